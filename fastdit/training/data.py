"""Training data: pre-extracted latents, raw ImageFolder images, synthetic latents and the embedded
digits default, plus the deterministic distributed batch order used for exact resume.

Every dataset is indexed by a key `(index, flip)`: the sampler decides the order and the horizontal
flip from (seed, epoch) alone, so the data position of a run is just (epoch, step in epoch) and a
resumed run reads exactly the batches the uninterrupted run would have read.
"""
from __future__ import annotations

import json
import os
from typing import Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


# ----------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------
def center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """The ADM / official DiT centre crop: (H, W, 3) uint8 of side `image_size`.

    Halve the image with a box filter while its short side is at least twice the target, resize with
    bicubic so the short side equals the target, then cut the centre square.
    """
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return arr[top: top + image_size, left: left + image_size]


def image_to_tensor(arr: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float32 in [-1, 1] (ToTensor then Normalize(0.5, 0.5))."""
    x = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float() / 255.0
    return x * 2.0 - 1.0


def load_image(path: str, image_size: int) -> np.ndarray:
    """Open, convert to RGB and centre-crop one image; raises OSError/ValueError on a corrupt file."""
    with Image.open(path) as im:
        im.load()
        return center_crop_arr(im.convert("RGB"), image_size)


def list_image_folder(root: str) -> Tuple[List[str], List[int], List[str]]:
    """ImageNet layout root/<class>/**/<image>: sorted classes, files sorted within each class.

    Returns (paths, labels, class_names), labels being the index of the sorted class folder.
    """
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder {root!r} does not exist (pass the ImageNet train folder, "
                                f"laid out as <root>/<class>/<image>)")
    classes = sorted(d.name for d in os.scandir(root) if d.is_dir())
    if not classes:
        raise FileNotFoundError(f"image folder {root!r} has no class sub-folders (<root>/<class>/<image>)")
    paths, labels = [], []
    for label, name in enumerate(classes):
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, name), followlinks=True):
            dirnames.sort()
            for fn in sorted(filenames):
                if fn.lower().endswith(IMAGE_EXTENSIONS):
                    paths.append(os.path.join(dirpath, fn))
                    labels.append(label)
    if not paths:
        raise FileNotFoundError(f"image folder {root!r} has no images with extensions {IMAGE_EXTENSIONS}")
    return paths, labels, classes


def check_no_empty_class(root: str, labels: List[int], classes: List[str]) -> None:
    """Every class folder holds at least one image (an empty one would be a label with no data)."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(classes))
    empty = [classes[i] for i in np.nonzero(counts == 0)[0]]
    if empty:
        raise FileNotFoundError(
            f"image folder {root!r}: class folder(s) {', '.join(empty[:5])}{' ...' if len(empty) > 5 else ''} "
            f"hold no images ({', '.join(IMAGE_EXTENSIONS)}); each class folder is a label, so remove the "
            f"empty ones or add their images")


class ImageFolderDataset(torch.utils.data.Dataset):
    """Raw images for on-the-fly VAE encoding (the official DiT way). key (i, flip) -> (x, y).

    x: (3, S, S) float32 in [-1, 1], centre-cropped as ADM and flipped horizontally when flip=1.
    """

    def __init__(self, root: str, image_size: int):
        self.paths, self.labels, self.classes = list_image_folder(root)
        check_no_empty_class(root, self.labels, self.classes)
        self.image_size = image_size
        self.num_classes = len(self.classes)
        self.channels = 3

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key):
        index, flip = _split_key(key)
        try:
            arr = load_image(self.paths[index], self.image_size)
        except Exception as e:  # noqa: BLE001 - any decoder error means a corrupt file
            raise RuntimeError(
                f"cannot read image {self.paths[index]!r} ({type(e).__name__}: {e}); remove it, or "
                f"extract latents with `python -m fastdit.extract_latents`, which skips corrupt files") from e
        if flip:
            arr = arr[:, ::-1]
        return image_to_tensor(arr), self.labels[index]


# ----------------------------------------------------------------------------------------------
# Latents written by fastdit.extract_latents
# ----------------------------------------------------------------------------------------------
LATENTS_FILE = "latents.npy"     # (N, 2, C, h, w): [unflipped, flipped] latents, already scaled
LABELS_FILE = "labels.npy"       # (N,) int64
STATUS_FILE = "status.npy"       # (N,) uint8: 0 pending, 1 done, 2 corrupt (skipped)
META_FILE = "meta.json"
STATUS_PENDING, STATUS_DONE, STATUS_CORRUPT = 0, 1, 2


