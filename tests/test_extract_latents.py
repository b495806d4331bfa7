"""fastdit.extract_latents on 2 CPU ranks with a tiny random AutoencoderKL and a corrupt image."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from fastdit.dist import free_port
from fastdit.training.data import center_crop_arr, image_to_tensor
from fastdit.extract_latents import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 16




@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3,
                        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
                        block_out_channels=(8, 16), layers_per_block=1, latent_channels=4,
                        norm_num_groups=4, sample_size=SIZE, mid_block_add_attention=False)
    path = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(str(path))
    return str(path), vae.eval()


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    sizes = [(20, 16), (16, 31), (40, 40), (17, 23), (64, 48), (16, 16), (33, 18)]
    for i, (w, h) in enumerate(sizes):
        cls = root / f"class{i % 3}"
        cls.mkdir(exist_ok=True)
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(img).save(cls / f"img{i}.png" if i % 2 else cls / f"img{i}.jpg", quality=95)
    (root / "class1" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    return str(root)


def _extract(args, world=2, timeout=240):
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    if world > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world),
               "--master_port", str(free_port()), "-m", "fastdit.extract_latents"]
    else:
        cmd = [sys.executable, "-m", "fastdit.extract_latents"]
    return subprocess.run(cmd + args, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def _expected(vae, path):
    """Scaled posterior means of one image and its mirror, computed here from PIL and diffusers."""
    arr = center_crop_arr(Image.open(path).convert("RGB"), SIZE)
    x = image_to_tensor(arr)[None]
    with torch.no_grad():
        m0 = vae.encode(x).latent_dist.mean * 0.18215
        m1 = vae.encode(x.flip(-1)).latent_dist.mean * 0.18215
    return m0[0].numpy(), m1[0].numpy()


def test_two_ranks_mean_latents_flips_and_corrupt(tmp_path, tiny_vae, image_folder, capsys):
    vae_path, vae = tiny_vae
    out = str(tmp_path / "lat")
    args = ["--data-path", image_folder, "--out", out, "--vae", vae_path, "--image-size", str(SIZE),
            "--batch-size", "2", "--num-workers", "0", "--dtype", "float32", "--posterior", "mean"]
    proc = _extract(args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "corrupt image skipped" in proc.stderr and "broken.jpg" in proc.stderr
    assert "1 corrupt image(s) skipped" in proc.stdout
    meta = json.load(open(os.path.join(out, "meta.json")))
    assert meta["complete"] and meta["count"] == 8 and meta["done"] == 7 and meta["corrupt"] == 1
    assert meta["corrupt_files"][0].endswith("broken.jpg") and meta["num_classes"] == 3
    assert meta["vae"] == vae_path and meta["latent_scale"] == 0.18215 and meta["image_size"] == SIZE
    listing = json.load(open(os.path.join(out, "files.json")))
    lat = np.load(os.path.join(out, "latents.npy"))
    labels = np.load(os.path.join(out, "labels.npy"))
    status = np.load(os.path.join(out, "status.npy"))
    assert lat.shape == (8, 2, 4, SIZE // 2, SIZE // 2)
    for i, p in enumerate(listing["paths"]):
        assert labels[i] == int(os.path.basename(os.path.dirname(p))[-1])
        if p.endswith("broken.jpg"):
            assert status[i] == 2
            continue
        assert status[i] == 1
        e0, e1 = _expected(vae, p)
        np.testing.assert_allclose(lat[i, 0], e0, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(lat[i, 1], e1, rtol=1e-4, atol=1e-5)
        assert not np.allclose(e0, e1)  # the flip changes the latent

    # Other settings on the same folder are refused instead of mixing latents (in-process, 1 rank).
    bad = list(args)
    bad[bad.index("--image-size") + 1] = "32"
    assert main(bad) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "image_size" in err


def test_posterior_samples_resume_bit_for_bit(tmp_path, tiny_vae, image_folder, capsys):
    vae_path, vae = tiny_vae
    out = str(tmp_path / "a")
    args = ["--data-path", image_folder, "--out", out, "--vae", vae_path, "--image-size", str(SIZE),
            "--num-workers", "0", "--no-progress"]
    proc = _extract(args, world=2)
    assert proc.returncode == 0, proc.stderr
    full = np.load(os.path.join(out, "latents.npy"))
    assert full.dtype == np.float16

    # Resume: forget three rows (as if killed before they were marked done); one rank redoes them and
    # gets the same posterior samples (the noise depends on seed, image and flip only).
    st = np.load(os.path.join(out, "status.npy"), mmap_mode="r+")
    lm = np.load(os.path.join(out, "latents.npy"), mmap_mode="r+")
    forgotten = [0, 4, 7]  # row 3 is the corrupt image
    assert all(st[i] == 1 for i in forgotten)
    st[forgotten] = 0
    lm[forgotten] = 0
    st.flush()
    lm.flush()
    del st, lm
    assert main(args) == 0
    assert "3 processed in this run" in capsys.readouterr().out
    np.testing.assert_array_equal(np.load(os.path.join(out, "latents.npy")), full)
    assert json.load(open(os.path.join(out, "meta.json")))["done"] == 7

    from fastdit.training.data import LatentDataset

    ds = LatentDataset(out)
    assert len(ds) == 7 and ds.channels == 4 and ds.latent_size == SIZE // 2
    # samples scatter around the posterior mean
    listing = json.load(open(os.path.join(out, "files.json")))
    e0, _ = _expected(vae, listing["paths"][0])
    z, _ = ds[(0, 0)]
    assert 0 < float((z.numpy() - e0).std()) < 1.0


def _train_one_process(cfg, tmp_path, name):
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(cfg))
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return subprocess.run([sys.executable, os.path.join(ROOT, "fastdit", "train.py"), "--config", str(path)],
                          capture_output=True, text=True, timeout=240, env=env, cwd=ROOT)


def test_train_on_extracted_latents_and_on_raw_images(tmp_path, tiny_vae, image_folder):
    """The latent-space paths of train.py on one process: memmap latents, and on-the-fly encoding."""
    vae_path, _ = tiny_vae
    lat = str(tmp_path / "lat")
    proc = _extract(["--data-path", image_folder, "--out", lat, "--vae", vae_path, "--image-size", str(SIZE),
                     "--num-workers", "0", "--no-progress"], world=1)
    assert proc.returncode == 0, proc.stderr
    with open(os.path.join(ROOT, "configs", "digits.json")) as f:
        base = json.load(f)
    base["model"].update(depth=1, hidden_size=32, num_heads=2, patch_size=2)
    base["diffusion"].update(sample_steps="ddim3", guide_all_channels=False)
    base["train"].update(max_steps=3, log_every=1, ckpt_every=3, samples_per_class=1, sample_classes=[0, 2],
                         progress=False, tensorboard=False, cpu_threads=1)
    base["deepspeed"].update(train_batch_size=4, train_micro_batch_size_per_gpu=2)
    clean = str(tmp_path / "clean")  # raw-image training stops at a corrupt file (with its path); drop it
    shutil.copytree(image_folder, clean, ignore=shutil.ignore_patterns("broken.jpg"))
    for kind, path in (("latents", lat), ("imagefolder", clean)):
        cfg = json.loads(json.dumps(base))
        cfg["data"] = {"kind": kind, "path": path, "image_size": SIZE, "vae": vae_path, "num_workers": 0,
                       "num_classes": 3}
        cfg["train"]["output_dir"] = str(tmp_path / f"run-{kind}")
        proc = _train_one_process(cfg, tmp_path, kind)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert f"data={kind}" in proc.stdout and "8x8x4" in proc.stdout  # 16 px through the 2x tiny VAE
        meta = json.load(open(tmp_path / f"run-{kind}" / "checkpoints" / "step_0000003" / "meta.json"))
        assert meta["vae"] == vae_path and meta["latent_scale"] == 0.18215 and meta["image_size"] == SIZE
        assert meta["model_kwargs"]["in_channels"] == 4 and meta["model_kwargs"]["num_classes"] == 3
        grid = Image.open(tmp_path / f"run-{kind}" / "samples" / "step_0000003.png")  # decoded by the VAE
        assert grid.size[1] > 2 * SIZE


def test_missing_vae_fails_before_work(tmp_path, image_folder, capsys):
    assert main(["--data-path", image_folder, "--out", str(tmp_path / "o"),
                 "--vae", str(tmp_path / "no-vae")]) == 2
    err = capsys.readouterr().err
    assert "no-vae" in err and "--vae" in err
    assert not os.path.exists(tmp_path / "o")
    assert main(["--data-path", image_folder, "--out", str(tmp_path / "o"),
                 "--vae", "someone/not-cached-vae"]) == 2
    assert "not in the Hugging Face cache" in capsys.readouterr().err
    fake = tmp_path / "fake-vae"
    fake.mkdir()
    (fake / "config.json").write_text("{}")
    assert main(["--data-path", str(tmp_path / "none"), "--out", str(tmp_path / "o"), "--vae", str(fake)]) == 2
    assert "--data-path" in capsys.readouterr().err and not os.path.exists(tmp_path / "o")
