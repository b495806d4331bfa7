"""fastdit.evaluate.run (`python -m fastdit.evaluate`): stored statistics need no network or weights;
images go through the FID Inception end to end."""
import json

import numpy as np
import pytest
import torch

from fastdit.evaluate import fid, inception
from fastdit.evaluate import run as evaluate

from _helpers import brute_precision_recall
from _helpers import random_inception as _random_inception


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


class _Plant:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os
        return (os.makedirs, (self.marker, 0o777, True))


def test_evaluate_errors_name_the_file_and_never_unpickle(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(inception.WEIGHTS_ENV, raising=False)
    good = tmp_path / "good.npz"
    np.savez(good, mu=np.zeros(4), sigma=np.eye(4))
    marker = tmp_path / "MARKER"
    np.savez(tmp_path / "pickled.npz", mu=np.array([_Plant(str(marker))], dtype=object), sigma=np.eye(4))
    (tmp_path / "cut.npz").write_bytes(good.read_bytes()[:60])
    np.savez(tmp_path / "small.npz", mu=np.zeros(3), sigma=np.eye(3))
    for name, words in (("pickled.npz", "allow_pickle"), ("cut.npz", "zip"), ("small.npz", "differ in shape"),
                        ("missing.npz", "no such")):
        path = str(tmp_path / name)
        assert evaluate.main([str(good), path, "--no-progress"]) == 2, name
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and path in err[0] and words in err[0].lower(), (name, err)
    assert not marker.exists()
