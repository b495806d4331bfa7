"""Compile every fastdit kernel for Hopper (sm_90) without a GPU and report registers and spills.

The Triton interpreter checks what the kernels compute but never runs the GPU code generator, so
errors that only the compiler sees (tl.dot shape/dtype rules, constexpr scoping, layout
conversions) and performance hazards (register spills) would otherwise wait for a GPU. This
module compiles each kernel at the tile sizes the launchers pick for DiT shapes, with the
arguments specialised as the JIT specialises them at run time (integer arguments equal to 1
become constants, multiples of 16 and pointers get the divisibility-16 hint), and reads the
registers / stack (spill) bytes of each cubin with the cuobjdump bundled with triton.

Run in a process where TRITON_INTERPRET is unset:
    python -m fastdit.kernels._sm90_check [--json PATH]
Exit status: 0 all compiled without spills; 1 a kernel failed to compile or spills;
3 the NVIDIA toolchain of this triton install is unavailable (nothing was checked).
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

import torch
import triton
import triton.language as tl

from ._common import INTERPRETED, row_tile

# The op modules by their own names (the package exports functions of the same names).
gr = importlib.import_module(".gated_residual", __package__)
ml = importlib.import_module(".modulate_layernorm", __package__)
pe = importlib.import_module(".patch_embed", __package__)

TARGET_ARCH = 90

_ROW_PTRS = dict.fromkeys(["X", "Y", "GATE", "SHIFT", "SCALE", "RES", "OUT", "DOUT", "XN", "DRES",
                           "DX", "DY"], "*bf16")
_ROW_PTRS.update(dict.fromkeys(["MEAN", "RSTD", "DSHIFT_PART", "DSCALE_PART", "DGATE_PART"], "*fp32"))


def _row_args(n: int, t: int, d: int) -> dict:
    """Argument values of the row kernels for contiguous bf16 (N, T, D) rows, (N, 6D) chunks."""
    v = dict(_ROW_PTRS)
    for s in "xyorn":
        v.update({f"stride_{s}n": t * d, f"stride_{s}t": d, f"stride_{s}d": 1})
    for s in "gsc":
        v.update({f"stride_{s}n": 6 * d, f"stride_{s}d": 1})
    v.update(T=t, D=d, eps=1e-6, n_tiles=16, tokens_per_tile=16, n_iters=8)
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


def cases():
    """(label, kernel, argument values, constexprs, num_warps) for DiT-like shapes."""
    out = []
    for d in (384, 1152, 8192):
        bt, bd, nw = row_tile(d)
        args = _row_args(32, 256, d)
        for res in (False, True):
            out.append((f"modln_fwd D={d} residual={res}", ml._modln_fwd_kernel, args,
                        dict(HAS_RESIDUAL=res, BLOCK_T=bt, BLOCK_D=bd), nw))
            out.append((f"modln_bwd D={d} residual={res}", ml._modln_bwd_kernel, args,
                        dict(HAS_RESIDUAL=res, HAS_DRES=res, BLOCK_T=bt, BLOCK_D=bd), nw))
        out.append((f"gated_residual_fwd D={d}", gr._gated_residual_fwd_kernel, args,
                    dict(BLOCK_T=bt, BLOCK_D=bd), nw))
        out.append((f"gated_residual_bwd D={d}", gr._gated_residual_bwd_kernel, args,
                    dict(BLOCK_T=bt, BLOCK_D=bd), nw))
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
    # fp32 GEMMs (IEEE products) once, at p = 2.
    args = {k_: ("*fp32" if isinstance(v, str) else v) for k_, v in _pe_args(32, 4, 32, 1152, 2).items()}
    bm, bn, bk = pe.fwd_blocks(1152, 16, torch.float32)
    out.append(("patch_embed_fwd fp32 p=2", pe._patch_embed_fwd_kernel, args,
                dict(P=2, HAS_BIAS=True, HAS_POS=True, UPCAST=False, DOT_PRECISION="ieee",
                     BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk), pe.NUM_WARPS))
    return out


def compile_sm90(fn, values: dict, constexprs: dict, num_warps: int):
    """Compile `fn` for sm_90 with run-time-like specialisation; return the compiled kernel."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    sig, consts, attrs = {}, dict(constexprs), {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
            continue
        v = values[name]
        if isinstance(v, str):
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
    src = ASTSource(fn, sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", TARGET_ARCH, 32),
                          options={"num_warps": num_warps})


def resource_usage(cubin: bytes):
    """(registers, stack bytes) of a cubin, read with triton's bundled cuobjdump; None if absent."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.isfile(tool):
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True,
                             text=True).stdout
    finally:
        os.unlink(f.name)
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


@triton.jit
def _toolchain_probe(ptr):
    # ptr: (1,) fp32 buffer the probe would write; it is compiled, never launched.
    tl.store(ptr, 1.0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", help="write the per-kernel rows here")
    a = p.parse_args(argv)
    if INTERPRETED:
        print("TRITON_INTERPRET is set: run this check in a process without it", file=sys.stderr)
        return 3
    try:
        compile_sm90(_toolchain_probe, {"ptr": "*fp32"}, {}, 1)
    except Exception as e:  # noqa: BLE001 - no NVIDIA backend / ptxas in this triton install
        print(f"NVIDIA toolchain unavailable: {e!r}", file=sys.stderr)
        return 3
    rows, failed = [], False
    for label, fn, values, consts, nw in cases():
        try:
            kernel = compile_sm90(fn, values, consts, nw)
            usage = resource_usage(kernel.asm["cubin"])
            regs, stack = usage if usage else (None, None)
            ok = stack in (None, 0)
            row = dict(kernel=label, num_warps=nw, registers=regs, stack_bytes=stack, ok=ok,
                       vector_loads=len(re.findall(r"ld\.global[^;]*\.v4", kernel.asm["ptx"])))
        except Exception as e:  # noqa: BLE001 - report every failing kernel, then fail
            row = dict(kernel=label, num_warps=nw, error=repr(e)[:500], ok=False)
        failed |= not row["ok"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(arch=f"sm_{TARGET_ARCH}", triton=triton.__version__, rows=rows), f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
