"""benchmarks/attention.py: the smoke run (every kernel x layout recorded) and what each row computes."""
import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import attention as B  # noqa: E402


def test_smoke_run_records_every_kernel_and_layout(tmp_path, capsys):
    out = tmp_path / "sub" / "a.json"
    assert B.main(["--smoke", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["benchmark"] == "attention" and data["config"]["smoke"] is True
    names = [(r["name"], r["layout"]) for r in data["rows"]]
    expected = [(f"sdpa:{k}", lay) for k in B.SDPA_KERNELS for lay in B.LAYOUTS] + \
               [(k, lay) for k in B.BACKENDS for lay in B.LAYOUTS] + [(k, lay) for k in B.VARIANTS for lay in B.LAYOUTS]
    assert names == expected
    by_name = {(r["name"], r["layout"]): r for r in data["rows"]}
    assert by_name[("triton:swept", "packed")]["env"] == {"FASTDIT_ATTENTION_TILING": "swept"}
    assert by_name[("triton:swept", "packed")]["status"] == by_name[("triton", "packed")]["status"]
    assert os.environ.get("FASTDIT_ATTENTION_TILING") is None           # restored after the row
    rows = {(r["name"], r["layout"]): r for r in data["rows"]}
    for key in (("sdpa:default", "packed"), ("sdpa:math", "contiguous"), ("sdpa_packed", "packed")):  # any CPU
        r = rows[key]
        assert r["status"] == "ok", r
        for p in B.PASSES:
            assert r[p]["ms"]["n"] == 2 and r[p]["ms"]["median"] > 0
    for r in data["rows"]:
        assert (r["status"] == "ok") == (r["error"] is None), r
        if r["status"] != "ok":
            assert r["error"]  # the reason is said
    assert data["fastest_packed"] in {r["name"] for r in data["rows"] if r["status"] == "ok"}
    assert "smoke" in capsys.readouterr().out


@pytest.mark.triton
def test_smoke_sweep_of_the_triton_attention_tilings(tmp_path, capsys):
    """--sweep-triton: each of the three kernels timed at its tilings (two in smoke mode), the fastest named."""
    out = tmp_path / "a.json"
    assert B.main(["--smoke", "--sweep-triton", "--no-rows", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["rows"] == [] and data["complete"] is True
    sweep = data["triton_sweep"]
    assert set(sweep) == {"fwd", "dq", "dkdv", "dq+bias"}
    for kernel, d in sweep.items():
        assert len(d["rows"]) == 2 and all(r["ms"]["median"] > 0 for r in d["rows"]), d
        assert d["fastest"] in [r["config"] for r in d["rows"]]
        assert all(r["config"][0] <= 16 and r["config"][1] <= 16 for r in d["rows"])  # fitted to T = 16
    assert "fastest tilings: fwd" in capsys.readouterr().out

    # the results so far reach the caller after each tiling (gpu-check keeps them when a deadline kills the run)
    seen = []
    a = B.parse_args(["--smoke"])
    B.sweep_triton(a, torch.device("cpu"), torch.float32, lambda r: seen.append(sum(len(v["rows"]) for v in r.values())))
    assert seen == list(range(1, 9))


@pytest.mark.parametrize("kind", ["default", "math"])
def test_each_row_computes_the_models_attention(kind):
    """The packed and contiguous calls compute what fastdit's math attention computes, gradients too."""
    from fastdit.models import attention as A
    torch.manual_seed(0)
    qkv = torch.randn(2, 16, 3, 2, 8, dtype=torch.float64, requires_grad=True)
    ref = A.attention(qkv, "math")
    g = torch.randn_like(ref)
    (dref,) = torch.autograd.grad(ref, qkv, g)
    packed = B.make_call(kind, "packed", qkv)()
    (dpacked,) = torch.autograd.grad(packed, qkv, g)
    torch.testing.assert_close(packed, ref)
    torch.testing.assert_close(dpacked, dref)
    assert torch.allclose(B.make_call(kind, "contiguous", qkv)(), ref)


def test_bad_sizes_are_one_line_errors(capsys):
    with pytest.raises(SystemExit) as e:
        B.main(["--smoke", "--heads", "0"])
    assert e.value.code == 2 and "--heads must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        B.main(["--smoke", "--no-rows"])
    assert e.value.code == 2 and "--no-rows leaves nothing to run" in capsys.readouterr().err
