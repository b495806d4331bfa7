"""FID / IS / precision-recall of a sample `.npz` against a reference `.npz` (ADM layout).

    python -m fastdit.evaluate REF.npz SAMPLES.npz --inception-weights pt_inception-2015-12-05-6726825d.pth
    python -m fastdit.evaluate --save-stats REF_STATS.npz IMAGES.npz --inception-weights ...

Each file is either images (`arr_0`, uint8 NHWC, 1 or 3 channels) or statistics (`mu` (2048,),
`sigma` (2048, 2048)), or both, as in the ADM evaluator's reference batches (where `mu`/`sigma`
describe the whole training set and `arr_0` is a subset used for precision/recall). Stored
statistics are used for FID when present; images are run through the FID Inception-v3
(`fastdit.evaluate.inception`, weights from a local file) otherwise. IS is reported for the sample file when
it holds images; precision/recall (k = 3) when both files hold images and --precision-recall is set.

Note: the features follow the PyTorch port of the TF Inception graph (bilinear resize with
half-pixel centres, input scaled as 2x/255 - 1). The ADM evaluator runs the TF graph itself; its
numbers and statistics can differ from these in the second or third significant digit, so compare
FIDs computed with the same feature extractor.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import zipfile
from typing import Dict, Optional

import numpy as np
import torch

from fastdit.evaluate import fid as fidlib
from fastdit.evaluate.inception import load_fid_inception
from fastdit.weights.safe_load import CheckpointFileError


class _LazyInception:
    """Loads the Inception network on first use (statistics-only files never need it)."""

    def __init__(self, weights: Optional[str], device):
        self.weights, self.device, self.net = weights, device, None

    def get(self):
        if self.net is None:
            self.net = load_fid_inception(self.weights, device=self.device)
        return self.net


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


_READ_ERRORS = (zipfile.BadZipFile, ValueError, KeyError, OSError, EOFError)


@contextlib.contextmanager
def _naming(path: str):
    """Errors while reading `path` say which file (ValueError '<path>: ...')."""
    try:
        yield
    except _READ_ERRORS as e:
        text = " ".join(str(e.args[0] if isinstance(e, KeyError) and e.args else e).split())
        if path in text:
            raise
        raise ValueError(f"{path}: {text or type(e).__name__} (an .npz of uint8 NHWC images 'arr_0' and/or "
                         f"float statistics 'mu', 'sigma'; object arrays are never loaded)") from None


def _named_batches(path: str, batch_size: int):
    with _naming(path):
        yield from fidlib.iter_npz_batches(path, "arr_0", batch_size)


def describe_set(path: str, inception: _LazyInception, batch_size: int = 100,
                 need_features: bool = False, progress: bool = True) -> Dict[str, np.ndarray]:
    """mu/sigma (stored or computed), plus pool features and logits when images were run.

    Nothing is unpickled (np.load with allow_pickle=False; images are streamed as plain arrays); an
    unreadable file raises ValueError naming it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such .npz: {path}")
    with _naming(path):
        keys = fidlib.npz_keys(path)
    has_images = "arr_0" in keys
    has_stats = "mu" in keys and "sigma" in keys
    if not has_images and not has_stats:
        raise ValueError(f"{path} holds neither images ('arr_0') nor statistics ('mu', 'sigma'); "
                         f"it has {keys}")
    out: Dict[str, np.ndarray] = {}
    if has_images and (need_features or not has_stats):
        with _naming(path):
            shape, dtype = fidlib.npz_array_shape(path, "arr_0")
        if dtype != np.uint8 or len(shape) not in (3, 4):
            raise ValueError(f"{path}: arr_0 must be uint8 NHWC images, got {dtype} {shape}")
        feats = fidlib.extract_features(
            _named_batches(path, batch_size), inception.get(),
            device=inception.device, progress=progress, total=shape[0])
        out.update(feats)
        out["mu"], out["sigma"] = fidlib.feature_statistics(feats["pool"])
    if has_stats:  # stored statistics win (e.g. ADM reference batches: full-train-set stats)
        with _naming(path), np.load(path, allow_pickle=False) as data:
            out["mu"], out["sigma"] = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
    return out


