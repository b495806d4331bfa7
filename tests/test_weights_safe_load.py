"""fastdit.weights.safe_load: checkpoint files are read without running code, on every load path; the
allowlist is exactly what genuine checkpoints need; damaged files are named."""
import argparse
import glob
import os
import shutil

import pytest
import torch

from fastdit.weights import safe_load as SL

from _helpers import random_dit, train_scenarios
from _train_scenarios import Plant, plant  # the planted object: unpickling it creates a folder

STEP2, STEP4 = "step_0000002", "step_0000004"


@pytest.fixture(scope="module")
def genuine(tmp_path_factory):
    work, results = train_scenarios(tmp_path_factory)
    assert results["genuine"]["rc"] == 0 and results["genuine3"]["rc"] == 0
    return work


# ----------------------------------------------------------------------------------------------
# The allowlist
# ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_allowlist_is_exactly_what_genuine_checkpoints_need(genuine):
    """Every file of a ZeRO-2 and a ZeRO-3 run of train.py loads; each DeepSpeed entry of the allowlist
    is needed by some genuine file (without it that file is refused)."""
    files = sorted(glob.glob(os.path.join(genuine, "genuine", "checkpoints", STEP4, "*.pt"))
                   + glob.glob(os.path.join(genuine, "genuine3", "checkpoints", STEP2, "*.pt")))
    assert any("optim_states" in f for f in files) and len(files) >= 7
    for f in files:
        SL.load_file(f)
    needed = {("deepspeed.runtime.fp16.loss_scaler", "LossScaler"), ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
              ("deepspeed.utils.tensor_fragment", "fragment_address")}
    assert needed <= set(SL.ALLOWED_GLOBALS)
    for module, name in needed:
        fewer = [g for g in SL.allowed_globals() if (g.__module__, g.__name__) != (module, name)]
        refused = []
        for f in files:
            with torch.serialization.safe_globals(fewer):
                try:
                    torch.load(f, map_location="cpu", weights_only=True)
                except Exception as e:  # noqa: BLE001
                    refused.append(str(e))
        assert refused and all(f"{module}.{name}" in e for e in refused), (name, refused[:1])
    # the rest: the official training dict's args (test_weights_load), fp16's dynamic loss scaler
    assert {m for m, _ in SL.ALLOWED_GLOBALS} == {"deepspeed.runtime.fp16.loss_scaler", "deepspeed.runtime.zero.config",
                                                  "deepspeed.utils.tensor_fragment", "argparse"}


def test_refused_and_damaged_files_are_named(tmp_path):
    marker = tmp_path / "MARKER"
    torch.save({"w": torch.zeros(2), "x": Plant(str(marker))}, tmp_path / "evil.pt")
    with pytest.raises(SL.UnsafeCheckpointError, match=r"evil\.pt holds pickled objects .*os\.makedirs.*"
                                                       r"--trust-checkpoint"):
        SL.load_file(str(tmp_path / "evil.pt"))
    assert not marker.exists()
    torch.save({"w": torch.zeros(100)}, tmp_path / "ok.pt")
    data = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(SL.DamagedCheckpointError, match=r"cut\.pt is damaged or truncated"):
        SL.load_file(str(tmp_path / "cut.pt"))
    with pytest.raises(SL.DamagedCheckpointError, match=r"gone\.pt is missing"):
        SL.load_file(str(tmp_path / "gone.pt"))
    assert "w" in SL.load_file(str(tmp_path / "evil.pt"), trust=True) and marker.exists()  # trust: it runs


