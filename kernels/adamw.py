"""One AdamW step over flat fp32 master weights in one pass, reading low-precision gradients.

DeepSpeed's ZeRO-1/2 step (bf16) turns the rank's gradient partition into fp32 (a concatenation
copy and a dtype copy), runs torch's fused AdamW over the fp32 master partition, then copies the
masters back into the bf16 parameters; the EMA then reads the masters once more. Per element that
is 10 + 28 + 6 (+ 12 for the EMA) bytes. This kernel does the same update reading the bf16
gradient directly and writing the bf16 parameter copy and (optionally) the EMA from the registers
that hold the new master: 2 + 16 read, 14 written (+ 8 for the EMA) bytes per element.

The update is torch.optim.AdamW's (decoupled weight decay, no amsgrad, no maximize), in fp32:

    p   = p * (1 - lr * wd)
    m   = m + (1 - beta1) * (g - m)                  (torch's lerp with weight < 0.5)
    v   = v * beta2 + (1 - beta2) * g * g
    p   = p - (lr / (1 - beta1^step)) * m / (sqrt(v) / sqrt(1 - beta2^step) + eps)
    lp  = bf16(p)                                    (optional: the model's low-precision copy)
    e   = e + w_ema * (p - e)  for elements [ema_lo, ema_hi)   (optional: w_ema = 1 - decay)

The bias corrections are computed by the caller in float64 from the step count (as torch does on
the host for its non-capturable optimizers) and passed as two fp32 scalars.

`gate` (optional): a 1-element tensor on the device, e.g. the gradients' all-reduced sum of squares. When
it is not finite the kernel loads and writes nothing (p, m, v, lp and the EMA keep their values), so an
optimizer step can queue the update before the host has read its non-finite check
(train.fused_step_deferred_check, fastdit/training/zero_step.py).

`adamw_step_(...)` launches the kernel (CUDA, or CPU under TRITON_INTERPRET=1); `adamw_step_ref_(...)`
is the same update in PyTorch ops with the same signature (used on CPU and by the tests).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import INTERPRETED, device_reason

# Elements per program: 4 warps x 32 threads x 8 elements; 8 bf16 gradient elements = one 128-bit load.
BLOCK = 1024


@triton.jit
def _adamw_kernel(
    P,            # *fp32 (n,): master weights, updated in place
    G,            # *bf16/fp16/fp32 (n,): gradients (already unscaled)
    M,            # *fp32 (n,): first moment, updated in place
    V,            # *fp32 (n,): second moment, updated in place
    LP,           # *bf16/fp16 (n,) or fp32 under the interpreter: low-precision copy of the new p (HAS_LP)
    E,            # *fp32 (ema_hi - ema_lo,): EMA of the elements [ema_lo, ema_hi) of p (HAS_EMA)
    n,            # number of elements
    ema_lo,       # first element of p the EMA covers
    ema_hi,       # one past the last element of p the EMA covers
    decay_keep,   # 1 - lr * weight_decay
    beta1_c,      # 1 - beta1
    beta2,        # beta2
    beta2_c,      # 1 - beta2
    step_size,    # lr / (1 - beta1^step)
    bc2_sqrt,     # sqrt(1 - beta2^step)
    eps,          # epsilon added to the denominator
    ema_w,        # 1 - EMA decay
    SEG_M,        # *int64 (n_seg + 1,): first element of each gradient segment in p, then n (SEGMENTED)
    SEG_G,        # *int64 (n_seg,): offset of each segment's first gradient element from G (SEGMENTED)
    n_seg,        # number of segments (SEGMENTED)
    GATE,         # *fp32 (1,): the update happens only where this value is finite (HAS_GATE)
    HAS_LP: tl.constexpr,
    HAS_EMA: tl.constexpr,
    SEGMENTED: tl.constexpr,  # G is read through the segment tables instead of element for element
    LOG_SEG: tl.constexpr,    # binary-search steps: 2**LOG_SEG >= n_seg
    ALIGNED: tl.constexpr,    # every segment's G offset - p offset is a multiple of 8 (128-bit loads)
    HAS_GATE: tl.constexpr,   # GATE given: no load or store at all when it is inf or NaN
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    if HAS_GATE:   # the gate as a block (the interpreter cannot AND a block mask with a scalar)
        gate = tl.zeros((BLOCK,), dtype=tl.float32) + tl.load(GATE).to(tl.float32)
        mask = mask & (gate >= -3.4028234663852886e38) & (gate <= 3.4028234663852886e38)   # NaN: both false
    p = tl.load(P + offs, mask=mask, other=0.0)
    if SEGMENTED:
        # The segment holding the block's first element: the last s with SEG_M[s] <= start.
        start = pid.to(tl.int64) * BLOCK
        lo = (n_seg * 0).to(tl.int64)
        hi = n_seg.to(tl.int64)
        for _ in tl.static_range(LOG_SEG):
            mid = (lo + hi) // 2
            right = tl.load(SEG_M + mid) <= start
            lo = tl.where(right, mid, lo)
            hi = tl.where(right, hi, mid)
        if start + BLOCK <= tl.load(SEG_M + lo + 1):      # the block lies in one segment: one shift
            delta = tl.load(SEG_G + lo) - tl.load(SEG_M + lo)
            if ALIGNED:
                delta = tl.multiple_of(delta, 8)
            g = tl.load(G + delta + offs, mask=mask, other=0.0)
        else:                                            # segment boundaries inside: look up each element
            lo_e = tl.zeros((BLOCK,), dtype=tl.int64)
            hi_e = tl.zeros((BLOCK,), dtype=tl.int64) + n_seg
            for _ in tl.static_range(LOG_SEG):
                mid_e = (lo_e + hi_e) // 2
                right_e = tl.load(SEG_M + mid_e) <= offs
                lo_e = tl.where(right_e, mid_e, lo_e)
                hi_e = tl.where(right_e, hi_e, mid_e)
            delta_e = tl.load(SEG_G + lo_e) - tl.load(SEG_M + lo_e)
            g = tl.load(G + delta_e + offs, mask=mask, other=0.0)
        g = g.to(tl.float32)
    else:
        g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(M + offs, mask=mask, other=0.0)
    v = tl.load(V + offs, mask=mask, other=0.0)
    p = p * decay_keep
    m = m + beta1_c * (g - m)
    v = v * beta2 + beta2_c * (g * g)
    denom = tl.sqrt(v) / bc2_sqrt + eps
    p = p - step_size * (m / denom)
    tl.store(P + offs, p, mask=mask)
    tl.store(M + offs, m, mask=mask)
    tl.store(V + offs, v, mask=mask)
    if HAS_LP:
        tl.store(LP + offs, p.to(LP.dtype.element_ty), mask=mask)
    if HAS_EMA:
        emask = mask & (offs >= ema_lo) & (offs < ema_hi)
        e = tl.load(E + (offs - ema_lo), mask=emask, other=0.0)
        e = e + ema_w * (p - e)
        tl.store(E + (offs - ema_lo), e, mask=emask)


def _scalars(lr: float, beta1: float, beta2: float, weight_decay: float, step: int):
    """(decay_keep, step_size, bc2_sqrt) from the hyper-parameters, in float64 like torch."""
    if step < 1:
        raise ValueError(f"step must be >= 1 (the count after this update), got {step}")
    bc1 = 1.0 - beta1 ** step
    bc2 = 1.0 - beta2 ** step
    return 1.0 - lr * weight_decay, lr / bc1, bc2 ** 0.5          # as torch.optim.AdamW computes them


class GradSegments:
    """Where each stretch of p's gradient lies in a gradient buffer G: p[m_starts[s] : m_starts[s+1]] has
    its gradient at G[g_offsets[s] : g_offsets[s] + length]. ZeRO-2 keeps a rank's gradients in one buffer
    in the order the backward hooks fired, not in p's order; the kernel reads them there through these
    tables instead of from a concatenated copy. Built on the host from plain integers (checked), kept on
    the device."""

    def __init__(self, m_starts, g_offsets, lengths, g_numel: int, device):
        if not (len(m_starts) == len(g_offsets) == len(lengths)) or not lengths:
            raise ValueError("segments need one m_start, g_offset and length each, and at least one")
        pos = 0
        for m0, g0, ln in zip(m_starts, g_offsets, lengths):
            if m0 != pos or ln <= 0 or g0 < 0 or g0 + ln > g_numel:
                raise ValueError(f"segments must tile p in order and lie inside G (segment at {m0}, "
                                 f"length {ln}, gradient offset {g0}, G has {g_numel})")
            pos += ln
        self.n = pos
        self.count = len(lengths)
        self.aligned = all((g0 - m0) % 8 == 0 for m0, g0 in zip(m_starts, g_offsets))
        self.host = (list(m_starts) + [pos], list(g_offsets))
        self.seg_m = torch.tensor(self.host[0], dtype=torch.int64, device=device)
        self.seg_g = torch.tensor(self.host[1], dtype=torch.int64, device=device)

    def gather(self, g: torch.Tensor) -> torch.Tensor:
        """The gradient in p's order (a copy; the PyTorch path and the tests)."""
        m, off = self.host
        return torch.cat([g[o: o + (m[i + 1] - m[i])] for i, o in enumerate(off)])


