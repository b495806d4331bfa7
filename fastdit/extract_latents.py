"""Encode an ImageFolder tree (ImageNet layout) into VAE latents for training.

    python -m fastdit.extract_latents --data-path /data/imagenet/train --out latents/in256 \\
        --image-size 256 --vae stabilityai/sd-vae-ft-ema
    torchrun --nproc_per_node 8 -m fastdit.extract_latents ...            # or
    deepspeed --num_gpus 8 --module fastdit.extract_latents ...

Each image is centre-cropped as ADM/the official DiT, encoded unflipped and horizontally flipped, and
the two latents (scaled by 0.18215; a posterior sample by default, as the official training input)
are written to `latents.npy`, a memory-mapped (N, 2, C, h, w) array. Rank r of W handles the images
i with i % W == r, so ranks never write the same rows. `status.npy` marks each row pending (0),
done (1) or corrupt (2); it is updated after the latents are flushed, so a killed run restarted with
the same arguments skips finished rows and redoes the rest bit for bit (the posterior noise of image
i is seeded by (seed, i, flip)). Corrupt images are reported, counted and skipped. `labels.npy`
holds the class index of each row and `meta.json` the VAE, scale, sizes and counts.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from typing import List

import numpy as np
import torch
import torch.distributed as dist

from fastdit.training.checkpoint import write_json_atomic
from fastdit.training.data import (LABELS_FILE, LATENTS_FILE, META_FILE, STATUS_CORRUPT, STATUS_DONE,
                          STATUS_FILE, STATUS_PENDING, image_to_tensor, list_image_folder, load_image)
from fastdit.generate.vae import LATENT_SCALE, VAENotFoundError, encode_distribution, load_vae, resolve_vae

FILES_LIST = "files.json"
DTYPES = {"float16": np.float16, "float32": np.float32}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="ImageFolder -> VAE latents (both flips), multi-rank, resumable")
    p.add_argument("--data-path", required=True, help="ImageFolder root: <root>/<class>/<image>")
    p.add_argument("--out", required=True, help="output folder (created; reused to resume)")
    p.add_argument("--vae", default="stabilityai/sd-vae-ft-ema",
                   help="AutoencoderKL: a local folder or a hub id already in the cache (no download)")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32, help="images per encoder call (x2 with flips)")
    p.add_argument("--num-workers", type=int, default=4)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float16", help="storage type of the latents")
    p.add_argument("--posterior", choices=["sample", "mean"], default="sample",
                   help="store a posterior sample (the official training input) or its mean")
    p.add_argument("--latent-scale", type=float, default=LATENT_SCALE)
    p.add_argument("--seed", type=int, default=0, help="seed of the posterior noise")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _say(msg: str, rank: int) -> None:
    if rank == 0:
        print(msg, flush=True)


class _PendingImages(torch.utils.data.Dataset):
    """Rows to encode -> (row, (3, S, S) tensor or None, error text)."""

    def __init__(self, paths: List[str], rows: List[int], image_size: int):
        self.paths, self.rows, self.image_size = paths, rows, image_size

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        row = self.rows[i]
        try:
            return row, image_to_tensor(load_image(self.paths[row], self.image_size)), ""
        except Exception as e:  # noqa: BLE001 - any decoder failure marks the image corrupt
            return row, None, f"{type(e).__name__}: {e}"


def _collate(items):
    return items


def _listing_digest(paths: List[str], labels: List[int]) -> str:
    h = hashlib.sha256()
    for p, l in zip(paths, labels):
        h.update(f"{p}\t{l}\n".encode())
    return h.hexdigest()


def _init_dist():
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def _posterior_noise(rows: List[int], flip: int, shape, seed: int) -> torch.Tensor:
    """(len(rows), C, h, w) standard normal noise, a function of (seed, row, flip) only."""
    out = torch.empty((len(rows),) + tuple(shape))
    for i, row in enumerate(rows):
        g = torch.Generator().manual_seed(seed * 1_000_003 + 2 * row + flip)
        out[i] = torch.randn(tuple(shape), generator=g)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    rank_env = int(os.environ.get("RANK", "0"))
    # Fail on bad input before any heavy work.
    try:
        resolve_vae(args.vae)
    except VAENotFoundError as e:
        if rank_env == 0:
            print(f"fastdit.extract_latents: error: {e}", file=sys.stderr)
        return 2
    if not os.path.isdir(args.data_path):
        if rank_env == 0:
            print(f"fastdit.extract_latents: error: --data-path {args.data_path!r} does not exist "
                  f"(pass an ImageFolder root laid out as <root>/<class>/<image>)", file=sys.stderr)
        return 2
    if args.image_size <= 0 or args.batch_size <= 0:
        print("fastdit.extract_latents: error: --image-size and --batch-size must be positive", file=sys.stderr)
        return 2

    rank, world = _init_dist()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cpu" and world > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    os.makedirs(args.out, exist_ok=True)

    # ---- the file list (rank 0), shared through files.json ---------------------------------
    list_path = os.path.join(args.out, FILES_LIST)
    if rank == 0:
        try:
            paths, labels, classes = list_image_folder(args.data_path)
        except FileNotFoundError as e:
            print(f"fastdit.extract_latents: error: {e}", file=sys.stderr)
            paths = None
        if paths is not None:
            listing = {"root": os.path.abspath(args.data_path), "paths": paths, "labels": labels,
                       "classes": classes, "digest": _listing_digest(paths, labels)}
            old = None
            if os.path.isfile(list_path):
                with open(list_path) as f:
                    old = json.load(f)
            if old is not None and old.get("digest") != listing["digest"]:
                print(f"fastdit.extract_latents: error: {args.out} holds latents of another file list "
                      f"(the image folder changed); use a new --out", file=sys.stderr)
                paths = None
            else:
                write_json_atomic(list_path, listing)
    ok = torch.tensor([0 if (rank == 0 and paths is None) else 1])
    if dist.is_initialized():
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    if not int(ok):
        return 2
    with open(list_path) as f:
        listing = json.load(f)
    paths, labels, classes = listing["paths"], listing["labels"], listing["classes"]
    n = len(paths)

    vae = load_vae(args.vae, device)
    channels = int(vae.config.latent_channels)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if args.image_size % factor:
        if rank == 0:
            print(f"fastdit.extract_latents: error: --image-size {args.image_size} is not a multiple of "
                  f"the VAE's downsampling factor {factor}", file=sys.stderr)
        return 2
    lat = args.image_size // factor
    shape = (n, 2, channels, lat, lat)
    settings = {"vae": args.vae, "latent_scale": args.latent_scale, "image_size": args.image_size,
                "latent_shape": [channels, lat, lat], "dtype": args.dtype, "posterior": args.posterior,
                "seed": args.seed, "count": n, "listing_digest": listing["digest"]}

    # ---- create or reopen the arrays (rank 0), then every rank maps them --------------------
    meta_path = os.path.join(args.out, META_FILE)
    lat_path = os.path.join(args.out, LATENTS_FILE)
    st_path = os.path.join(args.out, STATUS_FILE)
    err = None
    if rank == 0:
        old = None
        if os.path.isfile(meta_path):
            with open(meta_path) as f:
                old = json.load(f)
        if old is not None and {k: old.get(k) for k in settings} != settings:
            diff = [k for k in settings if old.get(k) != settings[k]]
            err = (f"{args.out} was started with other settings ({', '.join(diff)}); rerun with the same "
                   f"arguments to resume, or use a new --out")
        elif old is None or not (os.path.isfile(lat_path) and os.path.isfile(st_path)):
            np.lib.format.open_memmap(lat_path, mode="w+", dtype=DTYPES[args.dtype], shape=shape).flush()
            np.save(os.path.join(args.out, LABELS_FILE), np.asarray(labels, dtype=np.int64))
            np.lib.format.open_memmap(st_path, mode="w+", dtype=np.uint8, shape=(n,)).flush()
            write_json_atomic(meta_path, dict(settings, complete=False, done=0, corrupt=0,
                                              num_classes=len(classes), classes=classes,
                                              data_path=os.path.abspath(args.data_path)))
        if err:
            print(f"fastdit.extract_latents: error: {err}", file=sys.stderr)
    ok = torch.tensor([0 if err else 1])
    if dist.is_initialized():
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    if not int(ok):
        return 2
    latents = np.load(lat_path, mmap_mode="r+")
    status = np.load(st_path, mmap_mode="r+")

    mine = [i for i in range(rank, n, world) if status[i] == STATUS_PENDING]
    total_mine = len(range(rank, n, world))
    _say(f"extracting {n} images with {world} rank(s): {total_mine - len(mine)} of rank 0's "
         f"{total_mine} already done; latents {channels}x{lat}x{lat} ({args.dtype}) -> {args.out}", rank)
    loader = torch.utils.data.DataLoader(_PendingImages(paths, mine, args.image_size),
                                         batch_size=args.batch_size, num_workers=args.num_workers,
                                         collate_fn=_collate, shuffle=False)
    from tqdm import tqdm

    bar = tqdm(total=total_mine, initial=total_mine - len(mine), disable=rank != 0 or args.no_progress,
               desc=f"rank 0/{world}", unit="img", file=sys.stdout, dynamic_ncols=True)
    corrupt_here = 0
    t0 = time.time()
    for batch in loader:
        good = [(row, x) for row, x, _ in batch if x is not None]
        for row, x, msg in batch:
            if x is None:
                corrupt_here += 1
                tqdm.write(f"[rank {rank}] corrupt image skipped: {paths[row]} ({msg})", file=sys.stderr)
        if good:
            rows = [r for r, _ in good]
            x = torch.stack([x for _, x in good]).to(device)  # (B, 3, S, S)
            mean, std = encode_distribution(vae, torch.cat([x, x.flip(-1)], 0))  # (2B, C, h, w)
            b = len(rows)
            if args.posterior == "sample":
                noise = torch.cat([_posterior_noise(rows, 0, mean.shape[1:], args.seed),
                                   _posterior_noise(rows, 1, mean.shape[1:], args.seed)]).to(mean)
                z = (mean + std * noise) * args.latent_scale
            else:
                z = mean * args.latent_scale
            z = z.cpu().numpy().astype(DTYPES[args.dtype])
            order = np.argsort(rows)  # memmap fancy assignment wants increasing rows
            rows_sorted = np.asarray(rows)[order]
            latents[rows_sorted, 0] = z[:b][order]
            latents[rows_sorted, 1] = z[b:][order]
        latents.flush()  # latents are on disk before their rows are marked done
        for row, x, _ in batch:
            status[row] = STATUS_DONE if x is not None else STATUS_CORRUPT
        status.flush()
        bar.update(len(batch))
    bar.close()
    elapsed = time.time() - t0

    counts = torch.tensor([corrupt_here, len(mine)], dtype=torch.int64)
    if dist.is_initialized():
        dist.all_reduce(counts)
    _barrier()
    if rank == 0:
        status_now = np.load(st_path, mmap_mode="r")
        done = int((status_now == STATUS_DONE).sum())
        corrupt = int((status_now == STATUS_CORRUPT).sum())
        pending = int((status_now == STATUS_PENDING).sum())
        corrupt_files = [paths[i] for i in np.nonzero(status_now == STATUS_CORRUPT)[0][:1000]]
        write_json_atomic(meta_path, dict(settings, complete=pending == 0, done=done, corrupt=corrupt,
                                          corrupt_files=corrupt_files, num_classes=len(classes),
                                          classes=classes, data_path=os.path.abspath(args.data_path)))
        print(f"latents of {done} images written to {args.out} ({corrupt} corrupt image(s) skipped, "
              f"{int(counts[1])} processed in this run in {elapsed:.1f}s)", flush=True)
        if pending:
            print(f"{pending} images still pending: rerun the same command to finish", flush=True)
    _barrier()
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
