"""The bias gradients that fastdit folds into kernels already reading their gradient, timed against PyTorch.

Two column-sum kernels give a linear's bias gradient from a pass the backward makes anyway:
  qkv   kernels/qkv_grads.py stack_qkv_grads: SDPA's dq, dk, dv stacked into dqkv (the qkv projection's
        layout) with dqkv's column sums (the qkv bias gradient)            model bias_fold, attention sdpa_packed
  gelu  kernels/gelu.py gelu_tanh_bwd: GELU(tanh)'s backward with dz's column sums (fc1's bias gradient),
        and with `+g` GELU(z) itself (the recomputed activation)            model mlp="fold" / "recompute-fold"
Each kernel sums its columns in one of two ways (FASTDIT_COLUMN_SUMS, kernels/_common.py):
  step  each loop step's rows summed into a per-column vector: a reduction across warps, barriers inside
        the loop (the default)
  once  the steps' tiles added element-wise, reduced once after the loop; the qkv stack then takes a flat
        2-D kernel where the (h, d) columns are contiguous per row (SDPA's gradients of the packed views)
and `unfused` is what runs without the fold: torch.stack (or aten.gelu_backward), then the bias gradient as
PyTorch's sum over the rows (autograd's reduction of a linear's bias).

At DiT-XL/2's shapes for --batch images (T 256, D 1152, 16 heads of 72; fc1 4608 wide), bf16, the gradients
laid out as SDPA gives them for the model's packed qkv views ((N, T, H, hd) order; `--layouts` adds
"contiguous", (N, H, T, hd), which takes the 3-D kernel under either mode). Per case: median ms
(triton.testing.do_bench on CUDA, L2 flushed per call), the bytes the op must move (qkv: read dq, dk, dv,
write dqkv; gelu: read z and dg, write dz, and g with +g; the per-tile fp32 partial sums and the bias vector
are not counted), GB/s and the share of a device-to-device copy measured in the same run; the bias
gradient's largest difference from the fp32 column sums of the unfused gradient, relative to their largest
magnitude (`db_rel_diff`; the unfused bias gradient itself is bf16), and the other outputs' largest difference
from the unfused ones (`others_max_abs_diff`).

Usage:
  python benchmarks/column_sums.py --json benchmarks/results/<dir>/column_sums.json [--batch 128]
  python benchmarks/column_sums.py --sweep ...                       # also `once` at other rows per step
  python benchmarks/column_sums.py --smoke --json /tmp/cs.json     # tiny CPU run through the interpreter
Nothing is printed that was not measured in this run; --smoke timings are the interpreter's.
"""
from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# As in benchmarks/kernels.py: run as a script, this folder would be sys.path[0] and benchmarks/kernels.py
# would answer to `import kernels`. Take the folder off.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.common import environment, write_json  # noqa: E402

SMOKE_NOTE = ("--smoke: tiny shapes on CPU through the Triton interpreter (TRITON_INTERPRET=1); the timings say "
              "nothing about kernel speed")
# --sweep: `once` at these rows per step besides the launchers' defaults (the flat stack kernel's 16, the GELU
# backward's 32), as impls "once bm=<rows>"
SWEEP_BLOCK_M = {"qkv": (8, 32), "gelu": (8, 16)}  # gelu at 64 spills with write_g (triton 3.6)
OPS = ("qkv", "gelu", "gelu+g")
LAYOUTS = ("bshd", "contiguous")


def _parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=128, help="images per call (tokens = batch x 256)")
    ap.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    ap.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=["bshd"],
                    help="the qkv gradients' memory order (default: SDPA's for the packed views)")
    ap.add_argument("--sweep", action="store_true",
                    help="also time `once` at other rows per step (block_m): " + ", ".join(
                        f"{op} {SWEEP_BLOCK_M[op]}" for op in ("qkv", "gelu")))
    ap.add_argument("--warmup", type=int, default=10, help="do_bench warm-up, ms")
    ap.add_argument("--rep", type=int, default=50, help="do_bench repetitions, ms")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--smoke", action="store_true", help=SMOKE_NOTE)
    a = ap.parse_args(argv)
    if a.batch < 1:
        ap.error(f"--batch must be at least 1, got {a.batch}")
    return a


