"""GELU(tanh) backward with the bias gradient of the linear layer before it, in one pass.

In the DiT MLP, z = fc1(h) and g = GELU_tanh(z). Autograd's backward reads z and dg to write
dz = GELU'(z) * dg, then fc1's bias gradient reads dz again (a column sum over the N*T rows, a separate
reduction kernel). At DiT-XL/2 (batch 128, bf16) dz is 32768 x 4608: the second read is 0.3 GB per block.
`gelu_tanh_bwd(z, dg)` writes dz and the fp32 per-tile column sums of dz in the same pass (reduced once
by the launcher), and optionally g = GELU_tanh(z) as well, for an MLP that recomputes g in the backward
(then z is read once for both).

Formula (torch's, in fp32; k0 = sqrt(2/pi), k1 = 0.044715):
    u = k0 * (z + k1 z^3),  t = tanh(u)
    g  = 0.5 z (1 + t)
    dz = dg * (0.5 (1 + t) + 0.5 z (1 - t^2) k0 (1 + 3 k1 z^2))
tanh is computed as 1 - 2 / (exp(2u) + 1) with u clamped to [-15, 15] (Triton has no tanh primitive on
every version); it agrees with CUDA's tanhf to a few fp32 ulps, below the bf16 rounding of the outputs.

Shapes: z, dg (M, C), any strides; dz (and g) come back contiguous in z's dtype, db (C,) in fp32
(the caller casts). Raises TypeError/ValueError like the other fastdit kernels (kernels/_common.py).
"""
# No `from __future__ import annotations`: the interpreter of old triton finds tl.constexpr only
# through annotation objects.

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import alloc, alloc_out, check_tensor, column_sums_once, column_tiles, device_reason, finish

K0 = 0.7978845608028654     # sqrt(2 / pi)
K1 = 0.044715


@triton.jit
def tanh_u(z):
    # tanh(u), u = K0 (z + K1 z^3): GELU_tanh(z) = 0.5 z (1 + tanh(u)); tanh as the docstring says. (z^2 is not
    # shared with gelu_tanh_grad: a z^2 tile kept live across exp costs a GEMM epilogue its registers.)
    u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
    u = tl.minimum(tl.maximum(u, -15.0), 15.0)           # tanh(+-15) is +-1 in fp32; keeps exp finite
    return 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)


@triton.jit
def gelu_tanh_grad(z, t):
    # GELU_tanh'(z) from t = tanh_u(z)
    return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * z * z)


