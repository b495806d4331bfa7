"""The DiT MLP's two GELU GEMMs with GELU in their epilogues (model option mlp="epilogue").

In the block's MLP, z = fc1(h) = h W1^T + b1, g = GELU_tanh(z), y = fc2(g). With cuBLAS GEMMs the GELU
passes are separate kernels over the 4D-wide tensors (DiT-XL/2, batch 128, bf16: 32768 x 4608, 0.3 GB
each):
  forward   fc1 writes z; GELU reads z and writes g                          (z written, read; g written)
  backward  fc2's data gradient writes dg = dy W2; GELU's backward reads z and dg and writes dz
            (kernels/gelu.py also sums dz over rows for fc1's bias gradient)
Here one Triton GEMM does each with the elementwise work on its output tile before it leaves registers:
  `linear_gelu(h, w1, b1) -> (z, g)`              z and g written from the tile: z is not read back
  `linear_dgelu(dy, w2, z) -> (dz, db, g|None)`   dg never reaches memory: the epilogue reads z's tile,
                                                  writes dz, the fp32 column sums of dz (fc1's bias
                                                  gradient, reduced once by the launcher) and, for an MLP
                                                  that recomputes g (write_g), GELU(z)
Per block at DiT-XL/2 that is 0.3 GB less in the forward and 0.6 GB less in the backward (about 0.1 and
0.2 ms at an H100's copy bandwidth). Whether it wins depends on this GEMM keeping cuBLAS's rate at these
shapes (K = 1152): `benchmarks/mlp_gemm.py` measures both sides; the model keeps mlp="plain" by default.
mlp="epilogue" keeps g for fc2's weight gradient (as mlp="fold" does); mlp="recompute-epilogue" keeps only h
and z and has the backward's epilogue rewrite g (write_g). Only the TMA kernel writes g there (179 registers
under triton 3.6, 174 under 3.9, at the default tiling, no spills); in the pointer kernel that epilogue
spilled at every tiling of the sm_90 compile report, so with it g comes from a separate GELU pass over z.

Two kernels compute the same thing: `_gemm_gelu_kernel` addresses its tiles with pointers (loads pipelined with
cp.async), `_gemm_gelu_tma_kernel` moves every tile with Hopper's TMA unit through host-built tensor
descriptors (GemmConfig.tma; tensors TMA cannot address, e.g. a row stride that is not a multiple of 16 bytes,
run the pointer kernel). The interpreter runs both.

Numerics (as the reference's ops, in fp32 inside the tile): z is rounded to its dtype first and GELU is
computed from the rounded z, so g equals GELU of the stored z (what a recompute in the backward gives).
dz = GELU'(z) * dg uses the fp32 dg of the accumulator (the reference rounds dg to bf16 first: this is
one rounding fewer), and db sums the fp32 dz before its rounding. GELU's formula and tanh are
kernels/gelu.py's. fp32 operands multiply in IEEE fp32 ("ieee"), as torch's default fp32 matmul does.

Shapes: h (M, K), w1 (N, K), b1 (N,) or None -> z, g (M, N); dy (M, K), w2 (K, N), z (M, N) -> dz (M, N),
db (N,) fp32. Any strides; outputs contiguous in the inputs' dtype. All tensors of one call share one
dtype (float32 / bfloat16 / float16) and one device; anything else raises (TypeError / ValueError, as the
other fastdit kernels do).
"""
# No `from __future__ import annotations`: the interpreter of old triton finds tl.constexpr only
# through annotation objects.

import os
from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import INTERPRETED, alloc, alloc_out, check_same_device, check_tensor, finish
from .gelu import gelu_tanh_grad, tanh_u


class GemmConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    group_m: int = 8
    tma: bool = False          # operands, z and the outputs through TMA tensor descriptors (see _gemm_gelu_tma_kernel)

    def tag(self) -> str:
        return f"{self.block_m}x{self.block_n}x{self.block_k}/{self.num_warps}/{self.num_stages}" + (
            "/tma" if self.tma else "")


