"""Full-size parity: the fast DiT computes the reference DiT's function, forward and every gradient.

The tests check parity on small models; this checks it at a real size (DiT-XL/2 at 256 by default) on
the device, where the Triton kernels and attention backends run their real code paths.

Oracle: the reference model in float64 on the same device. Every case (the reference and the fast
model in fp32 and bf16, with Triton or PyTorch kernels and each attention backend that can run) gets
the same weights (random, unit gain, non-zero everywhere: adaLN-Zero's zero init would hide gradient
bugs), the same inputs in eval mode (no label dropout) and the loss sum(out * w) for a fixed random w.
Reported: normwise relative errors ||a - b|| / ||b|| of the output and of all parameter gradients
concatenated, and the worst single parameter's gradient.

Verdicts:  fp32 cases  out and all-grads error < 1e-4, worst parameter < 1e-3 (TF32 is turned off)
           bf16 cases  error <= 2 x (the reference run in bf16's error) + 1e-3  (the flash-attention rule)
and every case finite with a gradient for every parameter. Exit code 1 when a case fails.

Switch cases (--switches, default all): the speed switches whose defaults wait for a GPU measurement, each
as one of benchmarks/throughput.py's rows (SWITCH_ROWS): the model built from that row's spec (its mlp,
bias_fold and attention options) under the row's environment (the kernels' switches), in bf16, and the rows
that between them run every new path also in fp32. A default flips only where its row wins and its case here
passes on the same GPU.

    python benchmarks/parity.py --json parity.json                    # DiT-XL/2, batch 4, on CUDA
    python benchmarks/parity.py --smoke                                # tiny model on CPU
    python benchmarks/parity.py --switches                             # no switch cases
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from benchmarks.common import environment, write_json  # noqa: E402

FP32_TOL, FP32_WORST_TOL, BF16_ATOL = 1e-4, 1e-3, 1e-3
# throughput rows whose models carry speed switches -> whether an fp32 case runs too (those with fp32
# cover every new path: GELU-epilogue GEMMs; fold, bias folds, fastdit's attention, the kernels' switches;
# fused+candidates: the LN backward's paired row sums, which no other row turns on, with the column sums once)
SWITCH_ROWS = {"fused+mlp-epilogue": True, "fused+mlp-recompute-epilogue": False, "fused+all-switches": False,
               "fused+all-switches/triton": True, "fused/triton-swept": False, "fused+candidates": True}
# --smoke: a tiny custom DiT (constructor kwargs of fastdit.models.reference.DiT)
SMOKE_ARCH = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="DiT-XL/2", help="registry name (default DiT-XL/2)")
    ap.add_argument("--image-size", type=int, default=256, help="pixels; latents are image_size / 8")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--attention", nargs="+", default=["sdpa", "flash_attn", "xformers"],
                    help="attention backends of the bf16 fast cases (those that cannot run are listed)")
    ap.add_argument("--switches", nargs="*", default=list(SWITCH_ROWS), choices=list(SWITCH_ROWS),
                    metavar="ROW", help=f"throughput rows to check (default all: {', '.join(SWITCH_ROWS)}; "
                                        "none when given without names)")
    ap.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument("--smoke", action="store_true", help="tiny model, batch 2, on CPU (checks the script)")
    a = ap.parse_args(argv)
    if a.batch < 1:
        ap.error(f"--batch must be >= 1, got {a.batch}")
    a.argv = None if argv is None else list(argv)
    return a


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / (b.double().norm() + 1e-30)).item()


def randomize_(model: torch.nn.Module, generator: torch.Generator) -> torch.nn.Module:
    """Unit-gain random weights (std 1/sqrt(fan_in); 0.1 for vectors and embeddings), pos_embed kept."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "pos_embed":
                continue
            std = 1.0 / p[0].numel() ** 0.5 if p.dim() > 1 and "embedding" not in name else 0.1
            p.copy_(torch.randn(p.shape, generator=generator) * std)
    return model


