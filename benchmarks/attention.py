"""Attention benchmark: which kernel runs DiT's self-attention fastest, and what the layout costs.

For the DiT-XL/2 shape by default (batch 128, 16 heads, head_dim 72, 256 tokens, bf16) it times, forward
and forward+backward (median over --rep calls, CUDA events on a GPU):

  sdpa:default    torch's scaled_dot_product_attention, free to choose (what fastdit's 'sdpa' runs)
  sdpa:cudnn      the same call restricted to one of SDPA's kernels (torch.nn.attention.sdpa_kernel);
  sdpa:flash      a kernel that cannot run this input is recorded as unavailable with the reason
  sdpa:efficient
  sdpa:math
  sdpa_packed     fastdit's backends (fastdit.models.attention), when they run here; sdpa_packed is SDPA
  flash_attn      with dq, dk, dv written into dqkv by one copy; triton is fastdit's Triton attention
  xformers        (fastdit.kernels.flash_attention: reads the packed qkv, writes dqkv in its layout)
  triton
  triton:swept    the same kernels at the H100 sweep's fastest tilings (FASTDIT_ATTENTION_TILING=swept)

each in two input layouts:

  packed      q, k, v as strided views of the qkv projection's output (N, T, 3, H, hd), as the model
              feeds them; the backward includes assembling dqkv from dq, dk, dv
  contiguous  q, k, v already contiguous (N, H, T, hd) (flash_attn / xformers: (N, T, H, hd)); the
              kernel alone, the floor the packed layout is compared with

With --sweep-triton it also times the Triton attention's kernels at each tiling of its SWEEP
(kernels/flash_attention.py: the forward; the backward with one kernel's tiling varied and the other's at its
default; the backward with the qkv bias sums of bias_fold), in the packed layout, and names the fastest of
each: how the launchers' defaults (FWD_CONFIG, BWD_DQ_CONFIG, BWD_DKDV_CONFIG) are chosen on a GPU.

Usage:
  python benchmarks/attention.py [--batch 128] [--heads 16] [--head-dim 72] [--tokens 256]
                                 [--dtype bf16] [--rep 50] [--warmup 10] [--sweep-triton] [--json PATH]
  python benchmarks/attention.py --smoke --json /tmp/a.json   # tiny CPU run: checks the tool, not a speed
Nothing is printed that was not measured in this run.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable, Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]  # see benchmarks/kernels.py
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.common import IntervalTimer, environment, summarize, synchronize, write_json  # noqa: E402

SDPA_KERNELS = ("default", "cudnn", "flash", "efficient", "math")
BACKENDS = ("sdpa_packed", "flash_attn", "xformers", "triton")  # fastdit.models.attention backends
# a backend under one of the kernels' environment switches: (backend, the environment set while it is timed)
VARIANTS = {"triton:swept": ("triton", (("FASTDIT_ATTENTION_TILING", "swept"),))}
LAYOUTS = ("packed", "contiguous")
PASSES = ("fwd", "fwd+bwd")
DTYPES = ("bf16", "fp16", "fp32")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=None, help="default 128 (smoke 2)")
    p.add_argument("--heads", type=int, default=None, help="default 16 (smoke 2)")
    p.add_argument("--head-dim", type=int, default=None, help="default 72 (smoke 8)")
    p.add_argument("--tokens", type=int, default=None, help="default 256 (smoke 16)")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="default bf16 (smoke fp32)")
    p.add_argument("--rep", type=int, default=None, help="timed calls per row and pass (default 50; smoke 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 10; smoke 1)")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--sweep-triton", action="store_true",
                   help="also time the Triton attention's kernels at each tiling of its SWEEP")
    p.add_argument("--no-rows", action="store_true", help="leave out the kernel x layout rows (with --sweep-triton)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU: checks the tool")
    a = p.parse_args(argv)
    big = dict(batch=128, heads=16, head_dim=72, tokens=256, dtype="bf16", rep=50, warmup=10)
    small = dict(batch=2, heads=2, head_dim=8, tokens=16, dtype="fp32", rep=2, warmup=1)
    for k, v in (small if a.smoke else big).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    for k in ("batch", "heads", "head_dim", "tokens", "rep"):
        if getattr(a, k) < 1:
            p.error(f"--{k.replace('_', '-')} must be >= 1, got {getattr(a, k)}")
    if a.warmup < 0:
        p.error(f"--warmup must be >= 0, got {a.warmup}")
    if a.no_rows and not a.sweep_triton:
        p.error("--no-rows leaves nothing to run without --sweep-triton")
    return a


def resolve_device(a):
    import torch
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("attention.py: error: --device cuda: no CUDA device is visible")
    if a.device == "cpu" or a.smoke or (a.device == "auto" and not torch.cuda.is_available()):
        if not a.smoke and a.device == "auto":
            raise SystemExit("attention.py: error: no CUDA device; run with --smoke (tool check) or --device cpu")
        return torch.device("cpu")
    return torch.device("cuda")


def make_call(kind: str, layout: str, qkv) -> Callable[[], Any]:
    """A function of no arguments that runs one attention call on `qkv` (N, T, 3, H, hd) in `layout`
    and returns its output (N, T, H*hd); the leaf tensor whose gradient the backward fills is qkv (packed)
    or the three contiguous inputs."""
    import torch
    import torch.nn.functional as F
    from fastdit.models import attention as A

    n, t, _, h, hd = qkv.shape
    if kind in BACKENDS:  # fastdit's backend calls take (N, T, 3, H, hd); contiguous: restacked per call
        if layout == "packed":
            return lambda: A.attention(qkv, kind)
        q, k, v = (x.detach().contiguous().requires_grad_() for x in qkv.unbind(2))
        return lambda: A.attention(torch.stack((q, k, v), 2), kind)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backend = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
               "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}.get(kind)

    def sdpa(q, k, v):
        if backend is None:
            return F.scaled_dot_product_attention(q, k, v)
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v)

    if layout == "packed":
        def call():
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (N, H, T, hd) strided views, as the model
            return sdpa(q, k, v).transpose(1, 2).reshape(n, t, h * hd)
        return call
    q, k, v = (x.detach().contiguous().requires_grad_() for x in qkv.permute(2, 0, 3, 1, 4).unbind(0))
    return lambda: sdpa(q, k, v).transpose(1, 2).reshape(n, t, h * hd)


def time_pass(call: Callable[[], Any], passname: str, device, rep: int, warmup: int) -> Dict[str, Any]:
    import torch
    grad = None

    def once():
        nonlocal grad
        out = call()
        if passname == "fwd+bwd":
            if grad is None:
                grad = torch.randn_like(out)
            out.backward(grad)

    for _ in range(warmup):
        once()
    synchronize(device)
    timer, ms = IntervalTimer(device), []
    for _ in range(rep):
        timer.start()
        once()
        ms.append(timer.stop())
    return summarize(ms)


def attention_flops(a, passname: str) -> float:
    """Matmul FLOPs of one call: 2 GEMMs of 2*N*H*T*T*hd forward; backward 2.5x the forward (5 GEMMs)."""
    fwd = 4.0 * a.batch * a.heads * a.tokens * a.tokens * a.head_dim
    return fwd if passname == "fwd" else 3.5 * fwd


def run_row(kind: str, layout: str, a, device, dtype) -> Dict[str, Any]:
    from benchmarks.common import env_vars
    if kind in VARIANTS:
        backend, env = VARIANTS[kind]
        with env_vars(env):
            row = _run_row(backend, layout, a, device, dtype)
        return dict(row, name=kind, env=dict(env))
    return _run_row(kind, layout, a, device, dtype)


def _run_row(kind: str, layout: str, a, device, dtype) -> Dict[str, Any]:
    import torch
    from fastdit.models import attention as A
    row: Dict[str, Any] = dict(name=f"{'sdpa:' if kind in SDPA_KERNELS else ''}{kind}", layout=layout,
                               status="ok", error=None)
    if kind in BACKENDS:
        ok, why = A.backend_status()[kind]
        if not ok:
            return dict(row, status="unavailable", error=why)
    torch.manual_seed(0)
    qkv = torch.randn(a.batch, a.tokens, 3, a.heads, a.head_dim, device=device, dtype=dtype, requires_grad=True)
    try:
        call = make_call(kind, layout, qkv)
        for passname in PASSES:
            ms = time_pass(call, passname, device, a.rep, a.warmup)
            row[passname] = dict(ms=ms, tflops=attention_flops(a, passname) / (ms["median"] * 1e-3) / 1e12)
    except RuntimeError as e:  # SDPA: "No available kernel" for a kernel that cannot take this input
        text = " ".join(str(e).split())
        row.update(status="unavailable" if "kernel" in text.lower() else "error", error=text[:400])
    finally:
        del qkv
        synchronize(device)
    return row


def sweep_triton(a, device, dtype, progress: Callable[[Dict[str, Any]], None] = lambda r: None) -> Dict[str, Any]:
    """Median ms of the Triton attention's forward at each forward tiling, and of its backward (both kernels)
    at each dq tiling (dk/dv at its default) and each dk/dv tiling (dq at its default); the fastest of each.
    A tiling that fails (e.g. too much shared memory on this card) is recorded with its error. `progress` gets
    the results so far after each tiling (the caller writes them: a deadline that kills the sweep keeps them)."""
    import importlib

    import torch
    fa = importlib.import_module("fastdit.kernels.flash_attention")
    torch.manual_seed(0)
    qkv = torch.randn(a.batch, a.tokens, 3, a.heads, a.head_dim, device=device, dtype=dtype)
    out, lse = fa.attention_fwd(qkv)
    dout = torch.randn_like(out)
    sweep = fa.SWEEP
    if a.smoke:   # the tool, not a speed: the first two tilings, shrunk to the tiny sequence by the launcher's rule
        sweep = {k: v[:2] for k, v in sweep.items()}
    calls = {
        "fwd": lambda c: fa.attention_fwd(qkv, config=c),
        "dq": lambda c: fa.attention_bwd(dout, qkv, out, lse, dq_config=c),
        "dkdv": lambda c: fa.attention_bwd(dout, qkv, out, lse, dkdv_config=c),
        "dq+bias": lambda c: fa.attention_bwd(dout, qkv, out, lse, dq_config=c, bias_sums=True),
    }
    result: Dict[str, Any] = {}
    for kernel, configs in sweep.items():
        rows = []
        for cfg in configs:
            cfg = fa.tiling(cfg, dtype, a.tokens)
            try:
                ms = time_pass(lambda: calls[kernel](cfg), "fwd", device, a.rep, a.warmup)
                rows.append(dict(config=list(cfg), ms=ms))
                print(f"  triton {kernel:<5} BLOCK_M {cfg[0]:3d} BLOCK_N {cfg[1]:3d} warps {cfg[2]} stages {cfg[3]}: "
                      f"{ms['median']:.3f} ms" + (" (with the other backward kernel at its default)"
                                                  if kernel != "fwd" else ""), flush=True)
            except Exception as e:  # noqa: BLE001 - a tiling this card cannot run is a result too
                rows.append(dict(config=list(cfg), error=" ".join(str(e).split())[:300]))
                print(f"  triton {kernel:<5} {cfg}: failed: {rows[-1]['error'][:90]}", flush=True)
            ok = [r for r in rows if "ms" in r]
            best = min(ok, key=lambda r: r["ms"]["median"]) if ok else None
            result[kernel] = dict(rows=rows, fastest=(best["config"] if best else None))
            progress(result)
    del qkv, out, lse, dout
    synchronize(device)
    return result


def main(argv: Optional[List[str]] = None) -> int:
    a = parse_args(argv)
    import torch
    device = resolve_device(a)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[a.dtype]
    kinds = [] if a.no_rows else list(SDPA_KERNELS) + list(BACKENDS) + list(VARIANTS)
    rows = []
    print(f"attention N={a.batch} H={a.heads} hd={a.head_dim} T={a.tokens} {a.dtype} on {device}"
          + (" (smoke: CPU, tiny; times say nothing about a GPU)" if a.smoke else ""), flush=True)
    print(f"{'kernel':<16} {'layout':<11} {'fwd ms':>8} {'fwd+bwd ms':>11} {'fwd+bwd TFLOP/s':>16}  note")
    for kind in kinds:
        for layout in LAYOUTS:
            r = run_row(kind, layout, a, device, dtype)
            rows.append(r)
            if r["status"] == "ok":
                print(f"{r['name']:<16} {layout:<11} {r['fwd']['ms']['median']:8.3f} "
                      f"{r['fwd+bwd']['ms']['median']:11.3f} {r['fwd+bwd']['tflops']:16.1f}", flush=True)
            else:
                print(f"{r['name']:<16} {layout:<11} {'-':>8} {'-':>11} {'-':>16}  {r['status']}: "
                      f"{(r['error'] or '')[:90]}", flush=True)
    ok = [r for r in rows if r["status"] == "ok" and r["layout"] == "packed"]
    best = min(ok, key=lambda r: r["fwd+bwd"]["ms"]["median"]) if ok else None
    if best:
        print(f"fastest fwd+bwd in the model's (packed) layout: {best['name']} "
              f"{best['fwd+bwd']['ms']['median']:.3f} ms")
    result = dict(benchmark="attention", environment=environment(device),
                  config=dict(batch=a.batch, heads=a.heads, head_dim=a.head_dim, tokens=a.tokens, dtype=a.dtype,
                              rep=a.rep, warmup=a.warmup, smoke=a.smoke),
                  rows=rows, fastest_packed=(best["name"] if best else None), triton_sweep=None, complete=False)
    if a.sweep_triton:
        from fastdit.models import attention as A
        ok, why = A.backend_status()["triton"]
        if ok:
            print("Triton attention tilings (median ms):", flush=True)

            def progress(sweep):
                result["triton_sweep"] = sweep
                if a.json:
                    write_json(a.json, result)
            sweep = sweep_triton(a, device, dtype, progress)
            result["triton_sweep"] = sweep
            print("fastest tilings: " + ", ".join(f"{k} {v['fastest']}" for k, v in sweep.items()))
        else:
            result["triton_sweep"] = dict(unavailable=why)
            print(f"Triton attention sweep: unavailable ({why})")
    result["complete"] = True
    if a.json:
        print(f"wrote {write_json(a.json, result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