def _check(p, g, m, v, lp, ema, ema_range, segments=None, gate=None):
    if gate is not None and (not isinstance(gate, torch.Tensor) or gate.numel() != 1
                             or gate.dtype != torch.float32 or gate.device != p.device):
        raise ValueError(f"gate must be a 1-element float32 tensor on p's device ({p.device})")
    for name, t in (("p", p), ("m", m), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.float32:
            raise TypeError(f"{name} must be a float32 tensor")
    if not isinstance(g, torch.Tensor) or g.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError("g must be a float32, bfloat16 or float16 tensor")
    n = p.numel()
    named = [("p", p), ("m", m), ("v", v)] + ([("lp", lp)] if lp is not None else [])
    if segments is None:
        named.insert(1, ("g", g))
    else:
        if segments.n != n:
            raise ValueError(f"the gradient segments cover {segments.n} elements, p has {n}")
        if g.dim() != 1 or not g.is_contiguous() or g.device != p.device:
            raise ValueError("g must be a contiguous 1-D gradient buffer on p's device")
        if segments.seg_m.device != p.device:
            raise ValueError(f"the segment tables are on {segments.seg_m.device}, p on {p.device}")
    for name, t in named:
        if t.dim() != 1 or not t.is_contiguous() or t.numel() != n:
            raise ValueError(f"{name} must be a contiguous 1-D tensor of {n} elements, got shape "
                             f"{tuple(t.shape)} strides {t.stride()}")
        if t.device != p.device:
            raise ValueError(f"{name} is on {t.device}, p on {p.device}")
    if lp is not None and lp.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"lp has dtype {lp.dtype}; expected bfloat16, float16 or float32")
    if ema is None:
        return 0, 0
    lo, hi = (0, n) if ema_range is None else (int(ema_range[0]), int(ema_range[1]))
    if not 0 <= lo <= hi <= n:
        raise ValueError(f"ema_range {ema_range} is not inside [0, {n}]")
    if (not isinstance(ema, torch.Tensor) or ema.dtype != torch.float32 or ema.dim() != 1
            or not ema.is_contiguous() or ema.numel() != hi - lo or ema.device != p.device):
        raise ValueError(f"ema must be a contiguous 1-D float32 tensor of {hi - lo} elements on {p.device}")
    return lo, hi