def forward_backward(model, x, t, y, w) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """(output, {param name: gradient}) of loss = sum(out * w), both in float64."""
    model.zero_grad(set_to_none=True)
    out = model(x, t, y)
    (out.double() * w).sum().backward()
    grads = {k: p.grad.detach().double() for k, p in model.named_parameters() if p.grad is not None}
    return out.detach().double(), grads


def compare(case: str, out, grads, out0, grads0) -> Dict:
    missing = sorted(set(grads0) - set(grads))
    keys = [k for k in grads0 if k in grads]
    per = {k: rel(grads[k], grads0[k]) for k in keys}
    worst = max(per, key=per.get) if per else None
    flat = torch.cat([grads[k].flatten() for k in keys]) if keys else torch.zeros(1)
    flat0 = torch.cat([grads0[k].flatten() for k in keys]) if keys else torch.zeros(1)
    finite = bool(torch.isfinite(out).all()) and bool(torch.isfinite(flat).all())
    return dict(case=case, out_rel=rel(out, out0), grad_rel=rel(flat, flat0), worst_param=worst,
                worst_param_rel=per.get(worst), missing_grads=missing, finite=finite)


def verdict(r: Dict, ref_bf16: Optional[Dict]) -> Optional[bool]:
    """True/False for fast cases (see the module docstring), None for the reference cases."""
    if "error" in r:
        return False if r["case"].startswith("fast") else None
    if not r["case"].startswith("fast"):
        return None
    ok = r["finite"] and not r["missing_grads"]
    if " fp32 " in r["case"]:
        return ok and r["out_rel"] < FP32_TOL and r["grad_rel"] < FP32_TOL and r["worst_param_rel"] < FP32_WORST_TOL
    if ref_bf16 is None or "error" in ref_bf16:
        return False
    return (ok and r["out_rel"] <= 2 * ref_bf16["out_rel"] + BF16_ATOL
            and r["grad_rel"] <= 2 * ref_bf16["grad_rel"] + BF16_ATOL)


