"""Generate exactly N samples for FID on any number of ranks, resumably, into an ADM `.npz`.

    torchrun --standalone --nproc_per_node 8 -m fastdit.sample_fid --ckpt CKPT --model DiT-XL/2 --vae VAE_DIR \\
        --num-samples 50000 --cfg-scale 1.5 --num-steps 250 --sample-dir samples/xl2-cfg1.5
    python -m fastdit.sample_fid ...            # single process (gloo/no process group)
    deepspeed --num_gpus 8 -m fastdit.sample_fid ...   # the DeepSpeed launcher works too

Determinism: global sample i has label labels[i] (drawn once for the whole run from `--seed`,
uniform over the classes, or i mod num_classes with --balanced-classes) and its own noise generator
seeded `seed + i` (see `fastdit.sample.PerSampleNoise`), so the output is the same for any world
size and batch size.

Layout and resume: samples are made in shards of `--shard-size` consecutive indices. Shard k is
written atomically (temporary file + rename) to `<sample-dir>/shards/shard_<k>.npz` with its
`indices`, `labels` and uint8 NHWC `images`. A restart (with any world size) re-scans the folder,
splits only the missing shards over the ranks and never rewrites a finished one. `run.json` pins
the settings; a restart with different settings is refused. Finally rank 0 checks that the shards
cover 0..N-1 exactly once and streams them into `<out>` (default `<sample-dir>/samples_<N>.npz`):
`arr_0` (N, H, W, 3) uint8 (1-channel images are repeated to RGB) and `arr_1` (N,) labels.
The sample folder must be visible to every rank (a shared filesystem on several nodes).
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import sys
import zipfile
from typing import Callable, List, Optional

import numpy as np
import torch

from fastdit import atomic, dist
from fastdit.diffusion import create_diffusion
from fastdit.generate import sample as S
from fastdit.generate.images import decode_images, to_rgb
from fastdit.generate.vae import LATENT_SCALE, load_vae


# ----------------------------------------------------------------------------------------------
# Plan
# ----------------------------------------------------------------------------------------------
def class_labels_for_run(num_samples: int, num_classes: int, seed: int,
                         balanced: bool = False) -> np.ndarray:
    """Labels of samples 0..N-1: uniform draws from a generator seeded `seed` (or i mod K)."""
    if balanced:
        return np.arange(num_samples, dtype=np.int64) % num_classes
    return np.random.default_rng(seed).integers(0, num_classes, size=num_samples, dtype=np.int64)


def shard_path(sample_dir: str, k: int) -> str:
    return os.path.join(sample_dir, "shards", f"shard_{k:06d}.npz")


def shard_range(k: int, shard_size: int, num_samples: int) -> range:
    return range(k * shard_size, min(num_samples, (k + 1) * shard_size))


def missing_shards(sample_dir: str, num_shards: int) -> List[int]:
    """Shards with no finished file (a finished file only ever appears by atomic rename)."""
    return [k for k in range(num_shards) if not os.path.isfile(shard_path(sample_dir, k))]


def _check_run_config(sample_dir: str, config: dict, rank: int) -> None:
    path = os.path.join(sample_dir, "run.json")
    if rank == 0:
        os.makedirs(os.path.join(sample_dir, "shards"), exist_ok=True)
        if not os.path.isfile(path):
            atomic.write_json(path, config)
    dist.barrier()
    with open(path) as f:
        saved = json.load(f)
    diff = {k: (saved.get(k), config.get(k)) for k in set(saved) | set(config)
            if saved.get(k) != config.get(k)}
    if diff:
        desc = "; ".join(f"{k}: folder {a!r} vs now {b!r}" for k, (a, b) in sorted(diff.items()))
        raise ValueError(f"{sample_dir} holds a run with other settings ({desc}); "
                         "use another --sample-dir or the same settings to resume")


def _write_shard(path: str, images: np.ndarray, labels: np.ndarray, indices: np.ndarray) -> None:
    tmp = f"{path}.tmp{os.getpid()}.npz"
    np.savez(tmp, images=images, labels=labels, indices=indices)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# Assembly
# ----------------------------------------------------------------------------------------------
def assemble_npz(sample_dir: str, num_samples: int, shard_size: int, out_path: str) -> str:
    """Check the shards cover 0..N-1 once and stream them into `out_path` (arr_0, arr_1)."""
    num_shards = math.ceil(num_samples / shard_size)
    missing = missing_shards(sample_dir, num_shards)
    if missing:
        raise RuntimeError(f"{len(missing)} shards are missing (e.g. {missing[:5]}); rerun to finish")
    finished = {p for p in glob.glob(os.path.join(sample_dir, "shards", "shard_*.npz"))
                if re.fullmatch(r"shard_\d{6}\.npz", os.path.basename(p))}
    extra = sorted(finished - {shard_path(sample_dir, k) for k in range(num_shards)})
    if extra:
        raise RuntimeError(f"unexpected shard files for N={num_samples}: {extra[:5]}")

    def shards():
        for k in range(num_shards):
            path = shard_path(sample_dir, k)
            try:
                with np.load(path) as d:
                    images, labels, indices = d["images"], d["labels"], d["indices"]
            except Exception as e:  # noqa: BLE001
                raise RuntimeError(f"{path} is unreadable ({e}); delete it and rerun") from e
            want = np.arange(k * shard_size, min(num_samples, (k + 1) * shard_size))
            if not np.array_equal(indices, want) or len(images) != len(want) or len(labels) != len(want):
                raise RuntimeError(f"{path} does not hold samples {want[0]}..{want[-1]}; "
                                   "delete it and rerun")
            yield to_rgb(images), labels

    first_images, _ = next(shards())
    h, w, c = first_images.shape[1:]
    tmp = f"{out_path}.tmp{os.getpid()}"
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    all_labels = []
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open("arr_0.npy", "w", force_zip64=True) as f:
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
                      "fortran_order": False, "shape": (num_samples, h, w, c)}
            np.lib.format.write_array_header_1_0(f, header)
            written = 0
            for images, labels in shards():
                if images.shape[1:] != (h, w, c) or images.dtype != np.uint8:
                    raise RuntimeError(f"shard images {images.shape} {images.dtype} differ from "
                                       f"{(h, w, c)} uint8")
                f.write(np.ascontiguousarray(images).tobytes())
                all_labels.append(labels)
                written += len(images)
        if written != num_samples:
            raise RuntimeError(f"assembled {written} samples, expected {num_samples}")
        with zf.open("arr_1.npy", "w") as f:
            np.lib.format.write_array(f, np.concatenate(all_labels).astype(np.int64))
    os.replace(tmp, out_path)
    for stale in glob.glob(os.path.join(sample_dir, "shards", "*.tmp*")):  # left by crashed writers
        os.remove(stale)
    return out_path


# ----------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------
def generate(model, *, num_samples: int, sample_dir: str, seed: int = 0, batch_size: int = 32,
             shard_size: Optional[int] = None, cfg_scale: float = 1.0, sampler: str = "ddpm",
             num_steps: int = 250, eta: float = 0.0, vae=None, latent_scale: float = LATENT_SCALE,
             bf16: bool = False, guide_all_channels: Optional[bool] = None,
             balanced_classes: bool = False, rank: int = 0, world_size: int = 1, device="cpu",
             out_path: Optional[str] = None, progress: bool = False, run_info: Optional[dict] = None,
             on_shard_done: Optional[Callable[[int], None]] = None) -> Optional[str]:
    """Make the missing shards of this rank, then (rank 0) assemble the npz; returns its path.

    `run_info`: extra settings pinned in run.json (checkpoint, model...). `on_shard_done(k)` is
    called after each finished shard (tests use it to simulate a crash).
    """
    if num_samples <= 0 or batch_size <= 0 or num_steps <= 0 or (shard_size is not None and shard_size <= 0):
        raise ValueError(f"num_samples ({num_samples}), batch_size ({batch_size}), num_steps ({num_steps}) and "
                         f"shard_size ({shard_size}) must be positive")
    shard_size = shard_size or batch_size
    num_shards = math.ceil(num_samples / shard_size)
    config = dict(run_info or {}, num_samples=num_samples, shard_size=shard_size, seed=seed,
                  cfg_scale=cfg_scale, sampler=sampler, num_steps=num_steps, eta=eta, bf16=bf16,
                  guide_all_channels=guide_all_channels, balanced_classes=balanced_classes,
                  num_classes=model.num_classes, latent_scale=latent_scale if vae else None)
    _check_run_config(sample_dir, config, rank)

    todo = missing_shards(sample_dir, num_shards)  # every rank scans before anyone writes
    dist.barrier()
    mine = todo[rank::world_size]
    labels_all = class_labels_for_run(num_samples, model.num_classes, seed, balanced_classes)
    diffusion = create_diffusion(S.respacing(sampler, num_steps), learn_sigma=model.learn_sigma)
    model_fn = S.make_model_fn(model, cfg_scale, None, guide_all_channels,
                               torch.bfloat16 if bf16 else None)
    shape = (model.in_channels, model.input_size, model.input_size)
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(mine), desc=f"rank 0: shards ({len(todo)} missing of {num_shards})")
    for k in mine:
        idx = np.array(shard_range(k, shard_size, num_samples))
        images = []
        for start in range(0, len(idx), batch_size):
            chunk = idx[start:start + batch_size]
            y = torch.from_numpy(labels_all[chunk])
            x0 = S.sample_loop(diffusion, model_fn, y, S.PerSampleNoise(seed + chunk), shape,
                               sampler, eta, device)
            images.append(decode_images(x0, vae, latent_scale))
        _write_shard(shard_path(sample_dir, k), np.concatenate(images), labels_all[idx], idx)
        if bar is not None:
            bar.update(1)
        if on_shard_done is not None:
            on_shard_done(k)
    if bar is not None:
        bar.close()

    dist.barrier()
    out_path = out_path or os.path.join(sample_dir, f"samples_{num_samples}.npz")
    if rank == 0:
        assemble_npz(sample_dir, num_samples, shard_size, out_path)
    dist.barrier()
    return out_path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastdit.sample_fid", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    S.add_model_args(p, cfg_default=1.5)  # the paper's FID-50K setting
    p.add_argument("--num-samples", type=S.positive_int, default=50_000)
    p.add_argument("--per-proc-batch-size", type=S.positive_int, default=32)
    p.add_argument("--shard-size", type=S.positive_int, default=None, help="samples per shard file "
                   "(default: the batch size; must stay the same across restarts)")
    p.add_argument("--sample-dir", required=True, help="shards, run.json and (default) the npz")
    p.add_argument("--out", default=None, help="final npz (default <sample-dir>/samples_<N>.npz)")
    p.add_argument("--balanced-classes", action="store_true", help="label of sample i = i mod K")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    rank, world, device = dist.init_process_group()
    if args.device:
        device = torch.device(args.device)
    try:
        model, info = S.load_model(args.ckpt, args.model, args.weights, args.impl, args.num_heads,
                                   device, S.impl_kwargs_from(args), verbose=rank == 0,
                                   trust=args.trust_checkpoint)
        vae_path = S.resolve_vae(args.vae, info, model.in_channels)
    except S.LOAD_ERRORS as e:
        code = S.error_line(p.prog, e) if rank == 0 else 2
        dist.destroy_process_group()
        return code
    vae = load_vae(vae_path, device) if vae_path else None
    num_steps = S.num_steps_for(args)
    run_info = {"ckpt": os.path.abspath(args.ckpt), "weights": args.weights,
                "model": info["model"], "model_kwargs": info["model_kwargs"], "vae": vae_path}
    out = generate(model, num_samples=args.num_samples, sample_dir=args.sample_dir, seed=args.seed,
                   batch_size=args.per_proc_batch_size, shard_size=args.shard_size,
                   cfg_scale=args.cfg_scale, sampler=args.sampler, num_steps=num_steps,
                   eta=args.eta, vae=vae, latent_scale=S._latent_scale(args.latent_scale, info),
                   bf16=args.bf16, guide_all_channels=S.guide_flag(args.guide_channels),
                   balanced_classes=args.balanced_classes, rank=rank, world_size=world,
                   device=device, out_path=args.out, progress=not args.no_progress,
                   run_info=run_info)
    if rank == 0:
        print(f"wrote {args.num_samples} samples to {out}")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
