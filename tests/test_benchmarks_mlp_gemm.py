"""benchmarks/mlp_gemm.py --smoke: every row runs (through the interpreter), the epilogue tilings agree with
cuBLAS + the separate pass, and the JSON says the timings mean nothing about speed."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.triton


def test_smoke_run_writes_every_row(tmp_path):
    out = tmp_path / "mlp_gemm.json"
    proc = subprocess.run([sys.executable, "benchmarks/mlp_gemm.py", "--smoke", "--passes", "fwd", "bwd", "bwd+g",
                           "--json", str(out)], cwd=ROOT,
                          env=dict(os.environ, TRITON_INTERPRET="1"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    d = json.loads(out.read_text())
    meta, rows, summary = d["meta"], d["results"], d["summary"]
    assert meta["smoke"] is True and meta["speed_meaningful"] is False and "interpreter" in meta["note"].lower()
    assert meta["command"].startswith("python benchmarks/mlp_gemm.py --smoke")
    for pas, baseline in (("fwd", "cublas+gelu"), ("bwd", "cublas+fold"), ("bwd+g", "cublas+fold")):
        impls = [r["impl"] for r in rows if r["pass"] == pas]
        assert impls[:2] == ["cublas", baseline] and len(impls) == 4, impls
        for r in rows:
            assert "error" not in r, r
            if r["pass"] == pas and r["config"]:
                assert r["wrong"] is False and max(r["max_rel_diff"].values()) < 1e-2, r
                assert set(r["max_rel_diff"]) == ({"z", "g"} if pas == "fwd" else {"dz", "db"} if pas == "bwd"
                                                  else {"dz", "db", "g"}), r
        assert summary[pas]["baseline"] == baseline and summary[pas]["best_ms"] > 0
    assert summary["derived_step_change_ms"] == 28 * sum(summary[p]["best_ms"] - summary[p]["baseline_ms"]
                                                         for p in ("fwd", "bwd"))
    assert summary["derived_recompute_step_change_ms"] == 28 * sum(summary[p]["best_ms"] - summary[p]["baseline_ms"]
                                                                   for p in ("fwd", "bwd+g"))
    assert "not a training measurement" in summary["derived_note"]
    assert "derived step change" in proc.stdout and "derived step change with recompute" in proc.stdout


def test_a_wrong_result_is_flagged():
    import torch
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    from benchmarks.mlp_gemm import max_rel_diff
    b = torch.tensor([1.0, -2.0, 4.0])
    assert max_rel_diff(b, b) == 0.0
    assert max_rel_diff(b + torch.tensor([0.0, 0.0, 0.4]), b) == pytest.approx(0.1)
    assert max_rel_diff(torch.tensor([1.0, float("nan"), 4.0]), b) == float("inf")
