"""Compile every fastdit kernel for Hopper (sm_90) without a GPU and report registers and spills.

The Triton interpreter checks what the kernels compute but never runs the GPU code generator, so
errors that only the compiler sees (tl.dot shape/dtype rules, constexpr scoping, layout
conversions) and performance hazards (register spills) would otherwise wait for a GPU. This
module compiles each kernel at the tile sizes the launchers pick for DiT shapes, with the
arguments specialised as the JIT specialises them at run time (integer arguments equal to 1
become constants, multiples of 16 and pointers get the divisibility-16 hint), and reads the
registers / stack (spill) bytes of each cubin with the cuobjdump bundled with triton.

It also reports the width of every global load and store (static instruction counts, not
executions): from the PTX, with each access traced back to the pointer argument its address is
computed from, and from the SASS (cuobjdump -sass) as the final word on what ptxas emitted. A row
tile is meant to move 16 bytes (128 bits) per access; per-row scalars (the fp32 MEAN / RSTD of
the LayerNorm rows) are narrower by nature. A narrow access to anything else is reported (the
`bulk_128bit` flag and the `narrow_bulk` list), not failed: it costs bandwidth, not correctness.
From the same SASS it counts the barriers inside loops (`loop_barriers`): in a bandwidth-bound kernel a
barrier every step (e.g. a column sum reduced across warps each step) keeps warps from running ahead.

Run in a process where TRITON_INTERPRET is unset:
    python -m fastdit.kernels._sm90_check [--json PATH]
    python -m fastdit.kernels._sm90_check --attention-sweep   # the Triton attention at every tiling a GPU
                                                              # sweep tries, instead of every kernel
    python -m fastdit.kernels._sm90_check --gemm-sweep        # the same for the MLP's GELU-epilogue GEMMs
Another triton release than the installed one (e.g. the GPU machine's) can be checked without changing the
environment: `pip install --target DIR --no-deps triton==X`, then run with PYTHONPATH=DIR.
Exit status (access widths never change it): 0 all compiled without spills; 1 a kernel failed to
compile or spills; 3 the NVIDIA toolchain of this triton install is unavailable (nothing checked).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import INTERPRETED, column_tiles, row_tile, token_tiles

# The op modules by their own names (the package exports functions of the same names).
gr = importlib.import_module(".gated_residual", __package__)
ml = importlib.import_module(".modulate_layernorm", __package__)
pe = importlib.import_module(".patch_embed", __package__)
aw = importlib.import_module(".adamw", __package__)
ge = importlib.import_module(".gelu", __package__)
qg = importlib.import_module(".qkv_grads", __package__)
ts = importlib.import_module(".tile_sums", __package__)
fa = importlib.import_module(".flash_attention", __package__)
gg = importlib.import_module(".gemm_gelu", __package__)

TARGET_ARCH = 90
H100_SMS = 132

_ROW_PTRS = dict.fromkeys(["X", "Y", "GATE", "SHIFT", "SCALE", "RES", "OUT", "DOUT", "XN", "DRES",
                           "DX", "DY"], "*bf16")
_ROW_PTRS.update(dict.fromkeys(["BIAS"], "*bf16"))
_ROW_PTRS.update(dict.fromkeys(["MEAN", "RSTD", "DSHIFT_PART", "DSCALE_PART", "DGATE_PART", "DBIAS_PART"],
                               "*fp32"))


def _row_args(n: int, t: int, d: int) -> dict:
    """Argument values of the row kernels for contiguous bf16 (N, T, D) rows, (N, 6D) chunks.

    The backward's token tiling is the launchers' for N samples on an H100 (132 SMs): at N = 32 its
    integers are multiples of 16 (the JIT marks them so), at N = 128 / 256 they are not.
    """
    v = dict(_ROW_PTRS)
    for s in "xyorn":
        v.update({f"stride_{s}n": t * d, f"stride_{s}t": d, f"stride_{s}d": 1})
    for s in "gsc":
        v.update({f"stride_{s}n": 6 * d, f"stride_{s}d": 1})
    v["stride_bd"] = 1
    tokens_per_tile, n_iters, n_tiles = token_tiles(n, t, row_tile(d)[0], torch.device("cpu"),
                                                    sms=H100_SMS)
    v.update(T=t, D=d, eps=1e-6, n_tiles=n_tiles, tokens_per_tile=tokens_per_tile, n_iters=n_iters)
    return v


def _pe_args(n: int, c: int, h: int, d: int, p: int) -> dict:
    """Argument values of the patch_embed kernels for contiguous bf16 (N, C, H, H) images."""
    t = (h // p) ** 2
    return dict(X="*bf16", WT="*bf16", BIAS="*bf16", POS="*bf16", OUT="*bf16", DOUT="*bf16",
                DX="*bf16", DW_PART="*fp32", DB_PART="*fp32",
                stride_xn=c * h * h, stride_xc=h * h, stride_xh=h, stride_xw=1,
                stride_wd=c * p * p, stride_wc=p * p, stride_wh=p, stride_ww=1, stride_b=1,
                stride_pt=d, stride_pd=1, stride_on=t * d, stride_ot=d, stride_od=1,
                M=n * t, D=d, K=c * p * p, T=t, GW=h // p, rows_per_split=512)


def _modln_cases(d: int, args: dict, res: bool, bias: bool = False, suffix: str = "", passes=("fwd", "bwd"),
                 stages: int = 1, paired: bool = False, block_t: Optional[int] = None):
    """The modulate+LN kernels' cases at row_tile(d): forward and backward (HAS_DRES with the residual;
    `stages`: the backward's token loop pipeline depth, named in the label when not 1; `paired`: the backward's
    two row sums as one reduction, FASTDIT_LN_ROW_SUMS=paired, named in the label; `block_t`: rows per loop
    step instead of row_tile's, named in the label)."""
    bt, bd, nw = row_tile(d)
    tag = (f"D={d} residual={res}" + (" bias" if bias else "") + suffix + (f" bt={block_t}" if block_t else "")
           + (f" stages={stages}" if stages != 1 else "") + (" paired" if paired else ""))
    bt = block_t or bt
    kernels = dict(fwd=(ml._modln_fwd_kernel, {}),
                   bwd=(ml._modln_bwd_kernel, dict(HAS_DRES=res, NUM_STAGES=stages, PAIRED_SUMS=paired)))
    return [(f"modln_{p} {tag}", kernels[p][0], args,
             dict(HAS_RESIDUAL=res, HAS_BIAS=bias, BLOCK_T=bt, BLOCK_D=bd, **kernels[p][1]), nw) for p in passes]


