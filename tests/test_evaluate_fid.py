"""fastdit.evaluate.fid: FID / IS / precision-recall math against independent references, and npz streaming."""

import numpy as np
import pytest
import scipy.special
import torch

from fastdit.evaluate import fid

from _helpers import brute_precision_recall



# ----------------------------------------------------------------------------------------------
# Independent references (eigen-decompositions, brute force)
# ----------------------------------------------------------------------------------------------
def frechet_by_eigh(mu1, s1, mu2, s2):
    """||dmu||^2 + tr S1 + tr S2 - 2 tr((S1^1/2 S2 S1^1/2)^1/2), all through symmetric eigh."""
    w, v = np.linalg.eigh(s1)
    r1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    ev = np.linalg.eigvalsh(r1 @ s2 @ r1)
    d = mu1 - mu2
    return d @ d + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(ev, 0, None)).sum()


def gaussian_features(n, d, seed, scale=1.0):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(d, d)) * scale
    return rng.normal(size=(n, d)) @ a + rng.normal(size=d)


def test_frechet_matches_independent_eigh_computation():
    f1, f2 = gaussian_features(400, 16, 0), gaussian_features(300, 16, 1, scale=0.5)
    mu1, s1 = f1.mean(0), np.cov(f1, rowvar=False)
    mu2, s2 = f2.mean(0), np.cov(f2, rowvar=False)
    got = fid.frechet_distance(mu1, s1, mu2, s2)
    want = frechet_by_eigh(mu1, s1, mu2, s2)
    assert got == pytest.approx(want, rel=1e-8)
    assert got > 1.0  # genuinely different sets


def test_feature_statistics_are_mean_and_unbiased_covariance():
    f = gaussian_features(50, 6, 2)
    mu, sigma = fid.feature_statistics(f)
    centred = f - f.mean(0)
    np.testing.assert_allclose(mu, f.sum(0) / 50, rtol=1e-12)
    np.testing.assert_allclose(sigma, centred.T @ centred / 49, rtol=1e-10)


def test_fid_of_a_set_with_itself_is_zero():
    f = gaussian_features(500, 32, 3)
    assert abs(fid.fid_from_features(f, f)) < 1e-8


def test_shifted_set_gives_squared_mean_difference():
    f = gaussian_features(500, 24, 4)
    delta = np.random.default_rng(5).normal(size=24) * 3.0
    got = fid.fid_from_features(f, f + delta)
    assert got == pytest.approx(float(delta @ delta), rel=1e-7)


def test_singular_product_falls_back_to_eps_offset(monkeypatch):
    f1, f2 = gaussian_features(100, 8, 6), gaussian_features(100, 8, 7)
    mu1, s1 = fid.feature_statistics(f1)
    mu2, s2 = fid.feature_statistics(f2)
    real_sqrtm = fid._sqrtm
    calls = []

    def flaky(a):  # first call "fails" like sqrtm on a singular product
        calls.append(a)
        return np.full_like(a, np.nan) if len(calls) == 1 else real_sqrtm(a)

    monkeypatch.setattr(fid, "_sqrtm", flaky)
    with pytest.warns(UserWarning, match="singular"):
        got = fid.frechet_distance(mu1, s1, mu2, s2, eps=1e-3)
    eye = np.eye(8) * 1e-3
    # the fallback uses sqrt((S1 + eps)(S2 + eps)) in the trace term only
    w, v = np.linalg.eigh(s1 + eye)
    r1 = (v * np.sqrt(w)) @ v.T
    tr = np.sqrt(np.clip(np.linalg.eigvalsh(r1 @ (s2 + eye) @ r1), 0, None)).sum()
    d = mu1 - mu2
    assert got == pytest.approx(d @ d + np.trace(s1) + np.trace(s2) - 2 * tr, rel=1e-8)
    np.testing.assert_allclose(calls[1], (s1 + eye) @ (s2 + eye))


def test_large_imaginary_component_is_an_error(monkeypatch):
    f = gaussian_features(50, 4, 8)
    mu, s = fid.feature_statistics(f)
    monkeypatch.setattr(fid, "_sqrtm", lambda a: a.astype(complex) + 0.5j * np.eye(len(a)))
    with pytest.raises(ValueError, match="imaginary"):
        fid.frechet_distance(mu, s, mu, s)
    # tiny imaginary parts are rounding noise and are dropped
    monkeypatch.setattr(fid, "_sqrtm", lambda a: fid.scipy.linalg.sqrtm(a) + 1e-9j)
    assert abs(fid.frechet_distance(mu, s, mu, s)) < 1e-6