def main(argv=None) -> int:
    a = parse_args(argv)
    from fastdit.models import attention as attn
    from fastdit.models import from_reference
    from fastdit.models.reference import DiT as RefDiT
    from fastdit.models.reference import DiT_models as RefModels

    if a.device == "cuda" or (a.device == "auto" and torch.cuda.is_available() and not a.smoke):
        if not torch.cuda.is_available():
            print("parity.py: error: --device cuda but no CUDA device is visible", file=sys.stderr)
            return 2
        dev = torch.device("cuda")
    else:
        dev = torch.device("cpu")
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    triton_ok = dev.type == "cuda" or interp
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 (cuDNN's conv allows TF32 otherwise)
    torch.backends.cudnn.allow_tf32 = False
    t0 = time.time()

    g = torch.Generator().manual_seed(a.seed)
    torch.manual_seed(a.seed)
    if a.smoke:
        ref = RefDiT(**SMOKE_ARCH, num_classes=10)
        n_cls, size, batch = 10, SMOKE_ARCH["input_size"], min(a.batch, 2)
    else:
        size = a.image_size // 8
        ref = RefModels[a.model](input_size=size, num_classes=1000)
        n_cls, batch = 1000, a.batch
    ref = randomize_(ref, g).eval()
    x = torch.randn(batch, 4, size, size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    y = torch.randint(0, n_cls, (batch,), generator=g)
    td, yd = t.to(dev), y.to(dev)

    oracle = copy.deepcopy(ref).double().to(dev)
    with torch.no_grad():
        w = torch.randn(oracle(x.double().to(dev), td, yd).shape, generator=g, dtype=torch.float64).to(dev)
    out0, grads0 = forward_backward(oracle, x.double().to(dev), td, yd, w)
    del oracle

    kern = "triton" if triton_ok else "torch"
    cases: List[Tuple[str, Callable[[], torch.nn.Module], torch.dtype]] = [
        ("reference fp32", lambda: copy.deepcopy(ref).to(dev), torch.float32),
        ("reference bf16", lambda: copy.deepcopy(ref).to(dev).bfloat16(), torch.bfloat16),
        (f"fast fp32 {kern}/sdpa", lambda: from_reference(ref, device=dev, kernels=kern, attention="sdpa"),
         torch.float32),
        ("fast bf16 torch/sdpa", lambda: from_reference(ref, device=dev, kernels="torch", attention="sdpa").bfloat16(),
         torch.bfloat16),
    ]
    status = attn.backend_status() if hasattr(attn, "backend_status") else None
    skipped = {}
    for b in a.attention:
        ok = attn.available_backends().get(b, False)
        if ok and b in ("flash_attn", "xformers") and dev.type != "cuda":
            ok, why = False, "needs CUDA"
        else:
            why = (status or {}).get(b, (ok, "not installed"))[1] if not ok else ""
        if not ok:
            skipped[b] = why or "not available"
            print(f"attention {b}: skipped ({skipped[b]})", flush=True)
            continue
        if any(c[0] == f"fast bf16 {kern}/{b}" for c in cases):
            continue  # already there (kernels=torch off CUDA without the interpreter)
        cases.append((f"fast bf16 {kern}/{b}",
                      lambda b=b: from_reference(ref, device=dev, kernels=kern, attention=b).bfloat16(),
                      torch.bfloat16))

    from benchmarks.common import env_vars
    from benchmarks.throughput import row_specs
    envs: Dict[str, tuple] = {}
    for spec in row_specs(a.switches):
        if spec.unavailable:
            skipped[spec.name] = spec.unavailable
            print(f"row {spec.name}: skipped ({spec.unavailable})", flush=True)
            continue
        opts = dict(attention=spec.attention, mlp=spec.mlp, bias_fold=spec.bias_fold)
        for dtype in ((torch.float32, torch.bfloat16) if SWITCH_ROWS[spec.name] else (torch.bfloat16,)):
            name = f"fast {'fp32' if dtype == torch.float32 else 'bf16'} {kern} {spec.name}"
            cases.append((name, lambda o=opts, d=dtype: from_reference(ref, device=dev, kernels=kern, **o).to(d), dtype))
            envs[name] = spec.env

    results = []
    for name, build, dtype in cases:
        try:
            with env_vars(envs.get(name, ())):
                model = build().eval()
                out, grads = forward_backward(model, x.to(dev, dtype), td, yd, w)
            r = compare(name, out, grads, out0, grads0)
            if envs.get(name):
                r["env"] = dict(envs[name])
            del model, out, grads
        except Exception as e:  # noqa: BLE001 - a failing case is recorded, the others still run
            r = dict(case=name, error=f"{type(e).__name__}: {e}"[:2000])
        results.append(r)
        if "error" in r:
            print(f"{name:28s} ERROR {r['error'][:300]}", flush=True)
        else:
            print(f"{name:28s} out {r['out_rel']:.2e}  grads {r['grad_rel']:.2e}  worst {r['worst_param']} "
                  f"{r['worst_param_rel']:.2e}" + (f"  MISSING {r['missing_grads']}" if r["missing_grads"] else ""),
                  flush=True)
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    ref_bf16 = next((r for r in results if r["case"] == "reference bf16"), None)
    for r in results:
        r["pass"] = verdict(r, ref_bf16)
    failed = [r["case"] for r in results if r["pass"] is False]
    wall = time.time() - t0
    print(f"parity: {sum(r['pass'] is True for r in results)} fast case(s) pass, {len(failed)} fail"
          + (f" ({', '.join(failed)})" if failed else "") + f"; {wall:.1f} s", flush=True)
    if a.json:
        env = environment(dev, argv=None if a.argv is None else ["benchmarks/parity.py"] + a.argv)
        write_json(a.json, dict(benchmark="parity", model=("smoke DiT" if a.smoke else a.model),
                                image_size=None if a.smoke else a.image_size, batch=batch, device=str(dev),
                                kernels=kern, tolerances=dict(fp32=FP32_TOL, fp32_worst_param=FP32_WORST_TOL,
                                                              bf16="2 x reference bf16 + %g" % BF16_ATOL),
                                skipped_backends=skipped, results=results, failed=failed, wall_s=wall,
                                environment=env))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
