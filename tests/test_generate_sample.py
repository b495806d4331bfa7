"""Sampling: the per-sample-noise loop against the official loops, determinism, CFG, decoding, CLI."""
import json
import os

import numpy as np
import pytest
import torch

from fastdit.generate import sample as S
from fastdit.generate.images import to_uint8
from fastdit.diffusion import create_diffusion
from fastdit.models.reference import DiT

from _helpers import randomize_weights_, write_training_run



def random_dit(seed=0, **kw):
    """A tiny reference DiT with random non-zero weights everywhere (adaLN-Zero init is all-zero)."""
    cfg = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2,
               num_classes=5)
    cfg.update(kw)
    torch.manual_seed(seed)
    model = DiT(**cfg)
    randomize_weights_(model, 0.08)
    return model.eval()


def official_style(model):
    """The model function the official sample code hands to p_sample_loop without CFG."""
    return lambda x, t, y: model(x, t, y)


@pytest.mark.parametrize("sampler,eta,clip", [("ddpm", 0.0, False), ("ddim", 0.0, False), ("ddim", 0.7, False),
                                             ("ddpm", 0.0, True), ("ddim", 0.0, True)])
def test_loop_reproduces_official_sampling_loops(sampler, eta, clip):
    """With the RNG consumed in the official order, our step == diffusion.p_sample_loop / ddim (clip:
    x_0 clipped to [-1, 1] at every step, as train.py's grids of pixel-space models)."""
    model = random_dit(1, learn_sigma=True)
    diffusion = create_diffusion(S.respacing(sampler, 8))
    y = torch.tensor([0, 3, 4])
    shape = (3, 4, 8, 8)
    torch.manual_seed(123)
    if sampler == "ddpm":
        want = diffusion.p_sample_loop(official_style(model), shape, clip_denoised=clip,
                                       model_kwargs={"y": y}, device="cpu")
    else:
        want = diffusion.ddim_sample_loop(official_style(model), shape, clip_denoised=clip,
                                          model_kwargs={"y": y}, device="cpu", eta=eta)
    got = S.sample_loop(diffusion, S.make_model_fn(model, use_cfg=False), y,
                        S.SharedStreamNoise(123, 3), shape[1:], sampler, eta, "cpu", clip_denoised=clip)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_learn_sigma_false_model_samples():
    model = random_dit(2, learn_sigma=False)
    x = S.sample_latents(model, [1, 2], [5, 6], num_steps=4)
    assert x.shape == (2, 4, 8, 8) and torch.isfinite(x).all()


def test_sampling_is_deterministic_and_per_sample():
    model = random_dit(3)
    labels, seeds = [0, 1, 2, 3], [10, 11, 12, 13]
    a = S.sample_latents(model, labels, seeds, cfg_scale=2.0, num_steps=6)
    b = S.sample_latents(model, labels, seeds, cfg_scale=2.0, num_steps=6)
    assert torch.equal(a, b)
    c = S.sample_latents(model, labels, [20, 11, 12, 13], cfg_scale=2.0, num_steps=6)
    assert not torch.allclose(a[0], c[0], atol=1e-2) and torch.allclose(a[1:], c[1:], atol=1e-4)
    # a sample does not depend on its batch: sample 2 alone equals sample 2 in the batch
    alone = S.sample_latents(model, [2], [12], cfg_scale=2.0, num_steps=6)
    # (batched and single matmuls may round differently: seen 1.1e-5 on one CPU, so 1e-4)
    torch.testing.assert_close(alone[0], a[2], atol=1e-4, rtol=1e-4)
    # the sampler noise is drawn on the CPU from per-sample generators
    noise = S.PerSampleNoise([12]).draw((4, 8, 8))
    torch.testing.assert_close(noise[0], torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(12)))


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_cfg_scale_one_equals_conditional_sample(sampler):
    model = random_dit(4)
    kw = dict(sampler=sampler, num_steps=6, eta=0.3)
    guided = S.sample_latents(model, [1, 4], [7, 8], cfg_scale=1.0, use_cfg=True, **kw)
    cond = S.sample_latents(model, [1, 4], [7, 8], cfg_scale=1.0, use_cfg=False, **kw)
    torch.testing.assert_close(guided, cond, atol=1e-5, rtol=1e-5)
    strong = S.sample_latents(model, [1, 4], [7, 8], cfg_scale=4.0, **kw)
    assert (strong - cond).norm() > 1e-2 * cond.norm()


@pytest.mark.parametrize("in_channels,guide_all,guided", [(4, False, 3), (4, True, 4), (1, None, 1)])
def test_cfg_model_fn_matches_explicit_guidance(in_channels, guide_all, guided):
    """out = uncond + s (cond - uncond) on the guided eps channels, cond elsewhere."""
    model = random_dit(5, in_channels=in_channels)
    x = torch.randn(3, in_channels, 8, 8)
    t = torch.tensor([3, 500, 999])
    y = torch.tensor([0, 2, 4])
    with torch.no_grad():
        cond = model(x, t, y)
        uncond = model(x, t, torch.full_like(y, model.num_classes))
        got = S.make_model_fn(model, 3.0, guide_all_channels=guide_all)(x, t, y)
    want = cond.clone()
    want[:, :guided] = uncond[:, :guided] + 3.0 * (cond[:, :guided] - uncond[:, :guided])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_bf16_autocast_sampling_is_close_to_fp32():
    model = random_dit(6)
    fp32 = S.sample_latents(model, [1], [3], num_steps=3, cfg_scale=1.5)
    bf16 = S.sample_latents(model, [1], [3], num_steps=3, cfg_scale=1.5, bf16=True)
    assert bf16.dtype == torch.float32
    rel = float((bf16 - fp32).norm() / fp32.norm())
    assert 0 < rel < 0.05