class LatentDataset(torch.utils.data.Dataset):
    """Memory-mapped latents from `fastdit.extract_latents`; key (i, flip) -> (z (C, h, w), y).

    Only images whose extraction finished are visible (corrupt and pending ones are left out); the
    flip picks which of the two stored variants is returned.
    """

    def __init__(self, path: str):
        meta_path = os.path.join(path, META_FILE)
        if not os.path.isfile(meta_path):
            raise FileNotFoundError(
                f"{path!r} is not a latents folder (no {META_FILE}); create it with "
                f"`python -m fastdit.extract_latents --data-path IMAGENET/train --out {path}` "
                f"or pass --set data.path=<folder written by extract_latents>")
        try:
            with open(meta_path) as f:
                self.meta = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{meta_path} is damaged (not valid JSON: {e}); rerun extract_latents") from None
        if not isinstance(self.meta, dict):
            raise ValueError(f"{meta_path} is not a JSON object; rerun extract_latents")
        if not self.meta.get("complete", False):
            raise RuntimeError(f"latents in {path!r} are incomplete ({self.meta.get('done', '?')} of "
                               f"{self.meta.get('count', '?')} images); rerun extract_latents to finish")
        self.latents = _load_npy(path, LATENTS_FILE, mmap_mode="r")
        labels = _load_npy(path, LABELS_FILE)
        status = _load_npy(path, STATUS_FILE)
        self.num_classes = _check_latent_folder(path, self.meta, self.latents, labels, status)
        self.valid = np.nonzero(status == STATUS_DONE)[0]
        self.labels = labels
        self.channels = int(self.latents.shape[2])
        self.latent_size = int(self.latents.shape[3])

    def __len__(self) -> int:
        return len(self.valid)

    def __getitem__(self, key):
        index, flip = _split_key(key)
        row = int(self.valid[index])
        z = torch.from_numpy(np.array(self.latents[row, flip], dtype=np.float32))
        return z, int(self.labels[row])


def _load_npy(folder: str, name: str, mmap_mode: Optional[str] = None) -> np.ndarray:
    """One array of a latents folder, never unpickled; ValueError naming the file when unreadable."""
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing; rerun `python -m fastdit.extract_latents` for this folder")
    try:
        return np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"{path} is unreadable ({' '.join(str(e).split())}): it must be the plain array "
                         f"that fastdit.extract_latents writes; rerun it for this folder") from None


def _check_latent_folder(path: str, meta: dict, latents: np.ndarray, labels: np.ndarray,
                         status: np.ndarray) -> int:
    """Shapes, dtypes, counts and label range of a latents folder (ValueError naming the file);
    returns meta's class count."""
    lat_path, lab_path, st_path = (os.path.join(path, f) for f in (LATENTS_FILE, LABELS_FILE, STATUS_FILE))
    fix = "; rerun `python -m fastdit.extract_latents` for this folder"
    if latents.ndim != 5 or latents.shape[1] != 2 or not np.issubdtype(latents.dtype, np.floating):
        raise ValueError(f"{lat_path} has shape {latents.shape} ({latents.dtype}); expected float "
                         f"(N, 2, C, h, w) latents (unflipped, flipped){fix}")
    n = latents.shape[0]
    count = meta.get("count")
    if count is not None and count != n:
        raise ValueError(f"{lat_path} holds {n} rows but {os.path.join(path, META_FILE)} says count={count}{fix}")
    for file, arr in ((lab_path, labels), (st_path, status)):
        if arr.ndim != 1 or arr.shape[0] != n or not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"{file} has shape {arr.shape} ({arr.dtype}); expected ({n},) integers, one per row "
                             f"of {LATENTS_FILE}{fix}")
    odd = np.setdiff1d(np.unique(status), [STATUS_PENDING, STATUS_DONE, STATUS_CORRUPT])
    if odd.size:
        raise ValueError(f"{st_path} holds values {odd[:5].tolist()}; expected 0 (pending), 1 (done), "
                         f"2 (corrupt){fix}")
    done = status == STATUS_DONE
    if "done" in meta and int(done.sum()) != meta["done"]:
        raise ValueError(f"{st_path} marks {int(done.sum())} rows done but {os.path.join(path, META_FILE)} "
                         f"says done={meta['done']}{fix}")
    if not done.any():
        raise ValueError(f"{st_path} marks no row done: there are no latents to train on{fix}")
    num_classes = meta.get("num_classes")
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"{os.path.join(path, META_FILE)}: num_classes must be a positive integer, got "
                         f"{num_classes!r}{fix}")
    used = labels[done]
    bad = used[(used < 0) | (used >= num_classes)]
    if bad.size:
        raise ValueError(f"{lab_path} holds labels {np.unique(bad)[:5].tolist()} outside [0, {num_classes}) "
                         f"(num_classes of {META_FILE}; label {num_classes} would train the guidance's null "
                         f"class){fix}")
    return num_classes


