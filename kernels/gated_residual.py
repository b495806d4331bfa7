"""Gated residual: out = x + gate * y.

x, y are (N, T, D); gate is (N, D), one vector per sample broadcast over the T tokens (DiT's
adaLN-Zero gates gate_msa / gate_mlp). Public op: `gated_residual(x, y, gate) -> x + gate[:, None] * y`;
backward dx, dy, dgate. (Its fusion with the next modulate + LayerNorm, the op the fast DiT runs, is
`gated_residual_modulate_layernorm` in modulate_layernorm.py: it shares that file's kernels.)

Layers: `@triton.jit` kernels, launchers on plain tensors, the torch.library ops
"fastdit::gated_residual_fwd/_bwd" with fake functions and autograd, and the plain PyTorch
`gated_residual_ref` the tests check against.

Numerics: loads upcast to fp32; dgate is an fp32 partial sum per tile of tokens, reduced once.
Dtypes: each input may be float32, bfloat16 or float16; the output takes PyTorch's promoted dtype
of (x, y, gate); each gradient has its input's dtype.
Any strides are taken. Raises TypeError/ValueError for the inputs listed in kernels/_common.py.
"""
# No `from __future__ import annotations` here: the interpreter of triton < 3.2 finds tl.constexpr
# parameters only through annotation objects, not strings.

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import (alloc, alloc_out, backward_op, check_rows, direct_dispatch, direct_function, finish,
                      launch_tile, loop_stages, promote, token_tiles)