def test_bad_labels_and_arguments_are_rejected():
    model = random_dit(7)
    with pytest.raises(ValueError, match=r"outside \[0, 5\)"):
        S.sample_latents(model, [5], [0], num_steps=2)
    with pytest.raises(ValueError, match="seeds"):
        S.sample_latents(model, [1, 2], [0], num_steps=2)
    with pytest.raises(ValueError, match="sampler"):
        S.sample_latents(model, [1], [0], sampler="euler", num_steps=2)
    assert S.respacing("ddim", 50) == "ddim50" and S.respacing("ddpm", 250) == "250"


# ----------------------------------------------------------------------------------------------
# The CLI
# ----------------------------------------------------------------------------------------------
def _digits_like(seed=8):
    return random_dit(seed, in_channels=1, num_classes=10, depth=2, hidden_size=32, num_heads=2)


def test_cli_from_an_exported_file(tmp_path, capsys):
    """A plain state dict (+ sibling json) -> grid PNG and npz equal to a direct computation."""
    from PIL import Image

    model = _digits_like()
    ckpt = tmp_path / "digits.pt"
    torch.save(model.state_dict(), ckpt)
    (tmp_path / "digits.json").write_text(json.dumps(
        {"model": None, "model_kwargs": {"num_heads": 2}, "vae": None}))
    out = tmp_path / "grid.png"
    argv = ["--ckpt", str(ckpt), "--class-labels", "3", "7", "--samples-per-class", "2",
            "--cfg-scale", "2.0", "--num-steps", "5", "--seed", "4", "--out", str(out),
            "--save-npz", str(tmp_path / "s.npz"), "--no-progress", "--device", "cpu"]
    assert S.main(argv) == 0
    with Image.open(out) as im:
        assert im.size == (40 + 2 * (64 + 2) + 2, 2 * (64 + 2) + 2)  # 8 px images zoomed 8x, 2 per row, labels
    with np.load(tmp_path / "s.npz") as d:
        images, labels = d["arr_0"], d["arr_1"]
    np.testing.assert_array_equal(labels, [3, 3, 7, 7])
    x0 = S.sample_latents(model, [3, 3, 7, 7], [4, 5, 6, 7], cfg_scale=2.0, num_steps=5)
    np.testing.assert_allclose(images.astype(int), to_uint8(x0).astype(int), atol=1)
    # without the head count the error says what to pass (one line, exit 2)
    os.remove(tmp_path / "digits.json")
    capsys.readouterr()
    assert S.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "--num-heads" in err[-1] and err[-1].startswith("python -m fastdit.sample: error: ")


def test_cli_counts_and_labels_are_checked(tmp_path, capsys):
    """--num-steps 0 is refused (it used to run 250 steps), and so are labels the model does not have."""
    ckpt = tmp_path / "d.pt"
    torch.save(_digits_like().state_dict(), ckpt)
    for flag, value in (("--num-steps", "0"), ("--samples-per-class", "0")):
        with pytest.raises(SystemExit) as e:
            S.main(["--ckpt", str(ckpt), flag, value])
        assert e.value.code == 2 and flag in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        S.main(["--ckpt", str(ckpt), "--num-heads", "2", "--class-labels", "3", "12", "--num-steps", "1",
                "--out", str(tmp_path / "g.png"), "--device", "cpu"])
    assert e.value.code == 2 and "[12] are outside [0, 10)" in capsys.readouterr().err
    assert not (tmp_path / "g.png").exists()


def test_cli_from_a_training_checkpoint_directory(tmp_path):
    model = _digits_like(9)
    tag = write_training_run(tmp_path / "run", model)
    for path in (tmp_path / "run", tmp_path / "run" / "checkpoints", tag):
        out = tmp_path / f"{path.name}.png"
        assert S.main(["--ckpt", str(path), "--num-steps", "2", "--sampler", "ddim", "--class-labels", "1",
                       "--out", str(out), "--no-progress", "--device", "cpu"]) == 0
        assert out.is_file()


def test_cli_grid_has_a_labelled_row_per_class(tmp_path):
    from PIL import Image

    model = _digits_like(11)
    torch.save(model.state_dict(), tmp_path / "m.pt")
    common = ["--ckpt", str(tmp_path / "m.pt"), "--num-heads", "2", "--num-steps", "2", "--sampler", "ddim",
              "--class-labels", "1", "7", "--no-progress", "--device", "cpu", "--upscale", "8"]
    assert S.main(common + ["--samples-per-class", "3", "--out", str(tmp_path / "rows.png")]) == 0
    grid = np.asarray(Image.open(tmp_path / "rows.png").convert("RGB"))
    # save_class_grid: a 40 px label column, 3 cells of 64 px (+2 px padding) per row, 2 rows
    assert grid.shape[:2] == (2 * 66 + 2, 40 + 3 * 66 + 2)
    assert (grid[:, :40] < 128).any()  # the labels are drawn in the left column
    assert S.main(common + ["--out", str(tmp_path / "plain.png")]) == 0  # one sample per class: plain grid
    assert np.asarray(Image.open(tmp_path / "plain.png")).shape[1] == 2 * 64 + 3 * 2


def test_cli_step_count_that_cannot_be_respaced_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        S.main(["--ckpt", str(tmp_path / "absent.pt"), "--sampler", "ddim", "--num-steps", "1"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "--num-steps 1: timestep respacing 'ddim1'" in err[-1] and "Traceback" not in "\n".join(err)