def test_frechet_rejects_bad_shapes_and_nans():
    with pytest.raises(ValueError, match="shape"):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="non-finite"):
        fid.frechet_distance(np.zeros(2), np.eye(2) * np.nan, np.zeros(2), np.eye(2))


# ----------------------------------------------------------------------------------------------
# Inception Score, precision / recall
# ----------------------------------------------------------------------------------------------
def test_inception_score_closed_forms():
    k = 10
    labels = np.repeat(np.arange(k), 30)
    onehot = np.eye(1008)[labels] * 200.0  # confident and uniformly spread over k classes
    mean, std = fid.inception_score(onehot, split_size=10_000)
    assert mean == pytest.approx(k, rel=1e-6) and std == 0
    same = np.tile(np.random.default_rng(0).normal(size=(1, 1008)), (50, 1))
    assert fid.inception_score(same)[0] == pytest.approx(1.0, abs=1e-9)


def test_inception_score_matches_scipy_per_split():
    logits = np.random.default_rng(1).normal(size=(120, 20)) * 3
    mean, std = fid.inception_score(logits, split_size=50)  # splits of 50, 50, 20
    scores = []
    for part in (logits[:50], logits[50:100], logits[100:]):
        p = scipy.special.softmax(part, axis=1)
        py = p.mean(0)
        scores.append(np.exp(np.mean([scipy.stats.entropy(row, py) for row in p])))
    assert mean == pytest.approx(np.mean(scores), rel=1e-10)
    assert std == pytest.approx(np.std(scores), rel=1e-8)


def test_precision_recall_matches_brute_force():
    rng = np.random.default_rng(2)
    real = rng.normal(size=(120, 5))
    fake = rng.normal(size=(90, 5)) * 1.5 + 0.7
    got = fid.precision_recall(real, fake, k=3)
    want = brute_precision_recall(real, fake, 3)
    assert got == pytest.approx(want, abs=1e-12)
    assert 0 < got[0] < 1 and 0 < got[1] < 1
    assert fid.precision_recall(real, real, k=3) == (1.0, 1.0)
    assert fid.precision_recall(real, real + 100.0, k=3) == (0.0, 0.0)


# ----------------------------------------------------------------------------------------------
# npz files and images
# ----------------------------------------------------------------------------------------------
def test_npz_streaming_reader(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, size=(23, 5, 4, 3), dtype=np.uint8)
    np.savez(tmp_path / "a.npz", arr_0=arr, arr_1=np.arange(23))
    assert sorted(fid.npz_keys(str(tmp_path / "a.npz"))) == ["arr_0", "arr_1"]
    assert fid.npz_array_shape(str(tmp_path / "a.npz")) == ((23, 5, 4, 3), np.dtype(np.uint8))
    batches = list(fid.iter_npz_batches(str(tmp_path / "a.npz"), batch_size=10))
    assert [len(b) for b in batches] == [10, 10, 3]
    np.testing.assert_array_equal(np.concatenate(batches), arr)
    np.savez_compressed(tmp_path / "c.npz", arr_0=arr)
    np.testing.assert_array_equal(
        np.concatenate(list(fid.iter_npz_batches(str(tmp_path / "c.npz"), batch_size=7))), arr)
    with pytest.raises(KeyError, match="arr_5"):
        next(fid.iter_npz_batches(str(tmp_path / "a.npz"), key="arr_5"))


def test_images_to_tensor_layout_and_errors():
    img = np.zeros((2, 4, 5, 3), np.uint8)
    img[0, 1, 2] = (255, 0, 51)
    x = fid.images_to_tensor(img)
    assert x.shape == (2, 3, 4, 5)
    torch.testing.assert_close(x[0, :, 1, 2], torch.tensor([1.0, 0.0, 0.2]))
    gray = fid.images_to_tensor(np.full((1, 4, 4, 1), 255, np.uint8))
    assert gray.shape == (1, 3, 4, 4) and bool((gray == 1).all())
    with pytest.raises(ValueError, match="uint8"):
        fid.images_to_tensor(np.zeros((1, 4, 4, 3), np.float32))
