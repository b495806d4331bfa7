"""FID / IS / precision-recall math, the FID Inception-v3 layout, and the evaluate CLI."""

import numpy as np
import pytest
import scipy.spatial.distance
import scipy.special
import torch

from fastdit.evaluate import fid, inception
from fastdit.evaluate import run as evaluate



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


def brute_precision_recall(real, fake, k):
    def radii(x):
        d = scipy.spatial.distance.cdist(x, x, "sqeuclidean")
        return np.sort(d, axis=1)[:, k]  # column 0 is the point itself

    rr, rf = radii(real), radii(fake)
    prec = np.mean((scipy.spatial.distance.cdist(fake, real, "sqeuclidean") <= rr[None]).any(1))
    rec = np.mean((scipy.spatial.distance.cdist(real, fake, "sqeuclidean") <= rf[None]).any(1))
    return prec, rec


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
# The Inception network
# ----------------------------------------------------------------------------------------------
def _conv(c_out, c_in, kh, kw=None):
    return (c_out, c_in, kh, kw if kw is not None else kh)


def expected_inception_layout():
    """Name -> conv weight shape of every conv of the 2015-12-05 FID Inception, as published."""
    convs = {"Conv2d_1a_3x3": _conv(32, 3, 3), "Conv2d_2a_3x3": _conv(32, 32, 3),
             "Conv2d_2b_3x3": _conv(64, 32, 3), "Conv2d_3b_1x1": _conv(80, 64, 1),
             "Conv2d_4a_3x3": _conv(192, 80, 3)}

    def block_a(name, cin, pool):
        convs.update({f"{name}.branch1x1": _conv(64, cin, 1), f"{name}.branch5x5_1": _conv(48, cin, 1),
                      f"{name}.branch5x5_2": _conv(64, 48, 5), f"{name}.branch3x3dbl_1": _conv(64, cin, 1),
                      f"{name}.branch3x3dbl_2": _conv(96, 64, 3), f"{name}.branch3x3dbl_3": _conv(96, 96, 3),
                      f"{name}.branch_pool": _conv(pool, cin, 1)})

    def block_c(name, c7):
        convs.update({f"{name}.branch1x1": _conv(192, 768, 1), f"{name}.branch7x7_1": _conv(c7, 768, 1),
                      f"{name}.branch7x7_2": _conv(c7, c7, 1, 7), f"{name}.branch7x7_3": _conv(192, c7, 7, 1),
                      f"{name}.branch7x7dbl_1": _conv(c7, 768, 1), f"{name}.branch7x7dbl_2": _conv(c7, c7, 7, 1),
                      f"{name}.branch7x7dbl_3": _conv(c7, c7, 1, 7), f"{name}.branch7x7dbl_4": _conv(c7, c7, 7, 1),
                      f"{name}.branch7x7dbl_5": _conv(192, c7, 1, 7), f"{name}.branch_pool": _conv(192, 768, 1)})

    def block_e(name, cin):
        convs.update({f"{name}.branch1x1": _conv(320, cin, 1), f"{name}.branch3x3_1": _conv(384, cin, 1),
                      f"{name}.branch3x3_2a": _conv(384, 384, 1, 3), f"{name}.branch3x3_2b": _conv(384, 384, 3, 1),
                      f"{name}.branch3x3dbl_1": _conv(448, cin, 1), f"{name}.branch3x3dbl_2": _conv(384, 448, 3),
                      f"{name}.branch3x3dbl_3a": _conv(384, 384, 1, 3),
                      f"{name}.branch3x3dbl_3b": _conv(384, 384, 3, 1), f"{name}.branch_pool": _conv(192, cin, 1)})

    block_a("Mixed_5b", 192, 32)
    block_a("Mixed_5c", 256, 64)
    block_a("Mixed_5d", 288, 64)
    convs.update({"Mixed_6a.branch3x3": _conv(384, 288, 3), "Mixed_6a.branch3x3dbl_1": _conv(64, 288, 1),
                  "Mixed_6a.branch3x3dbl_2": _conv(96, 64, 3), "Mixed_6a.branch3x3dbl_3": _conv(96, 96, 3)})
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
        block_c(name, c7)
    convs.update({"Mixed_7a.branch3x3_1": _conv(192, 768, 1), "Mixed_7a.branch3x3_2": _conv(320, 192, 3),
                  "Mixed_7a.branch7x7x3_1": _conv(192, 768, 1), "Mixed_7a.branch7x7x3_2": _conv(192, 192, 1, 7),
                  "Mixed_7a.branch7x7x3_3": _conv(192, 192, 7, 1), "Mixed_7a.branch7x7x3_4": _conv(192, 192, 3)})
    block_e("Mixed_7b", 1280)
    block_e("Mixed_7c", 2048)
    shapes = {}
    for name, shape in convs.items():
        shapes[f"{name}.conv.weight"] = shape
        for b in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{name}.bn.{b}"] = (shape[0],)
    shapes["fc.weight"] = (1008, 2048)
    shapes["fc.bias"] = (1008,)
    return shapes


