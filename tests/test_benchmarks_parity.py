"""benchmarks/parity.py --smoke: the switch cases (the speed switches waiting for a GPU measurement) run beside
the default cases, each against the float64 oracle, and a switch that computes a wrong gradient fails."""
import importlib
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
parity = importlib.import_module("benchmarks.parity")


@pytest.mark.triton
def test_smoke_runs_every_switch_case_through_the_kernels(tmp_path):
    out = tmp_path / "parity.json"
    proc = subprocess.run([sys.executable, "benchmarks/parity.py", "--smoke", "--json", str(out)], cwd=ROOT,
                          env=dict(os.environ, TRITON_INTERPRET="1"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    d = json.loads(out.read_text())
    by = {r["case"]: r for r in d["results"]}
    want = [f"fast bf16 triton {row}" for row in parity.SWITCH_ROWS]
    want += [f"fast fp32 triton {row}" for row, fp32 in parity.SWITCH_ROWS.items() if fp32]
    assert len(want) == 9
    for name in want:
        assert by[name]["pass"] is True and not by[name]["missing_grads"], by.get(name)
    assert by["fast bf16 triton fused+all-switches"]["env"]["FASTDIT_TILE_SUMS"] == "triton"   # the row's env
    assert "env" not in by["fast bf16 triton fused+mlp-epilogue"]
    assert by["fast bf16 triton fused/triton-swept"]["env"] == {"FASTDIT_ATTENTION_TILING": "swept"}
    assert by["fast fp32 triton fused+all-switches/triton"]["grad_rel"] < parity.FP32_TOL
    # the LN backward's paired row sums: a full-size case of their own only through this row
    assert by["fast fp32 triton fused+candidates"]["env"]["FASTDIT_LN_ROW_SUMS"] == "paired"
    assert by["fast fp32 triton fused+candidates"]["grad_rel"] < parity.FP32_TOL
    assert os.environ.get("FASTDIT_TILE_SUMS") is None  # the switches' environment is restored


def test_no_switch_cases_when_asked_and_a_wrong_switch_fails(tmp_path, monkeypatch):
    out = tmp_path / "none.json"
    assert parity.main(["--smoke", "--device", "cpu", "--switches", "--json", str(out)]) == 0
    assert not [r for r in json.loads(out.read_text())["results"] if "fused+" in r["case"]]

    gg = importlib.import_module("fastdit.kernels.gemm_gelu")
    right = gg.linear_dgelu_ref

    def wrong(dy, w2, z, **kw):            # fc1's gradient 1.5x too large
        dz, db, g = right(dy, w2, z, **kw)
        return dz * 1.5, db * 1.5, g
    monkeypatch.setattr(gg, "linear_dgelu_ref", wrong)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    out = tmp_path / "wrong.json"
    assert parity.main(["--smoke", "--device", "cpu", "--switches", "fused+mlp-epilogue", "--json", str(out)]) == 1
    d = json.loads(out.read_text())
    assert d["failed"] == ["fast fp32 torch fused+mlp-epilogue", "fast bf16 torch fused+mlp-epilogue"], d["failed"]
