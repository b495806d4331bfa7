"""python -m fastdit.experiments (fastdit/experiments/runner.py, figures.py): bad input, the smoke studies, a
failed member, resuming without retraining."""
import json
import os
import subprocess
import sys

import pytest

from fastdit.experiments import runner

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def env():
    e = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")  # the session's classifier cache
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "FASTDIT_TEST_FAIL_MEMBER"):
        e.pop(k, None)
    return e


def study(args, env, extra_env=None, timeout=300):
    proc = subprocess.run([sys.executable, "-m", "fastdit.experiments", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=dict(env, **(extra_env or {})))
    return proc


def test_bad_input_names_what_is_valid(tmp_path, capsys):
    out = str(tmp_path / "s")
    assert runner.main(["blocks", "--blocks", "adaln_zero,film", "--out", out]) == 2
    err = capsys.readouterr().err
    assert "unknown block type 'film'" in err and "adaln_zero, adaln, cross_attention, in_context" in err
    assert runner.main(["scaling", "--models", "digits-S/2,DiT-Q/2", "--out", out]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'DiT-Q/2'" in err and "digits-S/2" in err and "DiT-XL/8" in err
    assert runner.main(["blocks", "--smoke", "--steps", "2", "--eval-every", "5", "--out", out]) == 2
    assert "too small to evaluate" in capsys.readouterr().err
    assert runner.main(["blocks", "--smoke", "--set", "train.eval_samples_per_class=1", "--out", out]) == 2
    assert "too small to evaluate" in capsys.readouterr().err
    assert runner.main(["scaling", "--config", "configs/s2_zero1.json", "--set", f"data.path={tmp_path}",
                        "--models", "DiT-S/8", "--out", out]) == 2
    assert "train.eval_fid_ref" in capsys.readouterr().err
    assert not any(os.path.isdir(os.path.join(out, d, "checkpoints")) for d in os.listdir(out)) \
        if os.path.isdir(out) else True  # nothing was trained


def test_plans():
    blocks = runner.plan_blocks(["adaLN-Zero", "in-context"])
    assert [m.name for m in blocks] == ["adaln_zero", "in_context"]
    members = runner.plan_scaling(["digits-S/4", "DiT-B/2"], digits=True)
    assert members[0].sets == ["model.depth=2", "model.hidden_size=64", "model.num_heads=2", "model.patch_size=4"]
    assert members[1].sets[0] == "model.name=DiT-B/2" and members[1].info["hidden_size"] == 768
    with pytest.raises(runner.StudyError, match="valid models: DiT-S/2"):
        runner.plan_scaling(["digits-S/2"], digits=False)  # the miniature family is for digits configs


@pytest.mark.slow
def test_blocks_smoke_records_a_failed_member_and_resumes_without_retraining(tmp_path, env):
    out = tmp_path / "blocks"
    proc = study(["blocks", "--smoke", "--out", str(out)], env, {"FASTDIT_TEST_FAIL_MEMBER": "adaln"})
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[blocks 2/4 adaLN] FAILED" in proc.stdout and "1 member(s) failed: adaLN" in proc.stderr
    res = json.load(open(out / "results.json"))
    status = {m["name"]: m["status"] for m in res["members"]}
    assert status == {"adaln_zero": "done", "adaln": "failed", "cross_attention": "done", "in_context": "done"}
    failed = next(m for m in res["members"] if m["name"] == "adaln")
    assert "train.max_steps must be positive" in failed["error"]
    for m in res["members"]:
        if m["status"] == "done":
            assert [e["step"] for e in m["evals"]] == [1, 2] and all(e["cfg_scale"] == 1.0 for e in m["evals"])
            e = m["evals"][-1]
            assert e["images_seen"] == 2 * 16 and e["train_gflops"] == pytest.approx(m["gflops"] * 3 * 32)
            assert 0 <= e["accuracy"] <= 1 and e["fd"] > 0 and e["fd_real"] > 0
    gflops = {m["name"]: m["gflops"] for m in res["members"]}
    assert gflops["in_context"] > gflops["adaln_zero"] > gflops["adaln"]  # two extra tokens; 6D vs 4D modulation
    assert os.path.getsize(out / "blocks.png") > 10_000
    stamps = {d: os.path.getmtime(out / d / "metrics.jsonl") for d in ("adaln_zero", "cross_attention", "in_context")}

    proc = study(["blocks", "--smoke", "--out", str(out)], env, {"FASTDIT_TEST_FAIL_MEMBER": "adaln"})
    assert proc.returncode == 1
    assert proc.stdout.count("not retrained") == 3 and "[blocks 2/4 adaLN] training" in proc.stdout
    assert stamps == {d: os.path.getmtime(out / d / "metrics.jsonl") for d in stamps}

    proc = study(["blocks", "--smoke", "--steps", "3", "--eval-every", "1", "--out", str(out)], env)
    assert proc.returncode == 2 and "other settings" in proc.stderr and "train.max_steps=3" in proc.stderr


@pytest.mark.slow
def test_scaling_smoke_grid(tmp_path, env):
    out = tmp_path / "scaling"
    proc = study(["scaling", "--smoke", "--out", str(out)], env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.load(open(out / "results.json"))
    assert [m["label"] for m in res["members"]] == ["digits-S/2", "digits-S/4", "digits-B/2", "digits-B/4"]
    assert all(m["status"] == "done" and len(m["evals"]) == 2 for m in res["members"])
    g = {m["label"]: m["gflops"] for m in res["members"]}
    assert g["digits-S/2"] > g["digits-S/4"] and g["digits-B/2"] > g["digits-B/4"] and g["digits-B/2"] > g["digits-S/2"]
    meta_patch = {m["label"]: m["model_kwargs"]["patch_size"] for m in res["members"]}
    assert meta_patch == {"digits-S/2": 2, "digits-S/4": 4, "digits-B/2": 2, "digits-B/4": 4}  # what really trained
    assert os.path.getsize(out / "scaling.png") > 10_000
    assert "[scaling 4/4 digits-B/4] done" in proc.stdout
