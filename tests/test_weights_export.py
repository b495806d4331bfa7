"""fastdit.weights.export (`python -m fastdit.export`) on a real fp32 ZeRO-1 run of fastdit/train.py.

The defect of issue #12: `python -m fastdit.export RUN --raw` of an fp32 ZeRO-1 checkpoint failed with
"missing keys (1): pos_embed" (ZeRO-1 does not save frozen parameters), while the other checkpoint reader
refilled it. There is one reader now (fastdit.weights.load), and export goes through it.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from _helpers import random_dit, write_training_run
from fastdit.dist import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env():
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


@pytest.fixture(scope="module")
def zero1_run(tmp_path_factory):
    """Two steps of a tiny digits DiT, fp32, ZeRO-1, one CPU rank through the DeepSpeed launcher."""
    tmp = tmp_path_factory.mktemp("zero1")
    with open(os.path.join(ROOT, "configs", "digits.json")) as f:
        cfg = json.load(f)
    cfg["model"].update(depth=2, hidden_size=64, num_heads=2, patch_size=2, kernels="torch")
    cfg["data"].update(image_size=8, num_workers=0)
    cfg["train"].update(output_dir=str(tmp / "run"), max_steps=2, log_every=1, ckpt_every=2, final_sample=False,
                        plots=False, tensorboard=False, progress=False, cpu_threads=1)
    cfg["deepspeed"].update(train_batch_size=16, train_micro_batch_size_per_gpu=16,
                            zero_optimization={"stage": 1}, bf16={"enabled": False})
    (tmp / "cfg.json").write_text(json.dumps(cfg))
    proc = subprocess.run([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1",
                           "--master_port", str(free_port()), os.path.join(ROOT, "fastdit", "train.py"),
                           "--config", str(tmp / "cfg.json")], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tmp


def _export(run, out, *flags):
    return subprocess.run([sys.executable, "-m", "fastdit.export", str(run), "--out", str(out), *flags],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_export_raw_of_an_fp32_zero1_run(zero1_run):
    tag_dir = zero1_run / "run" / "checkpoints" / "step_0000002"
    meta = json.loads((tag_dir / "meta.json").read_text())
    assert meta["zero_stage"] == 1 and meta["bf16"] is False
    proc = _export(zero1_run / "run", zero1_run / "raw.pt", "--raw")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "pos_embed" in proc.stderr  # the note: rebuilt as the fixed sin-cos table
    raw = torch.load(zero1_run / "raw.pt", weights_only=True)
    # fp32 ZeRO-1: the engine's module holds the same fp32 values as the master weights
    module = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    module = {k.removeprefix("module."): v for k, v in module.items()}
    assert set(raw) == set(module)
    for k, v in module.items():
        assert v.dtype == torch.float32 and torch.equal(raw[k], v), k
    side = json.loads((zero1_run / "raw.json").read_text())
    assert side["weights"] == "raw" and side["step"] == 2 and side["model_kwargs"]["depth"] == 2


@pytest.mark.slow
def test_export_ema_of_the_same_run(zero1_run):
    proc = _export(zero1_run / "run" / "checkpoints", zero1_run / "ema_out.pt")
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(zero1_run / "ema_out.pt", weights_only=True)
    want = torch.load(zero1_run / "run" / "checkpoints" / "step_0000002" / "ema.pt", weights_only=True)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    proc = _export(zero1_run / "nowhere", zero1_run / "x.pt")
    assert proc.returncode == 2 and "not a fastdit checkpoint directory" in proc.stderr


def _fake_run(tmp_path, seed=9):
    """A training checkpoint folder holding only what export reads (ema.pt, meta.json, latest)."""
    model = random_dit(seed, in_channels=1, num_classes=10, depth=2, hidden_size=32, num_heads=2)
    tag = write_training_run(tmp_path / "run", model)
    return model, tag


def test_safetensors_is_the_default_and_sample_reads_both_formats(tmp_path, capsys):
    """export writes <run>/export/<tag>_ema.safetensors by default (.pt on request); both files hold the
    checkpoint's EMA weights exactly, and fastdit.sample draws the same images from either."""
    from safetensors.torch import load_file

    from fastdit.generate import sample as S
    from fastdit.weights import export as E

    model, tag = _fake_run(tmp_path)
    assert E.main([str(tmp_path / "run")]) == 0
    st = tmp_path / "run" / "export" / "step_0000500_ema.safetensors"
    assert st.is_file() and (tmp_path / "run" / "export" / "step_0000500_ema.json").is_file()
    assert E.main([str(tag), "--out", str(tmp_path / "w.pt")]) == 0
    want = model.state_dict()
    for got in (load_file(st), torch.load(tmp_path / "w.pt", weights_only=True)):
        assert set(got) == set(want) and all(torch.equal(got[k], want[k].float()) for k in want)
    with open(st, "rb") as f:  # really safetensors: an 8-byte header length, then the JSON header
        assert f.read(9)[8:] == b"{"
    grids = {}
    for path in (st, tmp_path / "w.pt"):
        npz = tmp_path / f"{path.suffix[1:]}.npz"
        assert S.main(["--ckpt", str(path), "--num-steps", "2", "--sampler", "ddim", "--class-labels", "1", "4",
                       "--out", str(tmp_path / "g.png"), "--save-npz", str(npz), "--no-progress",
                       "--device", "cpu"]) == 0
        with np.load(npz) as d:
            grids[path.suffix] = d["arr_0"]
    np.testing.assert_array_equal(grids[".safetensors"], grids[".pt"])


def test_export_refuses_an_unknown_suffix_and_a_broken_safetensors_file(tmp_path, capsys):
    from fastdit.weights import export as E
    from fastdit.weights.load import load_checkpoint

    _fake_run(tmp_path)
    assert E.main([str(tmp_path / "run"), "--out", str(tmp_path / "w.bin")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and ".safetensors" in err[0] and ".pt" in err[0]
    assert not (tmp_path / "w.bin").exists()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_checkpoint(str(bad))
