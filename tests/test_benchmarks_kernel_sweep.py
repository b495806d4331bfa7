"""benchmarks/kernel_sweep.py (the smoke run, its numeric check) and the row launchers' num_warps override."""
import importlib
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import kernel_sweep as S  # noqa: E402

ML = importlib.import_module("fastdit.kernels.modulate_layernorm")
GR = importlib.import_module("fastdit.kernels.gated_residual")
COMMON = importlib.import_module("fastdit.kernels._common")

pytestmark = pytest.mark.triton
DEV = "cuda" if torch.cuda.is_available() else "cpu"
interpreted_only = pytest.mark.skipif(not COMMON.INTERPRETED,
                                      reason="in-process --smoke needs the Triton interpreter (CPU tensors)")


# ----------------------------------------------------------------------------------------------
# The sweep
# ----------------------------------------------------------------------------------------------
def test_smoke_run_exits_0_and_writes_every_config(tmp_path):
    out = tmp_path / "sub" / "sweep.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "benchmarks/kernel_sweep.py", "--smoke", "--json", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "smoke" in proc.stdout
    data = json.loads(out.read_text())
    meta = data["meta"]
    assert meta["smoke"] is True and meta["speed_meaningful"] is False and meta["note"]
    for key in ("gpu", "torch", "triton", "git_commit", "date", "command", "copy_gbps", "dtype", "grid",
                "numerics", "deadline_s", "stopped_early", "elapsed_s"):
        assert key in meta, key
    assert "kernel_sweep.py --smoke" in meta["command"]
    assert meta["stopped_early"] is False
    groups = {(s["op"], s["pass"]) for s in data["summary"]}
    assert groups == {(op, p) for op in S.OPS for p in S.PASSES}
    for s in data["summary"]:
        rows = [r for r in data["results"] if (r["op"], r["pass"], r["D"]) == (s["op"], s["pass"], s["D"])]
        assert 3 <= len(rows) == s["configs"] <= 4
        dflt = [r for r in rows if r["default"]]
        assert len(dflt) == 1 and dflt[0]["name"] == "default" and dflt[0]["numerics"] == "reference"
        assert dflt[0]["overrides"]["num_warps"] is None and dflt[0]["overrides"]["block_t"] is None
        assert s["default"]["name"] == "default" and s["best"] is not None
        for r in rows:
            assert r["status"] == "ok", r
            assert r["ms"] > 0 and r["bytes"] > 0 and r["copy_share"] is not None
            assert r["max_abs_diff"] is not None and r["tol_ratio"] is not None  # the numeric check ran
            assert ("tokens_per_tile" in r) == (s["pass"] == "bwd")
        assert any(not r["default"] and r["numerics"] == "ok" for r in rows)


