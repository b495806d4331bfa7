"""Kernel benchmark: fastdit's fused Triton ops vs the eager `*_ref` and torch.compile(`*_ref`).

For each op (modulate_layernorm, gated_residual, gated_residual_modulate_layernorm, patch_embed),
each pass (fwd, bwd, fwd+bwd) and each DiT shape (D in 384/768/1024/1152, T in 256/1024, batch N
chosen so N*T = --tokens, 65536 by default), it times

    fused    fastdit.kernels.<op>
    fused-direct  the same, dispatched straight to the launchers (FASTDIT_KERNEL_DISPATCH=direct: the
             same kernels, less host work per call; benchmarks/host_overhead.py)
    fused-gemm-bwd  patch_embed only: the same forward, the backward from library GEMMs
             (FASTDIT_PATCH_EMBED_BWD=gemm: dweight and dbias in one GEMM, dx as a GEMM folded back)
    fused-paired-sums  the two LN ops: the backward's two row sums in one reduction (FASTDIT_LN_ROW_SUMS=paired)
    fused-tile-sums  the three row ops: the backward's per-tile partial sums added and cast in one Triton
             pass (FASTDIT_TILE_SUMS=triton) instead of a reduction and a cast per gradient
    eager    fastdit.kernels.<op>_ref (plain PyTorch)
    compile  torch.compile(<op>_ref)
    apex / flash_attn_triton   LayerNorm from apex or flash-attn + eager modulate (modulate_layernorm
             only, and only when the package imports)

and reports milliseconds (median; triton.testing.do_bench on CUDA, which flushes L2 before each
call), the bytes the op must move through HBM at least, the GB/s that implies, and that as a share
of a device-to-device copy measured in the same run (`copy_share`; 1.0 = as fast as a copy).

Two more columns say whether a call's time is its kernels' or the host's:
  host_ms   the CPU time to issue one call (median of 10, the device idle at its start): Python, the
            torch.library dispatch, the launches. Where host_ms approaches ms, do_bench timed the host.
  ms_graph  the same call captured once in a CUDA graph and replayed (triton.testing.do_bench_cudagraph,
            no L2 flush): the GPU time of its kernels and allocations without host gaps
            (`copy_share_graph`). Captured for fwd and fwd+bwd (the latter differentiating new leaf views
            per call: fresh_leaves_fwd_bwd); a bwd alone would replay an autograd graph built outside the
            capture, so the bwd row gets fwd+bwd minus fwd (`graph_basis`). None (with `graph_error`) where
            capture fails; CUDA only.

Bytes counted per op (e = element size; partial-sum buffers and L2 re-reads are not counted):
  modulate_layernorm  fwd: read x, write y (2*NTD*e) + shift, scale (2*ND*e) + mean, rstd (2*NT*4)
                      bwd: read dy, x, write dx (3*NTD*e) + scale, dshift, dscale (3*ND*e) + mean, rstd
  gated_residual      fwd: read x, y, write out (3*NTD*e) + gate
                      bwd: read dout, y, write dy (3*NTD*e) + gate, dgate (dx is dout itself)
  gated_residual_modulate_layernorm
                      fwd: read x, y, write x', h (4*NTD*e) + gate, shift, scale + mean, rstd
                      bwd: read dh, dx', x', y, write dx, dy (6*NTD*e) + 6*ND*e + mean, rstd
  patch_embed         fwd: read x (N*C*H*W*e), weight (D*K*e), bias, pos (T*D*e); write out (NTD*e)
                      bwd: read dout (NTD*e), x, weight; write dx, dweight, dbias
  fwd+bwd is the sum. patch_embed rows also give TFLOP/s (2*M*K*D per GEMM; 3 GEMMs fwd+bwd).

Usage:
  python benchmarks/kernels.py [--ops ...] [--dims 384 768 1024 1152] [--tokens-per-sample 256 1024]
                               [--dtype bf16] [--json PATH] [--plot PATH]
  python benchmarks/kernels.py --smoke --json /tmp/k.json   # tiny CPU run through the interpreter
Nothing is printed that was not measured in this run.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Run as a script, this file's folder lands on sys.path[0] and the file itself would then answer to
# `import kernels` (a PyPI package name that transformers/diffusers probe for). Take the folder off.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.common import IntervalTimer, env_vars, environment, synchronize, write_json  # noqa: E402

OPS = ("modulate_layernorm", "gated_residual", "gated_residual_modulate_layernorm", "patch_embed")
PASSES = ("fwd", "bwd", "fwd+bwd")


def _parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS)
    p.add_argument("--dims", nargs="+", type=int, default=[384, 768, 1024, 1152])
    p.add_argument("--tokens-per-sample", nargs="+", type=int, default=[256, 1024],
                   help="T; patch_embed uses 4-channel latents of side 2*sqrt(T) with p=2")
    p.add_argument("--tokens", type=int, default=65536, help="N*T per call (N = tokens // T)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--impls", nargs="+", default=["fused", "fused-direct", "fused-gemm-bwd", "fused-tile-sums",
                                                  "fused-paired-sums", "eager", "compile", "apex",
                                                  "flash_attn_triton"])
    p.add_argument("--warmup", type=int, default=25, help="ms of warm-up (do_bench) per timing")
    p.add_argument("--rep", type=int, default=100, help="ms of repetitions (do_bench) per timing")
    p.add_argument("--copy-mib", type=int, default=1024, help="buffer size of the copy baseline")
    p.add_argument("--json", help="write the rows and run metadata here")
    p.add_argument("--plot", help="write a PNG of copy_share per op, pass and impl here")
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes on CPU through the Triton interpreter (fused + eager only): checks the "
                        "harness runs; its timings are the interpreter's, not a GPU's")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# Cases: inputs, functions, bytes
# ----------------------------------------------------------------------------------------------
def _case(op, n, t, d, dtype, device):
    """(fused_fn, ref_fn, args, grad_outs, bytes_fwd, bytes_bwd, flops_fwd, flops_bwd, shape)."""
    import torch
    import fastdit.kernels as K

    e = torch.tensor([], dtype=dtype).element_size()
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, scale=1.0, offset=0.0):
        return (torch.randn(*shape, generator=g) * scale + offset).to(device=device, dtype=dtype)

    ntd, nd, nt = n * t * d, n * d, n * t
    if op == "patch_embed":
        side = int(round(t ** 0.5)) * 2
        c, p = 4, 2
        t = (side // p) ** 2
        ntd, k = n * t * d, c * p * p
        x = rnd(n, c, side, side).requires_grad_()
        w = rnd(d, c, p, p, scale=k ** -0.5).requires_grad_()
        b = rnd(d).requires_grad_()
        pos = rnd(1, t, d)
        args = [x, w, b]
        fused = lambda x, w, b: K.patch_embed(x, w, b, pos, p)  # noqa: E731
        ref = lambda x, w, b: K.patch_embed_ref(x, w, b, pos, p)  # noqa: E731
        img = n * c * side * side * e
        bytes_fwd = img + d * k * e + d * e + t * d * e + ntd * e
        bytes_bwd = ntd * e + img + d * k * e + img + d * k * e + d * e
        flops = 2 * n * t * k * d
        return fused, ref, args, [rnd(n, t, d)], bytes_fwd, bytes_bwd, flops, 2 * flops, (n, t, d)

    mods = rnd(n, 6 * d, scale=0.5, offset=0.3)
    if op == "modulate_layernorm":
        x = rnd(n, t, d, scale=2.0).requires_grad_()
        c = mods.requires_grad_()
        fused = lambda x, c: K.modulate_layernorm(x, c[:, :d], c[:, d:2 * d])  # noqa: E731
        ref = lambda x, c: K.modulate_layernorm_ref(x, c[:, :d], c[:, d:2 * d])  # noqa: E731
        bytes_fwd = 2 * ntd * e + 2 * nd * e + 2 * nt * 4
        bytes_bwd = 3 * ntd * e + 3 * nd * e + 2 * nt * 4
        return fused, ref, [x, c], [rnd(n, t, d)], bytes_fwd, bytes_bwd, 0, 0, (n, t, d)
    x = rnd(n, t, d, scale=2.0).requires_grad_()
    y = rnd(n, t, d).requires_grad_()
    c = mods.requires_grad_()
    if op == "gated_residual":
        fused = lambda x, y, c: K.gated_residual(x, y, c[:, 2 * d:3 * d])  # noqa: E731
        ref = lambda x, y, c: K.gated_residual_ref(x, y, c[:, 2 * d:3 * d])  # noqa: E731
        return (fused, ref, [x, y, c], [rnd(n, t, d)], 3 * ntd * e + nd * e,
                3 * ntd * e + 2 * nd * e, 0, 0, (n, t, d))
    # gated_residual_modulate_layernorm
    fused = lambda x, y, c: K.gated_residual_modulate_layernorm(  # noqa: E731
        x, y, c[:, 2 * d:3 * d], c[:, 3 * d:4 * d], c[:, 4 * d:5 * d])
    ref = lambda x, y, c: K.gated_residual_modulate_layernorm_ref(  # noqa: E731
        x, y, c[:, 2 * d:3 * d], c[:, 3 * d:4 * d], c[:, 4 * d:5 * d])
    return (fused, ref, [x, y, c], [rnd(n, t, d), rnd(n, t, d)],
            4 * ntd * e + 3 * nd * e + 2 * nt * 4, 6 * ntd * e + 6 * nd * e + 2 * nt * 4, 0, 0,
            (n, t, d))


def _ln_alternatives(impls, d, device):
    """Third-party LayerNorm + eager modulate for modulate_layernorm, when importable."""
    import torch
    alts = {}
    if "apex" in impls:
        try:
            from apex.normalization import FusedLayerNorm
            ln = FusedLayerNorm(d, eps=1e-6, elementwise_affine=False).to(device)
            alts["apex"] = lambda x, c: ln(x) * (1 + c[:, None, d:2 * d]) + c[:, None, :d]
        except Exception:  # noqa: BLE001 - apex is optional
            pass
    if "flash_attn_triton" in impls:
        try:
            from flash_attn.ops.triton.layer_norm import layer_norm_fn
            ones = torch.ones(d, device=device)

            def fa(x, c):
                h = layer_norm_fn(x, ones.to(x.dtype), None, eps=1e-6)
                return h * (1 + c[:, None, d:2 * d]) + c[:, None, :d]
            alts["flash_attn_triton"] = fa
        except Exception:  # noqa: BLE001 - flash-attn is optional
            pass
    return alts


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------
def _timer(device, warmup, rep):
    """fn -> median milliseconds. CUDA: triton's do_bench (L2 flushed per call); CPU: the median of 3
    benchmarks.common.IntervalTimer intervals after one warm-up call."""
    if device.type == "cuda":
        from triton.testing import do_bench
        return lambda fn: float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))

    def cpu_time(fn, reps=3):
        fn()
        timer, times = IntervalTimer(device), []
        for _ in range(reps):
            timer.start()
            fn()
            times.append(timer.stop())
        return statistics.median(times)
    return cpu_time


def _direct(fn):
    """fn with the fastdit ops dispatched straight to their launchers (FASTDIT_KERNEL_DISPATCH=direct)."""
    from fastdit.kernels._common import kernel_dispatch

    def call(*args):
        with kernel_dispatch("direct"):
            return fn(*args)
    return call


# Impls that are `fused` run under a switch of the kernels (environment variable, value, the ops it changes).
ENV_IMPLS = {
    "fused-gemm-bwd": ("FASTDIT_PATCH_EMBED_BWD", "gemm", ("patch_embed",)),
    "fused-paired-sums": ("FASTDIT_LN_ROW_SUMS", "paired", ("modulate_layernorm", "gated_residual_modulate_layernorm")),
    "fused-tile-sums": ("FASTDIT_TILE_SUMS", "triton", ("modulate_layernorm", "gated_residual",
                                                        "gated_residual_modulate_layernorm")),
}


def _impl_env(impl):
    """The environment an impl runs in (ENV_IMPLS), for its forward and its backward calls."""
    return env_vars([ENV_IMPLS[impl][:2]] if impl in ENV_IMPLS else [])


def _as_list(out):
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _pass_fns(fn, args, grad_outs):
    """Callables timing fwd, bwd (graph kept, grads only) and fwd+bwd of fn(*args)."""
    import torch
    diff = [a for a in args if a.requires_grad]

    def fwd():
        return fn(*args)

    outs = _as_list(fn(*args))

    def bwd():
        return torch.autograd.grad(outs, diff, grad_outs, retain_graph=True)

    def both():
        return torch.autograd.grad(_as_list(fn(*args)), diff, grad_outs)
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": both}


def fresh_leaves_fwd_bwd(fn, args, grad_outs):
    """fwd+bwd of fn(*args) as captured into a CUDA graph: each call differentiates new leaves (detached views of
    the inputs, no copy), so their autograd nodes take the stream current at the call, the capturing one.
    The inputs' own gradient-accumulation nodes keep the stream they were first used on (the default stream,
    outside the capture), and the engine would make that stream wait on the capturing one, which invalidates the
    capture (PyTorch's CUDA-graph notes: warm a captured backward up on a side stream). The likely cause of every
    fwd+bwd capture failing on an H100 (torch 2.11, cudaErrorStreamCaptureInvalidated), eager's too; not yet
    rerun on a GPU."""
    import torch

    def both():
        leaves = [a.detach().requires_grad_() if a.requires_grad else a for a in args]
        return torch.autograd.grad(_as_list(fn(*leaves)), [a for a in leaves if a.requires_grad], grad_outs)
    return both


def derive_bwd_graph_times(rows) -> None:
    """Give each bwd row whose fwd and fwd+bwd rows (same op, impl, shape) have graph times the difference as its
    graph time (`graph_basis` "fwd+bwd minus fwd"): the backward's GPU time without host gaps, which a capture of
    the backward alone cannot give (its autograd graph was built outside the capture)."""
    key = lambda r: (r["op"], r["impl"], r["N"], r["T"], r["D"], r["dtype"])  # noqa: E731
    graph = {(key(r), r["pass"]): r["ms_graph"] for r in rows if r.get("ms_graph")}
    for r in rows:
        f, fb = graph.get((key(r), "fwd")), graph.get((key(r), "fwd+bwd"))
        if r["pass"] != "bwd" or r.get("ms_graph") or not (f and fb):
            continue
        if fb <= f:   # noise larger than the backward: no figure rather than a wrong one
            r["graph_error"] = f"fwd+bwd graph time {fb:.4f} ms not above fwd's {f:.4f} ms"
            continue
        r["ms_graph"] = fb - f
        r["gbps_graph"] = r["bytes"] / (r["ms_graph"] * 1e-3) / 1e9
        r["copy_share_graph"] = r["gbps_graph"] * r["copy_share"] / r["gbps"]
        r["graph_error"], r["graph_basis"] = None, "fwd+bwd minus fwd"


def _host_ms(fn, device, reps=10):
    """Median CPU time (ms) to issue one call of fn, each started with the device idle."""
    import time
    times = []
    for _ in range(reps):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    synchronize(device)
    return statistics.median(times)


_GRAPHS_OFF = []  # set after a failed capture leaves the device unusable: no more captures in this run


def _graph_ms(fn, device, rep):
    """(ms, error): fn's GPU time replayed from a CUDA graph (no host work), or (None, why)."""
    if device.type != "cuda":
        return None, "CUDA graphs need a CUDA device"
    if _GRAPHS_OFF:
        return None, f"CUDA graph timing off after an earlier failure: {_GRAPHS_OFF[0]}"
    try:
        from triton.testing import do_bench_cudagraph
        try:
            return float(do_bench_cudagraph(fn, rep=rep, return_mode="median")), None
        except TypeError:   # a triton without return_mode: its mean
            return float(do_bench_cudagraph(fn, rep=rep)), None
    except Exception as e:  # noqa: BLE001 - a capture that fails is reported, not fatal
        why = f"{type(e).__name__}: {e}"[:300]
        import torch
        try:
            torch.cuda.synchronize(device)  # is the device still usable after the failed capture?
        except Exception as e2:  # noqa: BLE001
            _GRAPHS_OFF.append(f"{why}; then {type(e2).__name__}: {e2}"[:300])
        return None, why


def _copy_gbps(device, mib, timer):
    """Measured device-to-device copy bandwidth (GB/s, read + write counted)."""
    import torch
    n = mib * 2 ** 20 // 4
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------
SMOKE_NOTE = ("--smoke: every timing below comes from the Triton interpreter on the CPU (TRITON_INTERPRET=1), "
              "not from a GPU; it shows the harness runs and says nothing about kernel speed")


def begin(smoke: bool, note: str, dtype_name: str):
    """The torch dtype named `dtype_name`. A smoke run goes through the Triton interpreter (set before
    triton is first imported) and prints `note` first, so nobody reads its timings as a GPU's."""
    if smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        print(note, flush=True)
    import torch
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]


