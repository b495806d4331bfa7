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

from ._common import (alloc, alloc_out, check_same_device, check_tensor, column_sums_once, column_tiles, finish,
                      promote, stride_unit)


@triton.jit
def _stack_one(G, s_n, s_h, s_t, s_d, OUT, n, t, h, d, mask, out_base):
    """Load one of dq/dk/dv at rows (n, t) x columns (h, d), store it into its dqkv slot, return the
    fp32 column sums of the tile (masked lanes read 0)."""
    g = tl.load(G + n[:, None, None] * s_n + t[:, None, None] * s_t + h[None, :, None] * s_h
                + d[None, None, :] * s_d, mask=mask, other=0.0)
    tl.store(OUT + out_base, g.to(OUT.dtype.element_ty), mask=mask)
    return tl.sum(g.to(tl.float32), axis=0)


@triton.jit
def _load_one(G, s_n, s_h, s_t, s_d, n, t, h, d, mask):
    """One of dq/dk/dv at rows (n, t) x columns (h, d) (masked lanes read 0)."""
    return tl.load(G + n[:, None, None] * s_n + t[:, None, None] * s_t + h[None, :, None] * s_h
                   + d[None, None, :] * s_d, mask=mask, other=0.0)


@triton.jit
def _step_rows(first, BLOCK_M: tl.constexpr, T, M, col_ok, col, row_len):
    """(n, t, mask, out offsets) of the BLOCK_M rows from row `first`, over the (head, hd) columns of a
    (BLOCK_H, BLOCK_HD) tile: sample and token of each row, the valid elements, and each element's place in the
    contiguous (rows, 3, H, hd) output (row_len = 3 * H * hd)."""
    r = (first + tl.arange(0, BLOCK_M)).to(tl.int64)
    n = r // T
    mask = (r < M)[:, None, None] & col_ok[None, :, :]
    return n, r - n * T, mask, r[:, None, None] * row_len + col[None, :, :]


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
    REDUCE_ONCE: tl.constexpr,          # column sums: False ("step") sums each step's rows (a reduction across
                                        # warps, barriers in the loop); True ("once") adds the tiles up
                                        # element-wise and reduces once after the loop (_common.column_sums_once)
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
    if REDUCE_ONCE:
        # Loads of the three inputs first, then the three stores (the compiler may not move a load past a
        # store that could alias it), and the sums as element-wise adds: no barrier inside the loop.
        tile_q = tl.zeros((BLOCK_M, BLOCK_H, BLOCK_HD), dtype=tl.float32)
        tile_k = tl.zeros((BLOCK_M, BLOCK_H, BLOCK_HD), dtype=tl.float32)
        tile_v = tl.zeros((BLOCK_M, BLOCK_H, BLOCK_HD), dtype=tl.float32)
        for it in range(0, n_iters):
            n, t, mask, base = _step_rows(row_tile * rows_per_tile + it * BLOCK_M, BLOCK_M, T, M, col_ok, col,
                                          3 * H * HD)
            gq = _load_one(DQ, sq_n, sq_h, sq_t, sq_d, n, t, h, d, mask)
            gk = _load_one(DK, sk_n, sk_h, sk_t, sk_d, n, t, h, d, mask)
            gv = _load_one(DV, sv_n, sv_h, sv_t, sv_d, n, t, h, d, mask)
            tl.store(OUT + base, gq.to(OUT.dtype.element_ty), mask=mask)
            tl.store(OUT + base + H * HD, gk.to(OUT.dtype.element_ty), mask=mask)
            tl.store(OUT + base + 2 * H * HD, gv.to(OUT.dtype.element_ty), mask=mask)
            tile_q += gq.to(tl.float32)
            tile_k += gk.to(tl.float32)
            tile_v += gv.to(tl.float32)
        acc_q = tl.sum(tile_q, axis=0)
        acc_k = tl.sum(tile_k, axis=0)
        acc_v = tl.sum(tile_v, axis=0)
    else:
        acc_q = tl.zeros((BLOCK_H, BLOCK_HD), dtype=tl.float32)
        acc_k = tl.zeros((BLOCK_H, BLOCK_HD), dtype=tl.float32)
        acc_v = tl.zeros((BLOCK_H, BLOCK_HD), dtype=tl.float32)
        for it in range(0, n_iters):
            n, t, mask, base = _step_rows(row_tile * rows_per_tile + it * BLOCK_M, BLOCK_M, T, M, col_ok, col,
                                          3 * H * HD)
            acc_q += _stack_one(DQ, sq_n, sq_h, sq_t, sq_d, OUT, n, t, h, d, mask, base)
            acc_k += _stack_one(DK, sk_n, sk_h, sk_t, sk_d, OUT, n, t, h, d, mask, base + H * HD)
            acc_v += _stack_one(DV, sv_n, sv_h, sv_t, sv_d, OUT, n, t, h, d, mask, base + 2 * H * HD)
    part = PART + row_tile * (3 * H * HD) + col
    tl.store(part, acc_q, mask=col_ok)
    tl.store(part + H * HD, acc_k, mask=col_ok)
    tl.store(part + 2 * H * HD, acc_v, mask=col_ok)