def cases():
    """(label, kernel, argument values, constexprs, num_warps or (num_warps, num_stages)) for DiT-like shapes."""
    out = []
    for d in (384, 1152, 8192):
        bt, bd, nw = row_tile(d)
        args = _row_args(32, 256, d)
        for res in (False, True):
            out += _modln_cases(d, args, res)
        out.append((f"gated_residual_fwd D={d}", gr._gated_residual_fwd_kernel, args,
                    dict(BLOCK_T=bt, BLOCK_D=bd), nw))
        out.append((f"gated_residual_bwd D={d}", gr._gated_residual_bwd_kernel, args,
                    dict(BLOCK_T=bt, BLOCK_D=bd, NUM_STAGES=1), nw))
    # DiT-XL/2 training batches: the backward's tiling integers lose the divisibility-16 hint.
    d = 1152
    bt, bd, nw = row_tile(d)
    args = _row_args(256, 256, d)
    for res in (False, True):
        out += _modln_cases(d, args, res, suffix=" N=256", passes=("bwd",))
    # The branch's bias added in the kernel and its gradient from the same pass (model bias_fold).
    out += _modln_cases(d, args, True, bias=True, suffix=" N=256")
    out.append((f"gated_residual_bwd D={d} N=256", gr._gated_residual_bwd_kernel, args,
                dict(BLOCK_T=bt, BLOCK_D=bd, NUM_STAGES=1), nw))
    # The backward's token loop software-pipelined (num_stages, benchmarks/kernel_sweep.py): the next steps'
    # rows load into shared memory (cp.async) while a step computes; shared memory per program grows.
    for stages in (2, 3):
        out += _modln_cases(d, args, True, suffix=" N=256", passes=("bwd",), stages=stages)
    out += _modln_cases(d, args, False, suffix=" N=256", passes=("bwd",), stages=3)
    # FASTDIT_LN_ROW_SUMS=paired: the backward's two row sums in one reduction (plain loop, and the measured default)
    out += _modln_cases(d, args, True, suffix=" N=256", passes=("bwd",), paired=True)
    out += _modln_cases(d, args, True, suffix=" N=256", passes=("bwd",), stages=3, paired=True)
    # The residual+LN backward's measured default tiling (RESIDUAL_BWD_TILING: 4 rows, 8 warps, 3 stages), and the
    # same tiling with the branch's bias (bias_fold), which ran row_tile's plain loop until 2026-11-28
    bt_m, nw_m, st_m = ml.RESIDUAL_BWD_TILING[bd]
    for with_bias in (False, True):
        out += [(label, fn, a, c, nw_m) for label, fn, a, c, _ in
                _modln_cases(d, args, True, bias=with_bias, suffix=" N=256", passes=("bwd",), stages=st_m,
                             block_t=bt_m)]
    for p in (2, 4, 8):
        d, c = 1152, 4
        k = c * p * p
        args = _pe_args(32, c, 32, d, p)
        bm, bn, bk = pe.fwd_blocks(d, k)
        out.append((f"patch_embed_fwd p={p}", pe._patch_embed_fwd_kernel, args,
                    dict(P=p, HAS_BIAS=True, HAS_POS=True, UPCAST=False, DOT_PRECISION="tf32",
                         BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk), pe.NUM_WARPS))
        bm, bn, bk = pe.bwd_blocks(d, k)
        out.append((f"patch_embed_dw p={p}", pe._patch_embed_dw_kernel, args,
                    dict(P=p, HAS_BIAS=True, UPCAST=False, DOT_PRECISION="tf32",
                         BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk), pe.NUM_WARPS))
        out.append((f"patch_embed_dx p={p}", pe._patch_embed_dx_kernel, args,
                    dict(P=p, UPCAST=False, DOT_PRECISION="tf32",
                         BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk), pe.NUM_WARPS))
    # The optimizer step (train.fused_optimizer_step) over DiT-XL/2's 675M-element partition, contiguous
    # gradient and gradient read through ZeRO-2's segment tables.
    n = 675_129_632
    args = dict(P="*fp32", G="*bf16", M="*fp32", V="*fp32", LP="*bf16", E="*fp32", n=n, ema_lo=0, ema_hi=n,
                decay_keep=1.0, beta1_c=0.1, beta2=0.999, beta2_c=0.001, step_size=1e-4, bc2_sqrt=0.5,
                eps=1e-8, ema_w=1e-4, SEG_M="*i64", SEG_G="*i64", n_seg=290, GATE="*fp32")
    for segmented in (False, True):
        for gate in (False, True):    # gate: train.fused_step_deferred_check (the update read on the device)
            out.append((f"adamw segmented={segmented}" + (" gate" if gate else ""), aw._adamw_kernel, args,
                        dict(HAS_LP=True, HAS_EMA=True, SEGMENTED=segmented, LOG_SEG=9, ALIGNED=segmented,
                             HAS_GATE=gate, BLOCK=aw.BLOCK), 4))
    # GELU backward + fc1 bias gradient (mlp="fold"), DiT-XL/2 batch 128: (32768, 4608) bf16.
    m, c = 128 * 256, 4 * 1152
    rows, n_iters, _ = column_tiles(m, triton.cdiv(c, 128), 32, torch.device("cpu"), sms=H100_SMS)
    args = dict(Z="*bf16", stride_zm=c, stride_zc=1, DG="*bf16", stride_gm=c, stride_gc=1, DZ="*bf16",
                G="*bf16", DB_PART="*fp32", M=m, C=c, rows_per_tile=rows, n_iters=n_iters)
    for write_g in (False, True):
        for once in (False, True):
            out.append((f"gelu_bwd write_g={write_g}" + (" once" if once else ""), ge._gelu_bwd_kernel, args,
                        dict(WRITE_G=write_g, BLOCK_M=32, BLOCK_C=128, REDUCE_ONCE=once), 4))
    # dq, dk, dv -> dqkv + the qkv bias gradient (bias_fold with sdpa_packed), DiT-XL/2 batch 128: the packed
    # strides of the qkv views, and contiguous (N, H, T, hd) gradients.
    n, h, t, hd = 128, 16, 256, 72
    bm, bh, bhd = qg.tile_shape(hd)
    rows, n_iters, _ = column_tiles(n * t, triton.cdiv(h, bh), bm, torch.device("cpu"), sms=H100_SMS)
    for layout, st in (("packed", (t * 3 * h * hd // 8, hd // 8, 3 * h * hd // 8, 1)),
                       ("contiguous", (h * t * hd // 8, t * hd // 8, hd // 8, 1))):   # in units of 8 (aligned)
        args = dict(DQ="*bf16", DK="*bf16", DV="*bf16", OUT="*bf16", PART="*fp32", T=t, M=n * t,
                    rows_per_tile=rows, n_iters=n_iters)
        for p in "qkv":
            args.update({f"s{p}_n": st[0], f"s{p}_h": st[1], f"s{p}_t": st[2], f"s{p}_d": st[3]})
        for once in (False, True):
            out.append((f"stack_qkv_grads {layout}" + (" once" if once else ""), qg._stack_qkv_kernel, args,
                        dict(H=h, HD=hd, BLOCK_M=bm, BLOCK_H=bh, BLOCK_HD=bhd, STRIDE_UNIT=8, REDUCE_ONCE=once), 8))
    # FASTDIT_COLUMN_SUMS=once with the (h, d) columns contiguous per row (the packed views; SDPA's gradients
    # ordered like them): the flat kernel.
    rows, n_iters, _ = column_tiles(n * t, triton.cdiv(h * hd, qg.FLAT_BLOCK_C), qg.FLAT_BLOCK_M,
                                    torch.device("cpu"), sms=H100_SMS)
    args = dict(DQ="*bf16", DK="*bf16", DV="*bf16", OUT="*bf16", PART="*fp32", T=t, M=n * t,
                rows_per_tile=rows, n_iters=n_iters)
    for p in "qkv":
        args.update({f"s{p}_n": t * h * hd // 8, f"s{p}_t": h * hd // 8})
    out.append(("stack_qkv_grads flat once", qg._stack_qkv_flat_kernel, args,
                dict(C=h * hd, BLOCK_M=qg.FLAT_BLOCK_M, BLOCK_C=qg.FLAT_BLOCK_C, STRIDE_UNIT=8), 8))
    # The row ops' per-tile partial sums added in one pass (FASTDIT_TILE_SUMS=triton): DiT-XL/2, batch 128, the
    # residual op's three (N, D) gradients from 5 tiles per sample, written in bf16.
    n, tiles, d = 128, 5, 1152
    args = dict(PART="*fp32", stride_p=n * tiles * d, stride_r=tiles * d, stride_s=d, OUT0="*bf16", OUT1="*bf16",
                OUT2="*bf16", S=tiles, C=d)
    out.append(("tile_sums P=3", ts._tile_sums_kernel, args, dict(P=3, BLOCK_S=ts.BLOCK_S, BLOCK_C=ts.BLOCK_C), 4))
    # The Triton attention (attention="triton") at its launchers' default tilings.
    out += attention_cases([("attention_fwd", "fwd", fa.FWD_CONFIG), ("attention_bwd_dq", "dq", fa.BWD_DQ_CONFIG),
                            ("attention_bwd_dkdv", "dkdv", fa.BWD_DKDV_CONFIG),
                            ("attention_bwd_dq +bias", "dq+bias", fa.BWD_DQ_CONFIG),
                            ("attention_bwd_dkdv +bias", "dkdv+bias", fa.BWD_DKDV_CONFIG)])
    # The MLP's GEMMs with GELU in the epilogue (mlp="epilogue") at the launchers' default tiling.
    out += gemm_gelu_cases([gg.DEFAULT_CONFIG], with_g=True)
    # fp32 GEMMs (IEEE products) once, at p = 2.
    args = {k_: ("*fp32" if isinstance(v, str) else v) for k_, v in _pe_args(32, 4, 32, 1152, 2).items()}
    bm, bn, bk = pe.fwd_blocks(1152, 16, torch.float32)
    out.append(("patch_embed_fwd fp32 p=2", pe._patch_embed_fwd_kernel, args,
                dict(P=2, HAS_BIAS=True, HAS_POS=True, UPCAST=False, DOT_PRECISION="ieee",
                     BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk), pe.NUM_WARPS))
    return out


# The Triton attention's kernels by the names of flash_attention.SWEEP; "+bias": with the qkv bias sums.
_ATTENTION_KERNELS = {"fwd": ("_attn_fwd_kernel", None), "dq": ("_attn_bwd_dq_kernel", False),
                      "dkdv": ("_attn_bwd_dkdv_kernel", False), "dq+bias": ("_attn_bwd_dq_kernel", True),
                      "dkdv+bias": ("_attn_bwd_dkdv_kernel", True)}


def attention_cases(tilings):
    """Cases for the Triton attention at DiT-XL/2's training shape (bf16, head dim 72 as 64 + 16 columns), one
    per (label, kernel name of _ATTENTION_KERNELS, (BLOCK_M, BLOCK_N, num_warps, num_stages)) as the launcher
    runs that tiling; their num_warps entry is (num_warps, num_stages)."""
    out = []
    for label, name, cfg in tilings:
        kernel, db = _ATTENTION_KERNELS[name]
        args, consts, warps, stages = _attention_case(16, 8, cfg, db)
        out.append((f"{label} hd=72", getattr(fa, kernel), args, consts, (warps, stages)))
    return out


def _attention_case(h: int, unit: int, cfg, has_db=None, t: int = 256, hd: int = 72):
    """(argument values, constexprs, num_warps, num_stages) of a Triton attention kernel as the launcher runs a
    contiguous bf16 qkv of `h` heads of `hd` at T = `t` with tiling `cfg` and stride unit `unit` (8: what
    flash_attention._stride_unit gives contiguous tensors; 1: the strides as they are). has_db: the backward
    kernels' HAS_DB (None for the forward, which has none)."""
    hd_a, hd_b = fa.head_split(hd)
    row, out_row = 3 * h * hd // unit, h * hd // unit
    args = dict(QKV="*bf16", s_qn=t * row, s_qt=row, OUT="*bf16", s_on=t * out_row, s_ot=out_row, LSE="*fp32",
                DELTA="*fp32", DOUT="*bf16", s_dn=t * out_row, s_dt=out_row, DQKV="*bf16", s_gn=t * row, s_gt=row,
                PART="*fp32", T=t, H=h, qk_scale=0.17, sm_scale=0.12)
    bm, bn, warps, stages = fa.tiling(cfg, torch.bfloat16, t)
    consts = dict(HD=hd, HD_A=hd_a, HD_B=hd_b, BLOCK_M=bm, BLOCK_N=bn, UPCAST=False, DOT_PRECISION="tf32",
                  STRIDE_UNIT=unit)
    if has_db is not None:   # the backward kernels' column sums for the qkv bias (bias_fold)
        consts["HAS_DB"] = has_db
    return args, consts, warps, stages


def attention_sweep_cases():
    """Every tiling a GPU sweep of the Triton attention tries (flash_attention.SWEEP), so that a tiling that
    cannot compile or spills is known before GPU time is spent on it."""
    return attention_cases([(f"attention_sweep {name} {'/'.join(map(str, cfg))}", name, cfg)
                            for name, cfgs in fa.SWEEP.items() for cfg in cfgs])


def ptx_instruction_mix(ptx: str) -> dict:
    """Static counts of the PTX memory, barrier and tensor-core instructions (ld.*, st.*, cp.*, ldmatrix,
    stmatrix, wgmma.*, mma.*, bar.*), by full opcode: two kernels with the same mix took the same code path."""
    mix = {}
    for m in re.finditer(r"^\s*(?:@!?%p\d+\s+)?([a-z][\w.]*)", ptx, re.M):
        op = m.group(1)
        if op.split(".")[0] in ("ld", "st", "cp", "ldmatrix", "stmatrix", "wgmma", "mma", "bar"):
            mix[op] = mix.get(op, 0) + 1
    return mix


def attention_path_rows(heads, reference_heads: int = 16):
    """For each Triton attention kernel (fwd, dq, dkdv at their default tilings; bf16, 2 x 256 tokens, hd 72) and
    each head count in `heads`, compiled as the launcher runs a contiguous qkv (stride unit 8) and as it ran before
    the stride unit (unit 1): whether the PTX instruction mix equals DiT-XL/2's (`reference_heads`, unit 8), and
    the opcodes whose counts differ."""
    kernels = (("fwd", fa._attn_fwd_kernel, fa.FWD_CONFIG), ("dq", fa._attn_bwd_dq_kernel, fa.BWD_DQ_CONFIG),
               ("dkdv", fa._attn_bwd_dkdv_kernel, fa.BWD_DKDV_CONFIG))

    def mix(fn, cfg, h, unit):
        args, consts, warps, stages = _attention_case(h, unit, cfg, False if "HAS_DB" in fn.arg_names else None)
        return ptx_instruction_mix(compile_sm90(fn, args, consts, warps, stages).asm["ptx"])

    rows = []
    for name, fn, cfg in kernels:
        ref = mix(fn, cfg, reference_heads, 8)
        for h in heads:
            for unit in (8, 1):
                got = mix(fn, cfg, h, unit)
                # ld.param: H = 1 is a constant to the JIT (one kernel parameter fewer), not another code path
                diff = {op: [got.get(op, 0), ref.get(op, 0)] for op in sorted(set(got) | set(ref))
                        if got.get(op, 0) != ref.get(op, 0) and not op.startswith("ld.param")}
                rows.append(dict(kernel=name, heads=h, stride_unit=unit, same_as_reference=not diff, differs=diff))
    return rows


_SASS_INSTRUCTION = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")


def _uniform_regs(operand: str, width: int) -> List[int]:
    """The uniform registers an operand names (URZ excluded), each `width` registers wide."""
    return [int(n) + i for n in re.findall(r"\bUR(\d+)\b", operand) for i in range(width)]


def _width(op: str, dst: bool = False) -> int:
    """Registers per operand of `op`: .128 four, .64 two; a .WIDE op writes a pair from 32-bit sources."""
    return 4 if ".128" in op else 2 if ".64" in op or (dst and ".WIDE" in op) else 1


def uniform_reads_before_write(sass: str) -> List[Tuple[str, int, str]]:
    """(address, UR number, instruction) for each uniform-ALU instruction (opcode U*) that reads a uniform register no
    earlier instruction (in address order) wrote: a value the assembler never defined. A read at a loop head of a
    register written later in the loop would show too, so a hit is a place to look, not yet a verdict. Writes:
    the first operand of any instruction that names a uniform register there (U* ops, S2UR, R2UR, LDCU, ...)."""
    written, hits = set(), []
    for line in sass.splitlines():
        m = _SASS_INSTRUCTION.match(line)
        if not m:
            continue
        addr, ins = m.groups()
        ins = re.sub(r"^@!?U?P[T\d]+\s+", "", ins)        # a predicate guard
        parts = ins.split(None, 1)
        if len(parts) < 2:
            continue
        op, operands = parts[0], [o.strip() for o in parts[1].split(",")]
        dst = operands[0] if re.match(r"^UR\d+$", operands[0]) else None
        if op.startswith("U") and dst is not None:
            for o in operands[1:]:
                for n in _uniform_regs(o, _width(op)):
                    if n not in written:
                        hits.append((addr, n, ins))
        if dst is not None:
            written.update(_uniform_regs(dst, _width(op, dst=True)))
    return hits


def attention_uniform_scan_rows(heads_units=((3, 1), (3, 8), (16, 8)), tilings: str = "sweep"):
    """For the Triton attention's kernels (fwd, dq, dkdv, dq with the bias sums) at each (heads, stride unit) and
    each tiling (`sweep`: every tiling of flash_attention.SWEEP, each kernel's default first; `default`: the
    defaults only), bf16, 256 tokens, hd 72: the uniform registers the sm_90 SASS reads before writing
    (uniform_reads_before_write). One such read built the wrong P.V descriptors of the 3-head forward with the
    bundled ptxas of triton 3.6 (docs/performance.md, known issues)."""
    kernels = {"fwd": (fa._attn_fwd_kernel, None), "dq": (fa._attn_bwd_dq_kernel, False),
               "dkdv": (fa._attn_bwd_dkdv_kernel, False), "dq+bias": (fa._attn_bwd_dq_kernel, True)}
    defaults = {"fwd": fa.FWD_CONFIG, "dq": fa.BWD_DQ_CONFIG, "dkdv": fa.BWD_DKDV_CONFIG, "dq+bias": fa.BWD_DQ_CONFIG}
    rows = []
    for name, (fn, has_db) in kernels.items():
        for cfg in (fa.SWEEP[name] if tilings == "sweep" else [defaults[name]]):
            for h, unit in heads_units:
                args, consts, warps, stages = _attention_case(h, unit, cfg, has_db)
                sass = _cuobjdump(compile_sm90(fn, args, consts, warps, stages).asm["cubin"], "-sass")
                hits = None if sass is None else [f"{a}: UR{n}: {i}" for a, n, i in uniform_reads_before_write(sass)]
                rows.append(dict(kernel=name, tiling=list(cfg), heads=h, stride_unit=unit, reads_before_write=hits))
    return rows


def gemm_gelu_cases(configs, with_g: bool = False):
    """kernels/gemm_gelu.py at DiT-XL/2's MLP shape (bf16, M = 128 x 256 tokens, D = 1152, 4D = 4608), per
    config: the forward (fc1 + bias + GELU) and the backward (fc2's data gradient + GELU' + bias sums); strides as
    the model passes them (w1 read transposed). with_g: also the TMA backward that rewrites GELU(z)
    (mlp="recompute-epilogue")."""
    m, d, n = 128 * 256, 1152, 4 * 1152
    fwd = dict(A="*bf16", stride_am=d, stride_ak=1, B="*bf16", stride_bk=1, stride_bn=d, BIAS="*bf16", Z="*bf16",
               stride_zm=n, stride_zn=1, OUT="*bf16", DB_PART="*fp32", M=m, N=n, K=d)
    bwd = dict(fwd, stride_bk=n, stride_bn=1)
    out = []
    for cfg in configs:
        tag = cfg.tag()
        base = dict(ROUND=tl.bfloat16, UPCAST=False, DOT_PRECISION="tf32", BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                    BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m)
        passes = [(False, False), (True, False)] + ([(True, True)] if with_g and cfg.tma else [])
        for backward, write_g in passes:
            if cfg.tma:
                bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
                desc = lambda r, c: f"tensordesc<bf16[{r},{c}]>"   # noqa: E731
                kernel, consts = gg._gemm_gelu_tma_kernel, dict(base, WRITE_G=write_g)
                values = dict(a_desc=desc(bm, bk), b_desc=desc(bk, bn) if backward else desc(bn, bk), BIAS="*bf16",
                              z_desc=desc(bm, bn), out_desc=desc(bm, bn), g_desc=desc(bm, bn), DB_PART="*fp32",
                              M=m, N=n, K=d)
            else:
                kernel, consts, values = gg._gemm_gelu_kernel, dict(base, EVEN_K=d % cfg.block_k == 0), \
                    (bwd if backward else fwd)
            label = f"gemm_gelu_{'bwd' if backward else 'fwd'}{' +g' if write_g else ''} {tag}"
            out.append((label, kernel, values, dict(consts, BACKWARD=backward, HAS_BIAS=not backward),
                        (cfg.num_warps, cfg.num_stages)))
    return out


def gemm_gelu_sweep_cases():
    """Every tiling benchmarks/mlp_gemm.py sweeps (gemm_gelu.SWEEP), compiled before GPU time is spent on it."""
    return gemm_gelu_cases(gg.SWEEP)


def _specialise(fn, values: dict, constexprs: dict):
    """(signature, constants, attributes) as the JIT would build them for these argument values."""
    sig, consts, attrs = {}, dict(constexprs), {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
            continue
        v = values[name]
        if isinstance(v, str) and v.startswith("tensordesc"):   # a host TMA descriptor, e.g. tensordesc<bf16[128,64]>
            sig[name] = v
        elif isinstance(v, str):
            sig[name] = v
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            sig[name] = "fp32"
        elif v == 1:
            sig[name] = "constexpr"
            consts[name] = 1
        else:
            sig[name] = "i32"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, consts, attrs


def runtime_arg_names(fn, values: dict, constexprs: dict):
    """The arguments that stay kernel parameters (in PTX order): constexprs and 1s are folded in; a TMA
    descriptor argument is its CUtensorMap parameter, then its shape (i32) and strides (i64) per dimension."""
    sig, _, _ = _specialise(fn, values, constexprs)
    names = []
    for name in fn.arg_names:
        if sig[name] == "constexpr":
            continue
        names.append(name)
        if sig[name].startswith("tensordesc"):
            ndim = sig[name].count(",") + 1
            names += [f"{name}.shape{i}" for i in range(ndim)] + [f"{name}.stride{i}" for i in range(ndim)]
    return names


def compile_sm90(fn, values: dict, constexprs: dict, num_warps: int, num_stages: Optional[int] = None):
    """Compile `fn` for sm_90 with run-time-like specialisation; return the compiled kernel."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    sig, consts, attrs = _specialise(fn, values, constexprs)
    src = ASTSource(fn, sig, constexprs=consts, attrs=attrs)
    options = {"num_warps": num_warps}
    if num_stages is not None:
        options["num_stages"] = num_stages
    return triton.compile(src, target=GPUTarget("cuda", TARGET_ARCH, 32), options=options)


def _cuobjdump(cubin: bytes, flag: str):
    """stdout of triton's bundled `cuobjdump <flag>` on a cubin; None if the tool is absent."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.isfile(tool):
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        return subprocess.run([tool, flag, f.name], capture_output=True, text=True).stdout
    finally:
        os.unlink(f.name)


# Hopper (sm_90) per-SM limits that decide how many programs of a kernel run at once.
SM90_REGS_PER_SM = 65536
SM90_MAX_WARPS_PER_SM = 64
SM90_MAX_BLOCKS_PER_SM = 32
SM90_SHARED_PER_SM = 228 * 1024


def programs_per_sm(registers: int, num_warps: int, shared_bytes: int = 0) -> int:
    """Resident programs (CTAs) per SM on sm_90 for a kernel's registers per thread, warps and shared
    memory: registers are allocated per warp in units of 256 (8 per thread), 64 warps and 32 CTAs at most.
    A bandwidth-bound row kernel needs enough resident warps to keep loads in flight."""
    per_warp = -(-registers * 32 // 256) * 256
    by_regs = SM90_REGS_PER_SM // (per_warp * num_warps) if registers else SM90_MAX_BLOCKS_PER_SM
    by_smem = SM90_SHARED_PER_SM // (shared_bytes + 1024) if shared_bytes else SM90_MAX_BLOCKS_PER_SM
    return max(0, min(by_regs, SM90_MAX_WARPS_PER_SM // num_warps, SM90_MAX_BLOCKS_PER_SM, by_smem))


def resource_usage(cubin: bytes):
    """(registers, stack bytes) of a cubin, read with triton's bundled cuobjdump; None if absent."""
    out = _cuobjdump(cubin, "--dump-resource-usage")
    m = re.search(r"REG:(\d+) STACK:(\d+)", out or "")
    return (int(m.group(1)), int(m.group(2))) if m else None


# ----------------------------------------------------------------------------------------------
# Global memory access widths
# ----------------------------------------------------------------------------------------------
# Pointers whose accesses are one fp32 per token row: narrow by nature, never a row tile.
ROW_SCALARS = frozenset({"MEAN", "RSTD"})
# Narrow by nature too: one scalar per program (the AdamW kernel's GATE, train.fused_step_deferred_check).
SCALAR_POINTERS = ROW_SCALARS | {"GATE"}

_PTX_PARAM = re.compile(r"\.param\s+\.\w+(\s+\.ptr)?[^,)\n]*?_param_(\d+)")
_PTX_ACCESS = re.compile(r"\b(ld|st)\.global((?:\.[\w:]+)*)\s+([^;]*);")
# Pipelined GEMM loops load their operands global -> shared with cp.async (4, 8 or 16 bytes).
_PTX_CP_ASYNC = re.compile(r"\bcp\.async\.\w+\.shared\.global\s+\[[^\]]*\]\s*,\s*\[\s*(%rd\d+)[^\]]*\]"
                           r"\s*,\s*(0x[0-9a-fA-F]+|\d+)")
# An instruction writing a 64-bit register (addresses live in %rd registers): opcode, dest, operands.
_PTX_DEF64 = re.compile(r"^\s*(?:@!?%p\d+\s+)?([a-z][\w.:]*)\s+(%rd\d+)\s*,\s*([^;]*);", re.M)
# LDGSTS is cp.async; LDGDEPBAR (its barrier) moves no data and is not matched.
_SASS_ACCESS = re.compile(r"\b(LDGSTS|LDG|STG)(?![A-Z])((?:\.[A-Z0-9_]+)*)")
_SASS_BYTES = {"128": 16, "64": 8, "U16": 2, "S16": 2, "U8": 1, "S8": 1}


def _ptx_bytes(modifiers: str) -> int:
    """Bytes moved by one PTX ld/st from its modifiers, e.g. '.v4.b32' -> 16, '.b16' -> 2."""
    vec, bits = 1, 0
    for m in modifiers.split(".")[1:]:
        if re.fullmatch(r"v\d+", m):
            vec = int(m[1:])
        elif re.fullmatch(r"[bsuf]\d+", m):
            bits = int(m[1:])
    return vec * bits // 8


def _pointer_params(reg: str, defs: dict, pointer_params: set) -> set:
    """Indices of the pointer parameters an address register is computed from (all its defs)."""
    seen, todo, found = set(), [reg], set()
    while todo:
        r = todo.pop()
        if r in seen:
            continue
        seen.add(r)
        for op, operands in defs.get(r, ()):
            m = re.search(r"_param_(\d+)\]", operands)
            if op.startswith("ld.param") and m and int(m.group(1)) in pointer_params:
                found.add(int(m.group(1)))
            todo.extend(re.findall(r"%rd\d+", operands))
    return found


def ptx_accesses(ptx: str, arg_names) -> list:
    """(kind 'ld'/'st', bytes, pointer argument) of each global access in the PTX (cp.async: 'ld').

    The pointer is the kernel argument the address register traces back to through the 64-bit
    arithmetic; '?' when it traces to none, names joined by '+' when to several.
    """
    pointer_params = {int(i) for ptr, i in _PTX_PARAM.findall(ptx) if ptr}
    defs = {}
    for op, dest, operands in _PTX_DEF64.findall(ptx):
        defs.setdefault(dest, []).append((op, operands))
    found = []
    for kind, modifiers, operands in _PTX_ACCESS.findall(ptx):
        addr = re.search(r"\[\s*(%rd\d+)", operands)
        found.append((kind, _ptx_bytes(modifiers), addr.group(1) if addr else None))
    for addr, size in _PTX_CP_ASYNC.findall(ptx):
        found.append(("ld", int(size, 0), addr))
    out = []
    for kind, size, addr in found:
        params = _pointer_params(addr, defs, pointer_params) if addr else set()
        names = sorted(arg_names[i] if i < len(arg_names) else f"param_{i}" for i in params)
        out.append((kind, size, "+".join(names) or "?"))
    return out


# A SASS instruction line: /*address*/ [predicate] OPCODE operands ;
_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")


def sass_loop_barriers(sass: str) -> tuple:
    """(loops, barriers inside a loop) of a kernel's SASS: a loop is the span from a backward branch's target
    to the branch (BRA to a lower address); a barrier (BAR.SYNC) inside one runs every iteration. In a
    bandwidth-bound kernel such a barrier stops each warp until the program's slowest one arrives, every
    step: e.g. a sum across rows held by several warps (tl.sum over axis 0 inside the loop)."""
    ins = [(int(addr, 16), op, rest) for addr, op, rest in _SASS_LINE.findall(sass)]
    spans = []
    for addr, op, rest in ins:
        target = re.search(r"0x([0-9a-f]+)", rest) if op.startswith("BRA") else None
        if target and int(target.group(1), 16) < addr:
            spans.append((int(target.group(1), 16), addr))
    inside = sum(1 for addr, op, _ in ins
                 if op.startswith("BAR.SYNC") and any(lo <= addr <= hi for lo, hi in spans))
    return len(spans), inside


def sass_widths(cubin: bytes):
    """{'ld': {bytes: count}, 'st': {...}} of the LDG / STG instructions, 'mma': {opcode: count} of the
    tensor-core instructions (HGMMA: Hopper's warpgroup wgmma; HMMA: the older per-warp mma.sync, about half
    the rate on sm_90), 'loops' and 'loop_barriers' (sass_loop_barriers); None without cuobjdump."""
    sass = _cuobjdump(cubin, "-sass")
    if sass is None:
        return None
    out = {"ld": {}, "st": {}, "mma": {op: len(re.findall(rf"\b{op}\b", sass)) for op in ("HGMMA", "HMMA")}}
    out["loops"], out["loop_barriers"] = sass_loop_barriers(sass)
    for op, modifiers in _SASS_ACCESS.findall(sass):
        size = next((_SASS_BYTES[m] for m in modifiers.split(".") if m in _SASS_BYTES), 4)
        hist = out["st" if op == "STG" else "ld"]
        hist[size] = hist.get(size, 0) + 1
    return out


def _histogram(accesses, kind: str) -> dict:
    """{bytes: count} of the accesses of one kind, widest first (JSON keys are strings)."""
    hist = {}
    for k, size, _ in accesses:
        if k == kind:
            hist[size] = hist.get(size, 0) + 1
    return {str(b): hist[b] for b in sorted(hist, reverse=True)}


def access_report(kernel, arg_names) -> dict:
    """The access-width fields of a row: PTX and SASS histograms, per-pointer widths, 128-bit flag.

    `accesses` maps 'ld X' / 'st OUT' to {bytes: count}; `narrow_bulk` lists the accesses under
    16 bytes to pointers other than SCALAR_POINTERS; `bulk_128bit` is True when there are none;
    `vector_loads` counts the 16-byte loads; `async_loads` the cp.async (global -> shared) among them, which a
    software-pipelined loop (tl.range num_stages > 1) issues.
    """
    acc = ptx_accesses(kernel.asm["ptx"], arg_names)
    per_ptr = {}
    for kind, size, ptr in acc:
        hist = per_ptr.setdefault(f"{kind} {ptr}", {})
        hist[str(size)] = hist.get(str(size), 0) + 1
    narrow = sorted({f"{kind} {ptr} {size}B" for kind, size, ptr in acc
                     if size < 16 and not set(ptr.split("+")) <= SCALAR_POINTERS})
    sass = sass_widths(kernel.asm["cubin"])
    row = dict(load_bytes=_histogram(acc, "ld"), store_bytes=_histogram(acc, "st"), accesses=per_ptr,
               narrow_bulk=narrow, bulk_128bit=not narrow,
               vector_loads=sum(1 for k, size, _ in acc if k == "ld" and size == 16),
               async_loads=len(_PTX_CP_ASYNC.findall(kernel.asm["ptx"])))
    if sass is not None:
        row["sass_load_bytes"] = {str(b): sass["ld"][b] for b in sorted(sass["ld"], reverse=True)}
        row["sass_store_bytes"] = {str(b): sass["st"][b] for b in sorted(sass["st"], reverse=True)}
        row["sass_mma"] = sass["mma"]
        row["loops"], row["loop_barriers"] = sass["loops"], sass["loop_barriers"]
        # Counts may differ (ptxas can unroll loops or drop predicated copies); widths should not.
        row["sass_widths_match_ptx"] = (set(row["sass_load_bytes"]) == set(row["load_bytes"]) and
                                        set(row["sass_store_bytes"]) == set(row["store_bytes"]))
    return row


def _widths(hist: dict) -> str:
    return " ".join(f"{b}Bx{n}" for b, n in hist.items()) or "-"


def format_row(row: dict) -> str:
    """One kernel as text: resources, load / store widths (PTX), the 128-bit verdict, what is narrow."""
    if "error" in row:
        return f"{row['kernel']:38s} FAILED {row['error']}"
    if "access_error" in row:
        return (f"{row['kernel']:38s} warps {row['num_warps']:2d}  regs {row['registers']}  "
                f"spill {row['stack_bytes']}  access widths not read: {row['access_error']}")
    line = (f"{row['kernel']:38s} warps {row['num_warps']:2d}  regs {row['registers']}  "
            f"spill {row['stack_bytes']}  {row.get('programs_per_sm', '?')}/SM  ld {_widths(row['load_bytes'])}  "
            f"st {_widths(row['store_bytes'])}  bulk 128-bit: {'yes' if row['bulk_128bit'] else 'no'}")
    if row.get("async_loads"):
        line += f"  cp.async {row['async_loads']}, shared {row.get('shared_bytes', '?')} B"
    line += "".join(f"  {op} {n}" for op, n in row.get("sass_mma", {}).items() if n)
    if row.get("loop_barriers"):
        line += f"  barriers in loops {row['loop_barriers']}"
    if row["narrow_bulk"]:
        line += "\n    narrow bulk: " + ", ".join(row["narrow_bulk"])
    scalars = sorted(k for k in row["accesses"] if set(k.split()[1].split("+")) <= SCALAR_POINTERS)
    if scalars:
        line += "\n    scalars: " + ", ".join(
            f"{k} {_widths(row['accesses'][k])}" for k in scalars)
    if row.get("sass_widths_match_ptx") is False:
        line += (f"\n    SASS widths differ: ld {_widths(row['sass_load_bytes'])}  "
                 f"st {_widths(row['sass_store_bytes'])}")
    return line


@triton.jit
def _toolchain_probe(ptr):
    # ptr: (1,) fp32 buffer the probe would write; it is compiled, never launched.
    tl.store(ptr, 1.0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", help="write the per-kernel rows here")
    p.add_argument("--attention-sweep", action="store_true",
                   help="compile the Triton attention at every tiling of its GPU sweep instead of every kernel")
    p.add_argument("--gemm-sweep", action="store_true",
                   help="compile the MLP's GELU-epilogue GEMMs at every tiling of their GPU sweep instead")
    p.add_argument("--attention-paths", type=int, nargs="+", metavar="HEADS",
                   help="instead: whether the Triton attention's kernels at these head counts (hd 72) compile to "
                        "DiT-XL/2's code path (its PTX instruction mix), with and without the stride unit")
    p.add_argument("--uniform-scan", choices=("default", "sweep"),
                   help="instead: the Triton attention's kernels at 3 heads (stride unit 1 and 8) and 16 heads, at the "
                        "default tilings or every sweep tiling: uniform registers the SASS reads before writing")
    a = p.parse_args(argv)
    if INTERPRETED:
        print("TRITON_INTERPRET is set: run this check in a process without it", file=sys.stderr)
        return 3
    try:
        compile_sm90(_toolchain_probe, {"ptr": "*fp32"}, {}, 1)
    except Exception as e:  # noqa: BLE001 - no NVIDIA backend / ptxas in this triton install
        print(f"NVIDIA toolchain unavailable: {e!r}", file=sys.stderr)
        return 3
    if a.uniform_scan:
        rows = attention_uniform_scan_rows(tilings=a.uniform_scan)
        for r in rows:
            hits = r["reads_before_write"]
            print(f"{r['kernel']:7s} {'/'.join(map(str, r['tiling'])):12s} H={r['heads']:<3d} stride unit "
                  f"{r['stride_unit']}: " + ("no SASS (cuobjdump absent)" if hits is None else
                                             f"{len(hits)} read(s) before write" + "".join(f"\n    {h}" for h in hits)),
                  flush=True)
        if a.json:
            with open(a.json, "w") as f:
                json.dump(dict(arch=f"sm_{TARGET_ARCH}", triton=triton.__version__, rows=rows), f, indent=1)
        return 0
    if a.attention_paths:
        rows = attention_path_rows(a.attention_paths)
        for r in rows:
            print(f"{r['kernel']:5s} H={r['heads']:<3d} stride unit {r['stride_unit']}: "
                  + ("the same instruction mix as H=16" if r["same_as_reference"] else
                     "differs from H=16 (count here, there): "
                     + ", ".join(f"{op} {a_}/{b_}" for op, (a_, b_) in r["differs"].items())), flush=True)
        if a.json:
            with open(a.json, "w") as f:
                json.dump(dict(arch=f"sm_{TARGET_ARCH}", triton=triton.__version__, rows=rows), f, indent=1)
        return 0
    rows, failed = [], False
    todo = attention_sweep_cases() if a.attention_sweep else gemm_gelu_sweep_cases() if a.gemm_sweep else cases()
    for label, fn, values, consts, nw in todo:
        nw, stages = nw if isinstance(nw, tuple) else (nw, None)   # (num_warps, num_stages) where a case sets both
        try:
            kernel = compile_sm90(fn, values, consts, nw, stages)
            usage = resource_usage(kernel.asm["cubin"])
            regs, stack = usage if usage else (None, None)
            ok = stack in (None, 0)
            row = dict(kernel=label, num_warps=nw, registers=regs, stack_bytes=stack, ok=ok)
            shared = int(getattr(kernel.metadata, "shared", 0) or 0)
            if regs is not None:
                row.update(shared_bytes=shared, programs_per_sm=programs_per_sm(regs, nw, shared))
                row["warps_per_sm"] = row["programs_per_sm"] * nw
        except Exception as e:  # noqa: BLE001 - report every failing kernel, then fail
            row = dict(kernel=label, num_warps=nw, error=repr(e)[:500], ok=False)
        else:
            try:
                row.update(access_report(kernel, runtime_arg_names(fn, values, consts)))
            except Exception as e:  # noqa: BLE001 - a report: never fails the run
                row["access_error"] = repr(e)[:500]
        failed |= not row["ok"]
        rows.append(row)
        print(format_row(row), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(arch=f"sm_{TARGET_ARCH}", triton=triton.__version__, rows=rows), f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