def shapes(smoke: bool, batch: int):
    """(N, H, T, hd, fc1 width) of the timed case."""
    return (2, 3, 8, 24, 64) if smoke else (batch, 16, 256, 72, 4 * 16 * 72)


def qkv_case(n, h, t, hd, layout, dtype, device):
    """dq, dk, dv (N, H, T, hd): `bshd` laid out (N, T, H, hd) as SDPA allocates them for strided views of a
    packed (N, T, 3, H, hd) qkv, `contiguous` as (N, H, T, hd)."""
    import torch
    g = torch.Generator(device="cpu").manual_seed(0)
    if layout == "bshd":
        return [torch.randn(n, t, h, hd, generator=g).to(device, dtype).transpose(1, 2) for _ in range(3)]
    return [torch.randn(n, h, t, hd, generator=g).to(device, dtype) for _ in range(3)]


def qkv_impls(dq, dk, dv, sweep=()):
    """name -> () -> (dqkv, db) for the three implementations (and `once` at each block_m of `sweep`)."""
    import torch
    from fastdit.kernels.qkv_grads import stack_qkv_grads
    n, h, t, hd = dq.shape

    def unfused():
        dqkv = torch.stack([g.transpose(1, 2) for g in (dq, dk, dv)], dim=2)   # what _PackedSDPA returns
        return dqkv, dqkv.view(n * t, 3 * h * hd).sum(0)                      # autograd's bias reduction
    out = dict(unfused=unfused, step=lambda: stack_qkv_grads(dq, dk, dv, reduce_once=False),
               once=lambda: stack_qkv_grads(dq, dk, dv, reduce_once=True))
    for bm in sweep:
        out[f"once bm={bm}"] = lambda bm=bm: stack_qkv_grads(dq, dk, dv, reduce_once=True, block_m=bm)
    return out


def gelu_case(m, c, dtype, device):
    import torch
    g = torch.Generator(device="cpu").manual_seed(0)
    return [(torch.randn(m, c, generator=g) * 2).to(device, dtype) for _ in range(2)]


def gelu_impls(z, dg, write_g: bool, sweep=()):
    """name -> () -> (dz, db[, g]) for the three implementations (and `once` at each block_m of `sweep`)."""
    import torch
    import torch.nn.functional as F
    from fastdit.kernels.gelu import gelu_tanh_bwd

    def unfused():
        dz = torch.ops.aten.gelu_backward(dg, z, approximate="tanh")
        out = (dz, dz.sum(0))
        return out + ((F.gelu(z, approximate="tanh"),) if write_g else ())

    def fused(once, **tiling):
        def call():
            dz, db, g = gelu_tanh_bwd(z, dg, write_g=write_g, reduce_once=once, **tiling)
            return (dz, db) + ((g,) if write_g else ())
        return call
    out = dict(unfused=unfused, step=fused(False), once=fused(True))
    for bm in sweep:
        out[f"once bm={bm}"] = fused(True, block_m=bm)
    return out


def compare(out, ref):
    """(db_rel_diff, others_max_abs_diff): the bias gradient's max |difference| from the fp32 column sums of the
    unfused gradient (ref[0]) over their max |value| (mlp_gemm.max_rel_diff: inf where the bias gradient is not
    finite); and the largest |difference| of the other outputs from the unfused ones (0 for the stack, a copy;
    GELU's may differ by an ulp)."""
    from benchmarks.mlp_gemm import max_rel_diff
    rdb = ref[0].float().reshape(-1, out[1].numel()).sum(0)
    rel = max_rel_diff(out[1], rdb) if rdb.numel() else 0.0
    others = [float((a.float() - b.float()).abs().max()) if a.numel() else 0.0
              for i, (a, b) in enumerate(zip(out, ref)) if i != 1]
    return rel, max(others, default=0.0)


