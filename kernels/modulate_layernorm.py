"""adaLN modulate + LayerNorm in one pass, alone or fused with the gated residual before it.

Two public ops, one pair of kernels (the HAS_RESIDUAL flag tells them apart):

* `modulate_layernorm(x, shift, scale, eps) -> y = LayerNorm(x) * (1 + scale) + shift`
  (the first block's input and the final layer);
* `gated_residual_modulate_layernorm(x, y, gate, shift, scale, eps) -> (x', h)` with
  x' = x + gate * y and h = LayerNorm(x') * (1 + scale) + shift in one pass (the step between a
  block's attention and MLP halves, and from one block into the next); its backward takes the
  gradients of both outputs.

x, y are (N, T, D); shift, scale and gate are (N, D), one vector per sample broadcast over the T
tokens; the LayerNorm has no affine parameters and eps 1e-6, as in DiT's adaLN blocks.

Three layers, as in every fastdit kernel file:
1. `@triton.jit` kernels `_modln_fwd_kernel` / `_modln_bwd_kernel`.
2. Launchers `<op>_fwd` / `<op>_bwd` taking and returning plain tensors, checking their inputs.
3. torch.library ops "fastdit::<op>_fwd/_bwd" (`_<op>_fwd_op` ...) with fake (meta) functions and
   the autograd formula, so torch.compile(fullgraph=True) traces them; `<op>` is the public
   function and `<op>_ref` the plain PyTorch definition the tests check against.

Numerics: every load is upcast to fp32, the variance is the centred two-pass one (mean first, then
the mean of squared deviations, from the same register tile), and the (N, D) gradients dshift,
dscale and dgate are fp32 partial sums per tile of tokens, reduced once over the tiles. The fused
op normalises the rounded x' it stores (as the unfused LN(x + g*y) does).

Dtypes: each input may be float32, bfloat16 or float16 (mixed is allowed, as under autocast); y has
PyTorch's promoted dtype of (x, shift, scale), x' that of (x, y, gate) and h that of (x', shift,
scale); each gradient has its input's dtype.
Any strides are taken (e.g. shift/scale as chunks of the (N, 6D) adaLN output, or x transposed).
Raises TypeError/ValueError for the inputs listed in kernels/_common.py.
"""
# No `from __future__ import annotations` here: the interpreter of triton < 3.2 finds tl.constexpr
# parameters only through annotation objects, not strings.

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import (alloc, alloc_out, backward_op, check_rows, direct_dispatch, direct_function, env_choice,
                      finish, launch_tile, loop_stages, promote, shared_memory_per_block, token_tiles)
