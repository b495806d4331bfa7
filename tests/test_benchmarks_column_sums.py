"""benchmarks/column_sums.py --smoke: every case runs through the interpreter, the fused bias gradients agree with
the unfused gradient's column sums, and the JSON says the timings mean nothing about speed."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.triton


def test_smoke_run_writes_every_case(tmp_path):
    out = tmp_path / "column_sums.json"
    proc = subprocess.run([sys.executable, "benchmarks/column_sums.py", "--smoke", "--layouts", "bshd", "contiguous",
                           "--json", str(out)], cwd=ROOT, env=dict(os.environ, TRITON_INTERPRET="1"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    d = json.loads(out.read_text())
    meta, rows, summary = d["meta"], d["rows"], d["summary"]
    assert meta["smoke"] is True and meta["speed_meaningful"] is False and "interpreter" in meta["note"].lower()
    assert meta["complete"] is True
    assert meta["command"].startswith("python benchmarks/column_sums.py --smoke")
    cases = {(r["op"], r["layout"]) for r in rows}
    assert cases == {("qkv", "bshd"), ("qkv", "contiguous"), ("gelu", None), ("gelu+g", None)}
    for r in rows:
        assert "error" not in r and r["ms"] > 0 and r["bytes"] > 0, r
        # against the fp32 column sums of the unfused bf16 gradient: unfused's own sum is rounded to bf16, the
        # GELU kernels sum their unrounded fp32 dz (both ~1e-3 apart), the stack sums the very values: exact-ish
        assert r["db_rel_diff"] < 1e-2, r
        if r["op"] == "qkv":
            assert r["others_max_abs_diff"] == 0.0, r   # the stack is a copy
            if r["impl"] != "unfused":
                assert r["db_rel_diff"] < 1e-5, r
    for key in ("qkv bshd", "qkv contiguous", "gelu", "gelu+g"):
        ms = summary[key]["ms"]
        assert set(ms) == {"unfused", "step", "once"}
        assert summary[key]["step_change_ms"]["once"] == pytest.approx(28 * (ms["once"] - ms["unfused"]))
    assert "per training step of DiT-XL/2" in proc.stdout


def test_sweep_adds_once_at_other_rows_per_step(tmp_path):
    out = tmp_path / "column_sums.json"
    proc = subprocess.run([sys.executable, "benchmarks/column_sums.py", "--smoke", "--sweep", "--ops", "qkv", "gelu",
                           "--json", str(out)], cwd=ROOT, env=dict(os.environ, TRITON_INTERPRET="1"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = json.loads(out.read_text())["summary"]
    assert set(summary["qkv bshd"]["ms"]) == {"unfused", "step", "once", "once bm=8", "once bm=32"}
    assert set(summary["gelu"]["ms"]) == {"unfused", "step", "once", "once bm=8", "once bm=16"}
    assert set(summary["gelu"]["step_change_ms"]) == {"step", "once", "once bm=8", "once bm=16"}
    for r in json.loads(out.read_text())["rows"]:
        assert "error" not in r and r["db_rel_diff"] < 1e-2, r


def test_a_wrong_bias_gradient_is_flagged():
    import torch
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    from benchmarks.column_sums import compare
    g = torch.tensor([[1.0, 2.0], [3.0, -4.0]])
    right = (g, g.sum(0))
    assert compare(right, right) == (0.0, 0.0)
    rel, other = compare((g + 1, g.sum(0) + torch.tensor([0.0, 0.2])), right)
    assert rel == pytest.approx(0.2 / 4) and other == 1.0
    assert compare((g, torch.tensor([float("nan"), 0.0])), right)[0] == float("inf")   # a NaN bias gradient


def test_a_run_cut_short_keeps_the_cases_timed(tmp_path, monkeypatch):
    """A deadline that kills the run (gpu-check's column_sums stage) leaves the cases timed so far in the JSON,
    marked incomplete: here the fourth timing (the copy's is the first) raises instead."""
    os.environ.setdefault("TRITON_INTERPRET", "1")
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    from benchmarks import column_sums as cs
    from benchmarks import kernels as kb
    real, calls = kb._timer, []

    def timer(*args):
        time_one = real(*args)

        def timed(fn):
            calls.append(1)
            if len(calls) == 4:    # the copy's, unfused's and step's timings done
                raise KeyboardInterrupt("the stage's deadline")
            return time_one(fn)
        return timed

    monkeypatch.setattr(kb, "_timer", timer)
    out = tmp_path / "column_sums.json"
    with pytest.raises(KeyboardInterrupt):
        cs.main(["--smoke", "--ops", "gelu", "--json", str(out)])
    d = json.loads(out.read_text())
    assert d["meta"]["complete"] is False
    assert [(r["op"], r["impl"]) for r in d["rows"]] == [("gelu", "unfused"), ("gelu", "step")]
    assert set(d["summary"]["gelu"]["ms"]) == {"unfused", "step"}