def evaluate(ref_path: str, sample_path: str, inception_weights: Optional[str] = None,
             batch_size: int = 100, device: Optional[str] = None, with_precision_recall: bool = False,
             split_size: int = 5000, progress: bool = True) -> Dict[str, float]:
    """FID of sample vs reference, IS of the sample images, optional precision/recall."""
    inception = _LazyInception(inception_weights, device or _default_device())
    if not os.path.isfile(sample_path):
        raise FileNotFoundError(f"no such .npz: {sample_path}")
    with _naming(sample_path):
        sample_keys = fidlib.npz_keys(sample_path)
    ref = describe_set(ref_path, inception, batch_size, need_features=with_precision_recall,
                       progress=progress)
    sample = describe_set(sample_path, inception, batch_size,
                          need_features="arr_0" in sample_keys, progress=progress)
    try:
        fid_value = fidlib.frechet_distance(ref["mu"], ref["sigma"], sample["mu"], sample["sigma"])
    except ValueError as e:
        raise ValueError(f"{ref_path} vs {sample_path}: {e}") from None
    result: Dict[str, float] = {"fid": fid_value}
    if "logits" in sample:
        result["inception_score"], result["inception_score_std"] = fidlib.inception_score(
            sample["logits"], split_size)
        result["num_samples"] = int(sample["logits"].shape[0])
    if with_precision_recall:
        if "pool" not in ref or "pool" not in sample:
            raise ValueError("precision/recall needs images ('arr_0') in both files")
        result["precision"], result["recall"] = fidlib.precision_recall(ref["pool"], sample["pool"])
    return result


def save_statistics(images_path: str, out_path: str, inception_weights: Optional[str] = None,
                    batch_size: int = 100, device: Optional[str] = None, progress: bool = True):
    """Write mu/sigma of an image .npz to `out_path` (reusable as a reference)."""
    inception = _LazyInception(inception_weights, device or _default_device())
    stats = describe_set(images_path, inception, batch_size, need_features=True, progress=progress)
    np.savez(out_path, mu=stats["mu"], sigma=stats["sigma"])
    return stats


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastdit.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ref", help="reference .npz (images 'arr_0' and/or statistics 'mu'/'sigma')")
    p.add_argument("sample", nargs="?", help="sample .npz (images 'arr_0' or statistics)")
    p.add_argument("--inception-weights", default=None,
                   help="local path of pt_inception-2015-12-05-6726825d.pth "
                        "(default: $FASTDIT_INCEPTION_WEIGHTS)")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--precision-recall", action="store_true",
                   help="also improved precision/recall (k=3; needs images in both files)")
    p.add_argument("--split-size", type=int, default=5000, help="IS split size (ADM: 5000)")
    p.add_argument("--save-stats", metavar="OUT.npz", default=None,
                   help="instead of comparing, write mu/sigma of the images in REF to OUT.npz")
    p.add_argument("--json", metavar="OUT.json", default=None, help="also write the results here")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    progress = not args.no_progress
    if args.batch_size < 1 or args.split_size < 1:
        p.error("--batch-size and --split-size must be >= 1")
    try:
        if args.save_stats:
            save_statistics(args.ref, args.save_stats, args.inception_weights, args.batch_size,
                            args.device, progress)
            print(f"wrote statistics of {args.ref} to {args.save_stats}")
            return 0
        if args.sample is None:
            p.error("give REF and SAMPLE .npz files (or --save-stats OUT.npz IMAGES.npz)")
        result = evaluate(args.ref, args.sample, args.inception_weights, args.batch_size, args.device,
                          args.precision_recall, args.split_size, progress)
    except (FileNotFoundError, ValueError, KeyError, CheckpointFileError) as e:
        text = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"{p.prog}: error: {' '.join(str(text).split())}", file=sys.stderr)
        return 2
    for k, v in result.items():
        print(f"{k}: {v:.6g}" if isinstance(v, float) else f"{k}: {v}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(result, ref=args.ref, sample=args.sample), f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
