"""Export a training checkpoint as a plain official-layout state dict.

    python -m fastdit.export runs/xl2/checkpoints/step_0400000 --out DiT-XL-2-256.pt        # EMA weights
    python -m fastdit.export runs/xl2 --out raw.pt --raw                                   # training weights

CKPT is a checkpoint folder, a `checkpoints/` folder or a run's output_dir (then `latest` is used).
The file is `torch.save` of {parameter name: fp32 tensor} with the official DiT keys, which the
official code loads with `model.load_state_dict(torch.load(path))`. The EMA weights come from the
checkpoint's ema.pt; --raw reassembles the fp32 master weights from DeepSpeed's ZeRO shards. A
`<out>.json` next to the file records the model name and constructor kwargs (meta.json's fields).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Dict

import torch

from fastdit.training.checkpoint import EMA, build_model_from_meta, read_meta, resolve_checkpoint, write_json_atomic


def raw_state_dict(ckpt_root: str, tag: str, meta: Dict) -> Dict[str, torch.Tensor]:
    """fp32 training weights of a DeepSpeed checkpoint (ZeRO shards merged; ZeRO-0: the module)."""
    tag_dir = os.path.join(ckpt_root, tag)
    if meta.get("zero_stage", 0) >= 1:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        return get_fp32_state_dict_from_zero_checkpoint(ckpt_root, tag=tag)
    path = os.path.join(tag_dir, "mp_rank_00_model_states.pt")
    sd = torch.load(path, map_location="cpu", weights_only=False)["module"]
    if meta.get("bf16"):
        print("note: ZeRO-0 bf16 checkpoint: the module weights are the bf16 copies", file=sys.stderr)
    return sd


def export_state_dict(ckpt: str, raw: bool = False):
    """(official-layout fp32 state dict, meta) of a checkpoint; keys and shapes checked against the model."""
    root, tag = resolve_checkpoint(ckpt)
    tag_dir = os.path.join(root, tag)
    meta = read_meta(tag_dir)
    if raw:
        sd = raw_state_dict(root, tag, meta)
    else:
        sd = torch.load(os.path.join(tag_dir, EMA), map_location="cpu", weights_only=True)
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    sd = {k: v.detach().float().contiguous() for k, v in sd.items()}
    with torch.device("meta"):
        model = build_model_from_meta(meta, impl="reference")
    from fastdit.models.reference import check_state_dict_keys
    check_state_dict_keys(model, sd)
    return sd, meta, tag_dir


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="checkpoint -> plain official-layout state dict (.pt)")
    p.add_argument("ckpt", help="checkpoint folder, checkpoints/ folder or a run's output_dir")
    p.add_argument("--out", required=True, help="output .pt file")
    p.add_argument("--raw", action="store_true", help="the training weights instead of the EMA")
    args = p.parse_args(argv)
    try:
        sd, meta, tag_dir = export_state_dict(args.ckpt, args.raw)
    except (FileNotFoundError, KeyError, ValueError) as e:
        print(f"fastdit.export: error: {e}", file=sys.stderr)
        return 2
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    torch.save(sd, tmp)
    os.replace(tmp, args.out)
    side = {k: meta.get(k) for k in ("model", "model_kwargs", "arch", "step", "vae", "latent_scale",
                                     "image_size", "ema_decay")}
    side["weights"] = "raw" if args.raw else "ema"
    side["source"] = os.path.abspath(tag_dir)
    stem = args.out[:-3] if args.out.endswith(".pt") else args.out
    write_json_atomic(stem + ".json", side)
    n = sum(v.numel() for v in sd.values())
    print(f"wrote {'raw' if args.raw else 'EMA'} weights of {tag_dir} (step {meta['step']}, {len(sd)} tensors, "
          f"{n:,} parameters) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