from .tile_sums import tile_sums


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _gated_residual_fwd_kernel(
    X,                                  # (N, T, D) residual stream
    stride_xn, stride_xt, stride_xd,    # strides of X, in elements
    Y,                                  # (N, T, D) branch output
    stride_yn, stride_yt, stride_yd,    # strides of Y
    GATE,                               # (N, D) per-sample gate
    stride_gn, stride_gd,               # strides of GATE
    OUT,                                # (N, T, D) contiguous output X + GATE * Y
    T,                                  # tokens per sample
    D,                                  # hidden size
    BLOCK_T: tl.constexpr,              # tokens per program
    BLOCK_D: tl.constexpr,              # next power of two >= D
):
    pid_t = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)                      # (BLOCK_T,)
    d = tl.arange(0, BLOCK_D)                                        # (BLOCK_D,)
    d_ok = d < D
    mask = (t < T)[:, None] & d_ok[None, :]
    x = tl.load(X + n * stride_xn + t[:, None] * stride_xt + d[None, :] * stride_xd,
                mask=mask, other=0.0).to(tl.float32)
    y = tl.load(Y + n * stride_yn + t[:, None] * stride_yt + d[None, :] * stride_yd,
                mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(GATE + n * stride_gn + d * stride_gd, mask=d_ok, other=0.0).to(tl.float32)
    out = x + gate[None, :] * y
    tl.store(OUT + (n * T + t[:, None]) * D + d[None, :], out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _gated_residual_bwd_kernel(
    DOUT,                               # (N, T, D) gradient of the output
    stride_on, stride_ot, stride_od,    # strides of DOUT
    Y,                                  # (N, T, D) branch output saved by the forward
    stride_yn, stride_yt, stride_yd,    # strides of Y
    GATE,                               # (N, D) per-sample gate
    stride_gn, stride_gd,               # strides of GATE
    DY,                                 # (N, T, D) contiguous output: DOUT * GATE
    DGATE_PART,                         # (N, n_tiles, D) fp32 output: per-tile sums of DOUT * Y
    T,                                  # tokens per sample
    D,                                  # hidden size
    n_tiles,                            # token tiles per sample (grid axis 0)
    tokens_per_tile,                    # = n_iters * BLOCK_T
    n_iters,                            # BLOCK_T-row steps per program
    BLOCK_T: tl.constexpr,              # tokens per step
    BLOCK_D: tl.constexpr,              # next power of two >= D
    NUM_STAGES: tl.constexpr,           # token loop pipeline depth (1: plain loop; _common.loop_stages)
):
    tile = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    gate = tl.load(GATE + n * stride_gn + d * stride_gd, mask=d_ok, other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for it in tl.range(0, n_iters, num_stages=NUM_STAGES):
        t = tile * tokens_per_tile + it * BLOCK_T + tl.arange(0, BLOCK_T)
        mask = (t < T)[:, None] & d_ok[None, :]
        dout = tl.load(DOUT + n * stride_on + t[:, None] * stride_ot + d[None, :] * stride_od,
                       mask=mask, other=0.0).to(tl.float32)
        y = tl.load(Y + n * stride_yn + t[:, None] * stride_yt + d[None, :] * stride_yd,
                    mask=mask, other=0.0).to(tl.float32)
        tl.store(DY + (n * T + t[:, None]) * D + d[None, :],
                 (dout * gate[None, :]).to(DY.dtype.element_ty), mask=mask)
        acc += tl.sum(dout * y, axis=0)
    tl.store(DGATE_PART + (n * n_tiles + tile) * D + d, acc, mask=d_ok)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
def check_gated_residual(x, y, gate) -> None:
    """Raise TypeError/ValueError unless the gated residual kernels take these inputs."""
    check_rows("x", x, [("y", y, "NTD"), ("gate", gate, "ND")])


def gated_residual_fwd(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, *,
                       block_t: Optional[int] = None, num_warps: Optional[int] = None) -> torch.Tensor:
    """Launch the forward kernel: x + gate[:, None] * y in the promoted dtype of the three.

    `block_t` / `num_warps` override row_tile's tiling (None: the heuristic; tests and
    benchmarks/kernel_sweep.py use them).
    """
    check_gated_residual(x, y, gate)
    n, t, d = x.shape
    bt, block_d, num_warps = launch_tile(d, block_t, num_warps)
    out_dtype = promote(x.dtype, y.dtype, gate.dtype)
    out = alloc_out((n, t, d), out_dtype, x.device)
    if n * t > 0:
        _gated_residual_fwd_kernel[(triton.cdiv(t, bt), n)](
            x, *x.stride(), y, *y.stride(), gate, *gate.stride(), out, t, d,
            BLOCK_T=bt, BLOCK_D=block_d, num_warps=num_warps)
    return finish(out, out_dtype)


def gated_residual_bwd(dout: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, *,
                       tokens_per_tile: Optional[int] = None, block_t: Optional[int] = None,
                       num_warps: Optional[int] = None, num_stages: Optional[int] = None
                       ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Launch the backward kernel: (dy = dout * gate in y.dtype, dgate = sum_t dout * y in gate.dtype).

    (dx is dout itself.) dgate is reduced from fp32 per-tile partial sums.
    `tokens_per_tile` / `block_t` / `num_warps` override the tiling (None: the heuristics), `num_stages`
    the token loop's pipeline depth (None: 1, a plain loop).
    """
    check_rows("y", y, [("dout", dout, "NTD"), ("gate", gate, "ND")])
    n, t, d = y.shape
    bt, block_d, num_warps = launch_tile(d, block_t, num_warps)
    stages = loop_stages(num_stages)
    tok, n_iters, n_tiles = token_tiles(n, t, bt, y.device, tokens_per_tile)
    dy = alloc_out((n, t, d), y.dtype, y.device)
    part = alloc((1, n, max(n_tiles, 1), d), torch.float32, y.device)
    if n * t == 0:
        return finish(dy, y.dtype), torch.zeros(n, d, dtype=gate.dtype, device=y.device)
    _gated_residual_bwd_kernel[(n_tiles, n)](
        dout, *dout.stride(), y, *y.stride(), gate, *gate.stride(), dy, part,
        t, d, n_tiles, tok, n_iters, BLOCK_T=bt, BLOCK_D=block_d, NUM_STAGES=stages, num_warps=num_warps)
    return finish(dy, y.dtype), tile_sums(part, [gate.dtype])[0]


# ----------------------------------------------------------------------------------------------
# torch.library ops + autograd
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("fastdit::gated_residual_fwd", mutates_args=())
def _gated_residual_fwd_op(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    return gated_residual_fwd(x, y, gate)


@_gated_residual_fwd_op.register_fake
def _(x, y, gate):
    check_gated_residual(x, y, gate)
    return x.new_empty(x.shape, dtype=promote(x.dtype, y.dtype, gate.dtype))


@torch.library.custom_op("fastdit::gated_residual_bwd", mutates_args=())
def _gated_residual_bwd_op(dout: torch.Tensor, y: torch.Tensor, gate: torch.Tensor
               ) -> Tuple[torch.Tensor, torch.Tensor]:
    return gated_residual_bwd(dout, y, gate)


@_gated_residual_bwd_op.register_fake
def _(dout, y, gate):
    return (torch.empty_like(y, memory_format=torch.contiguous_format),
            gate.new_empty(gate.shape, dtype=gate.dtype))


def _gated_residual_setup(ctx, inputs, output):
    x, y, gate = inputs
    ctx.save_for_backward(y, gate)
    ctx.x_dtype = x.dtype


def _gated_residual_backward(ctx, dout):
    y, gate = ctx.saved_tensors
    dy, dgate = backward_op(ctx, _gated_residual_bwd_op)(dout, y, gate)
    return dout.to(ctx.x_dtype), dy, dgate


_gated_residual_fwd_op.register_autograd(_gated_residual_backward, setup_context=_gated_residual_setup)
_GatedResidualDirect = direct_function(_gated_residual_fwd_op, _gated_residual_setup, _gated_residual_backward)


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """out = x + gate[:, None] * y, fused. x, y (N, T, D); gate (N, D); any strides.

    Differentiable in x, y and gate. Raises TypeError/ValueError for inputs the kernel does not
    take (see kernels/_common.py).
    """
    check_gated_residual(x, y, gate)
    return (_GatedResidualDirect.apply if direct_dispatch() else _gated_residual_fwd_op)(x, y, gate)


def gated_residual_ref(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch: x + gate[:, None] * y."""
    return x + gate.unsqueeze(1) * y