from .gated_residual import gated_residual_ref
from .tile_sums import tile_sums


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _modln_fwd_kernel(
    X,                                  # (N, T, D) input rows; the residual stream when HAS_RESIDUAL
    stride_xn, stride_xt, stride_xd,    # strides of X, in elements
    Y,                                  # (N, T, D) branch output, added as X + GATE * Y (HAS_RESIDUAL)
    stride_yn, stride_yt, stride_yd,    # strides of Y (0 when unused)
    GATE,                               # (N, D) residual gate (HAS_RESIDUAL)
    stride_gn, stride_gd,               # strides of GATE (0 when unused)
    BIAS,                               # (D,) bias of the branch, added as X + GATE * (Y + BIAS) (HAS_BIAS)
    stride_bd,                          # stride of BIAS (0 when unused)
    SHIFT,                              # (N, D) adaLN shift
    stride_sn, stride_sd,               # strides of SHIFT
    SCALE,                              # (N, D) adaLN scale; rows are multiplied by (1 + SCALE)
    stride_cn, stride_cd,               # strides of SCALE
    RES,                                # (N, T, D) contiguous output X + GATE * Y (HAS_RESIDUAL)
    OUT,                                # (N, T, D) contiguous output LN(rows) * (1 + SCALE) + SHIFT
    MEAN,                               # (N * T,) fp32 output: mean of each normalised row
    RSTD,                               # (N * T,) fp32 output: 1 / sqrt(var + eps) of each row
    T,                                  # tokens per sample
    D,                                  # hidden size (row length)
    eps,                                # LayerNorm epsilon
    HAS_RESIDUAL: tl.constexpr,         # form rows as X + GATE * Y and store them to RES
    HAS_BIAS: tl.constexpr,             # add BIAS to Y first (HAS_RESIDUAL only)
    BLOCK_T: tl.constexpr,              # tokens per program
    BLOCK_D: tl.constexpr,              # next power of two >= D: one row per register tile row
):
    pid_t = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)                      # (BLOCK_T,)
    d = tl.arange(0, BLOCK_D)                                        # (BLOCK_D,)
    t_ok = t < T
    d_ok = d < D
    mask = t_ok[:, None] & d_ok[None, :]                             # (BLOCK_T, BLOCK_D)

    x = tl.load(X + n * stride_xn + t[:, None] * stride_xt + d[None, :] * stride_xd,
                mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        y = tl.load(Y + n * stride_yn + t[:, None] * stride_yt + d[None, :] * stride_yd,
                    mask=mask, other=0.0).to(tl.float32)
        gate = tl.load(GATE + n * stride_gn + d * stride_gd, mask=d_ok, other=0.0).to(tl.float32)
        if HAS_BIAS:
            y = y + tl.load(BIAS + d * stride_bd, mask=d_ok, other=0.0).to(tl.float32)[None, :]
        x = x + gate[None, :] * y
        res = x.to(RES.dtype.element_ty)
        tl.store(RES + (n * T + t[:, None]) * D + d[None, :], res, mask=mask)
        # Normalise the stored (rounded) residual, as the unfused x' = x + g*y; LN(x') would.
        x = res.to(tl.float32)

    mean = tl.sum(x, axis=1) / D                                     # (BLOCK_T,)
    xc = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / D                                # centred two-pass variance
    rstd = 1.0 / tl.sqrt(var + eps)

    shift = tl.load(SHIFT + n * stride_sn + d * stride_sd, mask=d_ok, other=0.0).to(tl.float32)
    scale = tl.load(SCALE + n * stride_cn + d * stride_cd, mask=d_ok, other=0.0).to(tl.float32)
    out = xc * rstd[:, None] * (1.0 + scale[None, :]) + shift[None, :]
    tl.store(OUT + (n * T + t[:, None]) * D + d[None, :], out.to(OUT.dtype.element_ty), mask=mask)
    tl.store(MEAN + n * T + t, mean, mask=t_ok)
    tl.store(RSTD + n * T + t, rstd, mask=t_ok)


@triton.jit
def _add_pair(a0, a1, b0, b1):
    # combine of a reduction over (x, y) pairs: both sums in one pass
    return a0 + b0, a1 + b1


@triton.jit
def _modln_bwd_kernel(
    DOUT,                               # (N, T, D) gradient of the modulated output
    stride_on, stride_ot, stride_od,    # strides of DOUT
    XN,                                 # (N, T, D) rows that were normalised (x, or x' = x + g*y)
    stride_xn, stride_xt, stride_xd,    # strides of XN
    SCALE,                              # (N, D) adaLN scale
    stride_cn, stride_cd,               # strides of SCALE
    MEAN,                               # (N * T,) fp32 row means saved by the forward
    RSTD,                               # (N * T,) fp32 row 1/std saved by the forward
    DRES,                               # (N, T, D) gradient arriving at x' from later use (HAS_DRES)
    stride_rn, stride_rt, stride_rd,    # strides of DRES (0 when unused)
    Y,                                  # (N, T, D) branch output of the residual (HAS_RESIDUAL)
    stride_yn, stride_yt, stride_yd,    # strides of Y (0 when unused)
    GATE,                               # (N, D) residual gate (HAS_RESIDUAL)
    stride_gn, stride_gd,               # strides of GATE (0 when unused)
    BIAS,                               # (D,) bias the forward added to Y (HAS_BIAS)
    stride_bd,                          # stride of BIAS (0 when unused)
    DX,                                 # (N, T, D) contiguous output: gradient of X (or of x)
    DY,                                 # (N, T, D) contiguous output: gradient of Y (HAS_RESIDUAL)
    DSHIFT_PART,                        # (N, n_tiles, D) fp32 output: per-tile sums of DOUT
    DSCALE_PART,                        # (N, n_tiles, D) fp32 output: per-tile sums of DOUT * xhat
    DGATE_PART,                         # (N, n_tiles, D) fp32 output: per-tile sums of dx' * (Y + BIAS)
    DBIAS_PART,                         # (N, n_tiles, D) fp32 output: per-tile sums of dx' * GATE (HAS_BIAS)
    T,                                  # tokens per sample
    D,                                  # hidden size
    n_tiles,                            # token tiles per sample (grid axis 0)
    tokens_per_tile,                    # = n_iters * BLOCK_T
    n_iters,                            # BLOCK_T-row steps per program
    HAS_RESIDUAL: tl.constexpr,         # the forward formed x' = X + GATE * Y: also give DY, DGATE
    HAS_DRES: tl.constexpr,             # add DRES (gradient of the stored x') into the x' gradient
    HAS_BIAS: tl.constexpr,             # the forward added BIAS to Y: also give DBIAS
    BLOCK_T: tl.constexpr,              # tokens per step
    BLOCK_D: tl.constexpr,              # next power of two >= D
    NUM_STAGES: tl.constexpr,           # token loop pipeline depth (1: plain loop; _common.loop_stages)
    PAIRED_SUMS: tl.constexpr,          # the two row sums of the LN gradient in one reduction (row_sums_paired)
):
    tile = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    # The (N, D) vectors are held in registers across the loop, except with HAS_BIAS: its extra
    # accumulator would push the default tile past 128 registers per thread (one program per SM instead
    # of two on sm_90, see _sm90_check.py), so there they are re-read each step (L1 hits).
    if not HAS_BIAS:
        scale1 = 1.0 + tl.load(SCALE + n * stride_cn + d * stride_cd, mask=d_ok, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            gate = tl.load(GATE + n * stride_gn + d * stride_gd, mask=d_ok, other=0.0).to(tl.float32)
    acc_shift = tl.zeros((BLOCK_D,), dtype=tl.float32)
    acc_scale = tl.zeros((BLOCK_D,), dtype=tl.float32)
    acc_gate = tl.zeros((BLOCK_D,), dtype=tl.float32)
    acc_dxn = tl.zeros((BLOCK_D,), dtype=tl.float32)

    for it in tl.range(0, n_iters, num_stages=NUM_STAGES):
        t = tile * tokens_per_tile + it * BLOCK_T + tl.arange(0, BLOCK_T)   # (BLOCK_T,)
        t_ok = t < T
        mask = t_ok[:, None] & d_ok[None, :]
        dout = tl.load(DOUT + n * stride_on + t[:, None] * stride_ot + d[None, :] * stride_od,
                       mask=mask, other=0.0).to(tl.float32)
        xn = tl.load(XN + n * stride_xn + t[:, None] * stride_xt + d[None, :] * stride_xd,
                     mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + n * T + t, mask=t_ok, other=0.0)
        rstd = tl.load(RSTD + n * T + t, mask=t_ok, other=0.0)
        xhat = tl.where(mask, (xn - mean[:, None]) * rstd[:, None], 0.0)
        if HAS_BIAS:
            scale1 = 1.0 + tl.load(SCALE + n * stride_cn + d * stride_cd, mask=d_ok, other=0.0).to(tl.float32)
        g = dout * scale1[None, :]                                   # gradient of xhat
        if PAIRED_SUMS:
            s1, s2 = tl.reduce((g * xhat, g), 1, _add_pair)
            c1 = s1 / D
            c2 = s2 / D
        else:
            c1 = tl.sum(g * xhat, axis=1) / D
            c2 = tl.sum(g, axis=1) / D
        dxn = tl.where(mask, (g - c2[:, None] - xhat * c1[:, None]) * rstd[:, None], 0.0)
        acc_shift += tl.sum(dout, axis=0)
        acc_scale += tl.sum(dout * xhat, axis=0)
        if HAS_RESIDUAL:
            if HAS_DRES:
                dxn += tl.load(DRES + n * stride_rn + t[:, None] * stride_rt + d[None, :] * stride_rd,
                               mask=mask, other=0.0).to(tl.float32)
            y = tl.load(Y + n * stride_yn + t[:, None] * stride_yt + d[None, :] * stride_yd,
                        mask=mask, other=0.0).to(tl.float32)
            if HAS_BIAS:
                gate = tl.load(GATE + n * stride_gn + d * stride_gd, mask=d_ok, other=0.0).to(tl.float32)
            tl.store(DY + (n * T + t[:, None]) * D + d[None, :],
                     (dxn * gate[None, :]).to(DY.dtype.element_ty), mask=mask)
            acc_gate += tl.sum(dxn * y, axis=0)
            if HAS_BIAS:
                acc_dxn += tl.sum(dxn, axis=0)
        tl.store(DX + (n * T + t[:, None]) * D + d[None, :], dxn.to(DX.dtype.element_ty), mask=mask)

    part = (n * n_tiles + tile) * D + d
    tl.store(DSHIFT_PART + part, acc_shift, mask=d_ok)
    tl.store(DSCALE_PART + part, acc_scale, mask=d_ok)
    if HAS_RESIDUAL:
        if HAS_BIAS:
            # sum_t dx' * (y + b) = sum_t dx' * y + b * sum_t dx';  d(bias) = gate * sum_t dx'
            bias = tl.load(BIAS + d * stride_bd, mask=d_ok, other=0.0).to(tl.float32)
            gate = tl.load(GATE + n * stride_gn + d * stride_gd, mask=d_ok, other=0.0).to(tl.float32)
            acc_gate += bias * acc_dxn
            tl.store(DBIAS_PART + part, gate * acc_dxn, mask=d_ok)
        tl.store(DGATE_PART + part, acc_gate, mask=d_ok)


# ----------------------------------------------------------------------------------------------
# Launchers (plain tensors in, plain tensors out)
# ----------------------------------------------------------------------------------------------
def _strides3(t: Optional[torch.Tensor]):
    return tuple(t.stride()) if t is not None else (0, 0, 0)


def _strides2(t: Optional[torch.Tensor]):
    return tuple(t.stride()) if t is not None else (0, 0)


def check_modulate_layernorm(x, shift, scale) -> None:
    """Raise TypeError/ValueError unless modulate_layernorm's kernels take these inputs."""
    check_rows("x", x, [("shift", shift, "ND"), ("scale", scale, "ND")])


def check_gated_residual_modulate_layernorm(x, y, gate, shift, scale, bias=None) -> None:
    """Raise TypeError/ValueError unless the fused residual + modulate + LN kernels take these."""
    check_rows("x", x, [("y", y, "NTD"), ("gate", gate, "ND"), ("shift", shift, "ND"),
                        ("scale", scale, "ND")] + ([("bias", bias, "D")] if bias is not None else []))


def _launch_fwd(x, y, gate, shift, scale, eps: float, res_dtype, out_dtype, block_t=None,
                num_warps=None, bias=None):
    n, t, d = x.shape
    device = x.device
    bt, block_d, num_warps = launch_tile(d, block_t, num_warps)
    out = alloc_out((n, t, d), out_dtype, device)
    res = alloc_out((n, t, d), res_dtype, device) if y is not None else None
    mean = alloc((n * t,), torch.float32, device)
    rstd = alloc((n * t,), torch.float32, device)
    if n * t > 0:
        grid = (triton.cdiv(t, bt), n)
        _modln_fwd_kernel[grid](
            x, *x.stride(),
            y if y is not None else x, *_strides3(y),
            gate if gate is not None else shift, *_strides2(gate),
            bias if bias is not None else shift, bias.stride(0) if bias is not None else 0,
            shift, *shift.stride(),
            scale, *scale.stride(),
            res if res is not None else out, out, mean, rstd,
            t, d, float(eps),
            HAS_RESIDUAL=y is not None, HAS_BIAS=bias is not None, BLOCK_T=bt, BLOCK_D=block_d,
            num_warps=num_warps,
        )
    out = finish(out, out_dtype)
    res = finish(res, res_dtype) if res is not None else None
    return res, out, mean.view(n, t), rstd.view(n, t)


# How the backward reduces each row's two sums (sum of g * xhat and of g): "separate" (the default) as two
# reductions, each a round through shared memory with barriers when a row spans several warps (at D = 1152, every
# loop step: 4 barriers with triton 3.9, 6 with 3.6, the sm_90 report's loop_barriers); "paired" as one reduction
# of the pair (tl.reduce over a tuple): 3 with either. The same fp32 sums. Read at each call. Unmeasured.
ROW_SUMS_ENV = "FASTDIT_LN_ROW_SUMS"
ROW_SUMS_CHOICES = ("separate", "paired")


def row_sums_paired() -> bool:
    """Whether the LN backward reduces its two row sums as one pair (FASTDIT_LN_ROW_SUMS=paired)."""
    return env_choice(ROW_SUMS_ENV, ROW_SUMS_CHOICES) == "paired"


# The fused residual+LN backward's tiling where a GPU run measured one better than row_tile's: (BLOCK_T,
# num_warps, num_stages) by BLOCK_D, for 2-byte row tensors on sm_90 or newer with the shared memory its
# pipelined loop takes (3 stages of 4-row tiles: ~131 KB per program at BLOCK_D 2048, twice the 65.6 KB the
# sm_90 report gives at BLOCK_T 2; an H100 allows 227 KB, a consumer part ~99 KB). H100, DiT-XL/2 (N=128,
# T=256, D=1152, bf16): 0.197 ms against row_tile's bt2/w8 plain loop 0.2515 ms, 1.28x, best of 91 tilings
# (benchmarks/kernel_sweep.py; benchmarks/results/h100-2026-11-27-570862f/second_call/kernel_sweep.json).
# Other widths, dtypes and devices keep row_tile's tiling and a plain loop.
# With the branch's bias (model bias_fold, off by default) the same tiling since 2026-11-28 (before: row_tile's
# plain loop, 0.055 ms a call slower without the bias): the same four row tensors, one more per-tile sum; its
# sm_90 compile (triton 3.6) takes 147.6 KB of shared memory against 131.3 KB, 240 registers, no spills, one
# program per SM as without the bias (python -m fastdit.kernels._sm90_check). Unmeasured with the bias.
RESIDUAL_BWD_TILING = {2048: (4, 8, 3)}
RESIDUAL_BWD_SHARED_MEMORY = 140 * 1024     # bytes per program a device must allow for that tiling
RESIDUAL_BWD_SHARED_MEMORY_BIAS = 156 * 1024    # the same with the bias


def residual_bwd_tiling(d: int, itemsize: int, device: torch.device,
                        bias: bool = False) -> Optional[Tuple[int, int, int]]:
    """(BLOCK_T, num_warps, num_stages) of the fused residual+LN backward's measured default for rows of
    width `d` and `itemsize`-byte row tensors on `device` (`bias`: the op adds the branch's bias, whose
    tiling needs more shared memory), or None: row_tile's tiling, a plain loop."""
    tiling = RESIDUAL_BWD_TILING.get(triton.next_power_of_2(d))
    if tiling is None or itemsize != 2 or device.type != "cuda":
        return None
    if torch.cuda.get_device_capability(device)[0] < 9:
        return None
    smem = shared_memory_per_block(device)
    need = RESIDUAL_BWD_SHARED_MEMORY_BIAS if bias else RESIDUAL_BWD_SHARED_MEMORY
    return tiling if smem is not None and smem >= need else None


def _launch_bwd(dout, xn, scale, mean, rstd, dres, y, gate, dx_dtype, dy_dtype, mod_dtype,
                gate_dtype, tokens_per_tile=None, block_t=None, num_warps=None, bias=None, num_stages=None):
    n, t, d = xn.shape
    device = xn.device
    if y is not None and block_t is None and num_warps is None and num_stages is None:
        rows = [dout, xn, y] + ([dres] if dres is not None else [])
        tiling = residual_bwd_tiling(d, max(r.element_size() for r in rows), device, bias=bias is not None)
        if tiling is not None:
            block_t, num_warps, num_stages = tiling
    bt, block_d, num_warps = launch_tile(d, block_t, num_warps)
    stages = loop_stages(num_stages)
    tok, n_iters, n_tiles = token_tiles(n, t, bt, device, tokens_per_tile)
    dx = alloc_out((n, t, d), dx_dtype, device)
    dy = alloc_out((n, t, d), dy_dtype, device) if y is not None else None
    n_parts = (4 if bias is not None else 3) if y is not None else 2
    parts = alloc((n_parts, n, max(n_tiles, 1), d), torch.float32, device)     # one (N, tiles, D) per sum
    dtypes = [mod_dtype, mod_dtype] + ([gate_dtype] if y is not None else [])  # dshift, dscale (, dgate)
    if n * t > 0:
        _modln_bwd_kernel[(n_tiles, n)](
            dout, *dout.stride(),
            xn, *xn.stride(),
            scale, *scale.stride(),
            mean, rstd,
            dres if dres is not None else dout, *_strides3(dres),
            y if y is not None else dout, *_strides3(y),
            gate if gate is not None else scale, *_strides2(gate),
            bias if bias is not None else scale, bias.stride(0) if bias is not None else 0,
            dx, dy if dy is not None else dx,
            parts[0], parts[1], parts[min(2, n_parts - 1)], parts[n_parts - 1],
            t, d, n_tiles, tok, n_iters,
            HAS_RESIDUAL=y is not None, HAS_DRES=dres is not None, HAS_BIAS=bias is not None,
            BLOCK_T=bt, BLOCK_D=block_d, NUM_STAGES=stages, PAIRED_SUMS=row_sums_paired(), num_warps=num_warps,
        )
        # (N, D) each, reduced once over the tiles; d(bias) over samples and tiles
        sums = tile_sums(parts, dtypes)
        if bias is not None:
            sums.append(tile_sums(parts[3:4].view(1, 1, n * n_tiles, d), [bias.dtype])[0].view(d))
    else:
        sums = [torch.zeros(n, d, dtype=dt, device=device) for dt in dtypes]
        if bias is not None:
            sums.append(torch.zeros(d, dtype=bias.dtype, device=device))
    dshift, dscale = sums[0], sums[1]
    dgate = sums[2] if y is not None else None
    dbias = sums[3] if bias is not None else None
    dx = finish(dx, dx_dtype)
    dy = finish(dy, dy_dtype) if dy is not None else None
    return dx, dy, dgate, dshift, dscale, dbias


def modulate_layernorm_fwd(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                           eps: float = 1e-6, *, block_t: Optional[int] = None,
                           num_warps: Optional[int] = None
                           ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward kernel: (y (N, T, D), mean (N, T) fp32, rstd (N, T) fp32).

    y = LN(x) * (1 + scale) + shift in the promoted dtype of (x, shift, scale).
    `block_t` overrides the tokens per program (tests use it to cover tile edges), `num_warps`
    the warps per program (None: row_tile's heuristic; a power of two in 1..32 else).
    """
    check_modulate_layernorm(x, shift, scale)
    _, y, mean, rstd = _launch_fwd(x, None, None, shift, scale, eps, None,
                                   promote(x.dtype, shift.dtype, scale.dtype), block_t, num_warps)
    return y, mean, rstd


def modulate_layernorm_bwd(dy: torch.Tensor, x: torch.Tensor, scale: torch.Tensor,
                           mean: torch.Tensor, rstd: torch.Tensor, shift_dtype: torch.dtype,
                           *, tokens_per_tile: Optional[int] = None, block_t: Optional[int] = None,
                           num_warps: Optional[int] = None, num_stages: Optional[int] = None
                           ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward kernel: (dx in x.dtype, dshift in shift_dtype, dscale in scale.dtype).

    dshift = sum_t dy, dscale = sum_t dy * xhat (fp32 per-tile partials reduced once);
    dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) with g = dy * (1 + scale).
    `tokens_per_tile` / `block_t` / `num_warps` override the tiling (tests use them to cover tile
    edges; None: the heuristics of kernels/_common.py), `num_stages` the token loop's pipeline depth
    (None: 1, a plain loop).
    """
    check_rows("x", x, [("dy", dy, "NTD"), ("scale", scale, "ND")])
    dx, _, _, dshift, dscale, _ = _launch_bwd(dy, x, scale, mean, rstd, None, None, None, x.dtype,
                                           None, scale.dtype, None, tokens_per_tile, block_t,
                                           num_warps, num_stages=num_stages)
    return dx, dshift.to(shift_dtype), dscale


def gated_residual_modulate_layernorm_fwd(x, y, gate, shift, scale, eps: float = 1e-6, *,
                                          bias: Optional[torch.Tensor] = None,
                                          block_t: Optional[int] = None,
                                          num_warps: Optional[int] = None):
    """Launch the fused forward: (x' = x + gate * y, h = LN(x') * (1 + scale) + shift, mean, rstd).

    With `bias` (D,): x' = x + gate * (y + bias), the sum formed in fp32 (y is a linear layer's output
    without its bias; the bias gradient then comes from this op's backward).
    x' has the promoted dtype of (x, y, gate[, bias]), h that of (x', shift, scale).
    `block_t` / `num_warps` override row_tile's tiling (None: the heuristic).
    """
    check_gated_residual_modulate_layernorm(x, y, gate, shift, scale, bias)
    res_dtype = promote(x.dtype, y.dtype, gate.dtype, *((bias.dtype,) if bias is not None else ()))
    out_dtype = promote(res_dtype, shift.dtype, scale.dtype)
    return _launch_fwd(x, y, gate, shift, scale, eps, res_dtype, out_dtype, block_t, num_warps, bias)


def gated_residual_modulate_layernorm_bwd(dh, dxnew, xnew, y, gate, scale, mean, rstd,
                                          x_dtype: torch.dtype, shift_dtype: torch.dtype, *,
                                          bias: Optional[torch.Tensor] = None,
                                          tokens_per_tile: Optional[int] = None,
                                          block_t: Optional[int] = None,
                                          num_warps: Optional[int] = None,
                                          num_stages: Optional[int] = None):
    """Launch the fused backward: (dx, dy, dgate, dshift, dscale), each in its input's dtype, and
    dbias after them when the forward had a `bias` (pass the same one).

    dxnew (gradient reaching x' from its other uses) may be None. With dx' the total gradient of x':
    dx = dx', dy = dx' * gate, dgate = sum_t dx' * (y [+ bias]), dbias = sum_{n,t} dx' * gate
    (fp32 per-tile partials, reduced once).
    `tokens_per_tile` / `block_t` / `num_warps` override the tiling (None: the heuristics), `num_stages`
    the token loop's pipeline depth (None: 1, a plain loop). With all of block_t, num_warps and num_stages
    None, 2-byte rows on sm_90+ take the measured tiling of RESIDUAL_BWD_TILING where it has one for their
    width (with `bias` too, where the device has the shared memory it takes).
    """
    check_rows("x_new", xnew, [("dh", dh, "NTD"), ("y", y, "NTD"), ("gate", gate, "ND"),
                               ("scale", scale, "ND")]
               + ([("dx_new", dxnew, "NTD")] if dxnew is not None else [])
               + ([("bias", bias, "D")] if bias is not None else []))
    dx, dy, dgate, dshift, dscale, dbias = _launch_bwd(
        dh, xnew, scale, mean, rstd, dxnew, y, gate, x_dtype, y.dtype, scale.dtype, gate.dtype,
        tokens_per_tile, block_t, num_warps, bias, num_stages)
    out = (dx, dy, dgate, dshift.to(shift_dtype), dscale)
    return out if bias is None else out + (dbias,)


# ----------------------------------------------------------------------------------------------
# torch.library ops + autograd: modulate + LayerNorm
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("fastdit::modulate_layernorm_fwd", mutates_args=())
def _modulate_layernorm_fwd_op(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float
                               ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return modulate_layernorm_fwd(x, shift, scale, eps)


@_modulate_layernorm_fwd_op.register_fake
def _(x, shift, scale, eps):
    check_modulate_layernorm(x, shift, scale)
    n, t, d = x.shape
    y = x.new_empty((n, t, d), dtype=promote(x.dtype, shift.dtype, scale.dtype))
    return y, x.new_empty((n, t), dtype=torch.float32), x.new_empty((n, t), dtype=torch.float32)


@torch.library.custom_op("fastdit::modulate_layernorm_bwd", mutates_args=())
def _modulate_layernorm_bwd_op(dy: torch.Tensor, x: torch.Tensor, scale: torch.Tensor,
                               mean: torch.Tensor, rstd: torch.Tensor, shift_dtype: torch.dtype
                               ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return modulate_layernorm_bwd(dy, x, scale, mean, rstd, shift_dtype)


@_modulate_layernorm_bwd_op.register_fake
def _(dy, x, scale, mean, rstd, shift_dtype):
    n, _, d = x.shape
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            x.new_empty((n, d), dtype=shift_dtype), x.new_empty((n, d), dtype=scale.dtype))


def _modulate_layernorm_setup(ctx, inputs, output):
    x, shift, scale, eps = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, scale, mean, rstd)
    ctx.shift_dtype = shift.dtype
    ctx.mark_non_differentiable(mean, rstd)


def _modulate_layernorm_backward(ctx, dy, dmean, drstd):
    x, scale, mean, rstd = ctx.saved_tensors
    dx, dshift, dscale = backward_op(ctx, _modulate_layernorm_bwd_op)(dy, x, scale, mean, rstd, ctx.shift_dtype)
    return dx, dshift, dscale, None


_modulate_layernorm_fwd_op.register_autograd(_modulate_layernorm_backward,
                                             setup_context=_modulate_layernorm_setup)
_ModulateLayernormDirect = direct_function(_modulate_layernorm_fwd_op, _modulate_layernorm_setup,
                                           _modulate_layernorm_backward)


def modulate_layernorm(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                       eps: float = 1e-6) -> torch.Tensor:
    """y = LayerNorm(x, no affine, eps) * (1 + scale[:, None]) + shift[:, None], fused.

    x (N, T, D); shift, scale (N, D), any strides. Differentiable in x, shift and scale.
    Raises TypeError/ValueError for inputs the kernel does not take (see kernels/_common.py).
    """
    check_modulate_layernorm(x, shift, scale)
    fwd = _ModulateLayernormDirect.apply if direct_dispatch() else _modulate_layernorm_fwd_op
    y, _, _ = fwd(x, shift, scale, float(eps))
    return y


def modulate_layernorm_ref(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                           eps: float = 1e-6) -> torch.Tensor:
    """Plain PyTorch: LayerNorm(x, no affine, eps) * (1 + scale[:, None]) + shift[:, None]."""
    h = torch.nn.functional.layer_norm(x, x.shape[-1:], eps=eps)
    return h * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


# ----------------------------------------------------------------------------------------------
# torch.library ops + autograd: gated residual + modulate + LayerNorm (HAS_RESIDUAL)
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("fastdit::gated_residual_modulate_layernorm_fwd", mutates_args=())
def _gated_residual_modulate_layernorm_fwd_op(
        x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
        eps: float, bias: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return gated_residual_modulate_layernorm_fwd(x, y, gate, shift, scale, eps, bias=bias)


@_gated_residual_modulate_layernorm_fwd_op.register_fake
def _(x, y, gate, shift, scale, eps, bias):
    check_gated_residual_modulate_layernorm(x, y, gate, shift, scale, bias)
    n, t, _ = x.shape
    res_dtype = promote(x.dtype, y.dtype, gate.dtype, *((bias.dtype,) if bias is not None else ()))
    return (x.new_empty(x.shape, dtype=res_dtype),
            x.new_empty(x.shape, dtype=promote(res_dtype, shift.dtype, scale.dtype)),
            x.new_empty((n, t), dtype=torch.float32), x.new_empty((n, t), dtype=torch.float32))


@torch.library.custom_op("fastdit::gated_residual_modulate_layernorm_bwd", mutates_args=())
def _gated_residual_modulate_layernorm_bwd_op(
        dh: torch.Tensor, dxnew: Optional[torch.Tensor], xnew: torch.Tensor, y: torch.Tensor,
        gate: torch.Tensor, scale: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
        x_dtype: torch.dtype, shift_dtype: torch.dtype, bias: Optional[torch.Tensor]
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    grads = gated_residual_modulate_layernorm_bwd(dh, dxnew, xnew, y, gate, scale, mean, rstd,
                                                  x_dtype, shift_dtype, bias=bias)
    return grads if bias is not None else grads + (xnew.new_empty((0,)),)


@_gated_residual_modulate_layernorm_bwd_op.register_fake
def _(dh, dxnew, xnew, y, gate, scale, mean, rstd, x_dtype, shift_dtype, bias):
    n, _, d = xnew.shape
    return (xnew.new_empty(xnew.shape, dtype=x_dtype),
            xnew.new_empty(xnew.shape, dtype=y.dtype),
            xnew.new_empty((n, d), dtype=gate.dtype),
            xnew.new_empty((n, d), dtype=shift_dtype),
            xnew.new_empty((n, d), dtype=scale.dtype),
            xnew.new_empty((d,), dtype=bias.dtype) if bias is not None else xnew.new_empty((0,)))


def _gated_residual_modulate_layernorm_setup(ctx, inputs, output):
    x, y, gate, shift, scale, eps, bias = inputs
    xnew, _, mean, rstd = output
    ctx.save_for_backward(xnew, y, gate, scale, mean, rstd, bias)
    ctx.x_dtype = x.dtype
    ctx.shift_dtype = shift.dtype
    ctx.mark_non_differentiable(mean, rstd)


def _gated_residual_modulate_layernorm_backward(ctx, dxnew, dh, dmean, drstd):
    xnew, y, gate, scale, mean, rstd, bias = ctx.saved_tensors
    dx, dy, dgate, dshift, dscale, dbias = backward_op(ctx, _gated_residual_modulate_layernorm_bwd_op)(
        dh, dxnew, xnew, y, gate, scale, mean, rstd, ctx.x_dtype, ctx.shift_dtype, bias)
    return dx, dy, dgate, dshift, dscale, None, (dbias if bias is not None else None)


_gated_residual_modulate_layernorm_fwd_op.register_autograd(
    _gated_residual_modulate_layernorm_backward, setup_context=_gated_residual_modulate_layernorm_setup)
_GatedResidualModulateLayernormDirect = direct_function(
    _gated_residual_modulate_layernorm_fwd_op, _gated_residual_modulate_layernorm_setup,
    _gated_residual_modulate_layernorm_backward)


def gated_residual_modulate_layernorm(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor,
                                      shift: torch.Tensor, scale: torch.Tensor,
                                      eps: float = 1e-6, bias: Optional[torch.Tensor] = None
                                      ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(x', h) with x' = x + gate[:, None] * y and h = LN(x') * (1 + scale) + shift, in one pass.

    x, y (N, T, D); gate, shift, scale (N, D); any strides. With `bias` (D,), x' = x + gate * (y + bias):
    y is then a linear layer's output without its bias, and the bias gradient comes from this op's
    backward pass (the column sum autograd would run over the linear's output gradient is not needed).
    Differentiable in every tensor input; the backward takes the gradients of both x' and h. Raises
    TypeError/ValueError for inputs the kernels do not take (see kernels/_common.py).
    """
    check_gated_residual_modulate_layernorm(x, y, gate, shift, scale, bias)
    fwd = (_GatedResidualModulateLayernormDirect.apply if direct_dispatch()
           else _gated_residual_modulate_layernorm_fwd_op)
    xnew, h, _, _ = fwd(x, y, gate, shift, scale, float(eps), bias)
    return xnew, h


def gated_residual_modulate_layernorm_ref(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor,
                                          shift: torch.Tensor, scale: torch.Tensor,
                                          eps: float = 1e-6, bias: Optional[torch.Tensor] = None
                                          ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch: x' = x + gate[:, None] * (y [+ bias]); h = LN(x') * (1 + scale) + shift."""
    xnew = gated_residual_ref(x, y + bias if bias is not None else y, gate)
    return xnew, modulate_layernorm_ref(xnew, shift, scale, eps)
