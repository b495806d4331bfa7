"""The MLP's GELU GEMMs: cuBLAS + a separate GELU pass (mlp="fold") against one Triton GEMM with GELU in its
epilogue (mlp="epilogue", kernels/gemm_gelu.py), at every tiling of gemm_gelu.SWEEP.

What is timed, per pass, at DiT-XL/2's MLP shape (M = batch x 256 tokens, D = 1152, 4D = 4608, bf16):
  fwd  cublas           F.linear(h, w1, b1)                               the GEMM alone (its TFLOP/s: the bar)
       cublas+gelu      F.linear, then F.gelu (tanh)                      what mlp="fold" runs
       epilogue <cfg>   gemm_gelu.linear_gelu(h, w1, b1, config=cfg)      writes z and GELU(z)
  bwd  cublas           dy.mm(w2)                                         the data-gradient GEMM alone
       cublas+fold      dy.mm(w2), then kernels/gelu.py's gelu_tanh_bwd   what mlp="fold" runs (dz + bias sums)
       epilogue <cfg>   gemm_gelu.linear_dgelu(dy, w2, z, config=cfg)     dz + bias sums, dg never written
  bwd+g (mlp="recompute-*": the backward also rebuilds GELU(z) for fc2's weight gradient)
       cublas           dy.mm(w2)
       cublas+fold      dy.mm(w2), then gelu_tanh_bwd(..., write_g=True)  what mlp="recompute-fold" runs
       epilogue <cfg>   linear_dgelu(dy, w2, z, write_g=True, config=cfg) GELU(z) from the epilogue (TMA tilings;
                                                                          the pointer ones add a GELU pass)
Each row: the median ms (triton.testing.do_bench, L2 flushed, as benchmarks/kernels.py), TFLOP/s of the GEMM's
2 M N K (the separate pass adds none), and for epilogue rows `vs_baseline` = baseline ms / row ms (> 1: the
epilogue is faster than cuBLAS + the separate pass). Each epilogue row's outputs are compared with the
baseline's: `max_rel_diff` = max |a - b| / max |b| per output (bf16: one rounding apart is ~4e-3; a config
whose difference is above 2e-2 or that writes a non-finite value where the baseline has none is `wrong`
and never reported as the best).

The summary gives per pass the best epilogue tiling and its time against the baseline, and the change of a
DiT-XL/2 training step if both passes of all `--depth` (28) blocks ran the best tilings: depth x (best -
baseline) per pass, summed (and with bwd+g in place of bwd, the change for mlp="recompute-epilogue" against
"recompute-fold"). Those figures are derived from these timings, not measured in a training step
(the throughput row `fused+mlp-epilogue` measures that).

Stops cleanly at --deadline-s (checked before each row; compiles included) and writes what was measured;
the JSON (rewritten after each row) holds the environment (GPU, versions, git commit, date, exact command).

Usage:
  python benchmarks/mlp_gemm.py --json benchmarks/results/mlp_gemm_h100.json
  python benchmarks/mlp_gemm.py --smoke --json /tmp/mlp_gemm.json    # tiny CPU run, interpreter
Nothing is printed that was not measured in this run; --smoke timings are the interpreter's.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# As in benchmarks/kernels.py: run as a script, this folder would be sys.path[0] and benchmarks/kernels.py
# would answer to `import kernels`. Take the folder off.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.common import environment, write_json  # noqa: E402

SMOKE_NOTE = ("--smoke: tiny shape on CPU through the Triton interpreter (TRITON_INTERPRET=1), two tilings (TMA and "
              "pointer kernels); "
              "the timings say nothing about kernel speed")
WRONG_REL = 2e-2


def _parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=128, help="images per step (M = batch x tokens)")
    p.add_argument("--tokens", type=int, default=256, help="tokens per image (DiT-XL/2 at 256: 256)")
    p.add_argument("--hidden", type=int, default=1152, help="D (the MLP is D -> 4D -> D)")
    p.add_argument("--depth", type=int, default=28, help="blocks per model, for the derived step change")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--passes", nargs="+", default=["fwd", "bwd"], choices=("fwd", "bwd", "bwd+g"))
    p.add_argument("--warmup", type=int, default=25, help="do_bench warm-up, ms")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetition time, ms")
    p.add_argument("--deadline-s", type=float, default=300.0)
    p.add_argument("--json", help="write the results here (rewritten after each row)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes through the Triton interpreter on CPU")
    return p.parse_args(argv)


def max_rel_diff(a, b) -> float:
    """max |a - b| / max |b| in fp64 (inf where a is non-finite and b is finite)."""
    a, b = a.double(), b.double()
    if (~a.isfinite() & b.isfinite()).any():
        return float("inf")
    scale = b.abs().max().item() or 1.0
    return (a - b).abs().max().item() / scale


def run(args, argv=None):
    t_start = time.monotonic()
    from benchmarks.kernels import _timer, begin
    dtype = begin(args.smoke, SMOKE_NOTE, args.dtype)
    import importlib

    import torch
    import torch.nn.functional as F
    gg = importlib.import_module("fastdit.kernels.gemm_gelu")
    ge = importlib.import_module("fastdit.kernels.gelu")
    if args.smoke:
        device = torch.device("cpu")
        m, d, sweep = 2 * 16, 32, [gg.GemmConfig(16, 32, 16, 4, 2, 2, tma=True), gg.GemmConfig(32, 16, 16, 4, 2, 2)]
    else:
        if not torch.cuda.is_available():
            raise SystemExit("benchmarks/mlp_gemm.py needs a CUDA device (or --smoke for a CPU check)")
        device = torch.device("cuda")
        m, d, sweep = args.batch * args.tokens, args.hidden, list(gg.SWEEP)
    n = 4 * d
    timer = _timer(device, args.warmup, args.rep)
    g = torch.Generator().manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device, dtype)

    h, dy = rnd(m, d), rnd(m, d)
    w1, b1, w2 = rnd(n, d, scale=d ** -0.5), rnd(n, scale=0.1), rnd(d, n, scale=d ** -0.5)
    z = F.linear(h, w1, b1)
    flops = 2.0 * m * n * d

    meta = dict(environment(device, argv=argv), benchmark="mlp_gemm", smoke=bool(args.smoke),
                speed_meaningful=not args.smoke, note=SMOKE_NOTE if args.smoke else None,
                dtype=str(dtype).replace("torch.", ""), shape=dict(M=m, D=d, N=n), depth=args.depth,
                timer=(f"triton.testing.do_bench median (warmup {args.warmup} ms, rep {args.rep} ms), L2 flushed"
                       if device.type == "cuda" else "wall clock median of 3 (benchmarks/kernels.py _timer)"),
                wrong_above_rel=WRONG_REL, deadline_s=args.deadline_s, stopped_early=False)
    rows, summary = [], {}

    def save():
        meta["elapsed_s"] = round(time.monotonic() - t_start, 1)
        if args.json:
            write_json(args.json, dict(meta=meta, summary=summary, results=rows))

    passes = {
        "fwd": dict(gemm=lambda: F.linear(h, w1, b1),
                    baseline=("cublas+gelu", lambda: (lambda zz: (zz, F.gelu(zz, approximate="tanh")))(
                        F.linear(h, w1, b1))),
                    fused=lambda cfg: gg.linear_gelu(h, w1, b1, config=cfg), outputs=("z", "g")),
        "bwd": dict(gemm=lambda: dy.mm(w2),
                    baseline=("cublas+fold", lambda: ge.gelu_tanh_bwd(z, dy.mm(w2))[:2]),
                    fused=lambda cfg: gg.linear_dgelu(dy, w2, z, config=cfg), outputs=("dz", "db")),
        "bwd+g": dict(gemm=lambda: dy.mm(w2),
                      baseline=("cublas+fold", lambda: ge.gelu_tanh_bwd(z, dy.mm(w2), write_g=True)),
                      fused=lambda cfg: gg.linear_dgelu(dy, w2, z, write_g=True, config=cfg),
                      outputs=("dz", "db", "g")),
    }

    def add(row):
        rows.append(row)
        ms = row.get("ms")
        extra = f"  x{row['vs_baseline']:.3f} vs baseline" if row.get("vs_baseline") else ""
        print(f"{row['pass']} {row['impl']:<28} " + (f"{ms:8.3f} ms  {row['tflops']:7.1f} TFLOP/s{extra}"
                                                      f"{'  WRONG' if row.get('wrong') else ''}"
                                                      if ms is not None else f"error: {row['error']}"), flush=True)
        save()

    stop = False
    for pas in args.passes:
        spec = passes[pas]
        base_ms = None
        base_out = None
        todo = [("cublas", spec["gemm"], None), (spec["baseline"][0], spec["baseline"][1], None)]
        todo += [(f"epilogue {c.tag()}", None, c)
                 for c in sweep]
        for impl, fn, cfg in todo:
            if time.monotonic() - t_start > args.deadline_s:
                stop = True
                meta.update(stopped_early=True, stopped_at=f"{pas} {impl}")
                break
            row = {"pass": pas, "impl": impl, "config": list(cfg) if cfg else None}
            try:
                if cfg is not None:
                    fn = (lambda c: (lambda: spec["fused"](c)))(cfg)
                out = fn()
                ms = timer(fn)
                row.update(ms=ms, tflops=flops / (ms * 1e-3) / 1e12)
                if impl == spec["baseline"][0]:
                    base_ms, base_out = ms, out
                if cfg is not None and base_out is not None:
                    diffs = {k: max_rel_diff(a, b) for k, a, b in zip(spec["outputs"], out, base_out)}
                    row.update(max_rel_diff=diffs, wrong=any(v > WRONG_REL for v in diffs.values()),
                               vs_baseline=base_ms / ms)
            except Exception as e:  # noqa: BLE001 - a tiling that fails is recorded, the sweep goes on
                row["error"] = f"{type(e).__name__}: {e}"[:400]
            add(row)
        ok = [r for r in rows if r["pass"] == pas and r.get("config") and r.get("ms") and not r.get("wrong")]
        if ok and base_ms:
            best = min(ok, key=lambda r: r["ms"])
            summary[pas] = dict(baseline=spec["baseline"][0], baseline_ms=base_ms, best=best["impl"],
                                best_ms=best["ms"], best_vs_baseline=base_ms / best["ms"],
                                default_ms=next((r["ms"] for r in ok if r["config"] == list(sweep[0])), None),
                                cublas_gemm_ms=next((r["ms"] for r in rows if r["pass"] == pas
                                                     and r["impl"] == "cublas" and r.get("ms")), None))
        save()
        if stop:
            break
    for key, bwd in (("derived_step_change_ms", "bwd"), ("derived_recompute_step_change_ms", "bwd+g")):
        if {"fwd", bwd} <= set(summary):
            summary[key] = args.depth * sum(summary[p]["best_ms"] - summary[p]["baseline_ms"] for p in ("fwd", bwd))
            summary["derived_note"] = (f"{args.depth} x (best - baseline), fwd + bwd (recompute: fwd + bwd+g): what "
                                       "the best tilings would change in a training step, from these kernel timings "
                                       "(not a training measurement)")
    save()
    for pas in ("fwd", "bwd", "bwd+g"):
        s = summary.get(pas)
        if s:
            print(f"{pas}: best {s['best']} {s['best_ms']:.3f} ms vs {s['baseline']} {s['baseline_ms']:.3f} ms "
                  f"(x{s['best_vs_baseline']:.3f}); the GEMM alone (cuBLAS) {s['cublas_gemm_ms']:.3f} ms", flush=True)
    if "derived_step_change_ms" in summary:
        print(f"derived step change, {args.depth} blocks: {summary['derived_step_change_ms']:+.2f} ms", flush=True)
    if "derived_recompute_step_change_ms" in summary:
        print(f"derived step change with recompute, {args.depth} blocks: "
              f"{summary['derived_recompute_step_change_ms']:+.2f} ms", flush=True)
    return dict(meta=meta, summary=summary, results=rows)


def main(argv=None) -> int:
    args = _parse(argv)
    run(args, argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
