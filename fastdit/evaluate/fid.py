"""Sample-quality metrics on Inception features: FID, Inception Score, precision/recall.

* FID (Heusel et al. 2017): the Fréchet distance between Gaussians fitted to the 2048-d pool
  features of two image sets, ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)).
* IS (Salimans et al. 2016): exp(E_x KL(p(y|x) || p(y))) from the 1008-way softmax, averaged over
  splits of `split_size` images (5000, as the ADM evaluator).
* Improved precision/recall (Kynkäänniemi et al. 2019, k = 3, as the ADM evaluator): a sample is
  "precise" when it falls inside the k-NN ball of some reference feature; recall swaps the roles.

Images come as uint8 NHWC arrays (the ADM `.npz` layout, `arr_0`); `iter_npz_batches` streams them
from an `.npz` without loading the whole array. Features come from `fastdit.evaluate.inception`.
"""
from __future__ import annotations

import contextlib
import warnings
import zipfile
from typing import Dict, Iterator, Optional, Tuple

import numpy as np
import scipy.linalg
import torch

# ----------------------------------------------------------------------------------------------
# Statistics and distances
# ----------------------------------------------------------------------------------------------


def feature_statistics(features: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of features (N, D), in float64."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"need features (N >= 2, D), got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def _sqrtm(a: np.ndarray) -> np.ndarray:
    out = scipy.linalg.sqrtm(a)
    return out[0] if isinstance(out, tuple) else out


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6,
                     imag_atol: float = 1e-3) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2).

    Tr((S1 S2)^(1/2)) comes from scipy.linalg.sqrtm. When the product is singular enough that sqrtm
    returns non-finite values, `eps` is added to both diagonals and the root recomputed (with a
    warning). A complex root whose diagonal has an imaginary part above `imag_atol` raises
    ValueError (numerical breakdown); smaller imaginary parts are rounding noise and are dropped.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape:
        raise ValueError(f"mean vectors differ in shape: {mu1.shape} vs {mu2.shape}")
    d = mu1.shape[0]
    if sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"covariances must be ({d}, {d}), got {sigma1.shape} and {sigma2.shape}")
    for name, arr in (("mu1", mu1), ("mu2", mu2), ("sigma1", sigma1), ("sigma2", sigma2)):
        if not np.isfinite(arr).all():
            raise ValueError(f"{name} has non-finite values")

    diff = mu1 - mu2
    covmean = _sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        warnings.warn(f"FID: sigma1 @ sigma2 is singular; adding {eps} to the diagonals")
        offset = np.eye(d) * eps
        covmean = _sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        max_imag = np.max(np.abs(np.diagonal(covmean).imag))
        if max_imag > imag_atol:
            raise ValueError(f"FID: sqrtm produced an imaginary component of {max_imag:.3g} "
                             f"(> {imag_atol}); the covariances are numerically unusable")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def fid_from_features(features1: np.ndarray, features2: np.ndarray) -> float:
    """FID between two feature sets (N1, D) and (N2, D)."""
    return frechet_distance(*feature_statistics(features1), *feature_statistics(features2))


def inception_score(logits: np.ndarray, split_size: int = 5000) -> Tuple[float, float]:
    """(mean, std) over splits of exp(mean_x KL(softmax(logits_x) || mean softmax)).

    logits (N, K). Splits are consecutive blocks of `split_size` (the last may be shorter).
    """
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2 or logits.shape[0] == 0:
        raise ValueError(f"need logits (N, K), got shape {logits.shape}")
    logp = logits - logits.max(axis=1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(axis=1, keepdims=True))  # log softmax (N, K)
    scores = []
    for start in range(0, logits.shape[0], split_size):
        lp = logp[start:start + split_size]  # (n, K)
        p = np.exp(lp)
        log_py = np.log(p.mean(axis=0, keepdims=True))  # (1, K)
        kl = (p * (lp - log_py)).sum(axis=1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))