@triton.jit
def _gelu_bwd_kernel(
    Z,                                  # (M, C) pre-activation
    stride_zm, stride_zc,               # strides of Z
    DG,                                 # (M, C) gradient of GELU's output
    stride_gm, stride_gc,               # strides of DG
    DZ,                                 # (M, C) contiguous output: gradient of Z
    G,                                  # (M, C) contiguous output: GELU(Z) (WRITE_G)
    DB_PART,                            # (n_row_tiles, C) fp32 output: per-tile column sums of DZ
    M,                                  # rows
    C,                                  # columns
    rows_per_tile,                      # = n_iters * BLOCK_M
    n_iters,                            # BLOCK_M-row steps per program
    WRITE_G: tl.constexpr,              # also write GELU(Z)
    BLOCK_M: tl.constexpr,              # rows per step
    BLOCK_C: tl.constexpr,              # columns per program
    REDUCE_ONCE: tl.constexpr,          # column sums: False ("step") sums each step's rows (a reduction across
                                        # warps inside the loop); True ("once") adds the steps' tiles up
                                        # element-wise and reduces once after the loop (_common.column_sums_once)
):
    col_tile = tl.program_id(0)
    row_tile = tl.program_id(1)
    c = col_tile * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    tile = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for it in range(0, n_iters):
        m = (row_tile * rows_per_tile + it * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        mask = (m < M)[:, None] & c_ok[None, :]
        z = tl.load(Z + m[:, None] * stride_zm + c[None, :] * stride_zc, mask=mask, other=0.0).to(tl.float32)
        dg = tl.load(DG + m[:, None] * stride_gm + c[None, :] * stride_gc, mask=mask, other=0.0).to(tl.float32)
        t = tanh_u(z)
        dz = dg * gelu_tanh_grad(z, t)
        dz = tl.where(mask, dz, 0.0)
        out = m[:, None] * C + c[None, :]
        tl.store(DZ + out, dz.to(DZ.dtype.element_ty), mask=mask)
        if WRITE_G:
            tl.store(G + out, (0.5 * z * (1.0 + t)).to(G.dtype.element_ty), mask=mask)
        if REDUCE_ONCE:
            tile += dz
        else:
            acc += tl.sum(dz, axis=0)
    if REDUCE_ONCE:
        acc = tl.sum(tile, axis=0)
    tl.store(DB_PART + row_tile * C + c, acc, mask=c_ok)


def gelu_tanh_bwd(z: torch.Tensor, dg: torch.Tensor, *, write_g: bool = False,
                  rows_per_tile: Optional[int] = None, block_m: int = 32, block_c: int = 128,
                  reduce_once: Optional[bool] = None) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """(dz, db, g): dz = GELU_tanh'(z) * dg (z's dtype), db = dz summed over rows (fp32, from the fp32
    values before rounding), g = GELU_tanh(z) when write_g else None. z, dg: (M, C) of one shape.
    `rows_per_tile` / `block_m` / `block_c` override the tiling (tests use them for edge tiles); `reduce_once`
    the column sums' accumulation (None: FASTDIT_COLUMN_SUMS, _common.column_sums_once)."""
    check_tensor("z", z, 2)
    check_tensor("dg", dg, 2)
    if dg.shape != z.shape:
        raise ValueError(f"dg has shape {tuple(dg.shape)}, z {tuple(z.shape)}")
    if dg.device != z.device:
        raise ValueError(f"dg is on {dg.device}, z on {z.device}")
    reason = device_reason(z.device)
    if reason:
        raise ValueError(reason)
    for name, v in (("block_m", block_m), ("block_c", block_c)):
        if v < 1 or v & (v - 1):
            raise ValueError(f"{name} must be a power of two, got {v}")
    m, c = z.shape
    dz = alloc_out((m, c), z.dtype, z.device)
    g = alloc_out((m, c), z.dtype, z.device) if write_g else None
    rows, n_iters, n_row_tiles = column_tiles(m, triton.cdiv(c, block_c), block_m, z.device, rows_per_tile)
    part = alloc((max(n_row_tiles, 1), c), torch.float32, z.device)
    if m * c > 0:
        _gelu_bwd_kernel[(triton.cdiv(c, block_c), n_row_tiles)](
            z, *z.stride(), dg, *dg.stride(), dz, g if g is not None else dz, part,
            m, c, rows, n_iters, WRITE_G=write_g, BLOCK_M=block_m, BLOCK_C=block_c,
            REDUCE_ONCE=column_sums_once() if reduce_once is None else bool(reduce_once), num_warps=4)
        db = part.sum(0)
    else:
        db = torch.zeros(c, dtype=torch.float32, device=z.device)
    return finish(dz, z.dtype), db, (finish(g, z.dtype) if g is not None else None)


def gelu_tanh_bwd_ref(z: torch.Tensor, dg: torch.Tensor, *, write_g: bool = False, **_
                      ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """The same three results from PyTorch ops (autograd's GELU backward, then the column sum)."""
    dz = torch.ops.aten.gelu_backward(dg, z, approximate="tanh")
    g = torch.nn.functional.gelu(z, approximate="tanh") if write_g else None
    return dz, dz.float().sum(0), g


# ----------------------------------------------------------------------------------------------
# torch.library op (traceable by torch.compile); the MLP's autograd function calls it in backward
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("fastdit::gelu_tanh_bwd", mutates_args=())
def _gelu_tanh_bwd_op(z: torch.Tensor, dg: torch.Tensor, write_g: bool
                      ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dz, db, g = gelu_tanh_bwd(z, dg, write_g=write_g)
    return dz, db, (g if g is not None else z.new_empty((0,)))


@_gelu_tanh_bwd_op.register_fake
def _(z, dg, write_g):
    m, c = z.shape
    g = torch.empty_like(z, memory_format=torch.contiguous_format) if write_g else z.new_empty((0,))
    return torch.empty_like(z, memory_format=torch.contiguous_format), z.new_empty((c,), dtype=torch.float32), g


def gelu_tanh_bwd_op(z: torch.Tensor, dg: torch.Tensor, *, write_g: bool = False):
    """gelu_tanh_bwd through the registered op: (dz, db fp32, g or None)."""
    dz, db, g = _gelu_tanh_bwd_op(z, dg, write_g)
    return dz, db, (g if write_g else None)