@interpreted_only
def test_wrong_or_failing_configs_are_marked_and_never_best(tmp_path, monkeypatch):
    """A tiling that returns wrong values (instantly, so it would be fastest) is 'wrong' and not the best; one
    that raises is 'error' with its message; the deadline stops cleanly and still writes the JSON."""
    real = ML.gated_residual_modulate_layernorm_fwd
    cache = {}

    def fake(x, y, gate, shift, scale, eps=1e-6, *, block_t=None, num_warps=None):
        if num_warps == 2:                       # "a tiling bug": h off by 0.5, returned without work
            if "out" not in cache:
                xnew, h, mean, rstd = real(x, y, gate, shift, scale, eps)
                cache["out"] = (xnew, h + 0.5, mean, rstd)
            return cache["out"]
        if num_warps == 8:
            raise RuntimeError("fake compile failure")
        return real(x, y, gate, shift, scale, eps, block_t=block_t, num_warps=num_warps)

    monkeypatch.setattr(ML, "gated_residual_modulate_layernorm_fwd", fake)
    out = tmp_path / "s.json"
    assert S.main(["--smoke", "--ops", "gated_residual_modulate_layernorm", "--passes", "fwd",
                   "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    rows = {r["name"]: r for r in data["results"]}
    assert set(rows) == {"default", "bt4/w2", "bt8/w8"}
    assert rows["bt4/w2"]["status"] == "wrong" and rows["bt4/w2"]["tol_ratio"] > 1
    assert abs(rows["bt4/w2"]["max_abs_diff"] - 0.5) < 0.1 and "tol" in rows["bt4/w2"]["numerics"]
    assert rows["bt8/w8"]["status"] == "error" and "fake compile failure" in rows["bt8/w8"]["error"]
    (s,) = data["summary"]
    assert s["best"]["name"] == "default" and s["wrong"] == 1 and s["errors"] == 1
    assert data["meta"]["command"].startswith("python benchmarks/kernel_sweep.py --smoke")

    # --deadline-s 0: nothing is started, the run still ends cleanly with its JSON.
    assert S.main(["--smoke", "--deadline-s", "0", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["meta"]["stopped_early"] is True and data["results"] == [] and data["summary"] == []


def test_compare_flags_tiling_bugs_not_rounding():
    ref = torch.randn(4, 8, 64).to(torch.bfloat16)
    rtol = S.rtol_for(torch.bfloat16)
    # one bf16 ulp everywhere (what a different reduction order can flip) passes
    one_ulp_off = (ref.view(torch.int16) + 1).view(torch.bfloat16)        # next bf16 away from zero
    assert (one_ulp_off != ref).all() and S.compare([one_ulp_off], [ref], rtol)["ok"]
    assert S.compare([ref, None], [ref.clone(), None], rtol) == dict(max_abs_diff=0.0, tol_ratio=0.0, ok=True,
                                                                      reason=None)
    wrong_row = ref.clone()
    wrong_row[1, 3] += 1.0
    r = S.compare([wrong_row], [ref], rtol)
    assert not r["ok"] and r["tol_ratio"] > 1 and r["max_abs_diff"] >= 0.9
    unwritten = ref.clone()
    unwritten[0, -2:] = float("nan")
    r = S.compare([unwritten], [ref], rtol)
    assert not r["ok"] and "non-finite" in r["reason"]
    assert not S.compare([ref[:, :4]], [ref], rtol)["ok"]


def test_grid_at_dit_xl_shape(monkeypatch):
    """The GPU grid at D=1152, T=256, N=128 on 132 SMs: default first, within the register budget, no duplicates."""
    monkeypatch.setattr(COMMON, "num_sms", lambda device: 132)
    args = S._parse([])
    fwd = S.make_grid("fwd", 128, 256, 1152, torch.device("cpu"), args)
    bwd = S.make_grid("bwd", 128, 256, 1152, torch.device("cpu"), args)
    for grid in (fwd, bwd):
        assert grid[0]["default"] and grid[0]["block_t"] == 2 and grid[0]["num_warps"] == 8
        assert sum(c["default"] for c in grid) == 1
        assert len({S._key(c) for c in grid}) == len(grid)
        for c in grid:
            assert c["block_t"] * c["block_d"] <= args.max_tile_elems
            assert c["block_t"] * c["block_d"] <= args.max_elems_per_thread * 32 * c["num_warps"]
    assert bwd[0]["tokens_per_tile"] == 52 and bwd[0]["n_tiles"] == 5          # token_tiles' ~4 per SM
    assert {c["block_t"] for c in fwd} == {1, 2, 4, 8} and {c["num_warps"] for c in fwd} == {2, 4, 8, 16}
    assert len(fwd) == 13 and len(bwd) == 65 + 26
    assert {c["n_tiles"] for c in bwd} == {2, 3, 5, 8, 9, 16}         # ~1, 2, 4, 8, 16 programs per SM
    # The pipelined token loop: the default tiling's first, then every tiling's at the default token tiling
    # (num_stages 2 and 3), then the plain-loop grid.
    assert [c["name"] for c in bwd[1:3]] == ["bt2/w8/tok52/s2", "bt2/w8/tok52/s3"]
    piped = [c for c in bwd if c["num_stages"] != 1]
    assert len(piped) == 26 and bwd[1:27] == piped
    assert all(c["overrides"]["tokens_per_tile"] is None and c["overrides"]["num_stages"] in (2, 3) for c in piped)
    assert {(c["block_t"], c["num_warps"]) for c in piped} == {(c["block_t"], c["num_warps"]) for c in fwd}
    assert bwd[0]["num_stages"] == 1 and bwd[0]["overrides"]["num_stages"] is None
    assert S.make_grid("bwd", 128, 256, 1152, torch.device("cpu"), S._parse(["--num-stages", "1"]))[1:] == bwd[27:]


def test_num_stages_argument_is_checked(capsys):
    with pytest.raises(SystemExit):
        S._parse(["--num-stages", "2", "5"])
    assert "--num-stages takes 1-4" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# The launchers' num_warps override
# ----------------------------------------------------------------------------------------------
def _inputs(n=2, t=5, d=40, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)

    def r(*s):
        return torch.randn(*s, generator=g).to(DEV, dtype)
    return dict(x=r(n, t, d), y=r(n, t, d), gate=r(n, d), shift=r(n, d), scale=r(n, d) * 0.5,
                dh=r(n, t, d), dxnew=r(n, t, d))


def _launch_all(i, **o):
    """Every row launcher's outputs with overrides o (the bwd ones get tokens_per_tile=2 when block_t is set and
    o has none; tokens_per_tile and num_stages go to the bwd launchers only)."""
    bo = dict(o)
    if o.get("block_t"):
        bo.setdefault("tokens_per_tile", 2)
    o = {k: v for k, v in o.items() if k not in ("tokens_per_tile", "num_stages")}
    y, mean, rstd = ML.modulate_layernorm_fwd(i["x"], i["shift"], i["scale"], **o)
    outs = [y, mean, rstd]
    outs += ML.modulate_layernorm_bwd(i["dh"], i["x"], i["scale"], mean, rstd, i["shift"].dtype, **bo)
    xnew, h, m2, r2 = ML.gated_residual_modulate_layernorm_fwd(i["x"], i["y"], i["gate"], i["shift"],
                                                               i["scale"], **o)
    outs += [xnew, h, m2, r2]
    outs += ML.gated_residual_modulate_layernorm_bwd(i["dh"], i["dxnew"], xnew, i["y"], i["gate"], i["scale"],
                                                     m2, r2, i["x"].dtype, i["shift"].dtype, **bo)
    outs.append(GR.gated_residual_fwd(i["x"], i["y"], i["gate"], **o))
    outs += GR.gated_residual_bwd(i["dh"], i["y"], i["gate"], **bo)
    return outs


class _Spy:
    """Stands in for a @triton.jit kernel: records the num_warps of each launch, then launches the real one."""

    def __init__(self, kernel, seen):
        self.kernel, self.seen = kernel, seen

    def __getitem__(self, grid):
        def launch(*args, **kw):
            self.seen.append(kw["num_warps"] if "NUM_STAGES" not in kw else (kw["num_warps"], kw["NUM_STAGES"]))
            return self.kernel[grid](*args, **kw)
        return launch


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_num_warps_override_reaches_the_kernels_and_keeps_results(dtype, monkeypatch):
    monkeypatch.setenv(COMMON.POISON_ENV, "1")
    seen = []
    for mod, name in ((ML, "_modln_fwd_kernel"), (ML, "_modln_bwd_kernel"),
                      (GR, "_gated_residual_fwd_kernel"), (GR, "_gated_residual_bwd_kernel")):
        monkeypatch.setattr(mod, name, _Spy(getattr(mod, name), seen))
    i = _inputs(dtype=dtype)
    default = _launch_all(i)
    nw = COMMON.row_tile(40)[2]                                 # None keeps the heuristic (4 warps at D=40)
    assert seen == [nw, (nw, 1), nw, (nw, 1), nw, (nw, 1)]       # fwd, bwd (plain token loop) x 3 ops
    for o in (dict(num_warps=2), dict(num_warps=16), dict(num_warps=1, block_t=2)):
        seen.clear()
        outs = _launch_all(i, **o)
        assert seen == [o["num_warps"], (o["num_warps"], 1)] * 3
        assert len(outs) == len(default)
        for a, b in zip(outs, default):
            assert a.dtype == b.dtype and a.shape == b.shape
            assert torch.isfinite(a.float()).all()
            if "block_t" in o:                                      # other tiling: sums in another order
                torch.testing.assert_close(a.float(), b.float(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-5,
                                           atol=1e-2 if dtype == torch.bfloat16 else 1e-5)
            else:
                assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_num_stages_override_reaches_the_backward_kernels_and_keeps_results(dtype, monkeypatch):
    """The pipelined token loop (num_stages 2-4) computes the same sums in the same order: equal outputs.
    (The interpreter runs the loop as written; on CUDA this runs the cp.async pipeline.)"""
    monkeypatch.setenv(COMMON.POISON_ENV, "1")
    i = _inputs(n=3, t=13, dtype=dtype)
    default = _launch_all(i, block_t=2, tokens_per_tile=6)       # 3 loop steps per program, a partial last tile
    seen = []
    for mod, name in ((ML, "_modln_bwd_kernel"), (GR, "_gated_residual_bwd_kernel")):
        monkeypatch.setattr(mod, name, _Spy(getattr(mod, name), seen))
    nw = COMMON.row_tile(40)[2]
    for k in (2, 3, 4):
        seen.clear()
        outs = _launch_all(i, block_t=2, tokens_per_tile=6, num_stages=k)
        assert seen == [(nw, k)] * 3
        assert len(outs) == len(default)
        for a, b in zip(outs, default):
            assert torch.equal(a, b)


@pytest.mark.parametrize("bad", [0, 5, -1, 2.0, True, "2"])
def test_num_stages_override_rejects_bad_values(bad):
    i = _inputs()
    m, r = i["x"][..., 0], i["x"][..., 0]
    calls = [
        lambda: ML.modulate_layernorm_bwd(i["dh"], i["x"], i["scale"], m, r, torch.float32, num_stages=bad),
        lambda: ML.gated_residual_modulate_layernorm_bwd(i["dh"], None, i["x"], i["y"], i["gate"], i["scale"], m, r,
                                                         torch.float32, torch.float32, num_stages=bad),
        lambda: GR.gated_residual_bwd(i["dh"], i["y"], i["gate"], num_stages=bad),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=r"num_stages must be None \(a plain loop\) or one of"):
            call()


@pytest.mark.parametrize("bad", [0, 3, 6, 64, -4, 2.0, True, "8"])
def test_num_warps_override_rejects_bad_values(bad):
    i = _inputs()
    calls = [
        lambda: ML.modulate_layernorm_fwd(i["x"], i["shift"], i["scale"], num_warps=bad),
        lambda: ML.modulate_layernorm_bwd(i["dh"], i["x"], i["scale"], i["x"][..., 0], i["x"][..., 0],
                                          torch.float32, num_warps=bad),
        lambda: ML.gated_residual_modulate_layernorm_fwd(i["x"], i["y"], i["gate"], i["shift"], i["scale"],
                                                         num_warps=bad),
        lambda: ML.gated_residual_modulate_layernorm_bwd(i["dh"], None, i["x"], i["y"], i["gate"], i["scale"],
                                                         i["x"][..., 0], i["x"][..., 0], torch.float32,
                                                         torch.float32, num_warps=bad),
        lambda: GR.gated_residual_fwd(i["x"], i["y"], i["gate"], num_warps=bad),
        lambda: GR.gated_residual_bwd(i["dh"], i["y"], i["gate"], num_warps=bad),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="num_warps must be None .* power of two in 1..32"):
            call()
    assert COMMON.launch_tile(1152) == COMMON.row_tile(1152)
    assert COMMON.launch_tile(1152, 4, 16) == (4, 2048, 16)


def test_graph_timing_uses_the_cuda_graph_replays(monkeypatch):
    """--timing graph: on CUDA each call is timed by benchmarks/kernels.py's CUDA-graph replays (no host work), and a
    capture that fails is that config's error; on CPU (smoke) it is the wall clock, and the JSON says which."""
    import types

    from benchmarks import kernels as KB
    seen = []
    monkeypatch.setattr(KB, "_graph_ms", lambda fn, device, rep: seen.append((device.type, rep)) or (0.25, None))
    cuda = types.SimpleNamespace(type="cuda")
    bench = S._call_timer("bench", cuda, lambda fn: 9.0, 50)
    graph = S._call_timer("graph", cuda, lambda fn: 9.0, 50)
    assert bench(lambda: None) == (9.0, None) and graph(lambda: None) == (0.25, None) and seen == [("cuda", 50)]
    monkeypatch.setattr(KB, "_graph_ms", lambda fn, device, rep: (None, "capture failed"))
    assert S._call_timer("graph", cuda, lambda fn: 9.0, 50)(lambda: None) == (None, "capture failed")
    cpu = types.SimpleNamespace(type="cpu")
    assert S._call_timer("graph", cpu, lambda fn: 3.0, 50)(lambda: None) == (3.0, None)
    args = S._parse(["--timing", "graph"])
    assert "do_bench_cudagraph" in S._timer_text(args, cuda) and "no CUDA graphs" in S._timer_text(args, cpu)
    assert "L2 flushed" in S._timer_text(S._parse([]), cuda)
