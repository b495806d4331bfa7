"""fastdit.training.checkpoint's resume through fastdit/train.py (one CPU rank): files someone else wrote
run no code, damaged checkpoints are named (and skipped by --resume auto), another global batch or
another run's folder is refused, nothing is lost. The scenarios run once (tests/_train_scenarios.py)."""
import json
import os

import pytest

from _helpers import train_scenarios

pytestmark = pytest.mark.slow
STEP2, STEP4 = "step_0000002", "step_0000004"
PLANTED = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt", "ema.pt",
           "trainer_state_rank00000.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    work, results = train_scenarios(tmp_path_factory)
    assert results["genuine"]["rc"] == 0, results["genuine"]["err"][-3000:]
    return work, results


def one_error_line(r):
    """The run's stderr holds exactly one line, the error; returns it."""
    lines = [line for line in r["err"].splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("fastdit.train: error: "), r["err"][-3000:]
    return lines[0]


@pytest.mark.parametrize("name", PLANTED)
def test_a_planted_object_runs_on_no_resume_path(runs, name):
    """A __reduce__ object in any file of the newest checkpoint: --resume auto and --resume PATH stop with
    exit 2 naming the file and --trust-checkpoint; the object never runs (its marker folder is absent)."""
    work, results = runs
    for mode in ("auto", "path"):
        r = results[f"planted-{mode}-{name}"]
        assert r["rc"] == 2 and r["markers"] == [], r
        line = one_error_line(r)
        assert os.path.join(STEP4, name) in line and "--trust-checkpoint" in line and "could run code" in line
    # not mistaken for damage: nothing was set aside, no older checkpoint was taken instead
    assert results[f"planted-auto-{name}"]["files"][os.path.join(work, f"planted-{name}", "checkpoints")] == \
        ["latest", STEP2, STEP4]


def test_trust_checkpoint_unpickles_fully(runs):
    """The marker mechanism works: with --trust-checkpoint the planted object does run (as documented)."""
    _, results = runs
    r = results["trusted"]
    assert r["rc"] == 0 and len(r["markers"]) == 1, r["err"][-3000:]


def test_another_global_batch_is_refused(runs):
    _, results = runs
    line = one_error_line(results["batch"])
    assert results["batch"]["rc"] == 2
    assert "global batch of 16" in line and "32" in line and "deepspeed.train_batch_size=16" in line


@pytest.mark.parametrize("name,file", [("model", "mp_rank_00_model_states.pt"),
                                       ("optim", "zero_pp_rank_0_mp_rank_00_optim_states.pt"),
                                       ("ema", "ema.pt"), ("meta", "meta.json"),
                                       ("trainer", "trainer_state_rank00000.pt")])
def test_damaged_checkpoint_names_the_file_and_the_intact_older_one(runs, name, file):
    work, results = runs
    r = results[f"damaged-path-{name}"]
    assert r["rc"] == 2
    line = one_error_line(r)
    assert os.path.join(STEP4, file) in line
    assert ("is missing" if name == "trainer" else "damaged or truncated") in line
    assert f"{os.path.join(work, f'damaged-{name}', 'checkpoints', STEP2)} is intact" in line
    assert "another world size" not in r["out"] + r["err"]


@pytest.mark.parametrize("name", ["ema", "trainer", "nometa"])
def test_resume_auto_sets_a_damaged_checkpoint_aside_and_falls_back(runs, name):
    work, results = runs
    r = results[f"damaged-auto-{name}"]
    assert r["rc"] == 0, r["err"][-3000:]
    ck = os.path.join(work, f"damaged-{name}", "checkpoints")
    assert f"warning: checkpoint {os.path.join(ck, STEP4)} is damaged" in r["out"]
    assert f"moved to {os.path.join(ck, STEP4)}.damaged" in r["out"]
    assert f"resumed from {os.path.join(ck, STEP2)} at step 2" in r["out"]
    assert "another world size" not in r["out"]
    assert {f"{STEP4}.damaged", STEP4, "step_0000005"} <= set(r["files"][ck])  # step 4 recomputed, old one kept


def test_resume_into_a_folder_holding_another_run_is_refused(runs):
    work, results = runs
    other = os.path.join(work, "other")
    for name in ("other-refused", "other-rewind"):
        r = results[name]
        assert r["rc"] == 2
        line = one_error_line(r)
        assert f"{other} already holds" in line and "--resume auto" in line and "--replace-run" in line
    assert "another run (checkpoint step_0000004" in one_error_line(results["other-refused"])
    assert "newer checkpoints of this run" in one_error_line(results["other-rewind"])
    assert results["other-refused"]["files"][os.path.join(other, "checkpoints")] == [".tmp", "latest", STEP2, STEP4]


def test_replace_run_moves_the_old_run_aside_whole(runs):
    work, results = runs
    other = os.path.join(work, "other")
    r = results["other-replaced"]
    assert r["rc"] == 0, r["err"][-3000:]
    assert r["files"][os.path.join(other, "replaced-1", "checkpoints")] == [".tmp", "latest", STEP2, STEP4]
    assert r["files"][os.path.join(other, "checkpoints")] == [".tmp", "latest", "step_0000006"]
    old = [json.loads(line) for line in open(os.path.join(other, "replaced-1", "metrics.jsonl"))]
    new = [json.loads(line) for line in open(os.path.join(other, "metrics.jsonl"))]
    assert [m["step"] for m in old] == [1, 2, 3, 4] and [m["step"] for m in new] == [5, 6]
    meta = json.load(open(os.path.join(other, "checkpoints", "step_0000006", "meta.json")))
    assert meta["samples_seen"] == 6 * 16


def test_a_failing_sample_grid_does_not_stop_the_run(runs):
    work, results = runs
    r = results["sampling"]
    assert r["rc"] == 0, r["err"][-3000:]
    assert "warning: the sample grid of step 2 failed (RuntimeError: the sampler broke)" in r["out"]
    assert "warning: the sample grid of step 4 failed" in r["out"] and "done: step 4" in r["out"]
    assert r["files"][os.path.join(work, "sampling", "checkpoints")] == [".tmp", "latest", STEP2, STEP4]
    # drawing a grid leaves the training RNG alone: the losses are those of the run without grids
    losses = [[r["loss"] for r in map(json.loads, open(os.path.join(work, run, "metrics.jsonl"))) if "loss" in r]
              for run in ("genuine", "sampling")]
    assert losses[0] == losses[1]
