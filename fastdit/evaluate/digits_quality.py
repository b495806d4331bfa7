"""How good are digits samples? A small classifier, trained on digits the DiT never sees, judges them.

The bundled digits (scikit-learn's 1797 8x8 images, through fastdit.training.data's 8x8 -> 16x16
pipeline) are split once, by class, with a fixed permutation (fastdit.training.data.digits_split):

  * "classifier" (30%, 539 digits): the classifier trains on these, and nothing else does;
  * "dit" (70%, 1258 digits): what a digits DiT trains on (data.digits_split="dit", the default). The
    classifier never sees them, so they are its test set (test accuracy) and the real digits that
    samples are compared with: a fixed class-stratified half is the FD reference ("ref", 626), the
    other half ("alt", 632) gives the real-vs-real FD at the same number of images per class as the
    samples, the scale a perfect sampler would get (finite-sample bias included).

Two numbers per sample set (labels asked for -> images):
  * accuracy: the fraction of samples the classifier assigns to the class they were asked for;
  * digits FD: the Fréchet distance (FID's formula, fastdit.evaluate.fid.frechet_distance) between Gaussians
    fitted to the classifier's 64-d penultimate features (pre-activation) of the samples and of "ref".

Note what the reference is: the DiT's own training digits (as FID-50K's reference is ImageNet's
training set), so a DiT that memorised its data would score the real-vs-real value.

The classifier (a two-conv CNN, ~40k parameters, 1-pixel random shifts as augmentation) trains in
seconds on one CPU thread, deterministically (fixed seeds, one thread), and is cached as
`<cache>/digits_classifier-<hash of RECIPE and torch version>.pt` with its test accuracy and the
reference features (tensors only: read back with weights_only, fastdit.weights.safe_load); <cache> is
train.eval_cache_dir, else $FASTDIT_CACHE_DIR, else $XDG_CACHE_HOME/fastdit (~/.cache/fastdit).

train.py evaluates this along the way and at the end (fastdit.training.quality); by hand:

    python -m fastdit.evaluate.digits_quality            # train (or load) the classifier, print its numbers
    python -m fastdit.evaluate.digits_quality --ckpt runs/digits --samples-per-class 50 --cfg-scale 1 2
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

CLASSIFIER_SIZE = 16  # the classifier sees 16x16 digits; other sample sizes are resized
NUM_CLASSES = 10

# Everything that decides the classifier's weights; its hash names the cache file.
RECIPE = {
    "version": 1,
    "image_size": CLASSIFIER_SIZE,
    "channels": [16, 32],
    "feature_dim": 64,
    "epochs": 40,
    "batch_size": 64,
    "lr": 3e-3,              # Adam, one-cycle schedule
    "max_shift": 2,          # random translation in 16x16 pixels (one pixel of the 8x8 original)
    "seed": 0,
    "ref_seed": 1,           # the ref/alt halves of the DiT split
}


# ----------------------------------------------------------------------------------------------
# The classifier
# ----------------------------------------------------------------------------------------------
class DigitsNet(nn.Module):
    """(N, 1, 16, 16) in [-1, 1] -> 10 logits; `features` is the 64-d penultimate layer (pre-ReLU)."""

    def __init__(self, channels: Sequence[int] = (16, 32), feature_dim: int = 64):
        super().__init__()
        c1, c2 = channels
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.fc = nn.Linear(c2 * (CLASSIFIER_SIZE // 4) ** 2, feature_dim)
        self.head = nn.Linear(feature_dim, NUM_CLASSES)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # (N, c1, 8, 8)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # (N, c2, 4, 4)
        return self.fc(x.flatten(1))                # (N, feature_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.features(x)))


def _numpy(x) -> np.ndarray:
    return x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def recipe_hash(recipe: Dict = RECIPE) -> str:
    text = json.dumps(dict(recipe, torch=torch.__version__.split("+")[0]), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def default_cache_dir() -> str:
    if os.environ.get("FASTDIT_CACHE_DIR"):
        return os.environ["FASTDIT_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fastdit")


@contextlib.contextmanager
def _one_thread():
    """The classifier's numbers must not depend on the caller's thread count."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def to_classifier_input(images: torch.Tensor) -> torch.Tensor:
    """(N, 1, S, S) images in [-1, 1] (any S) -> (N, 1, 16, 16) float32 CPU, clamped to [-1, 1].

    S = 8 is upsampled bilinearly exactly as fastdit.training.data does; larger sizes are area-averaged."""
    x = images.detach().float().cpu()
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"digits images must be (N, 1, S, S), got {tuple(x.shape)}")
    x = x.clamp(-1.0, 1.0)
    s = x.shape[-1]
    if s < CLASSIFIER_SIZE:
        x = (x + 1.0) / 2.0  # the data pipeline interpolates in [0, 1]
        x = F.interpolate(x, size=(CLASSIFIER_SIZE, CLASSIFIER_SIZE), mode="bilinear", align_corners=False)
        x = x.clamp(0.0, 1.0) * 2.0 - 1.0
    elif s > CLASSIFIER_SIZE:
        x = F.interpolate(x, size=(CLASSIFIER_SIZE, CLASSIFIER_SIZE), mode="area")
    return x.contiguous()