# The launchers' default tiling on a GPU, and what benchmarks/mlp_gemm.py sweeps (default first). Chosen from
# the sm_90 compile report (python -m fastdit.kernels._sm90_check --gemm-sweep; triton 3.6, the GPU machine's,
# and 3.9; DiT-XL/2's shapes) until a GPU sweep measures them. The default moves every tile by TMA and compiles
# without spills in both epilogues: under triton 3.6, 96 (forward) and 128 (backward) registers and 96 KB of
# shared memory, so two programs fit on an SM and one's epilogue can overlap the other's K loop (3.9's backward
# takes 146 registers: one program). 128x256 and 256x128, the usual Hopper GEMM tiles, spill 8-48 bytes in the
# backward's epilogue; the pointer (cp.async) kernel is swept for comparison.
# FASTDIT_GEMM_GELU_CONFIG="BMxBNxBK/warps/stages[/tma]" overrides the default without an edit.
DEFAULT_CONFIG = GemmConfig(128, 128, 64, 8, 3, tma=True)
SWEEP = (DEFAULT_CONFIG,
         GemmConfig(128, 128, 64, 8, 4, tma=True),
         GemmConfig(128, 256, 64, 8, 3, tma=True),
         GemmConfig(256, 128, 64, 8, 3, tma=True),
         GemmConfig(128, 64, 64, 4, 4, tma=True),
         GemmConfig(128, 128, 64, 8, 5, tma=True),
         GemmConfig(128, 128, 64, 8, 3),
         GemmConfig(128, 128, 64, 8, 4))
CONFIG_ENV = "FASTDIT_GEMM_GELU_CONFIG"


def parse_config(text: str) -> GemmConfig:
    """'128x128x64/8/4' -> GemmConfig(128, 128, 64, 8, 4), '.../tma' with tma=True (the form of GemmConfig.tag);
    ValueError naming the expected form otherwise."""
    try:
        parts = text.strip().lower().split("/")
        tma = len(parts) == 4 and parts[3] == "tma"
        if len(parts) != 3 and not tma:
            raise ValueError
        bm, bn, bk = (int(v) for v in parts[0].split("x"))
        cfg = GemmConfig(bm, bn, bk, int(parts[1]), int(parts[2]), tma=tma)
    except ValueError:
        raise ValueError(f"{CONFIG_ENV}={text!r}: expected BLOCK_MxBLOCK_NxBLOCK_K/num_warps/num_stages[/tma], "
                         "e.g. 128x128x64/8/3/tma") from None
    try:
        check_config(cfg)
    except ValueError as e:
        raise ValueError(f"{CONFIG_ENV}={text!r}: {e}") from None
    return cfg