def test_restricted_torch_load_covers_callers_that_ask_for_full_unpickling(tmp_path):
    """DeepSpeed calls torch.load(..., weights_only=False) itself: inside the context that call is
    restricted, files read already are answered from `preloaded`, and torch.load is restored after."""
    marker = tmp_path / "MARKER"
    torch.save({"x": Plant(str(marker))}, tmp_path / "evil.pt")
    torch.save({"w": torch.ones(3)}, tmp_path / "ok.pt")
    real = torch.load
    pre = {str(tmp_path / "ok.pt"): {"w": "preloaded"}}
    with SL.restricted_torch_load(preloaded=pre):
        with pytest.raises(SL.UnsafeCheckpointError):
            torch.load(str(tmp_path / "evil.pt"), map_location="cpu", weights_only=False)
        assert torch.load(str(tmp_path / "ok.pt"), weights_only=False) == {"w": "preloaded"}
        assert torch.equal(torch.load(str(tmp_path / "ok.pt"), weights_only=False)["w"], torch.ones(3))
        with SL.restricted_torch_load():  # nested
            assert torch.equal(torch.load(str(tmp_path / "ok.pt"))["w"], torch.ones(3))
    assert torch.load is real and not marker.exists()
    with pytest.raises(SL.UnsafeCheckpointError):
        with SL.restricted_torch_load():
            torch.load(str(tmp_path / "evil.pt"), weights_only=False)
    assert torch.load is real and not marker.exists()


# ----------------------------------------------------------------------------------------------
# Every reader: fastdit.sample, sample_fid, export, load_checkpoint; files and checkpoint folders
# ----------------------------------------------------------------------------------------------
def _commands(ckpt, tmp_path, weights):
    from fastdit.generate import sample, sample_fid
    from fastdit.weights import export

    common = ["--ckpt", str(ckpt), "--num-steps", "1", "--no-progress", "--device", "cpu", "--weights", weights]
    yield "sample", lambda: sample.main(common + ["--class-labels", "1", "--out", str(tmp_path / "g.png")])
    yield "sample_fid", lambda: sample_fid.main(common + ["--num-samples", "2", "--sample-dir", str(tmp_path / "fid")])
    if os.path.isdir(ckpt):
        yield "export", lambda: export.main([str(ckpt), "--out", str(tmp_path / "e.pt")]
                                           + (["--raw"] if weights == "model" else []))


@pytest.mark.slow
@pytest.mark.parametrize("name,weights", [("ema.pt", "ema"), ("mp_rank_00_model_states.pt", "model"),
                                          ("zero_pp_rank_0_mp_rank_00_optim_states.pt", "model")])
def test_no_command_runs_a_planted_object_in_a_checkpoint_folder(genuine, tmp_path, capsys, name, weights):
    run = tmp_path / "run"
    shutil.copytree(os.path.join(genuine, "genuine"), run)
    marker = tmp_path / "MARKER"
    plant(run / "checkpoints" / STEP4 / name, marker)
    for cmd, call in _commands(run, tmp_path, weights):
        assert call() == 2, cmd
        err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # (zero_to_fp32's bar)
        assert len(err) == 1 and os.path.join(STEP4, name) in err[0] and "--trust-checkpoint" in err[0], (cmd, err)
        assert not marker.exists(), cmd
    from fastdit.weights.load import load_checkpoint
    with pytest.raises(SL.UnsafeCheckpointError):
        load_checkpoint(str(run), weights=weights)
    assert not marker.exists()


def test_no_command_runs_a_planted_object_in_a_pt_file(tmp_path, capsys):
    model = random_dit(3, in_channels=1, num_classes=10)
    marker = tmp_path / "MARKER"
    files = {"state dict": {**model.state_dict(), "extra": Plant(str(marker))},
             "official training dict": {"ema": model.state_dict(), "model": model.state_dict(),
                                        "args": argparse.Namespace(model="DiT-S/2"), "opt": Plant(str(marker))},
             "deepspeed module file": {"module": model.state_dict(), "extra": Plant(str(marker))}}
    for what, obj in files.items():
        path = tmp_path / "ckpt.pt"
        torch.save(obj, path)
        for cmd, call in _commands(path, tmp_path, "ema"):
            assert call() == 2, (what, cmd)
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and str(path) in err[0] and "could run code" in err[0], (what, cmd, err)
            assert not marker.exists(), (what, cmd)