def _random_shift(x: torch.Tensor, max_shift: int, g: torch.Generator) -> torch.Tensor:
    n, _, h, w = x.shape
    pad = F.pad(x, (max_shift,) * 4, value=-1.0)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=g)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=g)
    return torch.stack([pad[i, :, dy[i]: dy[i] + h, dx[i]: dx[i] + w] for i in range(n)])


def _stratified_halves(labels: torch.Tensor, seed: int):
    g = torch.Generator().manual_seed(seed)
    ref, alt = [], []
    for c in range(NUM_CLASSES):
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        ref.append(idx[: len(idx) // 2])
        alt.append(idx[len(idx) // 2:])
    return torch.cat(ref), torch.cat(alt)


def train_classifier(recipe: Dict = RECIPE, log: Optional[Callable[[str], None]] = None) -> Dict:
    """Train the classifier on the "classifier" split; returns the cache payload (weights + stats)."""
    from fastdit.training.data import digits_split, load_digits_images

    t0 = time.time()
    x, y = load_digits_images(recipe["image_size"])
    train_idx, test_idx = digits_split(y, "classifier"), digits_split(y, "dit")
    with _one_thread(), torch.random.fork_rng(devices=[]), torch.enable_grad():  # callers may be in no_grad
        torch.manual_seed(recipe["seed"])
        net = DigitsNet(recipe["channels"], recipe["feature_dim"])
        g = torch.Generator().manual_seed(recipe["seed"] + 1)
        bs, epochs = recipe["batch_size"], recipe["epochs"]
        steps = epochs * ((len(train_idx) + bs - 1) // bs)
        opt = torch.optim.Adam(net.parameters(), lr=recipe["lr"])
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe["lr"], total_steps=steps)
        net.train()
        for _ in range(epochs):
            perm = train_idx[torch.randperm(len(train_idx), generator=g)]
            for i in range(0, len(perm), bs):
                b = perm[i: i + bs]
                loss = F.cross_entropy(net(_random_shift(x[b], recipe["max_shift"], g)), y[b])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
        net.eval()
        with torch.no_grad():
            test_pred = net(x[test_idx]).argmax(1)
            train_acc = float((net(x[train_idx]).argmax(1) == y[train_idx]).float().mean())
            feats = net.features(x[test_idx]).double()
    test_acc = float((test_pred == y[test_idx]).float().mean())
    ref_pos, alt_pos = _stratified_halves(y[test_idx], recipe["ref_seed"])
    # tensors, numbers, strings and containers only: the cache is read back with weights_only=True
    payload = {
        "recipe": recipe, "hash": recipe_hash(recipe), "torch": str(torch.__version__),
        "state_dict": {k: v.clone() for k, v in net.state_dict().items()},
        "test_acc": test_acc, "train_acc": train_acc,
        "num_train": len(train_idx), "num_test": len(test_idx),
        "ref_features": feats[ref_pos].clone(), "ref_labels": y[test_idx][ref_pos].clone(),
        "alt_features": feats[alt_pos].clone(), "alt_labels": y[test_idx][alt_pos].clone(),
        "train_seconds": time.time() - t0,
    }
    if log:
        log(f"digits classifier trained in {payload['train_seconds']:.1f}s on {len(train_idx)} held-out digits: "
            f"test accuracy {100 * test_acc:.2f}% on the {len(test_idx)} digits of the DiT split")
    return payload


# ----------------------------------------------------------------------------------------------
# The judge: a trained classifier and its real-digit statistics
# ----------------------------------------------------------------------------------------------
class DigitsJudge:
    """Scores digits samples: accuracy against the requested labels and digits FD against "ref"."""

    def __init__(self, payload: Dict, path: Optional[str] = None):
        from fastdit.evaluate.fid import feature_statistics

        recipe = payload["recipe"]
        self.net = DigitsNet(recipe["channels"], recipe["feature_dim"])
        self.net.load_state_dict(payload["state_dict"])
        self.net.eval()
        self.payload, self.path = payload, path
        self.test_acc = float(payload["test_acc"])
        self.ref_features = _numpy(payload["ref_features"])
        self.alt_features = _numpy(payload["alt_features"])
        self.alt_labels = _numpy(payload["alt_labels"])
        self.ref_mu, self.ref_sigma = feature_statistics(self.ref_features)
        self._real_cache: Dict[int, float] = {}

    @classmethod
    def load(cls, cache_dir: Optional[str] = None, recipe: Dict = RECIPE,
             log: Optional[Callable[[str], None]] = None) -> "DigitsJudge":
        """The cached classifier of `recipe`, trained (and cached atomically) when missing. The cache is
        read with weights_only (fastdit.weights.safe_load): a file that needs more, or a torn one, is
        retrained over."""
        from fastdit.atomic import torch_save
        from fastdit.weights.safe_load import load_file

        cache_dir = cache_dir or default_cache_dir()
        path = os.path.join(cache_dir, f"digits_classifier-{recipe_hash(recipe)}.pt")
        if os.path.isfile(path):
            try:
                return cls(load_file(path), path)
            except Exception as e:  # noqa: BLE001 - a torn or foreign file: retrain it
                if log:
                    log(f"digits classifier cache {path} unreadable ({' '.join(str(e).split())[:200]}); retraining")
        payload = train_classifier(recipe, log)
        os.makedirs(cache_dir, exist_ok=True)
        torch_save(payload, path)
        return cls(payload, path)

    @torch.no_grad()
    def _run(self, images: torch.Tensor):
        x = to_classifier_input(images)
        with _one_thread():
            feats, logits = [], []
            for chunk in x.split(500):
                f = self.net.features(chunk)
                feats.append(f.double())
                logits.append(self.net.head(F.relu(f)).double())
        return torch.cat(feats).numpy(), torch.cat(logits)

    def features(self, images: torch.Tensor) -> np.ndarray:
        return self._run(images)[0]

    def real_vs_real(self, per_class: int) -> float:
        """FD of `per_class` real digits of each class (the "alt" half, or all of it) against "ref"."""
        from fastdit.evaluate.fid import fid_from_features

        if per_class not in self._real_cache:
            labels = self.alt_labels
            pick = np.concatenate([np.nonzero(labels == c)[0][:per_class] for c in range(NUM_CLASSES)])
            self._real_cache[per_class] = fid_from_features(self.alt_features[pick], self.ref_features)
        return self._real_cache[per_class]

    def score(self, images: torch.Tensor, labels: Sequence[int]) -> Dict:
        """{accuracy, fd, fd_real, per_class_accuracy, num_samples, classifier_test_acc}."""
        from fastdit.evaluate.fid import feature_statistics, frechet_distance

        labels = torch.as_tensor(list(labels), dtype=torch.long)
        if len(labels) != len(images):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        if len(images) < 2:
            raise ValueError(f"the digits FD needs at least 2 samples, got {len(images)}: the budget is "
                             f"too small to evaluate")
        feats, logits = self._run(images)
        pred = logits.argmax(1)
        correct = (pred == labels).float()
        per_class = {int(c): float(correct[labels == c].mean()) for c in labels.unique()}
        counts = torch.bincount(labels, minlength=NUM_CLASSES)
        k = int(counts[counts > 0].min())
        fd = frechet_distance(*feature_statistics(feats), self.ref_mu, self.ref_sigma)
        return {"accuracy": float(correct.mean()), "fd": fd, "fd_real": self.real_vs_real(k),
                "per_class_accuracy": per_class, "num_samples": int(len(labels)),
                "classifier_test_acc": self.test_acc}

    def describe(self) -> Dict:
        p = self.payload
        return {"classifier": self.path, "hash": p["hash"], "test_acc": p["test_acc"],
                "num_train": p["num_train"], "num_test": p["num_test"],
                "num_ref": int(len(p["ref_labels"])), "num_alt": int(len(p["alt_labels"]))}


# ----------------------------------------------------------------------------------------------
# Sampling (fastdit.generate.sample's API) and scoring a model
# ----------------------------------------------------------------------------------------------

def eval_plan(samples_per_class: int, num_classes: int = NUM_CLASSES, seed: int = 0):
    """Labels (label-major) and per-sample noise seeds of one evaluation; the same for every scale."""
    labels = [c for c in range(num_classes) for _ in range(samples_per_class)]
    seeds = [seed * 1_000_003 + j for j in range(len(labels))]
    return labels, seeds


def sample_chunks(model, labels: Sequence[int], seeds: Sequence[int], indices: Sequence[int],
                  cfg_scale: float, sample_steps: str, device, batch_size: int,
                  guide_all_channels: Optional[bool] = None, diffusion=None) -> torch.Tensor:
    """x_0 of the samples `indices` (their labels and seeds), `batch_size` at a time, via
    fastdit.generate.sample.sample_latents (each sample has its own noise generator: batch-independent).
    x_0 is not clipped to [-1, 1] during sampling (the classifier input is clamped once at the end); the
    sample grids of pixel-space runs clip at every step."""
    from fastdit.diffusion import create_diffusion
    from fastdit.generate.sample import parse_sample_steps, respacing, sample_latents

    sampler, num_steps = parse_sample_steps(sample_steps)
    if diffusion is None:
        diffusion = create_diffusion(respacing(sampler, num_steps), learn_sigma=model.learn_sigma)
    out = []
    for i in range(0, len(indices), batch_size):
        idx = list(indices[i: i + batch_size])
        out.append(sample_latents(model, [labels[j] for j in idx], [seeds[j] for j in idx], cfg_scale=cfg_scale,
                                  sampler=sampler, num_steps=num_steps, device=device,
                                  guide_all_channels=guide_all_channels, diffusion=diffusion).cpu())
    if not out:
        return torch.empty(0)
    return torch.cat(out)


def evaluate_model(model, judge: DigitsJudge, samples_per_class: int = 50, cfg_scales: Sequence[float] = (1.0,),
                   sample_steps: str = "ddim50", seed: int = 0, device="cpu", batch_size: int = 250,
                   guide_all_channels: Optional[bool] = None) -> List[Dict]:
    """One record per CFG scale (single process; training uses fastdit.training.quality, over ranks)."""
    labels, seeds = eval_plan(samples_per_class, min(model.num_classes, NUM_CLASSES), seed)
    records = []
    for scale in cfg_scales:
        t0 = time.time()
        x = sample_chunks(model, labels, seeds, range(len(labels)), scale, sample_steps, device, batch_size,
                          guide_all_channels)
        rec = judge.score(x, labels)
        rec.update(cfg_scale=float(scale), sample_steps=sample_steps, seed=seed,
                   samples_per_class=samples_per_class, eval_seconds=time.time() - t0)
        records.append(rec)
    return records


def quality_line(records: Sequence[Dict]) -> str:
    """One line for the console: accuracy and digits FD per CFG scale, real-vs-real and test accuracy."""
    if not records:
        return "quality: none measured"
    r0 = records[0]
    parts = [f"CFG {r['cfg_scale']:g}: accuracy {100 * r['accuracy']:.1f}%, digits FD {r['fd']:.2f}"
             for r in records]
    return (f"quality (EMA, {r0['num_samples']} samples, {r0['sample_steps']}, seed {r0['seed']}): "
            + " | ".join(parts)
            + f" | real-vs-real FD {r0['fd_real']:.2f} | classifier test accuracy "
              f"{100 * r0['classifier_test_acc']:.1f}%")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastdit.evaluate.digits_quality", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=None, help="a digits DiT (training output dir, checkpoint or export); "
                   "without it only the classifier's own numbers are printed")
    p.add_argument("--num-heads", type=int, default=None,
                   help="for a bare state dict of a custom architecture (training folders record it)")
    p.add_argument("--samples-per-class", type=int, default=50)
    p.add_argument("--sample-steps", default="ddim50")
    p.add_argument("--cfg-scale", type=float, nargs="+", default=[1.0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--json", default=None, help="also write the records here")
    args = p.parse_args(argv)
    judge = DigitsJudge.load(args.cache_dir, log=print)
    d = judge.describe()
    print(f"classifier {d['classifier']}: test accuracy {100 * d['test_acc']:.2f}% on {d['num_test']} digits "
          f"(trained on {d['num_train']} held-out ones); real-vs-real FD "
          f"{judge.real_vs_real(args.samples_per_class):.3f} at {args.samples_per_class}/class")
    if args.ckpt is None:
        return 0
    from fastdit.generate.sample import LOAD_ERRORS, error_line, load_model

    try:
        model, _ = load_model(args.ckpt, impl="reference", num_heads=args.num_heads)
    except LOAD_ERRORS as e:
        return error_line("fastdit.evaluate.digits_quality", e)
    recs = evaluate_model(model, judge, args.samples_per_class, args.cfg_scale, args.sample_steps, args.seed)
    print(quality_line(recs))
    if args.json:
        from fastdit.atomic import write_json
        write_json(args.json, {"records": recs, "classifier": d})
    return 0


if __name__ == "__main__":
    sys.exit(main())
