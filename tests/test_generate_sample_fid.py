"""FID sampling at scale: exact N, ADM npz layout, per-sample seeds, resume, world-size independence."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from fastdit.dist import free_port
from fastdit.generate import sample as S
from fastdit.generate import sample_fid as F
from fastdit.generate.images import to_uint8
from fastdit.models.reference import DiT

from _helpers import randomize_weights_


N, SHARD, STEPS, SEED = 7, 2, 3, 11
KW = dict(input_size=8, patch_size=4, in_channels=1, hidden_size=32, depth=1, num_heads=2,
          num_classes=4)


def tiny_model():
    torch.manual_seed(0)
    model = DiT(**KW)
    randomize_weights_(model, 0.08)
    return model.eval()


def run(model, sample_dir, **kw):
    args = dict(num_samples=N, sample_dir=str(sample_dir), seed=SEED, batch_size=SHARD,
                cfg_scale=1.5, num_steps=STEPS)
    args.update(kw)
    return F.generate(model, **args)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """An uninterrupted single-process run: (model, npz path)."""
    model = tiny_model()
    out = run(model, tmp_path_factory.mktemp("full") / "samples")
    return model, out


def test_npz_layout_and_content(reference_run):
    model, out = reference_run
    with np.load(out) as d:
        assert sorted(d.files) == ["arr_0", "arr_1"]
        images, labels = d["arr_0"], d["arr_1"]
    assert images.shape == (N, 8, 8, 3) and images.dtype == np.uint8  # NHWC, grey -> RGB
    assert (images[..., 0] == images[..., 2]).all()
    np.testing.assert_array_equal(labels, F.class_labels_for_run(N, 4, SEED))
    # sample i is the sample of seed SEED + i with label labels[i], whatever the batching
    x0 = S.sample_latents(model, labels.tolist(), [SEED + i for i in range(N)], cfg_scale=1.5,
                          num_steps=STEPS)
    np.testing.assert_allclose(images[..., 0].astype(int), to_uint8(x0)[..., 0].astype(int), atol=1)


def test_resume_after_crash_gives_the_uninterrupted_result(tmp_path, reference_run):
    model, full = reference_run
    sample_dir = tmp_path / "samples"

    class Crash(RuntimeError):
        pass

    def crash_after_two(k):
        if k == 1:
            raise Crash

    with pytest.raises(Crash):
        run(model, sample_dir, on_shard_done=crash_after_two)
    shards = sorted(os.listdir(sample_dir / "shards"))
    assert shards == ["shard_000000.npz", "shard_000001.npz"]
    before = {s: os.path.getmtime(sample_dir / "shards" / s) for s in shards}
    # a writer killed mid-write leaves only a temporary file behind
    (sample_dir / "shards" / "shard_000002.npz.tmp999.npz").write_bytes(b"garbage")

    done = []
    out = run(model, sample_dir, on_shard_done=done.append)
    assert done == [2, 3]  # only the missing shards were made
    assert {s: os.path.getmtime(sample_dir / "shards" / s) for s in shards} == before
    assert sorted(os.listdir(sample_dir / "shards")) == [f"shard_{k:06d}.npz" for k in range(4)]
    with np.load(out) as a, np.load(full) as b:
        np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
        np.testing.assert_array_equal(a["arr_1"], b["arr_1"])
    # every index exactly once
    idx = np.concatenate([np.load(sample_dir / "shards" / f"shard_{k:06d}.npz")["indices"]
                          for k in range(4)])
    np.testing.assert_array_equal(idx, np.arange(N))


def test_restart_with_other_settings_is_refused(tmp_path, reference_run):
    model, _ = reference_run
    run(model, tmp_path / "s", num_samples=3)
    with pytest.raises(ValueError, match="cfg_scale"):
        run(model, tmp_path / "s", num_samples=3, cfg_scale=4.0)


def test_corrupt_or_foreign_shards_are_reported(tmp_path, reference_run):
    model, _ = reference_run
    run(model, tmp_path / "s", num_samples=3)
    bad = tmp_path / "s" / "shards" / "shard_000001.npz"
    np.savez(bad, images=np.zeros((1, 8, 8, 1), np.uint8), labels=np.zeros(1), indices=np.array([0]))
    with pytest.raises(RuntimeError, match="shard_000001.*delete it"):
        F.assemble_npz(str(tmp_path / "s"), 3, SHARD, str(tmp_path / "x.npz"))
    os.remove(bad)
    with pytest.raises(RuntimeError, match="missing"):
        F.assemble_npz(str(tmp_path / "s"), 3, SHARD, str(tmp_path / "x.npz"))




@pytest.mark.parametrize("flag,value", [("--num-steps", "0"), ("--per-proc-batch-size", "0"), ("--shard-size", "-2"),
                                        ("--num-samples", "0")])
def test_bad_counts_are_refused_before_any_work(tmp_path, capsys, flag, value):
    """Refused by the argument parser (exit 2): --num-steps 0 no longer means 250, and nothing (run.json
    with -2 in it) is written that would refuse the corrected rerun."""
    with pytest.raises(SystemExit) as e:
        F.main(["--ckpt", str(tmp_path / "none.pt"), "--sample-dir", str(tmp_path / "s"), flag, value])
    assert e.value.code == 2 and flag in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def _cli(ckpt, sample_dir, out, num_samples=N, steps=STEPS):
    return ["-m", "fastdit.sample_fid", "--ckpt", str(ckpt), "--num-heads", "2",
            "--impl", "reference", "--num-samples", str(num_samples),
            "--per-proc-batch-size", str(SHARD), "--cfg-scale", "1.5", "--num-steps", str(steps),
            "--seed", str(SEED), "--sample-dir", str(sample_dir), "--out", str(out), "--no-progress"]


def _env():
    return dict(os.environ, PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""),
                OMP_NUM_THREADS="1")


@pytest.mark.slow
def test_sigkill_then_restart(tmp_path, reference_run):
    """Kill -9 the CLI after its first shards, restart it: exactly N, same as uninterrupted."""
    import time

    model, _ = reference_run
    ckpt = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), ckpt)
    n, steps = 48, 25
    sample_dir, out = tmp_path / "samples", tmp_path / "out.npz"
    proc = subprocess.Popen([sys.executable] + _cli(ckpt, sample_dir, out, n, steps), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = sample_dir / "shards" / "shard_000001.npz"
    deadline = time.time() + 120
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.kill()
    proc.wait()
    made = [f for f in os.listdir(sample_dir / "shards") if f.endswith(".npz") and "tmp" not in f]
    assert 2 <= len(made) < n // SHARD, f"the run was not interrupted mid-way ({len(made)} shards)"
    assert not out.exists()
    proc = subprocess.run([sys.executable] + _cli(ckpt, sample_dir, out, n, steps), env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    full = run(model, tmp_path / "uninterrupted", num_samples=n, num_steps=steps)
    with np.load(out) as a, np.load(full) as b:
        assert a["arr_0"].shape == (n, 8, 8, 3)
        np.testing.assert_array_equal(a["arr_1"], b["arr_1"])
        assert np.abs(a["arr_0"].astype(int) - b["arr_0"].astype(int)).max() <= 1


@pytest.mark.slow
def test_two_ranks_with_torchrun_match_one_process(tmp_path, reference_run):
    """torchrun --nproc_per_node 2 (gloo) through the CLI == the single-process run."""
    model, full = reference_run
    ckpt = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), ckpt)
    out = tmp_path / "two.npz"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    cmd += _cli(ckpt, tmp_path / "samples", out)
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with np.load(out) as a, np.load(full) as b:
        np.testing.assert_array_equal(a["arr_1"], b["arr_1"])
        diff = np.abs(a["arr_0"].astype(int) - b["arr_0"].astype(int))
        assert diff.max() <= 1  # at most a rounding flip of one level
    run_json = json.loads((tmp_path / "samples" / "run.json").read_text())
    assert run_json["num_samples"] == N and run_json["shard_size"] == SHARD