def test_inception_state_dict_is_the_weights_file_layout():
    model = inception.FIDInceptionV3()
    want = expected_inception_layout()
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()
           if not k.endswith("num_batches_tracked")}
    assert got == want
    assert len(want) == 94 * 5 + 2  # 94 conv+BN units and the 1008-way classifier
    # torchvision's Inception-v3 has 27,161,264 parameters; without the aux head (3,326,696) and
    # with 1008 instead of 1000 classes (+16,392) that is 23,850,960
    assert sum(p.numel() for p in model.parameters()) == 23_850_960
    assert all(m.eps == 1e-3 for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert inception.expected_state_dict_keys() == list(want)


def _random_inception(seed=0, calibrate=False):
    """Random weights; with `calibrate`, BatchNorm statistics from one random batch so that the
    features are O(1) instead of vanishing through ~50 random layers."""
    torch.manual_seed(seed)
    model = inception.FIDInceptionV3()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.2)
            m.momentum = 1.0  # running stats = the calibration batch's
    if calibrate:
        model.train()
        with torch.no_grad():
            model(torch.rand(2, 3, 16, 16))
    return model.eval()


def test_inception_forward_shapes_on_tiny_batch():
    model = _random_inception()
    with torch.no_grad():
        pool, logits = model(torch.rand(2, 3, 32, 32))
    assert pool.shape == (2, 2048) and logits.shape == (2, 1008)
    assert torch.isfinite(pool).all() and torch.isfinite(logits).all()
    assert pool.std() > 0 and (pool >= 0).all()  # mean of ReLU outputs
    torch.testing.assert_close(logits, model.fc(pool))
    with pytest.raises(ValueError, match="RGB"):
        model(torch.rand(2, 1, 32, 32))


