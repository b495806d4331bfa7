"""How far diffusers' DiTTransformer2DModel is from fastdit's DiT with the same weights, and why.

    python benchmarks/diffusers_difference.py --model DiT-XL/2 [--batch 1] [--json diff.json]

One registry model with random weights N(0, weight_std^2) on every parameter but the fixed pos_embed (so no
adaLN-Zero gate is zero), input 32x32x4, t in {0, 250, 500, 999}, `--batch` samples per t, CPU fp32. Each row
is a diffusers model built from the same weights (fastdit.weights.interop): "diffusers_default" (its
norm_eps 1e-5 and its timestep frequencies), "export" (norm_eps 1e-6 as fastdit exports: the frequencies
only), "export_matched_timesteps" (frequencies fixed with match_official_timesteps: rounding only) and
"eps_only" (frequencies fixed, norm_eps 1e-5). Reported per row: max |difference|, relative L2 difference and
the largest output. The figures quoted in fastdit/weights/interop.py come from this script.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from benchmarks.common import environment, write_json  # noqa: E402
from fastdit.models.reference import DiT_models  # noqa: E402
from fastdit.models.registry import model_config  # noqa: E402
from fastdit.weights.interop import (compare_with_diffusers, diffusers_config,  # noqa: E402
                                     fastdit_to_diffusers_state_dict, match_official_timesteps)


def measure_design_difference(model_name: str = "DiT-S/2", batch: int = 2, weight_std: float = 0.02,
                              seed: int = 0, timesteps=(0, 250, 500, 999)) -> Dict[str, Dict[str, float]]:
    """Output differences fastdit vs diffusers for one registry model with random weights.

    Every weight (but the fixed pos_embed) is drawn N(0, weight_std^2), so no adaLN-Zero gate is
    zero. Rows: "diffusers_default" (norm_eps 1e-5 and its timestep frequencies), "export"
    (norm_eps 1e-6: frequencies only), "export_matched_timesteps" (frequencies fixed: rounding
    only) and "eps_only" (frequencies fixed, norm_eps 1e-5).
    """
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    model = DiT_models[model_name](input_size=32, num_classes=1000).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.normal_(0, weight_std)
    n = len(timesteps) * batch
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, 4, 32, 32, generator=g)
    t = torch.tensor(list(timesteps)).repeat_interleave(batch)
    y = torch.randint(0, 1000, (n,), generator=g)
    cfg = model_config(model_name)
    kwargs = dict(cfg, input_size=32, in_channels=4, num_classes=1000, learn_sigma=True)
    dsd = fastdit_to_diffusers_state_dict(model.state_dict(), cfg["depth"])
    results = {}
    for label, eps, matched in (("diffusers_default", 1e-5, False), ("export", 1e-6, False),
                                ("export_matched_timesteps", 1e-6, True), ("eps_only", 1e-5, True)):
        dmodel = DiTTransformer2DModel(**dict(diffusers_config(kwargs), norm_eps=eps))
        dmodel.load_state_dict(dsd, strict=True)
        dmodel.eval()
        if matched:
            match_official_timesteps(dmodel)
        results[label] = compare_with_diffusers(model, dmodel, x, t, y)
        del dmodel
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="DiT-S/2", help="registry name (default DiT-S/2)")
    p.add_argument("--batch", type=int, default=2, help="samples per timestep")
    p.add_argument("--weight-std", type=float, default=0.02)
    p.add_argument("--json", metavar="PATH", help="also write the rows and the environment here")
    args = p.parse_args(argv)
    rows = measure_design_difference(args.model, args.batch, args.weight_std)
    for label, row in rows.items():
        print(f"{args.model} {label}: " + ", ".join(f"{k}={v:.3g}" for k, v in row.items()))
    if args.json:
        write_json(args.json, dict(benchmark="diffusers_difference", model=args.model, batch=args.batch,
                                   weight_std=args.weight_std, rows=rows, environment=environment("cpu")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
