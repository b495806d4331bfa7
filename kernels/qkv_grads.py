"""The attention's input gradients stacked into the qkv projection's layout, with its bias gradient.

The DiT block's qkv projection writes qkv (N, T, 3, H, hd); attention reads q, k, v as strided
(N, H, T, hd) views of it and its backward returns dq, dk, dv. Autograd then needs dqkv in qkv's layout
for the projection's backward: one copy of the three (a stack), after which the bias gradient is a
column sum over the N*T rows of dqkv, a second full read (DiT-XL/2, batch 128, bf16: 226 MB per block).
`stack_qkv_grads(dq, dk, dv)` writes dqkv and the fp32 per-tile column sums in the same pass (reduced
once by the launcher): the bias gradient costs no extra read.

Shapes: dq, dk, dv (N, H, T, hd), one shape, any strides; dqkv comes back contiguous (N, T, 3, H, hd) in
their promoted dtype, db (3 * H * hd,) in fp32 (the caller casts), ordered as qkv's columns.
Raises TypeError/ValueError like the other fastdit kernels (kernels/_common.py).
"""
# No `from __future__ import annotations`: the interpreter of old triton finds tl.constexpr only
# through annotation objects.

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import (alloc, alloc_out, check_same_device, check_tensor, column_tiles, finish, promote,
                      stride_unit)


@triton.jit
def _stack_one(G, s_n, s_h, s_t, s_d, OUT, n, t, h, d, mask, out_base):
    """Load one of dq/dk/dv at rows (n, t) x columns (h, d), store it into its dqkv slot, return the
    fp32 column sums of the tile (masked lanes read 0)."""
    g = tl.load(G + n[:, None, None] * s_n + t[:, None, None] * s_t + h[None, :, None] * s_h
                + d[None, None, :] * s_d, mask=mask, other=0.0)
    tl.store(OUT + out_base, g.to(OUT.dtype.element_ty), mask=mask)
    return tl.sum(g.to(tl.float32), axis=0)