def test_inception_weights_load_strictly_and_errors_are_clear(tmp_path, monkeypatch):
    monkeypatch.delenv(inception.WEIGHTS_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match="--inception-weights"):
        inception.load_fid_inception(None)
    with pytest.raises(FileNotFoundError, match=inception.WEIGHTS_FILENAME):
        inception.load_fid_inception(str(tmp_path / "nope.pth"))

    sd = {k: v for k, v in _random_inception(1).state_dict().items()
          if not k.endswith("num_batches_tracked")}  # like a converted file without counters
    path = tmp_path / "weights.pth"
    torch.save(sd, path)
    monkeypatch.setenv(inception.WEIGHTS_ENV, str(path))
    loaded = inception.load_fid_inception(None)  # the env var route
    for k, v in sd.items():
        assert torch.equal(loaded.state_dict()[k], v)

    bad = dict(sd)
    bad.pop("Mixed_7c.branch_pool.conv.weight")
    bad["AuxLogits.fc.weight"] = torch.zeros(1000, 768)
    with pytest.raises(KeyError, match="Mixed_7c.branch_pool.conv.weight.*AuxLogits.fc.weight"):
        inception.load_inception_state_dict(inception.FIDInceptionV3(), bad)
    wrong = dict(sd, **{"fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000)})
    with pytest.raises(ValueError, match="fc.weight"):
        inception.load_inception_state_dict(inception.FIDInceptionV3(), wrong)

    # a torch.hub-style hash suffix that does not match the content warns (then the tiny file
    # fails the strict load)
    named = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save({"fc.bias": torch.zeros(1008)}, named)
    with pytest.warns(UserWarning, match="sha256"), pytest.raises(KeyError, match="missing"):
        inception.load_fid_inception(str(named))


# ----------------------------------------------------------------------------------------------
# npz handling and the evaluate CLI
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


def test_evaluate_statistics_files_need_no_network(tmp_path, monkeypatch):
    monkeypatch.delenv(inception.WEIGHTS_ENV, raising=False)
    rng = np.random.default_rng(9)
    a = rng.normal(size=(64, 16)) * 0.1
    sigma = a @ a.T + np.eye(64) * 0.01  # full rank
    mu = rng.normal(size=64)
    delta = np.full(64, 0.01)
    np.savez(tmp_path / "ref.npz", mu=mu, sigma=sigma)
    np.savez(tmp_path / "s.npz", mu=mu + delta, sigma=sigma)
    out = tmp_path / "r.json"
    assert evaluate.main([str(tmp_path / "ref.npz"), str(tmp_path / "s.npz"), "--json", str(out),
                          "--no-progress"]) == 0
    import json

    res = json.loads(out.read_text())
    assert res["fid"] == pytest.approx(64 * 1e-4, rel=1e-6)
    # images without weights: the error names the flag
    np.savez(tmp_path / "img.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(FileNotFoundError, match="--inception-weights"):
        evaluate.evaluate(str(tmp_path / "ref.npz"), str(tmp_path / "img.npz"), progress=False)
    np.savez(tmp_path / "junk.npz", foo=np.zeros(3))
    with pytest.raises(ValueError, match="neither images"):
        evaluate.evaluate(str(tmp_path / "junk.npz"), str(tmp_path / "s.npz"), progress=False)


def test_evaluate_images_end_to_end(tmp_path, monkeypatch):
    """npz images -> Inception (random weights file) -> the statistics, IS and PR of a direct run.

    (The Fréchet distance itself is tested above; here it is intercepted to keep the test fast.)
    """
    net = _random_inception(2, calibrate=True)
    weights = tmp_path / "w.pth"
    torch.save(net.state_dict(), weights)
    rng = np.random.default_rng(3)
    ref_imgs = rng.integers(0, 256, size=(4, 16, 16, 3), dtype=np.uint8)
    smp_imgs = rng.integers(0, 256, size=(4, 16, 16, 1), dtype=np.uint8)  # grayscale samples
    np.savez(tmp_path / "ref.npz", arr_0=ref_imgs)
    np.savez(tmp_path / "smp.npz", arr_0=smp_imgs)
    seen = []
    monkeypatch.setattr(fid, "frechet_distance", lambda *a: seen.append(a) or 1.25)
    res = evaluate.evaluate(str(tmp_path / "ref.npz"), str(tmp_path / "smp.npz"), str(weights),
                            batch_size=3, device="cpu", with_precision_recall=True, progress=False)
    both = np.concatenate([ref_imgs, np.repeat(smp_imgs, 3, axis=-1)])
    with torch.no_grad():
        pool, logits = net(torch.from_numpy(both).permute(0, 3, 1, 2).float() / 255)
    rp, sp = pool[:4].double().numpy(), pool[4:].double().numpy()
    assert res["fid"] == 1.25 and len(seen) == 1
    mu1, s1, mu2, s2 = seen[0]
    for got, want in ((mu1, rp.mean(0)), (s1, np.cov(rp, rowvar=False)),
                      (mu2, sp.mean(0)), (s2, np.cov(sp, rowvar=False))):
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4 * np.abs(want).max())
    assert res["inception_score"] == pytest.approx(fid.inception_score(logits[4:].double().numpy())[0],
                                                   rel=1e-5)
    assert res["num_samples"] == 4
    assert (res["precision"], res["recall"]) == pytest.approx(brute_precision_recall(rp, sp, 3))

    # --save-stats writes mu/sigma; a file with both uses the stored statistics
    np.savez(tmp_path / "two.npz", arr_0=ref_imgs[:2])
    stats = tmp_path / "two_stats.npz"
    assert evaluate.main(["--save-stats", str(stats), str(tmp_path / "two.npz"),
                          "--inception-weights", str(weights), "--no-progress",
                          "--device", "cpu"]) == 0
    with np.load(stats) as d:
        np.testing.assert_allclose(d["mu"], rp[:2].mean(0), rtol=1e-4, atol=1e-6)
