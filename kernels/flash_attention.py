"""Self-attention straight from the qkv projection's layout, in Triton (a FlashAttention-style kernel).

The DiT block's qkv projection writes qkv (N, T, 3, H, hd). These kernels read q, k and v from that buffer
as it is, write the output in the (N, T, H * hd) layout the output projection reads, and write the backward's
dq, dk, dv into one dqkv (N, T, 3, H, hd) buffer in the projection's layout: no layout copy in either
direction and no per-block stack of dq, dk, dv.

Head dims that are not a power of two (DiT-XL: 1152 / 16 = 72) are split into a power-of-two part and a
16-wide tail (72 = 64 + 8 valid of 16): the dot products run over 80 columns instead of the 128 a kernel with
one power-of-two head tile pads 72 to (1.11x the FLOPs instead of 1.78x). Numerics as FlashAttention 2: fp32
scores and accumulators, an online softmax in base 2, the probabilities rounded to the input dtype before the
P V and dS K products, dq / dk / dv from recomputed probabilities with delta = rowsum(dO * O) and the
log-sum-exp saved by the forward. fp32 inputs use IEEE products (no TF32). Deterministic: no atomics.

Launch: forward one program per (BLOCK_M queries, sample x head); backward one program per (BLOCK_M queries)
for dq (it also writes delta) and then one per (BLOCK_N keys) for dk and dv.

Shapes: qkv (N, T, 3, H, hd) with unit stride along hd and along the (3, H) axes packed as the projection
writes them (any N and T strides); out (N, T, H * hd); lse (N * H, T) fp32. Raises TypeError/ValueError like
the other fastdit kernels (kernels/_common.py).
"""
# No `from __future__ import annotations`: the interpreter of old triton finds tl.constexpr only
# through annotation objects.

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import (INTERPRETED, alloc, alloc_out, check_same_device, check_tensor, env_choice, finish,
                      stride_unit)

LOG2E = 1.4426950408889634

# Largest head dim the kernels take: the dk/dv program holds two (BLOCK_N, head tile) fp32 accumulators.
MAX_HEAD_DIM = 256