class SyntheticLatentDataset(torch.utils.data.Dataset):
    """Deterministic random latents (benchmarks, GPU smoke runs): key (i, flip) -> (z, y)."""

    def __init__(self, size: int, channels: int, latent_size: int, num_classes: int, seed: int = 0):
        self.size, self.channels, self.latent_size = size, channels, latent_size
        self.num_classes, self.seed = num_classes, seed

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, key):
        index, flip = _split_key(key)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        z = torch.randn(self.channels, self.latent_size, self.latent_size, generator=g)
        y = int(torch.randint(0, self.num_classes, (1,), generator=g))
        return (z.flip(-1) if flip else z), y


# ----------------------------------------------------------------------------------------------
# The embedded default: scikit-learn's bundled 8x8 digits (real data, no download)
# ----------------------------------------------------------------------------------------------
def load_digits_images(image_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """sklearn's 1797 handwritten 8x8 digits upsampled (bilinear) to image_size, in [-1, 1].

    Returns x (N, 1, S, S) float32 and y (N,) int64 (the digit).
    """
    images, target = _bundled_digits()
    x = torch.from_numpy(images.astype(np.float32) / 16.0).unsqueeze(1)  # (N, 1, 8, 8) in [0, 1]
    if image_size != 8:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = (x.clamp(0.0, 1.0) * 2.0 - 1.0).contiguous()
    y = torch.from_numpy(target.astype(np.int64))
    return x, y


def _bundled_digits() -> Tuple[np.ndarray, np.ndarray]:
    """(images (1797, 8, 8), target (1797,)): scikit-learn's digits.csv.gz read straight from its package
    folder (importing sklearn costs seconds per process, which every digits run and study member paid);
    sklearn's own load_digits when the file is not where it always was."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    path = os.path.join(os.path.dirname(spec.origin), "datasets", "data", "digits.csv.gz") if spec else ""
    if os.path.isfile(path):
        data = np.loadtxt(path, delimiter=",")
        return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images, digits.target


# The digits a quality classifier learns from (fastdit.evaluate.digits_quality) are held out from the DiT:
# a fixed, class-stratified 30% of each class ("classifier"); the DiT trains on the other 70% ("dit").
DIGITS_CLASSIFIER_FRACTION = 0.3
DIGITS_SPLIT_SEED = 0
DIGITS_SPLITS = ("dit", "classifier", "all")


def digits_split(labels: torch.Tensor, part: str) -> torch.Tensor:
    """Sorted indices of one part of the digits: "classifier" (round(30%) of each class, picked by a
    fixed permutation), "dit" (the rest) or "all". Depends on the labels only, never on a run's seed."""
    if part not in DIGITS_SPLITS:
        raise ValueError(f"unknown digits split {part!r}; valid: {', '.join(DIGITS_SPLITS)}")
    if part == "all":
        return torch.arange(len(labels))
    g = torch.Generator().manual_seed(DIGITS_SPLIT_SEED)
    held = torch.zeros(len(labels), dtype=torch.bool)
    for c in sorted(set(labels.tolist())):
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        held[idx[: round(len(idx) * DIGITS_CLASSIFIER_FRACTION)]] = True
    return (held if part == "classifier" else ~held).nonzero().flatten()


class DigitsDataset(torch.utils.data.Dataset):
    """The embedded default in pixel space: key (i, flip) -> (x (1, S, S) in [-1, 1], digit).

    split: "all" (1797 digits), "dit" (the 70% a DiT trains on) or "classifier" (see digits_split).
    """

    def __init__(self, image_size: int = 16, split: str = "all"):
        x, y = load_digits_images(image_size)
        keep = digits_split(y, split)
        self.x, self.y = x[keep].contiguous(), y[keep].contiguous()
        self.split = split
        self.num_classes = 10
        self.channels = 1

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, key):
        index, flip = _split_key(key)
        x = self.x[index]
        return (x.flip(-1) if flip else x), int(self.y[index])