def _pairwise_sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances (Na, Nb) in float64."""
    a, b = a.double(), b.double()
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    return d.clamp_min_(0)


def manifold_radii(features: np.ndarray, k: int = 3, batch_size: int = 4096) -> np.ndarray:
    """Squared distance from each feature (N, D) to its k-th nearest other feature: (N,)."""
    feats = torch.from_numpy(np.asarray(features, dtype=np.float32))
    n = feats.shape[0]
    if n <= k:
        raise ValueError(f"need more than k={k} features for k-NN radii, got {n}")
    radii = np.empty(n, dtype=np.float64)
    for start in range(0, n, batch_size):
        d = _pairwise_sq_dists(feats[start:start + batch_size], feats)  # (b, N)
        # the point itself is at distance 0: the (k+1)-th smallest is the k-th other neighbour
        radii[start:start + batch_size] = d.kthvalue(k + 1, dim=1).values.numpy()
    return radii


def _fraction_inside(points: np.ndarray, centres: np.ndarray, radii: np.ndarray,
                     batch_size: int = 4096) -> float:
    """Fraction of points within (squared) radius radii[j] of some centres[j]."""
    pts = torch.from_numpy(np.asarray(points, dtype=np.float32))
    ctr = torch.from_numpy(np.asarray(centres, dtype=np.float32))
    r = torch.from_numpy(np.asarray(radii, dtype=np.float64))
    inside = 0
    for start in range(0, pts.shape[0], batch_size):
        d = _pairwise_sq_dists(pts[start:start + batch_size], ctr)  # (b, M)
        inside += int((d <= r[None, :]).any(dim=1).sum())
    return inside / pts.shape[0]


def precision_recall(real_features: np.ndarray, fake_features: np.ndarray, k: int = 3
                     ) -> Tuple[float, float]:
    """Improved precision (fake inside the real manifold) and recall (real inside the fake one)."""
    real_radii = manifold_radii(real_features, k)
    fake_radii = manifold_radii(fake_features, k)
    precision = _fraction_inside(fake_features, real_features, real_radii)
    recall = _fraction_inside(real_features, fake_features, fake_radii)
    return precision, recall


# ----------------------------------------------------------------------------------------------
# Images -> features
# ----------------------------------------------------------------------------------------------
def images_to_tensor(batch: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, C) with C in {1, 3} (or (N, H, W)) -> float (N, 3, H, W) in [0, 1]."""
    batch = np.asarray(batch)
    if batch.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (the ADM npz layout), got {batch.dtype}")
    if batch.ndim == 3:
        batch = batch[..., None]
    if batch.ndim != 4 or batch.shape[-1] not in (1, 3):
        raise ValueError(f"images must be NHWC with 1 or 3 channels, got shape {batch.shape}")
    x = torch.tensor(batch).permute(0, 3, 1, 2).float() / 255.0  # copies (streamed batches are read-only)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x


@contextlib.contextmanager
def _no_tf32():
    """Full fp32 convolutions/matmuls (TF32 would perturb the features on Ampere+ GPUs)."""
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@torch.no_grad()
def extract_features(batches, net, device="cpu", progress: bool = False,
                     total: Optional[int] = None) -> Dict[str, np.ndarray]:
    """Run `net` (FIDInceptionV3) over an iterable of uint8 NHWC batches.

    Returns {"pool": (N, 2048) float64, "logits": (N, 1008) float64}.
    """
    pools, logits = [], []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, unit="img", desc="inception")
    with _no_tf32():
        for batch in batches:
            x = images_to_tensor(batch).to(device)
            pool, logit = net(x)
            pools.append(pool.double().cpu().numpy())
            logits.append(logit.double().cpu().numpy())
            if bar is not None:
                bar.update(x.shape[0])
    if bar is not None:
        bar.close()
    if not pools:
        raise ValueError("no images to evaluate")
    return {"pool": np.concatenate(pools), "logits": np.concatenate(logits)}


# ----------------------------------------------------------------------------------------------
# .npz files
# ----------------------------------------------------------------------------------------------
def npz_keys(path: str) -> list:
    """Array names stored in an .npz (without loading them)."""
    with zipfile.ZipFile(path) as zf:
        return [n[:-4] for n in zf.namelist() if n.endswith(".npy")]


def npz_array_shape(path: str, key: str = "arr_0") -> Tuple[Tuple[int, ...], np.dtype]:
    """(shape, dtype) of one array in an .npz, read from its header only."""
    with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as f:
        shape, _, dtype = _read_npy_header(f)
    return shape, dtype


def _read_npy_header(f):
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    else:
        raise ValueError(f"unsupported .npy format version {version}")
    return shape, fortran, dtype


def iter_npz_batches(path: str, key: str = "arr_0", batch_size: int = 250
                     ) -> Iterator[np.ndarray]:
    """Stream consecutive row batches of one array of an .npz (C order, no pickles)."""
    with zipfile.ZipFile(path) as zf:
        if f"{key}.npy" not in zf.namelist():
            raise KeyError(f"{path} has no array {key!r}; it holds {npz_keys(path)}")
        with zf.open(f"{key}.npy") as f:
            shape, fortran, dtype = _read_npy_header(f)
            if fortran or dtype.hasobject:
                raise ValueError(f"{path}:{key} must be a C-ordered plain array")
            row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
            remaining = shape[0]
            while remaining:
                n = min(batch_size, remaining)
                buf = f.read(n * row)
                if len(buf) != n * row:
                    raise ValueError(f"{path}:{key} is truncated")
                yield np.frombuffer(buf, dtype=dtype).reshape((n,) + tuple(shape[1:]))
                remaining -= n
