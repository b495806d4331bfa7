"""The digits quality metric (fastdit.evaluate.digits_quality): the held-out split, the classifier, the
digits FD and its calibration, determinism, the cache."""
import os

import pytest
import torch
from _helpers import tiny_pixel_dit

from fastdit.evaluate import digits_quality as dq
from fastdit.training.data import DigitsDataset, digits_split, load_digits_images


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("fastdit-cache"))


@pytest.fixture(scope="module")
def judge(cache):
    return dq.DigitsJudge.load(cache)


def real_halves():
    """Images and labels of the classifier's "ref" and "alt" halves of the DiT split."""
    x, y = load_digits_images(16)
    dit = digits_split(y, "dit")
    ref, alt = dq._stratified_halves(y[dit], dq.RECIPE["ref_seed"])
    return (x[dit][ref], y[dit][ref]), (x[dit][alt], y[dit][alt])


def test_digits_split_is_fixed_stratified_and_disjoint():
    _, y = load_digits_images(8)
    clf, dit = digits_split(y, "classifier"), digits_split(y, "dit")
    assert len(clf) + len(dit) == len(y) == 1797 and not set(clf.tolist()) & set(dit.tolist())
    assert (len(clf), len(dit)) == (539, 1258)
    for c in range(10):
        n = int((y == c).sum())
        assert int((y[clf] == c).sum()) == round(0.3 * n)
    assert torch.equal(clf, digits_split(y, "classifier"))  # no RNG state involved
    assert len(DigitsDataset(8, "dit")) == 1258 and len(DigitsDataset(8)) == 1797
    with pytest.raises(ValueError, match="valid: dit, classifier, all"):
        digits_split(y, "test")


def test_classifier_is_accurate_on_digits_it_never_saw(judge):
    assert judge.test_acc > 0.95, judge.test_acc  # 97.7% measured (1258 digits of the DiT split)
    assert judge.payload["num_train"] == 539 and judge.payload["num_test"] == 1258
    (_, _), (xa, ya) = real_halves()
    rec = judge.score(xa, ya.tolist())
    assert rec["accuracy"] > 0.95
    wrong = judge.score(xa, ((ya + 1) % 10).tolist())  # asked-for labels that are not the digits shown
    assert wrong["accuracy"] < 0.05


def test_fd_small_for_real_digits_large_for_noise_and_for_missing_classes(judge):
    (_, _), (xa, ya) = real_halves()
    real = judge.score(xa, ya.tolist())
    assert real["fd"] == pytest.approx(real["fd_real"], rel=0.25) and real["fd"] < 5.0  # all of "alt" vs k per class
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(500, 1, 16, 16, generator=g) * 2 - 1
    labels = [c for c in range(10) for _ in range(50)]
    bad = judge.score(noise, labels)
    assert bad["fd"] > 100 * real["fd"] and bad["accuracy"] < 0.3
    # a sampler that only draws 0-4 (asked for 0-9) is far from the real digits too
    low = ya < 5
    half = judge.score(xa[low], ya[low].tolist())
    assert half["fd"] > 10 * real["fd"]
    # 8x8 samples are judged through the data pipeline's 8 -> 16 upsampling: same numbers
    x8, _ = load_digits_images(8)
    x16, _ = load_digits_images(16)
    pick = torch.arange(0, 1797, 7)
    torch.testing.assert_close(dq.to_classifier_input(x8[pick]), x16[pick], atol=1e-6, rtol=0)


def test_scores_are_deterministic_and_need_two_samples(judge):
    (_, _), (xa, ya) = real_halves()
    a, b = judge.score(xa[:100], ya[:100].tolist()), judge.score(xa[:100], ya[:100].tolist())
    assert a == b
    with pytest.raises(ValueError, match="too small to evaluate"):
        judge.score(xa[:1], ya[:1].tolist())


def test_classifier_is_cached_by_recipe_and_read_without_unpickling_code(judge, cache, monkeypatch, tmp_path):
    assert os.path.isfile(judge.path) and judge.path.startswith(cache)
    from fastdit.weights.safe_load import load_file
    load_file(judge.path)  # tensors and plain values only: weights_only reads it
    monkeypatch.setattr(dq, "train_classifier", lambda *a, **k: pytest.fail("retrained a cached classifier"))
    again = dq.DigitsJudge.load(cache)
    assert again.test_acc == judge.test_acc and again.real_vs_real(20) == judge.real_vs_real(20)
    assert dq.recipe_hash(dict(dq.RECIPE, epochs=1)) != dq.recipe_hash()  # another recipe, another file
    # a torn cache file is trained over (here: the stand-in trainer's payload), with a note
    torn = tmp_path / os.path.basename(judge.path)
    torn.write_bytes(b"not a torch file")
    monkeypatch.setattr(dq, "train_classifier", lambda *a, **k: judge.payload)
    notes = []
    fresh = dq.DigitsJudge.load(str(tmp_path), log=notes.append)
    assert fresh.test_acc == judge.test_acc and "unreadable" in notes[0]


def _tiny_dit(seed=0, in_channels=1, size=8):
    return tiny_pixel_dit(seed, in_channels, size)


def test_evaluate_model_is_deterministic_for_a_fixed_seed(judge):
    model = _tiny_dit()
    a = dq.evaluate_model(model, judge, 3, [1.0, 2.0], "ddim3", seed=5)
    b = dq.evaluate_model(model, judge, 3, [1.0, 2.0], "ddim3", seed=5)
    c = dq.evaluate_model(model, judge, 3, [1.0], "ddim3", seed=6)
    strip = lambda rs: [{k: v for k, v in r.items() if k != "eval_seconds"} for r in rs]  # noqa: E731
    assert strip(a) == strip(b) and [r["cfg_scale"] for r in a] == [1.0, 2.0]
    assert a[0]["fd"] != c[0]["fd"]  # the seed matters
    # samples are batch-independent: chunks of 7 give what one batch of 30 gives
    labels, seeds = dq.eval_plan(3, 10, 5)
    x1 = dq.sample_chunks(model, labels, seeds, range(30), 1.0, "ddim3", "cpu", 30)
    x2 = dq.sample_chunks(model, labels, seeds, range(30), 1.0, "ddim3", "cpu", 7)
    torch.testing.assert_close(x1, x2, atol=1e-4, rtol=0)
    line = dq.quality_line(a)
    assert "CFG 1: accuracy" in line and "CFG 2: accuracy" in line and "real-vs-real FD" in line


def test_command_scores_a_checkpoint_and_names_a_missing_one(judge, cache, tmp_path, capsys):
    path = tmp_path / "tiny.pt"
    torch.save({"ema": _tiny_dit().state_dict()}, path)
    out = tmp_path / "q.json"
    assert dq.main(["--ckpt", str(path), "--samples-per-class", "2", "--sample-steps", "ddim3",
                    "--num-heads", "2", "--cache-dir", cache, "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "classifier" in text and "quality (EMA, 20 samples, ddim3, seed 0): CFG 1: accuracy" in text
    assert os.path.isfile(out)
    assert dq.main(["--ckpt", str(tmp_path / "missing.pt"), "--cache-dir", cache]) == 2
    assert "fastdit.evaluate.digits_quality: error:" in capsys.readouterr().err