def _split_key(key) -> Tuple[int, int]:
    if isinstance(key, (tuple, list)):
        return int(key[0]), int(key[1])
    return int(key), 0


# ----------------------------------------------------------------------------------------------
# Deterministic distributed batch order
# ----------------------------------------------------------------------------------------------
def epoch_order(num_items: int, seed: int, epoch: int, random_flip: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """The permutation and per-position flip bits of one epoch; a function of (seed, epoch) only."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(num_items, generator=g)
    flips = torch.randint(0, 2, (num_items,), generator=g) if random_flip else torch.zeros(
        num_items, dtype=torch.int64)
    return perm, flips


class RankBatchSampler(torch.utils.data.Sampler):
    """Yields this rank's micro-batches of keys (index, flip) for one epoch, from a given step on.

    One optimizer step consumes a global batch of micro * grad_accum * world consecutive positions of
    the epoch's permutation; micro-batch m of rank r is the slice starting at (m * world + r) * micro.
    The incomplete global batch at the end of an epoch is dropped (as drop_last=True).
    """

    def __init__(self, num_items: int, micro_batch: int, grad_accum: int, rank: int, world: int,
                 seed: int, epoch: int, start_step: int = 0, random_flip: bool = True):
        self.num_items, self.micro, self.ga = num_items, micro_batch, grad_accum
        self.rank, self.world, self.seed, self.epoch = rank, world, seed, epoch
        self.start_step, self.random_flip = start_step, random_flip
        self.global_batch = micro_batch * grad_accum * world
        self.steps_per_epoch = num_items // self.global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(f"the dataset has {num_items} items, fewer than one global batch of "
                             f"{self.global_batch} (micro {micro_batch} x accumulation {grad_accum} x "
                             f"{world} ranks); use a smaller batch or more data")

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * self.ga

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        perm, flips = epoch_order(self.num_items, self.seed, self.epoch, self.random_flip)
        for step in range(self.start_step, self.steps_per_epoch):
            base = step * self.global_batch
            for m in range(self.ga):
                lo = base + (m * self.world + self.rank) * self.micro
                idx = perm[lo: lo + self.micro].tolist()
                fl = flips[lo: lo + self.micro].tolist()
                yield list(zip(idx, fl))


def rank_batches(dataset, micro_batch: int, grad_accum: int, rank: int, world: int, seed: int,
                 start_step: int, random_flip: bool, num_workers: int, pin_memory: bool) -> Iterator:
    """This rank's micro-batches (x, y) from optimizer step `start_step` on, epoch after epoch, in the
    order of RankBatchSampler (so a resumed run reads what the uninterrupted run would have read)."""
    steps_per_epoch = RankBatchSampler(len(dataset), micro_batch, grad_accum, rank, world, seed, 0,
                                       random_flip=random_flip).steps_per_epoch
    epoch, in_epoch = divmod(start_step, steps_per_epoch)
    loader_gen = torch.Generator().manual_seed(seed)  # keeps DataLoader off the global RNG
    while True:
        sampler = RankBatchSampler(len(dataset), micro_batch, grad_accum, rank, world, seed, epoch,
                                   start_step=in_epoch, random_flip=random_flip)
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                                             pin_memory=pin_memory, generator=loader_gen,
                                             persistent_workers=False)
        yield from loader
        epoch, in_epoch = epoch + 1, 0


def build_dataset(data_cfg, model_in_channels: Optional[int] = None):
    """The dataset named by data.kind (a fastdit.training.config.DataConfig); raises with what to pass
    when a path is missing."""
    from fastdit.generate.vae import DOWNSAMPLE, LATENT_CHANNELS

    kind = data_cfg.kind
    if kind == "digits":
        return DigitsDataset(data_cfg.image_size, data_cfg.digits_split)
    if kind == "latents":
        return LatentDataset(data_cfg.path)
    if kind == "imagefolder":
        return ImageFolderDataset(data_cfg.path, data_cfg.image_size)
    if kind == "synthetic":
        return SyntheticLatentDataset(data_cfg.synthetic_size, model_in_channels or LATENT_CHANNELS,
                                      data_cfg.image_size // DOWNSAMPLE, data_cfg.num_classes)
    raise ValueError(f"unknown data.kind {kind!r}")
