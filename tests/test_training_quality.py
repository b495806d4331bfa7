"""train.py's quality hook (fastdit.training.quality): its settings checked at load, the FID path for latent
runs (stand-in features), the training RNG left alone. The 2-rank digits run: tests/test_train.py."""
import json
import os
import types

import numpy as np
import pytest
import torch
from _helpers import tiny_pixel_dit

from fastdit.evaluate import digits_quality as dq
from fastdit.training.config import ConfigError, config_from_dict
from fastdit.training.quality import QualityEvaluator, check_files, fid_moments

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _raw(name="digits.json", **train):
    with open(os.path.join(ROOT, "configs", name)) as f:
        raw = json.load(f)
    raw["train"].update(train)
    return raw


@pytest.mark.parametrize("train,message", [
    (dict(eval_samples_per_class=1), "eval_samples_per_class=1 is too small to evaluate"),
    (dict(eval_every=2000, final_eval=False), "budget is too small to evaluate anything"),
    (dict(eval_every=-1), "train.eval_every must be >= 0"),
    (dict(eval_batch_size=0), "train.eval_batch_size must be positive"),
    (dict(eval_sample_steps="fifty"), "eval_sample_steps='fifty'.*'ddim50' or '250'"),
    (dict(eval_sample_steps="ddim2000"), "eval_sample_steps='ddim2000'.*2000 steps out of 1000"),
    (dict(eval_cfg="all"), "train.eval_cfg must be one of 'both', 'unguided', 'guided'"),
])
def test_bad_evaluation_settings_fail_at_load(train, message):
    config_from_dict(_raw(), "digits.json")
    with pytest.raises(ConfigError, match=message):
        config_from_dict(_raw(**train), "digits.json")
    # nothing to evaluate, nothing to complain about: no final evaluation and none along the way
    config_from_dict(_raw(eval_samples_per_class=1, final_eval=False), "digits.json")


def test_fid_settings_need_both_files(tmp_path):
    raw = _raw("s2_zero1.json", eval_fid_ref=str(tmp_path / "ref.npz"))
    raw["data"]["path"] = str(tmp_path)
    with pytest.raises(ConfigError, match="eval_inception_weights is missing"):
        config_from_dict(raw, "s2.json")
    raw["train"]["eval_inception_weights"] = str(tmp_path / "w.pth")
    cfg = config_from_dict(raw, "s2.json")
    assert "train.eval_fid_ref" in check_files(cfg) and "does not exist" in check_files(cfg)
    (tmp_path / "ref.npz").write_bytes(b"x")
    (tmp_path / "w.pth").write_bytes(b"x")
    assert check_files(cfg) is None


class FakeInception(torch.nn.Module):
    def forward(self, x):  # (N, 3, H, W) in [0, 1] -> (pool (N, 6), logits (N, 4))
        pool = torch.cat([x.mean((2, 3)), x.amax((2, 3))], 1)
        return pool, pool[:, :4]


def _tiny_dit(seed=0, in_channels=1, size=8):
    return tiny_pixel_dit(seed, in_channels, size)


def test_fid_moments_give_the_feature_statistics():
    """Per-rank moments of the Inception features sum to the whole set's mean and covariance (a stand-in
    feature net; pixel-space 3-channel model, no VAE)."""
    from fastdit.diffusion import create_diffusion
    from fastdit.evaluate.fid import extract_features, feature_statistics
    from fastdit.generate.images import decode_images

    model = _tiny_dit(1, in_channels=3)
    labels, seeds = [j % 10 for j in range(12)], list(range(12))
    diffusion = create_diffusion("ddim3", learn_sigma=True)
    parts = [fid_moments(model, labels, seeds, idx, 1.0, "ddim3", "cpu", 4, None, diffusion, None, 0.18215,
                         FakeInception()) for idx in (range(0, 8), range(8, 12))]
    n = sum(p[0] for p in parts)
    s1 = sum(p[1] for p in parts)
    s2 = sum(p[2] for p in parts)
    mu, sigma = s1 / n, (s2 - n * np.outer(s1 / n, s1 / n)) / (n - 1)
    x0 = dq.sample_chunks(model, labels, seeds, range(12), 1.0, "ddim3", "cpu", 12, None, diffusion)
    feats = extract_features([decode_images(x0)], FakeInception())["pool"]
    want_mu, want_sigma = feature_statistics(feats)
    np.testing.assert_allclose(mu, want_mu, atol=1e-6)
    np.testing.assert_allclose(sigma, want_sigma, atol=1e-6)
    assert n == 12 and mu.shape == (6,) and np.abs(sigma).sum() > 0


def test_fid_mode_of_the_training_hook_leaves_the_training_rng_alone(tmp_path, monkeypatch):
    """A latent-style run with train.eval_fid_ref + train.eval_inception_weights scores FID of its EMA samples
    (stand-ins: a 3-channel pixel model without VAE, a 6-d feature net, a mu/sigma reference file); building
    the sampling model does not advance the global RNG that training draws its timesteps and noise from."""
    from fastdit.diffusion import create_diffusion
    from fastdit.evaluate import inception
    from fastdit.evaluate.fid import frechet_distance

    monkeypatch.setattr(inception, "load_fid_inception", lambda weights, device="cpu": FakeInception())
    rng = np.random.default_rng(0)
    mu_ref, a = rng.normal(size=6), rng.normal(size=(6, 6))
    np.savez(tmp_path / "ref.npz", mu=mu_ref, sigma=a @ a.T)
    (tmp_path / "w.pth").write_bytes(b"stand-in")
    raw = _raw("s2_zero1.json", eval_every=5, eval_fid_ref=str(tmp_path / "ref.npz"), eval_num_samples=12,
               eval_inception_weights=str(tmp_path / "w.pth"), eval_sample_steps="ddim3", eval_batch_size=5)
    raw["data"].update(kind="synthetic", image_size=64)
    cfg = config_from_dict(raw, "s2.json")
    assert check_files(cfg) is None
    model = _tiny_dit(2, in_channels=3)
    sd = model.state_dict()
    setup = types.SimpleNamespace(ema=types.SimpleNamespace(full_state_dict=lambda dst=None: sd),
                                  device=torch.device("cpu"), full_kwargs=dict(num_classes=10, class_dropout_prob=0.1))
    metrics = tmp_path / "metrics.jsonl"
    ev = QualityEvaluator(cfg, setup, lambda: _tiny_dit(7, in_channels=3), out_dir=str(tmp_path), vae_spec=None,
                          metrics_path=str(metrics), log=lambda m: None)
    assert ev.mode == "fid" and ev.scales == [1.0, 4.0] and ev.due(10) and not ev.due(7)
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    recs = ev.evaluate(10)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert [(r["step"], r["cfg_scale"], r["num_samples"]) for r in recs] == [(10, 1.0, 12), (10, 4.0, 12)]
    labels, seeds = [j % 10 for j in range(12)], [j for j in range(12)]
    n, s1, s2 = fid_moments(model, labels, seeds, range(12), 1.0, "ddim3", "cpu", 12, None,
                            create_diffusion("ddim3", learn_sigma=True), None, 0.18215, FakeInception())
    mu = s1 / n
    want = frechet_distance(mu, (s2 - n * np.outer(mu, mu)) / (n - 1), mu_ref, a @ a.T)
    assert recs[0]["fid"] == pytest.approx(want, rel=1e-6)
    assert recs[0]["fid"] != recs[1]["fid"]
    assert "FID-12" in ev.summary(recs)
    logged = [json.loads(ln) for ln in open(metrics)]
    assert [r["quality"] for r in logged] == ["fid", "fid"]