@triton.jit
def _stack_qkv_flat_kernel(
    DQ, sq_n, sq_t,                     # gradient of q, its (h, d) columns one contiguous run per (n, t) row
    DK, sk_n, sk_t,                     # the same for k
    DV, sv_n, sv_t,                     # the same for v
    OUT,                                # (N*T, 3, C) contiguous output: dqkv
    PART,                               # (n_row_tiles, 3, C) fp32 output: per-tile column sums
    T,                                  # tokens per sample
    M,                                  # rows = N * T
    rows_per_tile,                      # = n_iters * BLOCK_M
    n_iters,                            # BLOCK_M-row steps per program
    C: tl.constexpr,                    # columns per row of one of q/k/v: H * hd
    BLOCK_M: tl.constexpr,              # rows per step
    BLOCK_C: tl.constexpr,              # columns per program
    STRIDE_UNIT: tl.constexpr,          # the row strides are passed divided by this (see _stack_qkv_kernel)
):
    """FASTDIT_COLUMN_SUMS=once where each input's (h, d) columns form one contiguous run per row (strides
    s_h = hd, s_d = 1: the packed qkv views, and the (N, T, H, hd)-ordered gradients SDPA allocates for them):
    a plain 2-D tile of rows x columns, no head-dim padding, the three loads before the three stores, and the
    column sums accumulated element-wise, reduced once after the loop (no barrier inside it)."""
    sq_n, sq_t = sq_n * STRIDE_UNIT, sq_t * STRIDE_UNIT
    sk_n, sk_t = sk_n * STRIDE_UNIT, sk_t * STRIDE_UNIT
    sv_n, sv_t = sv_n * STRIDE_UNIT, sv_t * STRIDE_UNIT
    col_tile = tl.program_id(0)
    row_tile = tl.program_id(1)
    c = col_tile * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    tile_q = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    tile_k = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    tile_v = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for it in range(0, n_iters):
        r = (row_tile * rows_per_tile + it * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        n = r // T
        t = r - n * T
        mask = (r < M)[:, None] & c_ok[None, :]
        gq = tl.load(DQ + (n * sq_n + t * sq_t)[:, None] + c[None, :], mask=mask, other=0.0)
        gk = tl.load(DK + (n * sk_n + t * sk_t)[:, None] + c[None, :], mask=mask, other=0.0)
        gv = tl.load(DV + (n * sv_n + t * sv_t)[:, None] + c[None, :], mask=mask, other=0.0)
        base = r[:, None] * (3 * C) + c[None, :]
        tl.store(OUT + base, gq.to(OUT.dtype.element_ty), mask=mask)
        tl.store(OUT + base + C, gk.to(OUT.dtype.element_ty), mask=mask)
        tl.store(OUT + base + 2 * C, gv.to(OUT.dtype.element_ty), mask=mask)
        tile_q += gq.to(tl.float32)
        tile_k += gk.to(tl.float32)
        tile_v += gv.to(tl.float32)
    part = PART + row_tile * (3 * C) + c
    tl.store(part, tl.sum(tile_q, axis=0), mask=c_ok)
    tl.store(part + C, tl.sum(tile_k, axis=0), mask=c_ok)
    tl.store(part + 2 * C, tl.sum(tile_v, axis=0), mask=c_ok)


# The flat kernel's tile: 16 rows x 128 columns (2048 elements, 8 per thread at 8 warps: one 16-byte access per
# input per step, and 3 x 8 fp32 accumulators per thread).
FLAT_BLOCK_M = 16
FLAT_BLOCK_C = 128


def flat_columns(*grads: torch.Tensor) -> bool:
    """Whether each gradient's (h, d) columns are one contiguous run per (n, t) row: stride(3) == 1 and
    stride(1) == hd (or a single head)."""
    return all(g.stride(3) == 1 and (g.shape[1] == 1 or g.stride(1) == g.shape[3]) for g in grads)


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
                    rows_per_tile: Optional[int] = None, block_m: Optional[int] = None,
                    reduce_once: Optional[bool] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(dqkv, db): dqkv (N, T, 3, H, hd) contiguous with dqkv[:, :, 0] = dq.transpose(1, 2) etc., and
    db = dqkv summed over (N, T) as (3 * H * hd,) fp32 (from the same read). `rows_per_tile` / `block_m`
    override the tiling (tests use them for edge tiles); `reduce_once` the column sums' accumulation
    (None: FASTDIT_COLUMN_SUMS, _common.column_sums_once; with it, inputs whose (h, d) columns are contiguous
    per row take the flat kernel)."""
    check_qkv_grads(dq, dk, dv)
    n, h, t, hd = dq.shape
    dtype = promote(dq.dtype, dk.dtype, dv.dtype)
    once = column_sums_once() if reduce_once is None else bool(reduce_once)
    flat = once and flat_columns(dq, dk, dv)
    bm = block_m or (FLAT_BLOCK_M if flat else tile_shape(hd)[0])
    if bm < 1 or bm & (bm - 1):
        raise ValueError(f"block_m must be a power of two, got {bm}")
    m, cols = n * t, h * hd
    out = alloc_out((n, t, 3, h, hd), dtype, dq.device)
    if m * cols == 0:
        return finish(out, dtype), torch.zeros(3 * cols, dtype=torch.float32, device=dq.device)
    if flat:
        rows, n_iters, n_row_tiles = column_tiles(m, triton.cdiv(cols, FLAT_BLOCK_C), bm, dq.device, rows_per_tile)
        part = alloc((n_row_tiles, 3 * cols), torch.float32, dq.device)
        unit = stride_unit((dq, dk, dv), (0, 2))

        def row_strides(g):
            return g.stride(0) // unit, g.stride(2) // unit
        _stack_qkv_flat_kernel[(triton.cdiv(cols, FLAT_BLOCK_C), n_row_tiles)](
            dq, *row_strides(dq), dk, *row_strides(dk), dv, *row_strides(dv), out, part, t, m, rows, n_iters,
            C=cols, BLOCK_M=bm, BLOCK_C=FLAT_BLOCK_C, STRIDE_UNIT=unit, num_warps=8)
        return finish(out, dtype), part.sum(0)
    _, bh, bhd = tile_shape(hd)
    rows, n_iters, n_row_tiles = column_tiles(m, triton.cdiv(h, bh), bm, dq.device, rows_per_tile)
    part = alloc((n_row_tiles, 3 * cols), torch.float32, dq.device)
    unit = 8 if aligned(dq, dk, dv) else 1

    def strides(g):
        s_n, s_h, s_t, s_d = g.stride()
        return s_n // unit, s_h // unit, s_t // unit, s_d
    _stack_qkv_kernel[(triton.cdiv(h, bh), n_row_tiles)](
        dq, *strides(dq), dk, *strides(dk), dv, *strides(dv), out, part,
        t, m, rows, n_iters, H=h, HD=hd, BLOCK_M=bm, BLOCK_H=bh, BLOCK_HD=bhd, STRIDE_UNIT=unit,
        REDUCE_ONCE=once, num_warps=8)
    return finish(out, dtype), part.sum(0)


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
