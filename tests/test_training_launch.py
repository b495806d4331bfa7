"""fastdit/training/launch.py (what `make digits` runs): a free rendezvous port, and ARGS reach train.py."""
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys

import pytest

from fastdit.training import launch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_split_args_keeps_train_arguments_and_picks_a_free_port():
    num, port, rest = launch.split_args(["--num_gpus", "2", "--config", "c.json", "--set", "a.b=1"])
    assert (num, port, rest) == (2, None, ["--config", "c.json", "--set", "a.b=1"])
    cmd = launch.command(["--num_gpus=3", "--config", "c.json"])
    i = cmd.index("--master_port")
    assert cmd[cmd.index("--num_gpus") + 1] == "3" and int(cmd[i + 1]) > 0
    assert launch.command(["--master_port", "4242", "--config", "c.json"])[i + 1] == "4242"
    with pytest.raises(ValueError, match="--num_gpus needs a positive integer"):
        launch.split_args(["--num_gpus", "two"])


def _make_digits_recipe(args: str):
    """The command `make digits ARGS=...` runs (without its install prerequisite)."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    out = subprocess.run(["make", "--no-print-directory", "-n", "digits", f"PY={sys.executable}",
                          f"ARGS={args}"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return shlex.split(out.strip().splitlines()[-1])


@pytest.mark.slow
def test_make_digits_starts_when_port_29500_is_taken_and_passes_args(tmp_path):
    out = tmp_path / "run"
    args = (f"--set train.output_dir={out} --set train.max_steps=2 --set train.log_every=1 "
            "--set train.final_sample=false --set train.plots=false --set train.tensorboard=false "
            "--set train.progress=false --set train.cpu_threads=1")
    cmd = _make_digits_recipe(args)
    assert "fastdit.training.launch" in cmd and f"train.output_dir={out}" in cmd
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    blocker = socket.socket()
    try:
        blocker.bind(("127.0.0.1", 29500))
        blocker.listen(1)
    except OSError:
        pass  # someone else already holds 29500: the situation under test
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    finally:
        blocker.close()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "EADDRINUSE" not in proc.stdout + proc.stderr
    with open(out / "metrics.jsonl") as f:
        steps = [json.loads(line)["step"] for line in f if line.strip()]
    assert steps == [1, 2]
