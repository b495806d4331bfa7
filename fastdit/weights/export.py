"""Export a training checkpoint as a plain official-layout state dict.

    python -m fastdit.export runs/xl2                      # EMA -> runs/xl2/export/step_0400000_ema.safetensors
    python -m fastdit.export runs/xl2/checkpoints/step_0400000 --out runs/xl2/export/DiT-XL-2-256.pt
    python -m fastdit.export runs/xl2 --raw                # training weights (..._raw.safetensors)

CKPT is a checkpoint folder, a `checkpoints/` folder or a run's output_dir (then `latest` is used).
The weights are {parameter name: fp32 tensor} with the official DiT keys, written as safetensors
(`.safetensors`, the default: no pickle, nothing runs on load) or, for `--out *.pt`, with `torch.save`,
which the official code loads with `model.load_state_dict(torch.load(path))`; without --out the file is
`<output_dir>/export/<tag>_<ema|raw>.safetensors`. `fastdit.sample --ckpt` reads both. The EMA weights come from the
checkpoint's ema.pt; --raw reassembles the fp32 master weights from DeepSpeed's ZeRO shards
(fastdit.weights.load.raw_training_weights; without ZeRO, the module weights). A
`<out>.json` next to the file records the model name and constructor kwargs (meta.json's fields).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from fastdit import atomic
from fastdit.models.build import build_dit
from fastdit.weights import layout
from fastdit.state_dict import check_state_dict_keys
from fastdit.weights.load import load_checkpoint
from fastdit.weights.safe_load import CheckpointFileError


def export_state_dict(ckpt: str, raw: bool = False, trust: bool = False):
    """(official-layout fp32 state dict, meta, tag folder) of a training checkpoint, read by
    fastdit.weights.load (without running code from it unless `trust`); keys and shapes checked against
    the architecture its meta.json describes."""
    root, tag = layout.resolve_checkpoint(ckpt, need_ema=not raw)
    loaded = load_checkpoint(os.path.join(root, tag), weights="model" if raw else "ema", trust=trust)
    for note in loaded.notes:
        print(f"note: {note}", file=sys.stderr)
    sd = {k: v.detach().float().contiguous() for k, v in loaded.state_dict.items()}
    with torch.device("meta"):
        model = build_dit("reference", **layout.model_kwargs(loaded.meta))
    check_state_dict_keys(model, sd)
    return sd, loaded.meta, loaded.path


FORMATS = {".safetensors": "safetensors", ".pt": "torch"}


def export_format(path: str) -> str:
    """'safetensors' or 'torch', from the file name's suffix (ValueError for any other suffix)."""
    fmt = FORMATS.get(os.path.splitext(path)[1].lower())
    if fmt is None:
        raise ValueError(f"--out {path}: the file name must end in .safetensors (the default format) or .pt")
    return fmt


def default_out(tag_dir: str, raw: bool) -> str:
    """<output_dir>/export/<tag>_<ema|raw>.safetensors for the checkpoint folder `tag_dir`."""
    tag_dir = os.path.abspath(tag_dir)
    out_dir = os.path.dirname(os.path.dirname(tag_dir))  # <output_dir>/checkpoints/<tag>
    return os.path.join(out_dir, "export", f"{os.path.basename(tag_dir)}_{'raw' if raw else 'ema'}.safetensors")


def save_weights(sd, path: str) -> None:
    """Write `sd` atomically, as safetensors or torch.save according to the suffix of `path`."""
    if export_format(path) == "torch":
        atomic.torch_save(sd, path)
        return
    from safetensors.torch import save_file

    tmp = f"{path}.tmp{os.getpid()}"
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp, metadata={"format": "pt"})
    os.replace(tmp, path)


SIDE_FIELDS = ("model", "model_kwargs", "arch", "step", "vae", "latent_scale", "image_size", "ema_decay")


def side_meta_path(weights_path: str) -> str:
    """`<file without suffix>.json`, the metadata beside an exported weights file (fastdit.weights.load
    reads it, so fastdit.sample needs no --model / --num-heads)."""
    return os.path.splitext(weights_path)[0] + ".json"


def write_side_meta(weights_path: str, meta: dict, **extra) -> str:
    """Write the metadata file beside `weights_path` (meta.json's model fields, plus `extra`)."""
    side = {k: (meta or {}).get(k) for k in SIDE_FIELDS}
    side.update(extra)
    path = side_meta_path(weights_path)
    atomic.write_json(path, side)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="checkpoint -> plain official-layout state dict "
                                            "(.safetensors, or .pt)")
    p.add_argument("ckpt", help="checkpoint folder, checkpoints/ folder or a run's output_dir")
    p.add_argument("--out", help="output file, .safetensors or .pt (default: "
                                 "<output_dir>/export/<tag>_<ema|raw>.safetensors)")
    p.add_argument("--raw", action="store_true", help="the training weights instead of the EMA")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="unpickle the checkpoint fully, also objects outside fastdit's allowlist: this runs any "
                        "code the files contain, so only for checkpoints you wrote yourself")
    args = p.parse_args(argv)
    try:
        if args.out is not None:
            export_format(args.out)  # a bad suffix stops before any reading
        sd, meta, tag_dir = export_state_dict(args.ckpt, args.raw, args.trust_checkpoint)
    except (FileNotFoundError, KeyError, ValueError, CheckpointFileError) as e:
        text = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"fastdit.export: error: {' '.join(str(text).split())}", file=sys.stderr)
        return 2
    if args.out is None:
        args.out = default_out(tag_dir, args.raw)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save_weights(sd, args.out)
    write_side_meta(args.out, meta, weights="raw" if args.raw else "ema", source=os.path.abspath(tag_dir))
    n = sum(v.numel() for v in sd.values())
    print(f"wrote {'raw' if args.raw else 'EMA'} weights of {tag_dir} (step {meta['step']}, {len(sd)} tensors, "
          f"{n:,} parameters) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