def check_config(cfg: GemmConfig) -> None:
    """ValueError unless the blocks are powers of two >= 16 (tl.dot's smallest tile) and warps/stages sane."""
    for name, v in zip(("block_m", "block_n", "block_k"), cfg[:3]):
        if v < 16 or v & (v - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {v}")
    if cfg.num_warps not in (1, 2, 4, 8, 16):
        raise ValueError(f"num_warps must be 1, 2, 4, 8 or 16, got {cfg.num_warps}")
    if not 1 <= cfg.num_stages <= 8 or cfg.group_m < 1:
        raise ValueError(f"num_stages must be 1..8 and group_m >= 1, got {cfg.num_stages}, {cfg.group_m}")


def default_config() -> GemmConfig:
    text = os.environ.get(CONFIG_ENV, "")
    return parse_config(text) if text else DEFAULT_CONFIG


@triton.jit
def _tile_of(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    # (row tile, column tile) of program `pid`, GROUP_M row tiles at a time (the tiles of one group share B's
    # column tiles in L2)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(tl.cdiv(M, BLOCK_M) - first_m, GROUP_M)
    return first_m + (pid % per_group) % group_rows, (pid % per_group) // group_rows


@triton.jit
def _gelu_of_stored(acc, ROUND: tl.constexpr):
    # GELU_tanh of the accumulator rounded to the stored z's dtype (bf16 by _round_to_bf16)
    if ROUND == tl.bfloat16:
        z = _round_to_bf16(acc)
    else:
        z = acc.to(ROUND).to(tl.float32)
    return 0.5 * z * (1.0 + tanh_u(z))


@triton.jit
def _dgelu(acc, z):
    # GELU_tanh'(z) * acc, z in fp32
    return acc * gelu_tanh_grad(z, tanh_u(z))


@triton.jit
def _round_to_bf16(x):
    # fp32 -> the nearest bf16 value (ties to even), kept in fp32, by integer arithmetic on the bits: what the
    # GPU's cvt.rn.bf16.f32 gives, and the same through the interpreter, whose bf16 cast truncates.
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _gemm_gelu_kernel(
    A, stride_am, stride_ak,            # (M, K) left operand: h (forward) or dy (backward)
    B, stride_bk, stride_bn,            # (K, N) right operand as strides: W1^T (forward) or W2 (backward)
    BIAS,                               # (N,) fc1's bias (forward, HAS_BIAS)
    Z, stride_zm, stride_zn,            # forward: (M, N) contiguous output z; backward: (M, N) input z
    OUT,                                # (M, N) contiguous output: g (forward) or dz (backward)
    DB_PART,                            # (cdiv(M, BLOCK_M), N) fp32 output: per-tile column sums of dz (backward)
    M, N, K,
    BACKWARD: tl.constexpr,             # epilogue: False -> z, GELU(z); True -> GELU'(z) * acc
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,               # K % BLOCK_K == 0: no mask on the K loop
    ROUND: tl.constexpr,                # dtype z is rounded to before the forward's GELU (z's dtype)
    UPCAST: tl.constexpr,               # cast dot operands to fp32 (interpreter, bf16/fp16)
    DOT_PRECISION: tl.constexpr,        # "ieee" for fp32 operands
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,              # row tiles per group of the launch order (L2 reuse of B)
):
    pid_m, pid_n = _tile_of(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    # Rows / columns past the end load row 0 / column 0 again (in bounds) and are masked at the stores.
    am = (rm % M).to(tl.int64)
    bn = (rn % N).to(tl.int64)
    a_ptrs = A + am[:, None] * stride_am + rk[None, :] * stride_ak
    b_ptrs = B + rk[:, None] * stride_bk + bn[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_left = K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=rk[None, :] < k_left, other=0.0)
            b = tl.load(b_ptrs, mask=rk[:, None] < k_left, other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    # The epilogue addresses its tile as a 64-bit tile base plus 32-bit offsets inside the tile: per-element
    # 64-bit address tensors would take two registers per element beside the accumulator's.
    om = tl.arange(0, BLOCK_M)
    on = tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    mask = m_ok[:, None] & n_ok[None, :]
    tile = pid_m.to(tl.int64) * BLOCK_M * N + pid_n * BLOCK_N
    offs = om[:, None] * N + on[None, :]
    if BACKWARD:
        z_tile = Z + pid_m.to(tl.int64) * BLOCK_M * stride_zm + pid_n * BLOCK_N * stride_zn
        z = tl.load(z_tile + om[:, None] * stride_zm + on[None, :] * stride_zn, mask=mask, other=0.0).to(tl.float32)
        dz = tl.where(mask, _dgelu(acc, z), 0.0)
        tl.store(OUT + tile + offs, dz.to(OUT.dtype.element_ty), mask=mask)
        tl.store(DB_PART + pid_m.to(tl.int64) * N + rn, tl.sum(dz, axis=0), mask=n_ok)
    else:
        if HAS_BIAS:
            acc += tl.load(BIAS + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(Z + tile + offs, acc.to(Z.dtype.element_ty), mask=mask)
        tl.store(OUT + tile + offs, _gelu_of_stored(acc, ROUND).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _gemm_gelu_tma_kernel(
    a_desc,                             # (M, K) left operand, blocks (BLOCK_M, BLOCK_K)
    b_desc,                             # forward: w1 (N, K), blocks (BLOCK_N, BLOCK_K); backward: w2 (K, N), (BLOCK_K, BLOCK_N)
    BIAS,                               # (N,) fc1's bias (forward, HAS_BIAS)
    z_desc,                             # (M, N) z: written (forward) or read (backward), blocks (BLOCK_M, BLOCK_N)
    out_desc,                           # (M, N) g (forward) or dz (backward), blocks (BLOCK_M, BLOCK_N)
    g_desc,                             # (M, N) GELU(z) written by the backward (WRITE_G), blocks (BLOCK_M, BLOCK_N)
    DB_PART,                            # (cdiv(M, BLOCK_M), N) fp32 output: per-tile column sums of dz (backward)
    M, N, K,
    BACKWARD: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    WRITE_G: tl.constexpr,              # backward: also write GELU(z) (an MLP that recomputes it)
    ROUND: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # _gemm_gelu_kernel with every tile moved by the TMA unit (Hopper): the loads of the K loop are
    # asynchronous bulk copies into shared memory (no address registers), and out-of-bounds rows and columns
    # read as zeros and are dropped at the stores, so the epilogue needs no masks: a row past M has a zero
    # accumulator, hence a zero dz in the column sums.
    pid_m, pid_n = _tile_of(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    off_m = pid_m * BLOCK_M
    off_n = pid_n * BLOCK_N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        a = a_desc.load([off_m, k * BLOCK_K])
        if BACKWARD:
            b = b_desc.load([k * BLOCK_K, off_n])
        else:
            b = tl.trans(b_desc.load([off_n, k * BLOCK_K]))
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)

    rn = off_n + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    if BACKWARD:
        z = z_desc.load([off_m, off_n]).to(tl.float32)
        if WRITE_G:      # GELU(z) first: its tile leaves registers before dz's is formed
            t = tanh_u(z)
            g_desc.store([off_m, off_n], (0.5 * z * (1.0 + t)).to(g_desc.dtype))
            dz = acc * gelu_tanh_grad(z, t)
        else:
            dz = _dgelu(acc, z)
        out_desc.store([off_m, off_n], dz.to(out_desc.dtype))
        tl.store(DB_PART + pid_m.to(tl.int64) * N + rn, tl.sum(dz, axis=0), mask=n_ok)
    else:
        if HAS_BIAS:
            acc += tl.load(BIAS + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        z_desc.store([off_m, off_n], acc.to(z_desc.dtype))
        out_desc.store([off_m, off_n], _gelu_of_stored(acc, ROUND).to(out_desc.dtype))


def tma_usable(*tensors) -> bool:
    """Whether TMA descriptors can address these 2-D tensors: last stride 1, the other stride and the base
    address 16-byte aligned (the TMA unit's rules). Otherwise the launchers run the pointer kernel."""
    for t in tensors:
        if t.stride(-1) != 1 or (t.stride(0) * t.element_size()) % 16 or t.data_ptr() % 16:
            return False
    return True


_TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def _check(named, dtype_of: str) -> torch.device:
    dtype = named[0][1].dtype
    for name, t in named[1:]:
        if t is not None and t.dtype != dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {dtype_of} has {dtype}; one dtype per call")
    return check_same_device(named)


def _launch(a, b, bias, z, out, part, m, n, k, backward, cfg, g=None) -> bool:
    """Run the kernel over (m, n): b is w1 (N, K) in the forward, w2 (K, N) in the backward; g: the backward's
    GELU(z) output, written by the TMA kernel only. Returns whether g was written."""
    check_config(cfg)
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n),)
    dummy = out
    common = dict(BACKWARD=backward, HAS_BIAS=bias is not None, ROUND=_TL_DTYPE[a.dtype],
                  UPCAST=INTERPRETED and a.dtype != torch.float32,
                  DOT_PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
                  BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
                  num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if cfg.tma and tma_usable(a, b, z, out, *([g] if g is not None else [])):
        from triton.tools.tensor_descriptor import TensorDescriptor
        bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
        desc = TensorDescriptor.from_tensor
        out_d = desc(out, [bm, bn])
        _gemm_gelu_tma_kernel[grid](
            desc(a, [bm, bk]), desc(b, [bk, bn] if backward else [bn, bk]), bias if bias is not None else dummy,
            desc(z, [bm, bn]), out_d, desc(g, [bm, bn]) if g is not None else out_d,
            part if part is not None else dummy, m, n, k, WRITE_G=g is not None, **common)
        return g is not None
    b_t = b if backward else b.t()             # the (K, N) right operand
    _gemm_gelu_kernel[grid](
        a, *a.stride(), b_t, *b_t.stride(), bias if bias is not None else dummy,
        z, *z.stride(), out, part if part is not None else dummy,
        m, n, k, EVEN_K=k % cfg.block_k == 0, **common)
    return False


def linear_gelu(h: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor] = None, *,
                config: Optional[GemmConfig] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(z, g): z = h @ w1.T + b1 in h's dtype, g = GELU_tanh(z) from the rounded z. h (M, K), w1 (N, K)."""
    check_tensor("h", h, 2)
    check_tensor("w1", w1, 2)
    if b1 is not None:
        check_tensor("b1", b1, 1)
    if w1.shape[1] != h.shape[1]:
        raise ValueError(f"w1 has shape {tuple(w1.shape)}; h {tuple(h.shape)} needs (N, {h.shape[1]})")
    if b1 is not None and b1.shape[0] != w1.shape[0]:
        raise ValueError(f"b1 has shape {tuple(b1.shape)}; w1 {tuple(w1.shape)} needs ({w1.shape[0]},)")
    _check([("h", h), ("w1", w1), ("b1", b1)], "h")
    (m, k), n = h.shape, w1.shape[0]
    z = alloc_out((m, n), h.dtype, h.device)
    g = alloc_out((m, n), h.dtype, h.device)
    if m * n == 0:
        return finish(z, h.dtype), finish(g, h.dtype)
    if k == 0:                                   # an empty sum: z = b1 (or 0), as F.linear gives
        zz = (b1.expand(m, n) if b1 is not None else h.new_zeros(m, n)).contiguous()
        return zz, torch.nn.functional.gelu(zz, approximate="tanh")
    _launch(h, w1, b1, z, g, None, m, n, k, False, config or default_config())
    return finish(z, h.dtype), finish(g, h.dtype)


def linear_dgelu(dy: torch.Tensor, w2: torch.Tensor, z: torch.Tensor, *, write_g: bool = False,
                 config: Optional[GemmConfig] = None
                 ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """(dz, db, g): dz = GELU_tanh'(z) * (dy @ w2) in z's dtype, db = dz summed over rows (fp32, before
    rounding), g = GELU_tanh(z) when write_g (else None): from the same epilogue under the TMA kernel, else
    from a separate GELU pass over z (the pointer kernel's epilogue would spill). dy (M, K), w2 (K, N),
    z (M, N)."""
    check_tensor("dy", dy, 2)
    check_tensor("w2", w2, 2)
    check_tensor("z", z, 2)
    if w2.shape[0] != dy.shape[1] or z.shape != (dy.shape[0], w2.shape[1]):
        raise ValueError(f"dy {tuple(dy.shape)} @ w2 {tuple(w2.shape)} must match z {tuple(z.shape)}")
    _check([("dy", dy), ("w2", w2), ("z", z)], "dy")
    (m, k), n = dy.shape, w2.shape[1]
    gelu = lambda: torch.nn.functional.gelu(z, approximate="tanh").contiguous() if write_g else None  # noqa: E731
    if m * n == 0 or k == 0:                     # dg = 0
        return (torch.zeros(m, n, dtype=z.dtype, device=z.device),
                torch.zeros(n, dtype=torch.float32, device=z.device), gelu())
    cfg = config or default_config()
    dz = alloc_out((m, n), z.dtype, z.device)
    # g's buffer only where the TMA kernel will write it (a fallback would hold a 4D-wide buffer it never fills)
    g = alloc_out((m, n), z.dtype, z.device) if write_g and cfg.tma and tma_usable(dy, w2, z, dz) else None
    part = alloc((triton.cdiv(m, cfg.block_m), n), torch.float32, z.device)
    if _launch(dy, w2, None, z, dz, part, m, n, k, True, cfg, g=g):
        g = finish(g, z.dtype)
    else:
        g = gelu()
    return finish(dz, z.dtype), part.sum(0), g


def linear_gelu_ref(h, w1, b1=None, **_):
    """(z, g) from PyTorch ops: F.linear, then GELU_tanh."""
    z = torch.nn.functional.linear(h, w1, b1)
    return z, torch.nn.functional.gelu(z, approximate="tanh")


def linear_dgelu_ref(dy, w2, z, *, write_g: bool = False, **_):
    """(dz, db, g) from PyTorch ops: the GEMM, autograd's GELU backward, the column sum, GELU(z) if write_g."""
    dz = torch.ops.aten.gelu_backward(dy.mm(w2), z, approximate="tanh")
    return dz, dz.float().sum(0), (torch.nn.functional.gelu(z, approximate="tanh") if write_g else None)


# ----------------------------------------------------------------------------------------------
# torch.library ops (traceable by torch.compile); the MLP's autograd function calls them
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("fastdit::linear_gelu", mutates_args=())
def linear_gelu_op(h: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor]
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """linear_gelu as a registered op (default tiling)."""
    return linear_gelu(h, w1, b1)


@linear_gelu_op.register_fake
def _(h, w1, b1):
    out = h.new_empty((h.shape[0], w1.shape[0]))
    return out, torch.empty_like(out)


@torch.library.custom_op("fastdit::linear_dgelu", mutates_args=())
def _linear_dgelu_op(dy: torch.Tensor, w2: torch.Tensor, z: torch.Tensor, write_g: bool
                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dz, db, g = linear_dgelu(dy, w2, z, write_g=write_g)
    return dz, db, (g if g is not None else z.new_empty((0,)))


@_linear_dgelu_op.register_fake
def _(dy, w2, z, write_g):
    g = z.new_empty(z.shape) if write_g else z.new_empty((0,))
    return z.new_empty(z.shape), z.new_empty((z.shape[1],), dtype=torch.float32), g


def linear_dgelu_op(dy, w2, z, *, write_g: bool = False):
    """linear_dgelu through the registered op (default tiling): (dz, db fp32, g or None)."""
    dz, db, g = _linear_dgelu_op(dy, w2, z, write_g)
    return dz, db, (g if write_g else None)