@triton.jit
def _load_tile(BASE, rows, row_ok, s_t, cols, col_ok, UPCAST: tl.constexpr):
    """(len(rows), len(cols)) tile of a row-major (T, hd) slice with row stride s_t; masked lanes read 0. With
    UPCAST (the interpreter's 2-byte dot operands) in fp32."""
    x = tl.load(BASE + rows[:, None] * s_t + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _head_bases(QKV, s_qn, H, HD: tl.constexpr):
    """(sample as int64, head, q / k / v base pointers) of the (sample, head) on program axis 1."""
    nh = tl.program_id(1)
    n = nh // H
    h = nh - n * H
    n64 = n.to(tl.int64)
    q_base = QKV + n64 * s_qn + h * HD
    return n64, h, q_base, q_base + H * HD, q_base + 2 * H * HD


@triton.jit
def _store_grad(PTRS, g, mask, PART_PTRS, col_ok, HAS_DB: tl.constexpr):
    """Store a gradient tile (rounded to the output's dtype) and, with HAS_DB, the column sums of the rounded
    values over its unmasked rows (what autograd's bias gradient adds up) at PART_PTRS."""
    g = g.to(PTRS.dtype.element_ty)
    tl.store(PTRS, g, mask=mask)
    if HAS_DB:
        tl.store(PART_PTRS, tl.sum(tl.where(mask, g.to(tl.float32), 0.0), 0), mask=col_ok)


@triton.jit
def _attn_fwd_kernel(
    QKV, s_qn, s_qt,                    # qkv (N, T, 3, H, HD): sample and token strides (elements)
    OUT, s_on, s_ot,                    # out (N, T, H * HD)
    LSE,                                # (N * H, T) fp32: log2-sum-exp2 of the scaled scores
    T, H, qk_scale,                     # tokens, heads, hd^-0.5 * log2(e)
    HD: tl.constexpr, HD_A: tl.constexpr, HD_B: tl.constexpr,   # head dim = first part + tail (0: none)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    STRIDE_UNIT: tl.constexpr,          # the strides are passed divided by this (see _stride_unit)
):
    s_qn, s_qt, s_on, s_ot = s_qn * STRIDE_UNIT, s_qt * STRIDE_UNIT, s_on * STRIDE_UNIT, s_ot * STRIDE_UNIT
    pid_m = tl.program_id(0)
    n64, h, q_base, k_base, v_base = _head_bases(QKV, s_qn, H, HD)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < T
    da = tl.arange(0, HD_A)
    a_ok = da < HD
    q_a = _load_tile(q_base, rows, row_ok, s_qt, da, a_ok, UPCAST)
    acc_a = tl.zeros((BLOCK_M, HD_A), dtype=tl.float32)
    if HD_B > 0:
        db = HD_A + tl.arange(0, HD_B)
        b_ok = db < HD
        q_b = _load_tile(q_base, rows, row_ok, s_qt, db, b_ok, UPCAST)
        acc_b = tl.zeros((BLOCK_M, HD_B), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for start in range(0, T, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < T
        k_a = _load_tile(k_base, cols, col_ok, s_qt, da, a_ok, UPCAST)
        v_a = _load_tile(v_base, cols, col_ok, s_qt, da, a_ok, UPCAST)
        s = tl.dot(q_a, tl.trans(k_a), input_precision=DOT_PRECISION)
        if HD_B > 0:
            k_b = _load_tile(k_base, cols, col_ok, s_qt, db, b_ok, UPCAST)
            s = tl.dot(q_b, tl.trans(k_b), s, input_precision=DOT_PRECISION)
        s = tl.where(col_ok[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        p = p.to(v_a.dtype)
        acc_a = tl.dot(p, v_a, acc_a * alpha[:, None], input_precision=DOT_PRECISION)
        if HD_B > 0:
            v_b = _load_tile(v_base, cols, col_ok, s_qt, db, b_ok, UPCAST)
            acc_b = tl.dot(p, v_b, acc_b * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    inv = 1.0 / l_i
    o_base = OUT + n64 * s_on + h * HD + rows[:, None] * s_ot
    tl.store(o_base + da[None, :], (acc_a * inv[:, None]).to(OUT.dtype.element_ty),
             mask=row_ok[:, None] & a_ok[None, :])
    if HD_B > 0:
        tl.store(o_base + db[None, :], (acc_b * inv[:, None]).to(OUT.dtype.element_ty),
                 mask=row_ok[:, None] & b_ok[None, :])
    tl.store(LSE + tl.program_id(1).to(tl.int64) * T + rows, m_i + tl.math.log2(l_i), mask=row_ok)


@triton.jit
def _attn_bwd_dq_kernel(
    QKV, s_qn, s_qt,                    # qkv (N, T, 3, H, HD)
    OUT, s_on, s_ot,                    # the forward's output (N, T, H * HD)
    DOUT, s_dn, s_dt,                   # its gradient, same shape
    LSE, DELTA,                         # (N * H, T) fp32: the forward's lse (read), rowsum(dO * O) (written)
    DQKV, s_gn, s_gt,                   # dqkv (N, T, 3, H, HD): this kernel writes the dq slot
    PART,                               # (N * cdiv(T, BLOCK_M), H * HD) fp32: dq's column sums per program (HAS_DB)
    T, H, qk_scale, sm_scale,
    HD: tl.constexpr, HD_A: tl.constexpr, HD_B: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, HAS_DB: tl.constexpr,
    STRIDE_UNIT: tl.constexpr,          # the strides are passed divided by this (see _stride_unit)
):
    s_qn, s_qt, s_on, s_ot = s_qn * STRIDE_UNIT, s_qt * STRIDE_UNIT, s_on * STRIDE_UNIT, s_ot * STRIDE_UNIT
    s_dn, s_dt, s_gn, s_gt = s_dn * STRIDE_UNIT, s_dt * STRIDE_UNIT, s_gn * STRIDE_UNIT, s_gt * STRIDE_UNIT
    pid_m = tl.program_id(0)
    n64, h, q_base, k_base, v_base = _head_bases(QKV, s_qn, H, HD)
    o_base = OUT + n64 * s_on + h * HD
    do_base = DOUT + n64 * s_dn + h * HD
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < T
    da = tl.arange(0, HD_A)
    a_ok = da < HD
    q_a = _load_tile(q_base, rows, row_ok, s_qt, da, a_ok, UPCAST)
    do_a = _load_tile(do_base, rows, row_ok, s_dt, da, a_ok, UPCAST)
    o_a = _load_tile(o_base, rows, row_ok, s_ot, da, a_ok, UPCAST)
    delta = tl.sum(do_a.to(tl.float32) * o_a.to(tl.float32), 1)
    dq_a = tl.zeros((BLOCK_M, HD_A), dtype=tl.float32)
    if HD_B > 0:
        db = HD_A + tl.arange(0, HD_B)
        b_ok = db < HD
        q_b = _load_tile(q_base, rows, row_ok, s_qt, db, b_ok, UPCAST)
        do_b = _load_tile(do_base, rows, row_ok, s_dt, db, b_ok, UPCAST)
        o_b = _load_tile(o_base, rows, row_ok, s_ot, db, b_ok, UPCAST)
        delta += tl.sum(do_b.to(tl.float32) * o_b.to(tl.float32), 1)
        dq_b = tl.zeros((BLOCK_M, HD_B), dtype=tl.float32)
    stat = tl.program_id(1).to(tl.int64) * T + rows
    tl.store(DELTA + stat, delta, mask=row_ok)
    lse = tl.load(LSE + stat, mask=row_ok, other=0.0)
    for start in range(0, T, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < T
        k_a = _load_tile(k_base, cols, col_ok, s_qt, da, a_ok, UPCAST)
        v_a = _load_tile(v_base, cols, col_ok, s_qt, da, a_ok, UPCAST)
        s = tl.dot(q_a, tl.trans(k_a), input_precision=DOT_PRECISION)
        dp = tl.dot(do_a, tl.trans(v_a), input_precision=DOT_PRECISION)
        if HD_B > 0:
            k_b = _load_tile(k_base, cols, col_ok, s_qt, db, b_ok, UPCAST)
            v_b = _load_tile(v_base, cols, col_ok, s_qt, db, b_ok, UPCAST)
            s = tl.dot(q_b, tl.trans(k_b), s, input_precision=DOT_PRECISION)
            dp = tl.dot(do_b, tl.trans(v_b), dp, input_precision=DOT_PRECISION)
        p = tl.where(col_ok[None, :], tl.math.exp2(s * qk_scale - lse[:, None]), 0.0)
        ds = (p * (dp - delta[:, None])).to(k_a.dtype)
        dq_a = tl.dot(ds, k_a, dq_a, input_precision=DOT_PRECISION)
        if HD_B > 0:
            dq_b = tl.dot(ds, k_b, dq_b, input_precision=DOT_PRECISION)
    g_base = DQKV + n64 * s_gn + h * HD + rows[:, None] * s_gt
    part = PART + (n64 * tl.num_programs(0) + pid_m) * (H * HD) + h * HD
    _store_grad(g_base + da[None, :], dq_a * sm_scale, row_ok[:, None] & a_ok[None, :], part + da, a_ok, HAS_DB)
    if HD_B > 0:
        _store_grad(g_base + db[None, :], dq_b * sm_scale, row_ok[:, None] & b_ok[None, :], part + db, b_ok, HAS_DB)


@triton.jit
def _attn_bwd_dkdv_kernel(
    QKV, s_qn, s_qt,                    # qkv (N, T, 3, H, HD)
    DOUT, s_dn, s_dt,                   # the output's gradient (N, T, H * HD)
    LSE, DELTA,                         # (N * H, T) fp32, both read
    DQKV, s_gn, s_gt,                   # dqkv: this kernel writes the dk and dv slots
    PART,                               # (N * cdiv(T, BLOCK_N), 2, H * HD) fp32: dk's, dv's column sums (HAS_DB)
    T, H, qk_scale, sm_scale,
    HD: tl.constexpr, HD_A: tl.constexpr, HD_B: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,   # query rows per step, key rows per program
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, HAS_DB: tl.constexpr,
    STRIDE_UNIT: tl.constexpr,          # the strides are passed divided by this (see _stride_unit)
):
    s_qn, s_qt, s_dn, s_dt = s_qn * STRIDE_UNIT, s_qt * STRIDE_UNIT, s_dn * STRIDE_UNIT, s_dt * STRIDE_UNIT
    s_gn, s_gt = s_gn * STRIDE_UNIT, s_gt * STRIDE_UNIT
    pid_n = tl.program_id(0)
    n64, h, q_base, k_base, v_base = _head_bases(QKV, s_qn, H, HD)
    do_base = DOUT + n64 * s_dn + h * HD
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < T
    da = tl.arange(0, HD_A)
    a_ok = da < HD
    k_a = _load_tile(k_base, cols, col_ok, s_qt, da, a_ok, UPCAST)
    v_a = _load_tile(v_base, cols, col_ok, s_qt, da, a_ok, UPCAST)
    dk_a = tl.zeros((BLOCK_N, HD_A), dtype=tl.float32)
    dv_a = tl.zeros((BLOCK_N, HD_A), dtype=tl.float32)
    if HD_B > 0:
        db = HD_A + tl.arange(0, HD_B)
        b_ok = db < HD
        k_b = _load_tile(k_base, cols, col_ok, s_qt, db, b_ok, UPCAST)
        v_b = _load_tile(v_base, cols, col_ok, s_qt, db, b_ok, UPCAST)
        dk_b = tl.zeros((BLOCK_N, HD_B), dtype=tl.float32)
        dv_b = tl.zeros((BLOCK_N, HD_B), dtype=tl.float32)
    stat_base = tl.program_id(1).to(tl.int64) * T
    for start in range(0, T, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < T
        q_a = _load_tile(q_base, rows, row_ok, s_qt, da, a_ok, UPCAST)
        do_a = _load_tile(do_base, rows, row_ok, s_dt, da, a_ok, UPCAST)
        st = tl.dot(k_a, tl.trans(q_a), input_precision=DOT_PRECISION)        # (BLOCK_N, BLOCK_M) scores^T
        dpt = tl.dot(v_a, tl.trans(do_a), input_precision=DOT_PRECISION)      # dP^T
        if HD_B > 0:
            q_b = _load_tile(q_base, rows, row_ok, s_qt, db, b_ok, UPCAST)
            do_b = _load_tile(do_base, rows, row_ok, s_dt, db, b_ok, UPCAST)
            st = tl.dot(k_b, tl.trans(q_b), st, input_precision=DOT_PRECISION)
            dpt = tl.dot(v_b, tl.trans(do_b), dpt, input_precision=DOT_PRECISION)
        lse = tl.load(LSE + stat_base + rows, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + stat_base + rows, mask=row_ok, other=0.0)
        pt = tl.where(row_ok[None, :], tl.math.exp2(st * qk_scale - lse[None, :]), 0.0)
        dst = (pt * (dpt - delta[None, :])).to(q_a.dtype)
        pt = pt.to(do_a.dtype)
        dv_a = tl.dot(pt, do_a, dv_a, input_precision=DOT_PRECISION)
        dk_a = tl.dot(dst, q_a, dk_a, input_precision=DOT_PRECISION)
        if HD_B > 0:
            dv_b = tl.dot(pt, do_b, dv_b, input_precision=DOT_PRECISION)
            dk_b = tl.dot(dst, q_b, dk_b, input_precision=DOT_PRECISION)
    g_base = DQKV + n64 * s_gn + h * HD + cols[:, None] * s_gt
    part = PART + (n64 * tl.num_programs(0) + pid_n) * (2 * H * HD) + h * HD
    mask_a = col_ok[:, None] & a_ok[None, :]
    _store_grad(g_base + H * HD + da[None, :], dk_a * sm_scale, mask_a, part + da, a_ok, HAS_DB)
    _store_grad(g_base + 2 * H * HD + da[None, :], dv_a, mask_a, part + H * HD + da, a_ok, HAS_DB)
    if HD_B > 0:
        mask_b = col_ok[:, None] & b_ok[None, :]
        _store_grad(g_base + H * HD + db[None, :], dk_b * sm_scale, mask_b, part + db, b_ok, HAS_DB)
        _store_grad(g_base + 2 * H * HD + db[None, :], dv_b, mask_b, part + H * HD + db, b_ok, HAS_DB)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
def head_split(hd: int) -> Tuple[int, int]:
    """(HD_A, HD_B): the head dim as a power-of-two part (>= 16) and a power-of-two tail (0: none, else >= 16)
    whose sum covers hd with the least padding a two-part split allows: 72 -> (64, 16), 64 -> (64, 0),
    96 -> (64, 32), 8 -> (16, 0)."""
    if hd < 1:
        raise ValueError(f"head dim must be positive, got {hd}")
    if hd <= 16:
        return 16, 0
    a = 1 << (hd.bit_length() - 1)              # largest power of two <= hd
    rest = hd - a
    return a, (0 if rest == 0 else max(16, triton.next_power_of_2(rest)))


# (BLOCK_M, BLOCK_N, num_warps, num_stages) of each kernel for 2-byte inputs; fp32 (IEEE products) halves the
# first two. Chosen from the sm_90 compile report (kernels/_sm90_check.py: no spills); not tuned on a GPU.
FWD_CONFIG = (128, 64, 8, 2)
BWD_DQ_CONFIG = (128, 32, 8, 2)
BWD_DKDV_CONFIG = (32, 128, 8, 2)
# The tilings a GPU sweep tries per kernel (benchmarks/attention.py --sweep-triton), each kernel's default first;
# every one compiles for sm_90 without spills at DiT-XL/2's shape with triton 3.6 and 3.9 (kernels/_sm90_check.py
# --attention-sweep). "dq+bias" is the dq kernel with the qkv bias sums of bias_fold: its registers rise at the
# default tiling (one program per SM instead of two), so it is swept against "dq" at the same tilings.
SWEEP = {
    "fwd": [FWD_CONFIG, (128, 64, 4, 2), (64, 64, 4, 2), (128, 128, 8, 2), (128, 64, 8, 3)],
    "dq": [BWD_DQ_CONFIG, (128, 64, 8, 2), (64, 64, 4, 2), (128, 32, 4, 2)],
    "dkdv": [BWD_DKDV_CONFIG, (64, 128, 8, 2), (64, 64, 4, 2), (64, 128, 8, 3)],
    "dq+bias": [BWD_DQ_CONFIG, (64, 64, 4, 2)],
}


# FASTDIT_ATTENTION_TILING=swept: each kernel at the fastest tiling of the H100 sweep at DiT-XL/2's shape
# (benchmarks/results/h100-2026-11-27-570862f/attention_sweep.json, median ms, default -> swept: the forward 0.385 ->
# 0.257; the whole backward with dq's tiling varied 0.987 -> 0.883, with dk/dv's 0.962 -> 0.834, dq's with the bias
# sums 1.300 -> 1.056). Off until a throughput row
# (fused/triton-swept) shows the step faster and the wrong-output probes pass on a GPU.
TILING_ENV = "FASTDIT_ATTENTION_TILING"
TILING_CHOICES = ("default", "swept")
DEFAULT_CONFIGS = {"fwd": FWD_CONFIG, "dq": BWD_DQ_CONFIG, "dkdv": BWD_DKDV_CONFIG}
SWEPT_CONFIGS = {"fwd": (64, 64, 4, 2), "dq": (64, 64, 4, 2), "dkdv": (64, 64, 4, 2)}


def launch_config(kernel: str, dtype: torch.dtype, t: int) -> Tuple[int, int, int, int]:
    """The tiling `kernel` ("fwd", "dq", "dkdv") runs at without an explicit config: the default, or the swept one
    under FASTDIT_ATTENTION_TILING=swept (read at each call; any other value is a one-line ValueError)."""
    table = SWEPT_CONFIGS if env_choice(TILING_ENV, TILING_CHOICES) == "swept" else DEFAULT_CONFIGS
    return tiling(table[kernel], dtype, t)


def tiling(cfg: Tuple[int, int, int, int], dtype: torch.dtype, t: int) -> Tuple[int, int, int, int]:
    """A (BLOCK_M, BLOCK_N, num_warps, num_stages) tiling as the launchers run it for `dtype` and T = t: fp32
    halves the blocks, and no block is longer than the sequence (at least 16, tl.dot's smallest)."""
    bm, bn, warps, stages = cfg
    if dtype == torch.float32:
        bm, bn = max(16, bm // 2), max(16, bn // 2)
    cap = max(16, triton.next_power_of_2(t))       # no tile longer than the sequence (tests' short T)
    return min(bm, cap), min(bn, cap), warps, stages


def _dot_flags(dtype: torch.dtype) -> Tuple[bool, str]:
    """(UPCAST, DOT_PRECISION): fp32 operands use IEEE products; the interpreter upcasts bf16/fp16 (its
    tl.dot of 2-byte operands is wrong; kernels/_common.py)."""
    return INTERPRETED and dtype != torch.float32, ("ieee" if dtype == torch.float32 else "tf32")


def packed(qkv: torch.Tensor) -> bool:
    """Whether qkv (N, T, 3, H, hd) has each token's (3, H, hd) values packed as the projection writes them."""
    _, _, _, h, hd = qkv.shape
    return qkv.stride(4) == 1 and qkv.stride(3) == hd and qkv.stride(2) == h * hd


def check_qkv(qkv) -> None:
    """Raise TypeError/ValueError unless the kernels take qkv: (N, T, 3, H, hd) floating, hd <= MAX_HEAD_DIM,
    each token's 3 * H * hd values packed (unit stride along hd, the projection's (3, H) layout)."""
    check_tensor("qkv", qkv, 5)
    n, t, three, h, hd = qkv.shape
    if three != 3:
        raise ValueError(f"qkv must have shape (N, T, 3, H, hd), got {tuple(qkv.shape)}")
    if hd > MAX_HEAD_DIM:
        raise ValueError(f"head dim {hd} is above {MAX_HEAD_DIM}, the largest the Triton attention takes")
    if not packed(qkv):
        raise ValueError(f"qkv must have each token's (3, H, hd) values packed as the projection writes them "
                         f"(strides (.., .., {h * hd}, {hd}, 1)), got strides {qkv.stride()}")
    check_same_device([("qkv", qkv)])


def _flat_rows(name: str, x: torch.Tensor, n: int, t: int, width: int) -> torch.Tensor:
    """x as (N, T, width) with unit stride along the last axis (a copy only when it is not)."""
    if tuple(x.shape) != (n, t, width):
        raise ValueError(f"{name} must have shape {(n, t, width)}, got {tuple(x.shape)}")
    return x if x.stride(2) == 1 else x.contiguous()


def _stride_unit(*tensors: torch.Tensor) -> int:
    """_common.stride_unit over the sample and token strides. A packed qkv row is 3 * H * hd elements: with
    hd = 72 a multiple of 16 only for an even H, so without the unit 3 or 5 heads compiled to 2-byte loads and
    stores without cp.async (sm_90 PTX: `python -m fastdit.kernels._sm90_check --attention-paths 3 16`), the path
    an H100 computed wrongly for qkv (2, 256, 3, 3, 72) bf16 (docs/performance.md, Known issues); with it, the
    same code as DiT-XL/2's 16 heads."""
    return stride_unit(tensors, (0, 1))


def _strides(x: torch.Tensor, unit: int) -> Tuple[int, int]:
    """x's sample and token strides divided by the stride unit."""
    return x.stride(0) // unit, x.stride(1) // unit


def attention_fwd(qkv: torch.Tensor, *, config: Optional[Tuple[int, int, int, int]] = None
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out (N, T, H * hd) in qkv's dtype, lse (N * H, T) fp32) of softmax(q k^T / sqrt(hd)) v.
    `config` = (BLOCK_M, BLOCK_N, num_warps, num_stages) overrides the tiling."""
    check_qkv(qkv)
    n, t, _, h, hd = qkv.shape
    out = alloc_out((n, t, h * hd), qkv.dtype, qkv.device)
    lse = alloc((n * h, t), torch.float32, qkv.device)
    if n * t * h == 0:
        return finish(out, qkv.dtype), lse
    bm, bn, warps, stages = config or launch_config("fwd", qkv.dtype, t)
    hd_a, hd_b = head_split(hd)
    upcast, precision = _dot_flags(qkv.dtype)
    unit = _stride_unit(qkv, out)
    _attn_fwd_kernel[(triton.cdiv(t, bm), n * h)](
        qkv, *_strides(qkv, unit), out, *_strides(out, unit), lse,
        t, h, hd ** -0.5 * LOG2E, HD=hd, HD_A=hd_a, HD_B=hd_b, BLOCK_M=bm, BLOCK_N=bn,
        UPCAST=upcast, DOT_PRECISION=precision, STRIDE_UNIT=unit, num_warps=warps, num_stages=stages)
    return finish(out, qkv.dtype), lse


def attention_bwd(dout: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, *,
                  bias_sums: bool = False, dq_config: Optional[Tuple[int, int, int, int]] = None,
                  dkdv_config: Optional[Tuple[int, int, int, int]] = None):
    """dqkv (N, T, 3, H, hd) contiguous, in qkv's dtype, for the output gradient dout (N, T, H * hd), from the
    forward's qkv, out and lse. With bias_sums, (dqkv, db): db = dqkv summed over (N, T) as (3 * H * hd,) fp32
    in qkv's column order (the qkv projection's bias gradient), from per-program column sums the kernels write
    as they store dqkv (no second read). The configs override the two kernels' tilings."""
    check_qkv(qkv)
    n, t, _, h, hd = qkv.shape
    check_tensor("dout", dout, 3)
    check_tensor("out", out, 3)
    dout = _flat_rows("dout", dout, n, t, h * hd)
    out = _flat_rows("out", out, n, t, h * hd)
    if not isinstance(lse, torch.Tensor) or lse.dtype != torch.float32 or tuple(lse.shape) != (n * h, t) \
            or not lse.is_contiguous():
        raise ValueError(f"lse must be the forward's contiguous fp32 (N * H, T) = {(n * h, t)} tensor")
    check_same_device([("qkv", qkv), ("dout", dout), ("out", out), ("lse", lse)])
    dqkv = alloc_out((n, t, 3, h, hd), qkv.dtype, qkv.device)
    if n * t * h == 0:
        dqkv = finish(dqkv, qkv.dtype)
        return (dqkv, torch.zeros(3 * h * hd, dtype=torch.float32, device=qkv.device)) if bias_sums else dqkv
    delta = alloc((n * h, t), torch.float32, qkv.device)
    hd_a, hd_b = head_split(hd)
    upcast, precision = _dot_flags(qkv.dtype)
    sm_scale = hd ** -0.5
    unit = _stride_unit(qkv, out, dout, dqkv)
    common = dict(HD=hd, HD_A=hd_a, HD_B=hd_b, UPCAST=upcast, DOT_PRECISION=precision, HAS_DB=bias_sums,
                  STRIDE_UNIT=unit)
    bm, bn, warps, stages = dq_config or launch_config("dq", qkv.dtype, t)
    part_q = alloc((n * triton.cdiv(t, bm), h * hd) if bias_sums else (1,), torch.float32, qkv.device)
    _attn_bwd_dq_kernel[(triton.cdiv(t, bm), n * h)](
        qkv, *_strides(qkv, unit), out, *_strides(out, unit), dout, *_strides(dout, unit),
        lse, delta, dqkv, *_strides(dqkv, unit), part_q, t, h, sm_scale * LOG2E, sm_scale,
        BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages, **common)
    bm, bn, warps, stages = dkdv_config or launch_config("dkdv", qkv.dtype, t)
    part_kv = alloc((n * triton.cdiv(t, bn), 2 * h * hd) if bias_sums else (1,), torch.float32, qkv.device)
    _attn_bwd_dkdv_kernel[(triton.cdiv(t, bn), n * h)](
        qkv, *_strides(qkv, unit), dout, *_strides(dout, unit), lse, delta,
        dqkv, *_strides(dqkv, unit), part_kv, t, h, sm_scale * LOG2E, sm_scale,
        BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages, **common)
    dqkv = finish(dqkv, qkv.dtype)
    if not bias_sums:
        return dqkv
    return dqkv, torch.cat([part_q.sum(0), part_kv.sum(0)])


class TritonAttention(torch.autograd.Function):
    """attention_fwd / attention_bwd as an autograd function of qkv: the gradient comes back in qkv's layout."""

    @staticmethod
    def forward(ctx, qkv):
        out, lse = attention_fwd(qkv)
        ctx.save_for_backward(qkv, out, lse)
        return out

    @staticmethod
    def backward(ctx, dout):
        qkv, out, lse = ctx.saved_tensors
        return attention_bwd(dout, qkv, out, lse)


def flash_attention(qkv: torch.Tensor) -> torch.Tensor:
    """Self-attention of qkv (N, T, 3, H, hd) -> (N, T, H * hd) through the Triton kernels, differentiable."""
    return TritonAttention.apply(qkv)


__all__ = ["attention_fwd", "attention_bwd", "flash_attention", "head_split", "check_qkv", "packed",
           "MAX_HEAD_DIM"]
