"""benchmarks/build_for_loading.py: the smoke run times both ways for both implementations and records how."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_smoke_run_writes_every_row(tmp_path):
    out = tmp_path / "b.json"
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "benchmarks/build_for_loading.py", "--smoke", "--json", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert [(r["impl"], r["way"]) for r in data["rows"]] == [
        ("reference", "init+load"), ("reference", "for_loading+load"),
        ("fast", "init+load"), ("fast", "for_loading+load")]
    assert all(len(r["seconds"]) == 1 and r["median_s"] > 0 for r in data["rows"])
    assert data["meta"]["model"] == "DiT-S/2" and "build_for_loading.py --smoke" in data["meta"]["command"]
