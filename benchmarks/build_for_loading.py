"""How long a model takes to build before a strict load fills it: the usual build (every layer initialised,
then overwritten by the load) against fastdit.models.empty.for_loading (built on the meta device, empty storage,
then the same load). This is the path of fastdit.weights.load.build_model (sample, sample_fid, export) and of
fastdit.models.dit.from_reference (benchmarks/parity.py's fast cases).

    python benchmarks/build_for_loading.py [--model DiT-XL/2] [--repeats 3] [--json PATH]
    python benchmarks/build_for_loading.py --smoke      # DiT-S/2 at 32x32, one repeat: checks the script

Rows: impl (reference / fast), way (init+load / for_loading+load), the seconds of each repeat (build and load
together; the first repeat of a process pays one-time costs such as the first allocation of the model's size)
and the median. Both ways are checked to hold the same tensors. CPU only: a host-side cost.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]  # see benchmarks/kernels.py
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from benchmarks.common import environment, write_json  # noqa: E402


def _parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="DiT-XL/2", help="a registry name (default DiT-XL/2)")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--smoke", action="store_true", help="DiT-S/2 at 32x32, one repeat")
    p.add_argument("--json", metavar="PATH")
    a = p.parse_args(argv)
    if a.smoke:
        a.model, a.image_size, a.repeats = "DiT-S/2", 32, 1
    if a.repeats < 1:
        p.error("--repeats must be >= 1")
    return a


def run(a, argv=None) -> dict:
    from fastdit.models.build import build_dit
    from fastdit.models.empty import for_loading
    from fastdit.models.registry import model_config
    from fastdit.weights.load import load_strict

    kwargs = dict(model_config(a.model), input_size=a.image_size // 8)
    torch.manual_seed(0)
    sd = {k: v.clone() for k, v in build_dit("reference", **kwargs).state_dict().items()}
    ways = {"init+load": lambda impl: build_dit(impl, **kwargs),
            "for_loading+load": lambda impl: for_loading(lambda: build_dit(impl, **kwargs), "cpu")}
    rows = []
    for impl in ("reference", "fast"):
        for way, build in ways.items():
            secs = []
            for _ in range(a.repeats):
                t0 = time.perf_counter()
                model = build(impl)
                load_strict(model, sd)
                secs.append(time.perf_counter() - t0)
                got = model.state_dict()
                bad = [k for k in sd if not torch.equal(got[k], sd[k])]
                if bad:
                    raise SystemExit(f"{impl} {way}: the loaded model differs from the checkpoint at {bad[:3]}")
                del model, got
            rows.append(dict(impl=impl, way=way, seconds=secs, median_s=statistics.median(secs)))
            print(f"{impl:9s} {way:17s} median {rows[-1]['median_s']:6.2f} s  "
                  f"({', '.join(f'{s:.2f}' for s in secs)})", flush=True)
    meta = environment("cpu", None if argv is None else ["benchmarks/build_for_loading.py", *argv])
    meta.update(model=a.model, image_size=a.image_size, repeats=a.repeats, torch_threads=torch.get_num_threads())
    return dict(meta=meta, rows=rows)


def main(argv=None) -> int:
    a = _parse(argv)
    out = run(a, argv)
    if a.json:
        print(f"wrote {write_json(a.json, out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