@triton.jit
def _stack_qkv_kernel(
    DQ, sq_n, sq_h, sq_t, sq_d,         # (N, H, T, hd) gradient of q and its strides, in elements
    DK, sk_n, sk_h, sk_t, sk_d,         # the same for k
    DV, sv_n, sv_h, sv_t, sv_d,         # the same for v
    OUT,                                # (N*T, 3, H, hd) contiguous output: dqkv
    PART,                               # (n_row_tiles, 3, H, hd) fp32 output: per-tile column sums
    T,                                  # tokens per sample
    M,                                  # rows = N * T
    rows_per_tile,                      # = n_iters * BLOCK_M
    n_iters,                            # BLOCK_M-row steps per program
    H: tl.constexpr,                    # heads
    HD: tl.constexpr,                   # head dim (a constexpr: the d < HD mask then keeps 16-byte accesses)
    BLOCK_M: tl.constexpr,              # rows per step
    BLOCK_H: tl.constexpr,              # heads per program
    BLOCK_HD: tl.constexpr,             # next power of two >= HD
    STRIDE_UNIT: tl.constexpr,          # the n, h, t strides are passed divided by this (8 when they are all
                                        # multiples of 8 and the inputs 16-byte aligned: multiplying them back
                                        # by a constant shows the compiler the alignment, so it emits 16-byte
                                        # loads; the JIT marks only multiples of 16, and DiT's hd = 72 is not)
):
    sq_n, sq_h, sq_t = sq_n * STRIDE_UNIT, sq_h * STRIDE_UNIT, sq_t * STRIDE_UNIT
    sk_n, sk_h, sk_t = sk_n * STRIDE_UNIT, sk_h * STRIDE_UNIT, sk_t * STRIDE_UNIT
    sv_n, sv_h, sv_t = sv_n * STRIDE_UNIT, sv_h * STRIDE_UNIT, sv_t * STRIDE_UNIT
    head_tile = tl.program_id(0)
    row_tile = tl.program_id(1)
    h = head_tile * BLOCK_H + tl.arange(0, BLOCK_H)                  # (BLOCK_H,)
    d = tl.arange(0, BLOCK_HD)                                       # (BLOCK_HD,)
    col_ok = (h < H)[:, None] & (d < HD)[None, :]                    # (BLOCK_H, BLOCK_HD)
    col = h[:, None] * HD + d[None, :]                               # column inside one of q/k/v
    acc_q = tl.zeros((BLOCK_H, BLOCK_HD), dtype=tl.float32)
    acc_k = tl.zeros((BLOCK_H, BLOCK_HD), dtype=tl.float32)
    acc_v = tl.zeros((BLOCK_H, BLOCK_HD), dtype=tl.float32)
    for it in range(0, n_iters):
        r = (row_tile * rows_per_tile + it * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        n = r // T
        t = r - n * T
        mask = (r < M)[:, None, None] & col_ok[None, :, :]
        base = r[:, None, None] * (3 * H * HD) + col[None, :, :]
        acc_q += _stack_one(DQ, sq_n, sq_h, sq_t, sq_d, OUT, n, t, h, d, mask, base)
        acc_k += _stack_one(DK, sk_n, sk_h, sk_t, sk_d, OUT, n, t, h, d, mask, base + H * HD)
        acc_v += _stack_one(DV, sv_n, sv_h, sv_t, sv_d, OUT, n, t, h, d, mask, base + 2 * H * HD)
    part = PART + row_tile * (3 * H * HD) + col
    tl.store(part, acc_q, mask=col_ok)
    tl.store(part + H * HD, acc_k, mask=col_ok)
    tl.store(part + 2 * H * HD, acc_v, mask=col_ok)


def tile_shape(hd: int) -> Tuple[int, int, int]:
    """(BLOCK_M, BLOCK_H, BLOCK_HD) for head dim hd: a ~4096-element tile (16 values per thread at 8 warps)."""
    block_hd = triton.next_power_of_2(hd)
    block_h = max(1, min(4, 512 // block_hd))
    return max(1, 4096 // (block_hd * block_h)), block_h, block_hd


def aligned(*grads: torch.Tensor) -> bool:
    """Whether each gradient has unit stride along hd and hd a multiple of 8, and its other strides take the
    stride unit 8 (_common.stride_unit: multiples of 8 elements, a 16-byte aligned start), so every 8-element
    run the kernel reads is one 16-byte load."""
    return all(g.stride(3) == 1 and g.shape[3] % 8 == 0 for g in grads) and stride_unit(grads, (0, 1, 2)) == 8


def check_qkv_grads(dq, dk, dv) -> None:
    """Raise TypeError/ValueError unless stack_qkv_grads takes these."""
    for name, g in (("dq", dq), ("dk", dk), ("dv", dv)):
        check_tensor(name, g, 4)
    if not (dq.shape == dk.shape == dv.shape):
        raise ValueError(f"dq, dk, dv must have one shape (N, H, T, hd), got {tuple(dq.shape)}, "
                         f"{tuple(dk.shape)}, {tuple(dv.shape)}")
    check_same_device([("dq", dq), ("dk", dk), ("dv", dv)])


def stack_qkv_grads(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, *,
                    rows_per_tile: Optional[int] = None, block_m: Optional[int] = None
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(dqkv, db): dqkv (N, T, 3, H, hd) contiguous with dqkv[:, :, 0] = dq.transpose(1, 2) etc., and
    db = dqkv summed over (N, T) as (3 * H * hd,) fp32 (from the same read). `rows_per_tile` / `block_m`
    override the tiling (tests use them for edge tiles)."""
    check_qkv_grads(dq, dk, dv)
    n, h, t, hd = dq.shape
    dtype = promote(dq.dtype, dk.dtype, dv.dtype)
    bm, bh, bhd = tile_shape(hd)
    bm = block_m or bm
    if bm < 1 or bm & (bm - 1):
        raise ValueError(f"block_m must be a power of two, got {bm}")
    m = n * t
    out = alloc_out((n, t, 3, h, hd), dtype, dq.device)
    rows, n_iters, n_row_tiles = column_tiles(m, triton.cdiv(h, bh), bm, dq.device, rows_per_tile)
    part = alloc((max(n_row_tiles, 1), 3 * h * hd), torch.float32, dq.device)
    if m * h * hd > 0:
        unit = 8 if aligned(dq, dk, dv) else 1

        def strides(g):
            s_n, s_h, s_t, s_d = g.stride()
            return s_n // unit, s_h // unit, s_t // unit, s_d
        _stack_qkv_kernel[(triton.cdiv(h, bh), n_row_tiles)](
            dq, *strides(dq), dk, *strides(dk), dv, *strides(dv), out, part,
            t, m, rows, n_iters, H=h, HD=hd, BLOCK_M=bm, BLOCK_H=bh, BLOCK_HD=bhd, STRIDE_UNIT=unit,
            num_warps=8)
        db = part.sum(0)
    else:
        db = torch.zeros(3 * h * hd, dtype=torch.float32, device=dq.device)
    return finish(out, dtype), db


def stack_qkv_grads_ref(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, **_
                        ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The same two results from PyTorch ops (a stack, then the column sum)."""
    n, h, t, hd = dq.shape
    dqkv = torch.stack([g.transpose(1, 2) for g in (dq, dk, dv)], dim=2)   # (N, T, 3, H, hd), one copy
    return dqkv, dqkv.reshape(n * t, 3 * h * hd).float().sum(0)


# ----------------------------------------------------------------------------------------------
# torch.library op (opcheck-able, traceable); the attention's autograd function calls it in backward
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("fastdit::stack_qkv_grads", mutates_args=())
def _stack_qkv_grads_op(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    return stack_qkv_grads(dq, dk, dv)


@_stack_qkv_grads_op.register_fake
def _(dq, dk, dv):
    check_qkv_grads(dq, dk, dv)
    n, h, t, hd = dq.shape
    return (dq.new_empty((n, t, 3, h, hd), dtype=promote(dq.dtype, dk.dtype, dv.dtype)),
            dq.new_empty((3 * h * hd,), dtype=torch.float32))


def stack_qkv_grads_op(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """stack_qkv_grads through the registered op: (dqkv, db fp32)."""
    return _stack_qkv_grads_op(dq, dk, dv)
