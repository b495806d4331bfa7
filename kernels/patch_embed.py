"""Patch embedding as a patch-gathering GEMM: (N, C, H, W) -> (N, T, D) with bias and pos_embed.

Equal to DiT's x_embedder followed by the position add:
    Conv2d(C, D, kernel_size=p, stride=p)(x).flatten(2).transpose(1, 2) + pos_embed
Token m = (image n, patch row r, patch column c) with t = r * (W / p) + c; the GEMM's K axis runs
over one patch, k = channel * p * p + i * p + j, which is the order of weight.reshape(D, C * p * p),
so the Conv2d weight (D, C, p, p) is read in place through its strides.

Kernels:
* forward: out[m, d] = sum_k x_patch[m, k] * weight[d, k] + bias[d] + pos_embed[t, d]; the
  (BLOCK_M, BLOCK_K) patch tile is gathered from x's strides inside the kernel; bias and pos_embed
  are added in the epilogue.
* backward dweight / dbias: dW[d, k] = sum_m dout[m, d] * x_patch[m, k], db[d] = sum_m dout[m, d];
  the M axis is split across programs that write fp32 partial sums, reduced once.
* backward dx: dx_patch[m, k] = sum_d dout[m, d] * weight[d, k], scattered back into (N, C, H, W)
  (patches do not overlap, so each element of dx is written exactly once).

FASTDIT_PATCH_EMBED_BWD=gemm computes the same backward with library GEMMs instead (patch_embed_bwd_gemm;
fp32 then follows torch's matmul precision setting).

pos_embed is treated as a constant (DiT's fixed sin-cos table, requires_grad=False); if it does
require grad, its gradient (the sum of dout over the batch) is computed in PyTorch.

Dtypes: x, weight and bias share one dtype (float32, bfloat16 or float16; TypeError otherwise, as
Conv2d); pos_embed may have any of those dtypes and the output has the promoted dtype of x and
pos_embed (as `conv(x) + pos_embed` would). fp32 GEMMs use IEEE fp32 products (no TF32).
Raises ValueError for a bad rank/shape, a patch size that does not divide H and W, or mixed devices.
"""
# No `from __future__ import annotations` here: the interpreter of triton < 3.2 finds tl.constexpr
# parameters only through annotation objects, not strings.

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import (INTERPRETED, alloc, alloc_out, backward_op, check_same_device, check_tensor, direct_dispatch,
                      direct_function, env_choice, finish, num_sms, promote)


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _patch_embed_fwd_kernel(
    X,                                          # (N, C, H, W) images
    stride_xn, stride_xc, stride_xh, stride_xw,  # strides of X, in elements
    WT,                                         # (D, C, P, P) Conv2d weight
    stride_wd, stride_wc, stride_wh, stride_ww,  # strides of WT
    BIAS,                                       # (D,) bias (HAS_BIAS)
    stride_b,                                   # stride of BIAS
    POS,                                        # (T, D) position table (HAS_POS)
    stride_pt, stride_pd,                       # strides of POS
    OUT,                                        # (M, D) contiguous output, M = N * T
    M,                                          # tokens in the batch, N * T
    D,                                          # hidden size (GEMM N axis)
    K,                                          # patch length C * P * P (GEMM K axis)
    T,                                          # tokens per image
    GW,                                         # patches per image row, W // P
    P: tl.constexpr,                            # patch size
    HAS_BIAS: tl.constexpr,                     # add BIAS in the epilogue
    HAS_POS: tl.constexpr,                      # add POS[t] in the epilogue
    UPCAST: tl.constexpr,                       # cast dot operands to fp32 (interpreter)
    DOT_PRECISION: tl.constexpr,                # "ieee" for fp32 operands, "tf32" (unused) else
    BLOCK_M: tl.constexpr,                      # tokens per program
    BLOCK_N: tl.constexpr,                      # hidden units per program
    BLOCK_K: tl.constexpr,                      # patch elements per step
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)                      # (BLOCK_M,) token ids
    m_ok = m < M
    img = m // T
    tok = m % T
    row_base = img.to(tl.int64) * stride_xn + (tok // GW) * P * stride_xh + (tok % GW) * P * stride_xw
    dd = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)                     # (BLOCK_N,) hidden ids
    d_ok = dd < D

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)                               # (BLOCK_K,) patch element ids
        k_ok = k < K
        c = k // (P * P)
        i = (k % (P * P)) // P
        j = k % P
        a = tl.load(X + row_base[:, None] + (c * stride_xc + i * stride_xh + j * stride_xw)[None, :],
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_K)
        w = tl.load(WT + dd[None, :] * stride_wd + (c * stride_wc + i * stride_wh + j * stride_ww)[:, None],
                    mask=k_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_K, BLOCK_N)
        if UPCAST:
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc += tl.dot(a, w, input_precision=DOT_PRECISION)

    if HAS_BIAS:
        acc += tl.load(BIAS + dd * stride_b, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    mask = m_ok[:, None] & d_ok[None, :]
    if HAS_POS:
        acc += tl.load(POS + tok[:, None] * stride_pt + dd[None, :] * stride_pd,
                       mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + m[:, None].to(tl.int64) * D + dd[None, :], acc.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _patch_embed_dw_kernel(
    DOUT,                                       # (N, T, D) gradient of the output
    stride_on, stride_ot, stride_od,            # strides of DOUT
    X,                                          # (N, C, H, W) images saved by the forward
    stride_xn, stride_xc, stride_xh, stride_xw,  # strides of X
    DW_PART,                                    # (SPLIT, D, K) fp32 output: partial dW over row splits
    DB_PART,                                    # (SPLIT, D) fp32 output: partial dbias (HAS_BIAS)
    M,                                          # tokens in the batch, N * T
    D,                                          # hidden size
    K,                                          # patch length C * P * P
    T,                                          # tokens per image
    GW,                                         # patches per image row
    rows_per_split,                             # tokens per split (a multiple of BLOCK_M)
    P: tl.constexpr,                            # patch size
    HAS_BIAS: tl.constexpr,                     # also sum DOUT into DB_PART (programs with pid_k 0)
    UPCAST: tl.constexpr,                       # cast dot operands to fp32 (interpreter)
    DOT_PRECISION: tl.constexpr,                # "ieee" for fp32 operands
    BLOCK_M: tl.constexpr,                      # tokens per step
    BLOCK_N: tl.constexpr,                      # hidden units per program
    BLOCK_K: tl.constexpr,                      # patch elements per program
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    split = tl.program_id(2)
    dd = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    d_ok = dd < D
    k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = k < K
    col_off = (k // (P * P)) * stride_xc + ((k % (P * P)) // P) * stride_xh + (k % P) * stride_xw

    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_N,), dtype=tl.float32)
    start = split * rows_per_split
    for m0 in range(start, start + rows_per_split, BLOCK_M):
        m = m0 + tl.arange(0, BLOCK_M)
        m_ok = m < M
        img = (m // T).to(tl.int64)
        tok = m % T
        g = tl.load(DOUT + img[:, None] * stride_on + tok[:, None] * stride_ot + dd[None, :] * stride_od,
                    mask=m_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_N)
        row_base = img * stride_xn + (tok // GW) * P * stride_xh + (tok % GW) * P * stride_xw
        a = tl.load(X + row_base[:, None] + col_off[None, :],
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_K)
        if HAS_BIAS:
            acc_b += tl.sum(g.to(tl.float32), axis=0)
        if UPCAST:
            g = g.to(tl.float32)
            a = a.to(tl.float32)
        else:
            g = g.to(a.dtype)
        acc += tl.dot(tl.trans(g), a, input_precision=DOT_PRECISION)

    tl.store(DW_PART + (split.to(tl.int64) * D + dd[:, None]) * K + k[None, :], acc,
             mask=d_ok[:, None] & k_ok[None, :])
    if HAS_BIAS:
        if pid_k == 0:
            tl.store(DB_PART + split.to(tl.int64) * D + dd, acc_b, mask=d_ok)


@triton.jit
def _patch_embed_dx_kernel(
    DOUT,                                       # (N, T, D) gradient of the output
    stride_on, stride_ot, stride_od,            # strides of DOUT
    WT,                                         # (D, C, P, P) Conv2d weight
    stride_wd, stride_wc, stride_wh, stride_ww,  # strides of WT
    DX,                                         # (N, C, H, W) output: gradient of the images
    stride_xn, stride_xc, stride_xh, stride_xw,  # strides of DX
    M,                                          # tokens in the batch, N * T
    D,                                          # hidden size (GEMM K axis here)
    K,                                          # patch length C * P * P
    T,                                          # tokens per image
    GW,                                         # patches per image row
    P: tl.constexpr,                            # patch size
    UPCAST: tl.constexpr,                       # cast dot operands to fp32 (interpreter)
    DOT_PRECISION: tl.constexpr,                # "ieee" for fp32 operands
    BLOCK_M: tl.constexpr,                      # tokens per program
    BLOCK_N: tl.constexpr,                      # hidden units per step
    BLOCK_K: tl.constexpr,                      # patch elements per program
):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = m < M
    img = (m // T).to(tl.int64)
    tok = m % T
    k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = k < K
    c = k // (P * P)
    i = (k % (P * P)) // P
    j = k % P

    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_N):
        dd = d0 + tl.arange(0, BLOCK_N)
        d_ok = dd < D
        g = tl.load(DOUT + img[:, None] * stride_on + tok[:, None] * stride_ot + dd[None, :] * stride_od,
                    mask=m_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_N)
        w = tl.load(WT + dd[:, None] * stride_wd + (c * stride_wc + i * stride_wh + j * stride_ww)[None, :],
                    mask=d_ok[:, None] & k_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_K)
        if UPCAST:
            g = g.to(tl.float32)
            w = w.to(tl.float32)
        else:
            g = g.to(w.dtype)
        acc += tl.dot(g, w, input_precision=DOT_PRECISION)

    row_base = img * stride_xn + (tok // GW) * P * stride_xh + (tok % GW) * P * stride_xw
    col_off = c * stride_xc + i * stride_xh + j * stride_xw
    tl.store(DX + row_base[:, None] + col_off[None, :], acc.to(DX.dtype.element_ty),
             mask=m_ok[:, None] & k_ok[None, :])


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
def _pos_table(pos_embed: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """pos_embed (1, T, D) or (T, D) as a (T, D) view."""
    if pos_embed is None:
        return None
    return pos_embed[0] if pos_embed.dim() == 3 else pos_embed


def check_patch_embed(x, weight, bias, pos_embed, patch_size) -> None:
    """Raise TypeError/ValueError unless the patch-embedding kernels take these inputs."""
    check_tensor("x", x, 4)
    check_tensor("weight", weight, 4)
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f"patch_size must be a positive int, got {patch_size!r}")
    n, c, h, w = x.shape
    p = patch_size
    d = weight.shape[0]
    if tuple(weight.shape[1:]) != (c, p, p):
        raise ValueError(f"weight must have shape (D, C, p, p) = (D, {c}, {p}, {p}) for x "
                         f"{tuple(x.shape)} and patch_size {p}, got {tuple(weight.shape)}")
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not divisible by patch_size {p}")
    if weight.dtype != x.dtype:
        raise TypeError(f"weight dtype {weight.dtype} differs from x dtype {x.dtype}")
    if d < 1:
        raise ValueError("weight has an empty output dimension")
    if bias is not None:
        check_tensor("bias", bias, 1)
        if bias.shape[0] != d:
            raise ValueError(f"bias must have shape ({d},), got {tuple(bias.shape)}")
        if bias.dtype != x.dtype:
            raise TypeError(f"bias dtype {bias.dtype} differs from x dtype {x.dtype}")
    if pos_embed is not None:
        t = (h // p) * (w // p)
        if not isinstance(pos_embed, torch.Tensor):
            raise TypeError(f"pos_embed must be a torch.Tensor or None, got {type(pos_embed).__name__}")
        check_tensor("pos_embed", pos_embed, pos_embed.dim() if pos_embed.dim() in (2, 3) else 3)
        want = (1, t, d) if pos_embed.dim() == 3 else (t, d)
        if tuple(pos_embed.shape) != want:
            raise ValueError(f"pos_embed must have shape (1, T, D) = {(1, t, d)} (or (T, D)), got "
                             f"{tuple(pos_embed.shape)}")
    check_same_device([("x", x), ("weight", weight), ("bias", bias), ("pos_embed", pos_embed)])


def _dot_flags(dtype: torch.dtype):
    """(UPCAST, DOT_PRECISION): fp32 operands use IEEE products; the interpreter upcasts bf16/fp16."""
    return INTERPRETED and dtype != torch.float32, ("ieee" if dtype == torch.float32 else "tf32")


def _block(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(n)))


# 8 warps for every patch_embed kernel: compiled for sm_90 at p = 2/4/8 these tiles keep the
# fp32 accumulator and gathered operands in registers without spills (see _sm90_check.py).
NUM_WARPS = 8


def fwd_blocks(d: int, k: int, dtype: torch.dtype = torch.bfloat16) -> Tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K) of the forward GEMM for hidden size d and patch length k.

    fp32 operands (IEEE products) take half the BLOCK_N: at 128 the sm_90 build spills.
    """
    return 64, _block(d, 16, 64 if dtype == torch.float32 else 128), _block(k, 16, 64)


def bwd_blocks(d: int, k: int) -> Tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K) of the dweight and dx GEMMs."""
    return 64, _block(d, 16, 64), _block(k, 16, 64)


def patch_embed_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                    pos_embed: Optional[torch.Tensor], patch_size: int, *,
                    blocks: Optional[Tuple[int, int, int]] = None) -> torch.Tensor:
    """Launch the forward GEMM: (N, T, D) = patches(x) @ weight^T + bias + pos_embed.

    `blocks` = (BLOCK_M, BLOCK_N, BLOCK_K) overrides the tile (tests use it to cover edges).
    """
    check_patch_embed(x, weight, bias, pos_embed, patch_size)
    n, c, h, w = x.shape
    p = patch_size
    d = weight.shape[0]
    gw = w // p
    t = (h // p) * gw
    m, k = n * t, c * p * p
    pos = _pos_table(pos_embed)
    out_dtype = promote(x.dtype, pos.dtype) if pos is not None else x.dtype
    out = alloc_out((n, t, d), out_dtype, x.device)
    if m == 0:
        return finish(out, out_dtype)
    bm, bn, bk = blocks or fwd_blocks(d, k, x.dtype)
    upcast, precision = _dot_flags(x.dtype)
    grid = (triton.cdiv(m, bm), triton.cdiv(d, bn))
    _patch_embed_fwd_kernel[grid](
        x, *x.stride(), weight, *weight.stride(),
        bias if bias is not None else weight, bias.stride(0) if bias is not None else 0,
        pos if pos is not None else weight, *(pos.stride() if pos is not None else (0, 0)),
        out, m, d, k, t, gw,
        P=p, HAS_BIAS=bias is not None, HAS_POS=pos is not None, UPCAST=upcast,
        DOT_PRECISION=precision, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=NUM_WARPS)
    return finish(out, out_dtype)


# Which code computes the backward: "triton" (the kernels above, the default) or "gemm" (the library's GEMMs
# on the patch rows: patch_embed_bwd_gemm). Read at each backward call.
BWD_ENV = "FASTDIT_PATCH_EMBED_BWD"
BWD_CHOICES = ("triton", "gemm")


def bwd_mode() -> str:
    """The patch_embed backward's implementation: FASTDIT_PATCH_EMBED_BWD, "triton" when unset."""
    return env_choice(BWD_ENV, BWD_CHOICES)


def _check_bwd(dout, x, weight, patch_size):
    """(n, c, h, w, p, d, t, m, k) of a backward call after its input checks."""
    check_patch_embed(x, weight, None, None, patch_size)
    n, c, h, w = x.shape
    p = patch_size
    d = weight.shape[0]
    t = (h // p) * (w // p)
    check_tensor("dout", dout, 3)
    if tuple(dout.shape) != (n, t, d):
        raise ValueError(f"dout must have shape {(n, t, d)}, got {tuple(dout.shape)}")
    check_same_device([("x", x), ("dout", dout)])
    return n, c, h, w, p, d, t, n * t, c * p * p


def patch_embed_bwd_gemm(dout: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, patch_size: int,
                         has_bias: bool = True, need_dx: bool = True
                         ) -> Tuple[Optional[torch.Tensor], torch.Tensor, Optional[torch.Tensor]]:
    """patch_embed_bwd's results from library GEMMs (cuBLAS on CUDA) instead of the Triton kernels.

    dweight and dbias come from one GEMM, dout^T (D, M) @ A (M, K'), where A holds each token's patch row
    (x gathered once, k = channel * p * p + i * p + j) and, for the bias, a column of ones, zero-padded to
    K' = a multiple of 8 (16-byte rows): dout is read once for both. dx is dout (M, D) @ weight (D, K),
    then folded back into (N, C, H, W) (patches do not overlap: a permuted copy). dout is cast to x's dtype
    first, as the kernels do; the GEMMs accumulate in fp32 and round once.
    """
    n, c, h, w, p, d, t, m, k = _check_bwd(dout, x, weight, patch_size)
    gh, gw = h // p, w // p
    if m == 0:
        dw = torch.zeros(d, c, p, p, dtype=weight.dtype, device=x.device)
        db = torch.zeros(d, dtype=weight.dtype, device=x.device) if has_bias else None
        return (torch.zeros_like(x) if need_dx else None), dw, db
    g = dout.to(x.dtype).reshape(m, d)                                  # (M, D), a view when contiguous
    width = -(-(k + int(has_bias)) // 8) * 8
    a = torch.empty(m, width, dtype=x.dtype, device=x.device)
    a[:, :k].view(n, gh, gw, c, p, p).copy_(x.reshape(n, c, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5))
    if width > k:
        a[:, k:].zero_()
        if has_bias:
            a[:, k].fill_(1)
    dwb = g.t().mm(a)                                                   # (D, K'): [dW | db | 0]
    # Separate tensors (a custom op's outputs may not alias each other): copies of the strided columns.
    dw = dwb[:, :k].contiguous().view(d, c, p, p).to(weight.dtype)
    db = dwb[:, k].contiguous().to(weight.dtype) if has_bias else None
    dx = None
    if need_dx:
        rows = g.mm(weight.reshape(d, k))                               # (M, K)
        dx = rows.view(n, gh, gw, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(n, c, h, w).to(x.dtype)
    return dx, dw, db


def patch_embed_bwd(dout: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, patch_size: int,
                    has_bias: bool = True, need_dx: bool = True, *,
                    blocks: Optional[Tuple[int, int, int]] = None, split: Optional[int] = None,
                    mode: Optional[str] = None
                    ) -> Tuple[Optional[torch.Tensor], torch.Tensor, Optional[torch.Tensor]]:
    """Launch the backward GEMMs: (dx (N, C, H, W) or None, dweight (D, C, p, p), dbias (D,) or None).

    dweight and dbias are reduced from fp32 partial sums over `split` slices of the N*T tokens.
    `blocks` = (BLOCK_M, BLOCK_N, BLOCK_K) and `split` override the tiling (for tests). `mode` "gemm" (default:
    FASTDIT_PATCH_EMBED_BWD, else "triton") computes the same with library GEMMs (patch_embed_bwd_gemm).
    """
    mode = bwd_mode() if mode is None else mode
    if mode not in BWD_CHOICES:
        raise ValueError(f"mode must be one of {BWD_CHOICES}, got {mode!r}")
    if mode == "gemm":
        return patch_embed_bwd_gemm(dout, x, weight, patch_size, has_bias, need_dx)
    n, c, h, w, p, d, t, m, k = _check_bwd(dout, x, weight, patch_size)
    gw = w // p
    upcast, precision = _dot_flags(x.dtype)
    bm, bn, bk = blocks or bwd_blocks(d, k)
    tiles_nk = triton.cdiv(d, bn) * triton.cdiv(k, bk)
    m_blocks = max(1, triton.cdiv(m, bm))
    if split is None:
        split = max(1, min(m_blocks, triton.cdiv(2 * num_sms(x.device), tiles_nk)))
    split = max(1, min(split, m_blocks))
    rows_per_split = triton.cdiv(m_blocks, split) * bm
    split = triton.cdiv(max(m, 1), rows_per_split)

    dw_part = alloc((split, d, k), torch.float32, x.device)
    db_part = alloc((split, d), torch.float32, x.device) if has_bias else None
    dx = alloc_out((n, c, h, w), x.dtype, x.device) if need_dx else None
    if m == 0:
        dw = torch.zeros(d, c, p, p, dtype=weight.dtype, device=x.device)
        db = torch.zeros(d, dtype=weight.dtype, device=x.device) if has_bias else None
        return (torch.zeros_like(x) if need_dx else None), dw, db
    _patch_embed_dw_kernel[(triton.cdiv(d, bn), triton.cdiv(k, bk), split)](
        dout, *dout.stride(), x, *x.stride(), dw_part, db_part if has_bias else dw_part,
        m, d, k, t, gw, rows_per_split,
        P=p, HAS_BIAS=has_bias, UPCAST=upcast, DOT_PRECISION=precision,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=NUM_WARPS)
    dw = dw_part.sum(0).view(d, c, p, p).to(weight.dtype)
    db = db_part.sum(0).to(weight.dtype) if has_bias else None
    if need_dx:
        _patch_embed_dx_kernel[(triton.cdiv(m, bm), triton.cdiv(k, bk))](
            dout, *dout.stride(), weight, *weight.stride(), dx, *dx.stride(),
            m, d, k, t, gw,
            P=p, UPCAST=upcast, DOT_PRECISION=precision,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=NUM_WARPS)
        dx = finish(dx, x.dtype)
    return dx, dw, db


# ----------------------------------------------------------------------------------------------
# torch.library ops + autograd
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("fastdit::patch_embed_fwd", mutates_args=())
def _pe_fwd_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
               pos_embed: Optional[torch.Tensor], patch_size: int) -> torch.Tensor:
    return patch_embed_fwd(x, weight, bias, pos_embed, patch_size)


@_pe_fwd_op.register_fake
def _(x, weight, bias, pos_embed, patch_size):
    check_patch_embed(x, weight, bias, pos_embed, patch_size)
    n, _, h, w = x.shape
    t = (h // patch_size) * (w // patch_size)
    dtype = promote(x.dtype, pos_embed.dtype) if pos_embed is not None else x.dtype
    return x.new_empty((n, t, weight.shape[0]), dtype=dtype)


@torch.library.custom_op("fastdit::patch_embed_bwd", mutates_args=())
def _pe_bwd_op(dout: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, patch_size: int,
               has_bias: bool, need_dx: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, dw, db = patch_embed_bwd(dout, x, weight, patch_size, has_bias, need_dx)
    empty = x.new_empty((0,))
    return (dx if dx is not None else empty), dw, (db if db is not None else empty.clone())


@_pe_bwd_op.register_fake
def _(dout, x, weight, patch_size, has_bias, need_dx):
    dx = torch.empty_like(x, memory_format=torch.contiguous_format) if need_dx else x.new_empty((0,))
    db = weight.new_empty((weight.shape[0],)) if has_bias else x.new_empty((0,))
    return dx, torch.empty_like(weight, memory_format=torch.contiguous_format), db


def _pe_setup_context(ctx, inputs, output):
    x, weight, bias, pos_embed, patch_size = inputs
    ctx.save_for_backward(x, weight)
    ctx.patch_size = patch_size
    ctx.has_bias = bias is not None
    ctx.pos_shape = None if pos_embed is None else pos_embed.shape
    ctx.pos_dtype = None if pos_embed is None else pos_embed.dtype


def _pe_backward(ctx, dout):
    x, weight = ctx.saved_tensors
    need_dx = ctx.needs_input_grad[0]
    dx, dw, db = backward_op(ctx, _pe_bwd_op)(dout, x, weight, ctx.patch_size, ctx.has_bias, need_dx)
    dpos = None
    if ctx.pos_shape is not None and ctx.needs_input_grad[3]:
        dpos = dout.sum(0, dtype=torch.float32).view(ctx.pos_shape).to(ctx.pos_dtype)
    return (dx if need_dx else None), dw, (db if ctx.has_bias else None), dpos, None


_pe_fwd_op.register_autograd(_pe_backward, setup_context=_pe_setup_context)
_PatchEmbedDirect = direct_function(_pe_fwd_op, _pe_setup_context, _pe_backward)


def patch_embed(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                pos_embed: Optional[torch.Tensor], patch_size: int) -> torch.Tensor:
    """Conv2d(kernel=stride=p)(x).flatten(2).transpose(1, 2) + pos_embed as one gathering GEMM.

    x (N, C, H, W); weight (D, C, p, p); bias (D,) or None; pos_embed (1, T, D), (T, D) or None
    with T = (H / p) * (W / p). Returns (N, T, D). Differentiable in x, weight and bias (and
    pos_embed, in PyTorch, if it requires grad). Raises TypeError/ValueError for inputs the kernels
    do not take (see check_patch_embed).
    """
    check_patch_embed(x, weight, bias, pos_embed, patch_size)
    return (_PatchEmbedDirect.apply if direct_dispatch() else _pe_fwd_op)(x, weight, bias, pos_embed, int(patch_size))


def patch_embed_ref(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                    pos_embed: Optional[torch.Tensor], patch_size: int) -> torch.Tensor:
    """Plain PyTorch: Conv2d(kernel=stride=p)(x).flatten(2).transpose(1, 2) + pos_embed."""
    y = torch.nn.functional.conv2d(x, weight, bias, stride=patch_size)   # (N, D, H/p, W/p)
    y = y.flatten(2).transpose(1, 2)                                     # (N, T, D)
    return y + pos_embed if pos_embed is not None else y