def run(a) -> dict:
    from benchmarks.kernels import _copy_gbps, _timer, begin
    dtype = begin(a.smoke, SMOKE_NOTE, "bf16")
    import torch
    device = torch.device("cuda" if torch.cuda.is_available() and not a.smoke else "cpu")
    timer = _timer(device, a.warmup, a.rep)
    copy = _copy_gbps(device, 4 if a.smoke else 1024, timer)
    n, h, t, hd, c4 = shapes(a.smoke, a.batch)
    e = torch.finfo(dtype).bits // 8
    rows = []
    for op in a.ops:
        for layout in (a.layouts if op == "qkv" else [None]):
            if op == "qkv":
                impls = qkv_impls(*qkv_case(n, h, t, hd, layout, dtype, device),
                                  sweep=SWEEP_BLOCK_M["qkv"] if a.sweep else ())
                nbytes = 6 * n * t * h * hd * e
                label = f"qkv {layout}"
            else:
                m = n * t
                impls = gelu_impls(*gelu_case(m, c4, dtype, device), write_g=op == "gelu+g",
                                   sweep=SWEEP_BLOCK_M["gelu"] if a.sweep else ())
                nbytes = (4 if op == "gelu+g" else 3) * m * c4 * e
                label = op
            ref = impls["unfused"]()
            for impl in impls:
                row = dict(op=op, layout=layout, impl=impl, bytes=nbytes)
                try:
                    rel, other = compare(impls[impl](), ref)
                    ms = timer(impls[impl])
                except Exception as ex:  # noqa: BLE001 - a failing case is recorded, the others still run
                    row["error"] = f"{type(ex).__name__}: {str(ex).splitlines()[0][:300] if str(ex) else ''}"
                    print(f"{label:16s} {impl:11s} error: {row['error']}", flush=True)
                    rows.append(row)
                    continue
                gbps = nbytes / (ms * 1e-3) / 1e9
                row.update(ms=ms, gbps=gbps, copy_share=gbps / copy, db_rel_diff=rel, others_max_abs_diff=other)
                rows.append(row)
                if a.json:   # the cases so far: a deadline that kills the run keeps them (complete=False)
                    write_json(a.json, dict(meta=dict(smoke=a.smoke, complete=False), copy_gbps=copy, rows=rows,
                                            summary=summarize(rows)))
                print(f"{label:16s} {impl:11s} {ms:8.4f} ms  {gbps:7.0f} GB/s  {gbps / copy:6.1%} of copy  "
                      f"db rel diff {rel:.1e}  other outputs max diff {other:.1e}", flush=True)
    summary = summarize(rows)
    for key, v in summary.items():
        if "step_change_ms" in v:
            print(f"{key}: per training step of DiT-XL/2 (28 blocks x this call), against unfused: "
                  + ", ".join(f"{impl} {ms:+.2f} ms" for impl, ms in v["step_change_ms"].items()), flush=True)
    meta = dict(smoke=a.smoke, speed_meaningful=not a.smoke and device.type == "cuda",
                note=SMOKE_NOTE if a.smoke else "", command=environment(device)["command"], complete=True)
    return dict(meta=meta, environment=environment(device), copy_gbps=copy, dtype="bf16",
                shape=dict(batch=n, heads=h, tokens=t, head_dim=hd, fc1=c4), rows=rows, summary=summary)


DEPTH = 28  # DiT-XL/2's blocks: each runs one qkv stack and one GELU backward per training step


def summarize(rows) -> dict:
    """Per op (and layout): each implementation's median ms, and `step_change_ms`: (impl - unfused) x 28, what
    the fold would change in one DiT-XL/2 training step if nothing else moved (kernel times, not a training
    measurement)."""
    out = {}
    for r in rows:
        if "ms" not in r:
            continue
        key = r["op"] + (f" {r['layout']}" if r["layout"] else "")
        out.setdefault(key, {"ms": {}})["ms"][r["impl"]] = r["ms"]
    for v in out.values():
        ms = v["ms"]
        if "unfused" in ms:
            v["step_change_ms"] = {impl: DEPTH * (ms[impl] - ms["unfused"]) for impl in ms if impl != "unfused"}
    return out


def main(argv=None) -> int:
    a = _parse(argv)
    result = run(a)
    if a.json:
        write_json(a.json, result)
    return 1 if any("error" in r for r in result["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