def run(args):
    dtype = begin(args.smoke, SMOKE_NOTE, args.dtype)
    import torch
    if args.smoke:
        device = torch.device("cpu")
        dtype = torch.float32
        dims, tps, tokens = [64], [16], 32
        impls = [i for i in args.impls if i in ("fused", "fused-direct", "eager", *ENV_IMPLS)]
        copy_mib = 16
    else:
        if not torch.cuda.is_available():
            raise SystemExit("benchmarks/kernels.py needs a CUDA device (or --smoke for a CPU check)")
        device = torch.device("cuda")
        dims, tps, tokens, impls, copy_mib = (args.dims, args.tokens_per_sample, args.tokens,
                                              args.impls, args.copy_mib)
    timer = _timer(device, args.warmup, args.rep)
    copy_gbps = _copy_gbps(device, copy_mib, timer)
    print(f"device-to-device copy: {copy_gbps:.1f} GB/s", flush=True)

    rows = []
    for op in args.ops:
        for t in tps:
            for d in dims:
                n = max(1, tokens // t)
                fused, ref, inputs, grad_outs, b_fwd, b_bwd, f_fwd, f_bwd, shape = _case(
                    op, n, t, d, dtype, device)
                fns = {"fused": fused, "eager": ref, "fused-direct": _direct(fused)}
                fns.update({impl: fused for impl, (_, _, ops) in ENV_IMPLS.items() if op in ops})   # _impl_env
                if "compile" in impls:
                    torch._dynamo.reset()
                    fns["compile"] = torch.compile(ref, dynamic=False)
                if op == "modulate_layernorm":
                    fns.update(_ln_alternatives(impls, d, device))
                with torch.no_grad():
                    exact = _as_list(ref(*[a.detach().float() for a in inputs]))
                for impl, fn in fns.items():
                    if impl not in impls:
                        continue
                    with _impl_env(impl):
                        with torch.no_grad():
                            outs = _as_list(fn(*[a.detach() for a in inputs]))
                        err = max((o.float() - r).abs().max().item() for o, r in zip(outs, exact))
                        for pas, call in _pass_fns(fn, inputs, grad_outs).items():
                            ms = timer(call)
                            host_ms = _host_ms(call, device, reps=2 if args.smoke else 10)
                            # ~20 ms of calls unrolled into one graph: capture stays short, the median is stable.
                            # Not the bwd pass: its autograd graph was built outside the capture, so its backward
                            # would run on the forward's stream, outside the capturing one (fwd+bwd - fwd gives it).
                            if pas == "bwd" and device.type == "cuda":
                                ms_graph, graph_error = None, ("bwd alone: its forward ran outside the capture; "
                                                               "see fwd+bwd minus fwd")
                            else:
                                graph_call = (fresh_leaves_fwd_bwd(fn, inputs, grad_outs) if pas == "fwd+bwd"
                                              else call)
                                ms_graph, graph_error = _graph_ms(graph_call, device, min(args.rep, 20))
                            nbytes = {"fwd": b_fwd, "bwd": b_bwd, "fwd+bwd": b_fwd + b_bwd}[pas]
                            flops = {"fwd": f_fwd, "bwd": f_bwd, "fwd+bwd": f_fwd + f_bwd}[pas]
                            gbps = nbytes / (ms * 1e-3) / 1e9
                            gbps_graph = nbytes / (ms_graph * 1e-3) / 1e9 if ms_graph else None
                            row = dict(op=op, **{"pass": pas}, impl=impl, N=shape[0], T=shape[1], D=shape[2],
                                       dtype=str(dtype).replace("torch.", ""), ms=ms, bytes=nbytes,
                                       gbps=gbps, copy_share=gbps / copy_gbps, max_abs_err=err,
                                       tflops=(flops / (ms * 1e-3) / 1e12) if flops else None,
                                       host_ms=host_ms, ms_graph=ms_graph, gbps_graph=gbps_graph,
                                       copy_share_graph=(gbps_graph / copy_gbps) if gbps_graph else None,
                                       graph_error=graph_error)
                            rows.append(row)
                            if args.json:   # rows so far: a deadline that kills the run keeps them
                                write_json(args.json, dict(meta=dict(copy_gbps=copy_gbps, complete=False,
                                                                     smoke=bool(args.smoke)), rows=rows))
                            graph = (f"graph {ms_graph:8.4f} ms {100 * gbps_graph / copy_gbps:5.1f}%" if ms_graph
                                     else "graph -")
                            print(f"{op:34s} {pas:8s} {impl:18s} N={shape[0]:<4d} T={shape[1]:<5d} "
                                  f"D={shape[2]:<5d} {ms:9.4f} ms {gbps:8.1f} GB/s "
                                  f"{100 * gbps / copy_gbps:5.1f}% of copy  host {host_ms:8.4f} ms  {graph}  "
                                  f"err {err:.2e}", flush=True)
    derive_bwd_graph_times(rows)
    for r in rows:
        base = [e for e in rows if e["impl"] == "eager" and e["op"] == r["op"]
                and e["pass"] == r["pass"] and (e["N"], e["T"], e["D"]) == (r["N"], r["T"], r["D"])]
        r["speedup_vs_eager"] = base[0]["ms"] / r["ms"] if base else None

    meta = dict(environment(device), interpreter=os.environ.get("TRITON_INTERPRET") == "1",
                smoke=bool(args.smoke), note=SMOKE_NOTE if args.smoke else None, copy_gbps=copy_gbps, copy_mib=copy_mib, tokens=tokens,
                complete=True,
                timer="triton.testing.do_bench median, L2 flushed" if device.type == "cuda"
                else "wall clock median of 3")
    if args.json:
        print(f"wrote {write_json(args.json, dict(meta=meta, rows=rows))}")
    if args.plot:
        plot(rows, meta, args.plot)
        print(f"wrote {args.plot}")
    return meta, rows


def plot(rows, meta, path):
    """Grouped bars: copy_share per (op, shape) for each impl, one panel per pass."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    impls = sorted({r["impl"] for r in rows}, key=lambda i: ["fused", "eager", "compile"].index(i)
                   if i in ("fused", "eager", "compile") else 9)
    fig, axes = plt.subplots(len(PASSES), 1, figsize=(14, 4 * len(PASSES)), squeeze=False)
    for ax, pas in zip(axes[:, 0], PASSES):
        sel = [r for r in rows if r["pass"] == pas]
        groups = sorted({(r["op"], r["T"], r["D"]) for r in sel},
                        key=lambda g: (OPS.index(g[0]), g[1], g[2]))
        width = 0.8 / max(len(impls), 1)
        for i, impl in enumerate(impls):
            vals = []
            for g in groups:
                hit = [r["copy_share"] for r in sel if (r["op"], r["T"], r["D"]) == g and r["impl"] == impl]
                vals.append(100 * hit[0] if hit else 0.0)
            ax.bar([j + i * width for j in range(len(groups))], vals, width, label=impl)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))])
        ax.set_xticklabels([f"{g[0].replace('gated_residual_modulate_layernorm', 'res+modLN')}\n"
                            f"T{g[1]} D{g[2]}" for g in groups], fontsize=6, rotation=90)
        ax.axhline(80, color="gray", lw=0.8, ls="--")
        ax.set_ylabel("% of measured copy GB/s")
        ax.set_title(f"{pas}  ({meta.get('gpu') or meta['device']}, copy {meta['copy_gbps']:.0f} GB/s)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    run(_parse())
