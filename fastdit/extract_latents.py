"""Encode an ImageFolder tree (ImageNet layout) into VAE latents for training.

    python -m fastdit.extract_latents --data-path /data/imagenet/train --out latents/in256 \\
        --image-size 256 --vae stabilityai/sd-vae-ft-ema
    torchrun --standalone --nproc_per_node 8 -m fastdit.extract_latents ...            # or
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
from typing import List, Optional

import numpy as np
import torch
from tqdm import tqdm

from fastdit import atomic, dist
from fastdit.training.data import (LABELS_FILE, LATENTS_FILE, META_FILE, STATUS_CORRUPT, STATUS_DONE,
                          STATUS_FILE, STATUS_PENDING, check_no_empty_class, image_to_tensor, list_image_folder,
                          load_image)
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


def _posterior_noise(rows: List[int], flip: int, shape, seed: int) -> torch.Tensor:
    """(len(rows), C, h, w) standard normal noise, a function of (seed, row, flip) only."""
    out = torch.empty((len(rows),) + tuple(shape))
    for i, row in enumerate(rows):
        g = torch.Generator().manual_seed(seed * 1_000_003 + 2 * row + flip)
        out[i] = torch.randn(tuple(shape), generator=g)
    return out


def _error(msg: str) -> int:
    """Print a one-line error (rank 0) and return the exit code 2."""
    if dist.env_rank() == 0:
        print(f"fastdit.extract_latents: error: {msg}", file=sys.stderr, flush=True)
    return 2


def _all_ok(ok: bool) -> bool:
    """True when every rank is ok (a MIN all-reduce; just `ok` without a process group)."""
    flag = torch.tensor([1 if ok else 0])
    if dist.is_initialized():
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(int(flag))


def _check_inputs(args) -> Optional[int]:
    """Fail on bad input before any heavy work: the exit code, or None when all is well."""
    try:
        resolve_vae(args.vae)
    except VAENotFoundError as e:
        return _error(str(e))
    if not os.path.isdir(args.data_path):
        return _error(f"--data-path {args.data_path!r} does not exist (pass an ImageFolder root laid out "
                      f"as <root>/<class>/<image>)")
    if args.image_size <= 0 or args.batch_size <= 0:
        return _error("--image-size and --batch-size must be positive")
    return None


def _share_listing(args, rank: int) -> Optional[dict]:
    """The image list, made by rank 0 and shared through files.json (None on every rank on an error)."""
    list_path = os.path.join(args.out, FILES_LIST)
    ok = True
    if rank == 0:
        try:
            paths, labels, classes = list_image_folder(args.data_path)
            check_no_empty_class(args.data_path, labels, classes)
            listing = {"root": os.path.abspath(args.data_path), "paths": paths, "labels": labels,
                       "classes": classes, "digest": _listing_digest(paths, labels)}
            old = None
            if os.path.isfile(list_path):
                with open(list_path) as f:
                    old = json.load(f)
            if old is not None and old.get("digest") != listing["digest"]:
                ok = False
                _error(f"{args.out} holds latents of another file list (the image folder changed); "
                       f"use a new --out")
            else:
                atomic.write_json(list_path, listing)
        except FileNotFoundError as e:
            ok = False
            _error(str(e))
    if not _all_ok(ok):
        return None
    with open(list_path) as f:
        return json.load(f)


def _open_arrays(args, settings: dict, listing: dict, rank: int):
    """Create (rank 0, on a first run) or reopen latents.npy / labels.npy / status.npy and meta.json;
    every rank then maps them. Returns (latents, status) memmaps, or None when the folder holds a run
    with other settings."""
    meta_path, lat_path, st_path = (os.path.join(args.out, f) for f in (META_FILE, LATENTS_FILE, STATUS_FILE))
    n = settings["count"]
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
            shape = (n, 2, *settings["latent_shape"])
            np.lib.format.open_memmap(lat_path, mode="w+", dtype=DTYPES[args.dtype], shape=shape).flush()
            np.save(os.path.join(args.out, LABELS_FILE), np.asarray(listing["labels"], dtype=np.int64))
            np.lib.format.open_memmap(st_path, mode="w+", dtype=np.uint8, shape=(n,)).flush()
            atomic.write_json(meta_path, _meta(args, settings, listing, complete=False, done=0, corrupt=0))
        if err:
            _error(err)
    if not _all_ok(err is None):
        return None
    return np.load(lat_path, mmap_mode="r+"), np.load(st_path, mmap_mode="r+")


def _meta(args, settings: dict, listing: dict, **counts) -> dict:
    return dict(settings, **counts, num_classes=len(listing["classes"]), classes=listing["classes"],
                data_path=os.path.abspath(args.data_path))


def _encode_batch(args, vae, device, batch, latents, status, paths, rank: int) -> int:
    """Encode the good images of one loader batch (both flips), write their rows, mark the batch's
    rows done or corrupt (after the latents are flushed). Returns the number of corrupt images."""
    good = [(row, x) for row, x, _ in batch if x is not None]
    corrupt = 0
    for row, x, msg in batch:
        if x is None:
            corrupt += 1
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
    return corrupt


def _report(args, settings: dict, listing: dict, processed: int, elapsed: float) -> None:
    """Rank 0: the final counts into meta.json (complete when nothing is pending) and on stdout."""
    status_now = np.load(os.path.join(args.out, STATUS_FILE), mmap_mode="r")
    done = int((status_now == STATUS_DONE).sum())
    corrupt = int((status_now == STATUS_CORRUPT).sum())
    pending = int((status_now == STATUS_PENDING).sum())
    corrupt_files = [listing["paths"][i] for i in np.nonzero(status_now == STATUS_CORRUPT)[0][:1000]]
    atomic.write_json(os.path.join(args.out, META_FILE),
                      _meta(args, settings, listing, complete=pending == 0, done=done, corrupt=corrupt,
                            corrupt_files=corrupt_files))
    print(f"latents of {done} images written to {args.out} ({corrupt} corrupt image(s) skipped, "
          f"{processed} processed in this run in {elapsed:.1f}s)", flush=True)
    if pending:
        print(f"{pending} images still pending: rerun the same command to finish", flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    code = _check_inputs(args)
    if code is not None:
        return code
    rank, world, device = dist.init_process_group()
    if device.type == "cpu" and world > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    os.makedirs(args.out, exist_ok=True)
    listing = _share_listing(args, rank)
    if listing is None:
        return 2
    paths, n = listing["paths"], len(listing["paths"])
    vae = load_vae(args.vae, device)
    channels = int(vae.config.latent_channels)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if args.image_size % factor:
        return _error(f"--image-size {args.image_size} is not a multiple of the VAE's downsampling factor "
                      f"{factor}")
    lat = args.image_size // factor
    settings = {"vae": args.vae, "latent_scale": args.latent_scale, "image_size": args.image_size,
                "latent_shape": [channels, lat, lat], "dtype": args.dtype, "posterior": args.posterior,
                "seed": args.seed, "count": n, "listing_digest": listing["digest"]}
    arrays = _open_arrays(args, settings, listing, rank)
    if arrays is None:
        return 2
    latents, status = arrays
    mine = [i for i in range(rank, n, world) if status[i] == STATUS_PENDING]
    total_mine = len(range(rank, n, world))
    dist.say(f"extracting {n} images with {world} rank(s): {total_mine - len(mine)} of rank 0's "
             f"{total_mine} already done; latents {channels}x{lat}x{lat} ({args.dtype}) -> {args.out}")
    loader = torch.utils.data.DataLoader(_PendingImages(paths, mine, args.image_size),
                                         batch_size=args.batch_size, num_workers=args.num_workers,
                                         collate_fn=_collate, shuffle=False)
    bar = tqdm(total=total_mine, initial=total_mine - len(mine), disable=rank != 0 or args.no_progress,
               desc=f"rank 0/{world}", unit="img", file=sys.stdout, dynamic_ncols=True)
    t0 = time.time()
    for batch in loader:
        _encode_batch(args, vae, device, batch, latents, status, paths, rank)
        bar.update(len(batch))
    bar.close()
    processed = torch.tensor([len(mine)], dtype=torch.int64)
    if dist.is_initialized():
        torch.distributed.all_reduce(processed)
    dist.barrier()
    if rank == 0:
        _report(args, settings, listing, int(processed), time.time() - t0)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
