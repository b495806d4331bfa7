"""Sums of per-tile partial sums: the second pass of the row ops' parameter gradients.

The backward kernels of modulate_layernorm / gated_residual_modulate_layernorm / gated_residual write the
gradients of their (N, D) modulation vectors as fp32 partial sums, one row per tile of tokens:
PART (P, N, S, D), P gradients (dshift, dscale, dgate), S tiles per sample. The totals are the sums over S,
each in its gradient's dtype. With PyTorch that is a reduction and a cast per gradient (up to six small
kernels per backward call, 57 calls per DiT-XL/2 step); `tile_sums` does all P of them in one Triton pass that
writes each total in its own dtype (an atomics-free second pass: one program per (sample, column block) adds
the S tiles in order).

Switch: FASTDIT_TILE_SUMS=triton (default torch: `part[i].sum(1).to(dtype)`, today's path), read at each call.
The two differ only in the order of fp32 additions.
"""
# No `from __future__ import annotations` here: the interpreter of triton < 3.2 finds tl.constexpr
# parameters only through annotation objects, not strings.

from typing import List, Sequence

import torch
import triton
import triton.language as tl

from ._common import alloc_out, env_choice, finish

ENV = "FASTDIT_TILE_SUMS"
CHOICES = ("torch", "triton")
MAX_PARTS = 3
BLOCK_S = 8          # tiles per step
BLOCK_C = 256        # columns per program


def mode() -> str:
    """FASTDIT_TILE_SUMS, "torch" when unset."""
    return env_choice(ENV, CHOICES)


@triton.jit
def _sum_tiles(PART, r, c, c_ok, stride_r, stride_s, S, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """(BLOCK_C,) fp32: sum over s < S of PART[r, s, c] (unit stride along c)."""
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for s0 in range(0, S, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        x = tl.load(PART + r * stride_r + s[:, None] * stride_s + c[None, :],
                    mask=(s < S)[:, None] & c_ok[None, :], other=0.0)
        acc += tl.sum(x, axis=0)
    return acc


@triton.jit
def _tile_sums_kernel(
    PART,                               # (P, R, S, C) fp32 partial sums, unit stride along C
    stride_p, stride_r, stride_s,       # strides of PART
    OUT0, OUT1, OUT2,                   # (R, C) contiguous outputs, each in its own dtype (OUT1/2 if P > 1/2)
    S,                                  # tiles to add per (part, row)
    C,                                  # columns
    P: tl.constexpr,                    # parts (1 to 3)
    BLOCK_S: tl.constexpr,              # tiles per step
    BLOCK_C: tl.constexpr,              # columns per program
):
    r = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    tl.store(OUT0 + r * C + c, _sum_tiles(PART, r, c, c_ok, stride_r, stride_s, S, BLOCK_S, BLOCK_C)
             .to(OUT0.dtype.element_ty), mask=c_ok)
    if P > 1:
        tl.store(OUT1 + r * C + c, _sum_tiles(PART + stride_p, r, c, c_ok, stride_r, stride_s, S, BLOCK_S, BLOCK_C)
                 .to(OUT1.dtype.element_ty), mask=c_ok)
    if P > 2:
        tl.store(OUT2 + r * C + c, _sum_tiles(PART + 2 * stride_p, r, c, c_ok, stride_r, stride_s, S, BLOCK_S,
                                              BLOCK_C).to(OUT2.dtype.element_ty), mask=c_ok)


def tile_sums(part: torch.Tensor, dtypes: Sequence[torch.dtype]) -> List[torch.Tensor]:
    """[part[i].sum(1) in dtypes[i] for i < len(dtypes)]: part (P', R, S, C) fp32 with unit stride along C,
    P' >= len(dtypes) (the first len(dtypes) parts are summed). Each result is (R, C), contiguous.

    FASTDIT_TILE_SUMS=triton: one Triton launch for all of them (1 to 3 parts); else PyTorch.
    """
    if part.dim() != 4 or part.dtype != torch.float32 or (part.numel() and part.stride(3) != 1):
        raise ValueError(f"part must be a (P, R, S, C) float32 tensor with unit column stride, got "
                         f"{tuple(part.shape)} {part.dtype}")
    if not 1 <= len(dtypes) <= min(MAX_PARTS, part.shape[0]):
        raise ValueError(f"tile_sums takes 1 to {min(MAX_PARTS, part.shape[0])} dtypes here, got {len(dtypes)}")
    _, r, s, c = part.shape
    if mode() == "torch" or r * c == 0:
        return [part[i].sum(1).to(dt) for i, dt in enumerate(dtypes)]
    outs = [alloc_out((r, c), dt, part.device) for dt in dtypes]
    if s == 0:
        for o in outs:
            o.zero_()
    else:
        ptrs = outs + [outs[0]] * (MAX_PARTS - len(outs))
        _tile_sums_kernel[(r, triton.cdiv(c, BLOCK_C))](
            part, part.stride(0), part.stride(1), part.stride(2), *ptrs, s, c,
            P=len(dtypes), BLOCK_S=BLOCK_S, BLOCK_C=BLOCK_C, num_warps=4)
    return [finish(o, dt) for o, dt in zip(outs, dtypes)]
