"""benchmarks/host_overhead.py: the host cost of each fused op with its kernel launches made no-ops (it
replaces the kernels module-wide, so it runs in its own process here)."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_host_overhead_rows(tmp_path):
    out = tmp_path / "host.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "host_overhead.py"), "--reps", "3",
                           "--json", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["meta"]["kernels_stubbed"] >= 7 and "not GPU times" in data["meta"]["note"]
    rows = data["rows"]
    keys = {(r["op"], r["impl"], r["pass"]) for r in rows}
    # 5 ops x (fused, fused-direct, ref) + the switched impls where they apply: tile sums for the 4 row-op cases,
    # the paired LN row sums for the 3 LN cases, the GEMM backward for patch_embed; the attention (fused, ref); two
    # passes each
    assert len(keys) == len(rows) == (5 * 3 + 4 + 3 + 1 + 2) * 2
    assert {r["impl"] for r in rows if r["op"] == "attention"} == {"fused", "ref"}
    assert {r["impl"] for r in rows} == {"fused", "fused-direct", "fused-tile-sums", "fused-paired-sums",
                                         "fused-gemm-bwd", "ref"}
    assert {r["op"] for r in rows if r["impl"] == "fused-gemm-bwd"} == {"patch_embed"}
    assert {r["op"].split("+")[0] for r in rows if r["impl"] == "fused-paired-sums"} == {
        "modulate_layernorm", "gated_residual_modulate_layernorm"}
    assert all(r["us_per_call"] > 0 for r in rows)
    assert {r["op"] for r in rows} >= {"gated_residual_modulate_layernorm", "patch_embed"}


def test_host_overhead_model_step(tmp_path):
    """--model-step: one training forward + backward of a 28-block DiT at a tiny width per model variant, the
    fast ones with their launches made no-ops."""
    out = tmp_path / "step.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "host_overhead.py"), "--model-step",
                           "--reps", "2", "--json", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["meta"]["arch"]["depth"] == 28 and data["meta"]["kernels_stubbed"] >= 7
    assert [r["model"] for r in data["rows"]] == ["reference", "fast", "fast-direct", "fast-torch-ops", "fast-graphed"]
    assert all(r["ms_per_step"] > 0 for r in data["rows"])
    ms = {r["model"]: r["ms_per_step"] for r in data["rows"]}
    # the graphed step issues no kernel from Python: far less host work than issuing the model's ops (28 blocks)
    assert ms["fast-graphed"] < ms["fast-torch-ops"] / 3, ms


def test_host_overhead_ema(tmp_path):
    """--ema: the EMA update as the fused optimizer step calls it, in the engine train.py builds (ZeRO-2 bf16, one
    CPU rank) for DiT-XL/2's depth at a tiny width: the kernel's flat group done, the other pieces walked."""
    out = tmp_path / "ema.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "host_overhead.py"), "--ema",
                           "--reps", "3", "--json", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert row["fused_step"] and row["params"] == 292 and row["flat_groups"] == 1 and row["done"] == [0]
    assert row["ms_per_update"] > 0