@torch.no_grad()
def adamw_step_ref_(p, g, m, v, *, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                    step: int, lp: Optional[torch.Tensor] = None, ema: Optional[torch.Tensor] = None,
                    ema_weight: float = 0.0, ema_range=None, segments: Optional[GradSegments] = None,
                    gate: Optional[torch.Tensor] = None) -> None:
    """The update of the module docstring in PyTorch ops (in place on p, m, v, lp, ema); nothing when `gate`
    is given and not finite (it reads the gate on the host: for CPU runs and the tests)."""
    lo, hi = _check(p, g, m, v, lp, ema, ema_range, segments, gate)
    decay_keep, step_size, bc2_sqrt = _scalars(lr, beta1, beta2, weight_decay, step)
    if gate is not None and not bool(torch.isfinite(gate).all()):
        return
    g = (segments.gather(g) if segments is not None else g).float()
    p.mul_(decay_keep)
    m.lerp_(g, 1.0 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    denom = (v.sqrt() / bc2_sqrt).add_(eps)
    p.addcdiv_(m, denom, value=-step_size)
    if lp is not None:
        lp.copy_(p)
    if ema is not None and hi > lo:
        ema.lerp_(p[lo:hi], float(ema_weight))


@torch.no_grad()
def adamw_step_(p, g, m, v, *, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                step: int, lp: Optional[torch.Tensor] = None, ema: Optional[torch.Tensor] = None,
                ema_weight: float = 0.0, ema_range=None, segments: Optional[GradSegments] = None,
                gate: Optional[torch.Tensor] = None) -> None:
    """The update of the module docstring as one Triton kernel (CUDA, or CPU under the interpreter).

    p, m, v: contiguous 1-D fp32; g: the same length in fp32/bf16/fp16; lp: optional low-precision
    copy of p to write; ema: optional fp32 EMA of p[ema_range[0]:ema_range[1]] (the whole p when
    ema_range is None), updated with weight ema_weight (= 1 - decay). step: the step count after
    this update (1 on the first). segments: g is a gradient buffer read through these tables (GradSegments)
    instead of p's gradient element for element. gate: a 1-element float32 tensor on p's device; when it is not
    finite the kernel writes nothing (read on the device: no host sync). Raises TypeError/ValueError on bad
    inputs, before any write.
    """
    lo, hi = _check(p, g, m, v, lp, ema, ema_range, segments, gate)
    reason = device_reason(p.device)
    if reason:
        raise ValueError(reason)
    decay_keep, step_size, bc2_sqrt = _scalars(lr, beta1, beta2, weight_decay, step)
    n = p.numel()
    if n == 0:
        return
    if segments is not None and segments.count == 1:   # one stretch: a plain view of the buffer
        g, segments = g[segments.host[1][0]: segments.host[1][0] + n], None
    # Under the interpreter fp32 -> bf16 casts round wrongly: write fp32 and round with torch.
    lp_buf = lp
    if lp is not None and INTERPRETED and lp.dtype != torch.float32:
        lp_buf = lp.float()         # its own values where the kernel writes nothing (a gate that is not finite)
    has_ema = ema is not None and hi > lo
    _adamw_kernel[(triton.cdiv(n, BLOCK),)](
        p, g, m, v, lp_buf if lp is not None else p, ema if has_ema else p, n, lo, hi,
        decay_keep, 1.0 - beta1, beta2, 1.0 - beta2, step_size, bc2_sqrt, eps, float(ema_weight),
        segments.seg_m if segments is not None else p, segments.seg_g if segments is not None else p,
        segments.count if segments is not None else 0, gate if gate is not None else p,
        HAS_LP=lp is not None, HAS_EMA=has_ema, SEGMENTED=segments is not None,
        LOG_SEG=max(1, (segments.count - 1).bit_length()) if segments is not None else 1,
        ALIGNED=bool(segments is not None and segments.aligned), HAS_GATE=gate is not None, BLOCK=BLOCK,
        num_warps=4)
    if lp_buf is not None and lp_buf is not lp:
        lp.copy_(lp_buf)
