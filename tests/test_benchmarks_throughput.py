"""benchmarks/throughput.py and benchmarks/common.py: the harness, on CPU (smoke mode).

The numbers of a CPU smoke run say nothing about speed; these tests check that the harness runs every
row, records failures instead of dying, computes its statistics and FLOP-based figures correctly, and
writes a complete, strict JSON with the environment.
"""
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import common  # noqa: E402
from benchmarks import throughput as tp  # noqa: E402
from fastdit.models import attention as attn_backends  # noqa: E402

EXPECTED_ROWS = ["eager", "eager/sdpa", "compile", "fused", "fused+compile", "fused+mlp-recompute", "fused+mlp-fold",
                 "fused+mlp-recompute-fold", "fused+mlp-epilogue", "fused+mlp-recompute-epilogue", "fused+bias-fold",
                 "fused+all-switches", "fused+direct-dispatch", "deepspeed", "deepspeed+compile",
                 "deepspeed/ds-step", "deepspeed+fused-step", "deepspeed+all-switches", "fused+all-switches/triton",
                 "deepspeed+all-switches/triton", "fused+graphs", "deepspeed+graphs", "fused/triton-swept",
                 "fused+mlp-fold/sums-once", "fused+bias-fold/sums-once", "deepspeed+bias-fold/sums-once",
                 "deepspeed/no-overlap", "deepspeed+deferred-check", "fused+candidates", "deepspeed+candidates",
                 "fused/math", "fused/sdpa", "fused/sdpa_packed", "fused/flash_attn", "fused/xformers",
                 "fused/triton"]


# ----------------------------------------------------------------------------------------------
# The whole smoke run, as a user runs it
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("throughput") / "sub" / "smoke.json"  # parent folder does not exist yet
    env = dict(os.environ, TRITON_INTERPRET="1")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "benchmarks/throughput.py", "--smoke", "--json", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out) as f:
        text = f.read()
    return dict(wall=wall, stdout=proc.stdout, text=text, data=json.loads(text))


def test_smoke_run_is_fast(smoke_run):
    assert smoke_run["wall"] < 240, f"smoke run took {smoke_run['wall']:.1f} s (budget: keep CI fast)"


@pytest.mark.triton  # the fused rows run the kernels through the interpreter
def test_smoke_rows_and_statuses(smoke_run):
    data = smoke_run["data"]
    assert data["benchmark"] == "throughput" and data["complete"] is True
    rows = {r["name"]: r for r in data["rows"]}
    assert [r["name"] for r in data["rows"]] == EXPECTED_ROWS
    for name in EXPECTED_ROWS[:14]:
        assert rows[name]["status"] == "ok", (name, rows[name]["error"])
        assert rows[name]["error"] is None
    # flash-attn / xformers rows: a backend that cannot run here (not installed, no CUDA, a failed test
    # call) is recorded as unavailable with the probe's reason; one that can run fails on the smoke
    # run's CPU tensors and is recorded as an error (the run went on).
    status = attn_backends.backend_status()
    for name, backend in (("fused/flash_attn", "flash_attn"), ("fused/xformers", "xformers")):
        r = rows[name]
        ok, reason = status[backend]
        assert r["status"] == ("error" if ok else "unavailable"), r
        assert r["error"] and (ok or reason in r["error"]), (r["error"], reason)
    # What each row ran
    assert rows["eager"]["model_class"] == "fastdit.models.reference.DiT" and rows["eager"]["compile"] is None
    assert rows["eager/sdpa"]["model_class"] == "fastdit.models.reference.DiT"
    assert rows["eager/sdpa"]["attention"] == "sdpa" and rows["eager/sdpa"]["kernels"] is None
    assert rows["compile"]["compile"] == {"backend": "aot_eager", "mode": None}
    assert "aot_eager" in rows["compile"]["note"] and "aot_eager" in rows["fused+compile"]["note"]
    for name in ("fused", "fused+compile", "fused/math", "fused/sdpa", "fused/sdpa_packed"):
        assert rows[name]["model_class"] == "fastdit.models.DiT"
        assert rows[name]["kernels"] == "triton"  # TRITON_INTERPRET=1 -> the interpreter
    assert rows["fused/math"]["attention"] == "math" and rows["fused/sdpa"]["attention"] == "sdpa"
    assert rows["fused"]["attention"] == "sdpa (auto)"  # auto on CPU fp32 resolves to sdpa
    for name in ("compile", "fused+compile"):
        assert rows[name]["compile_graph_breaks"] == 0, rows[name]
    # The deepspeed row: fastdit.training.trainer's step on the engine configs/xl2_zero2.json builds, one rank
    ds = rows["deepspeed"]
    assert ds["step"].startswith("fastdit.training.trainer.Trainer.train_step")
    assert ds["model_class"] == "fastdit.models.DiT" and ds["kernels"] == "triton"
    assert ds["attention"] == "sdpa (auto)" and ds["compile"] is None
    eng = ds["deepspeed"]
    assert eng["config"].endswith(os.path.join("configs", "xl2_zero2.json"))
    assert eng["zero_stage"] == 2 and eng["bf16"] is False  # smoke: fp32 (--precision maps to the config)
    assert eng["optimizer"]["type"] == "AdamW" and eng["optimizer"]["engine_optimizer"] == "DeepSpeedZeroOptimizer"
    assert (eng["micro_batch"], eng["grad_accum"], eng["world_size"], eng["global_batch"]) == (2, 1, 1, 2)
    assert eng["arch"] == dict(tp.SMOKE_ARCH) and eng["ema_decay"] == 0.9999
    # Same model, data, t/noise draws and AdamW (lr 1e-4, fp32) as the fused row: the same losses, also
    # after the optimizer steps, so the engine's step trains what the harness's step trains.
    for key in ("loss_first", "loss_last"):
        assert ds[key] == pytest.approx(rows["fused"][key], rel=1e-5, abs=1e-6), key
    for key in ("loss_first", "loss_last"):  # sdpa_packed: sdpa's gradients, so the same training
        assert rows["fused/sdpa_packed"][key] == pytest.approx(rows["fused/sdpa"][key], rel=1e-5, abs=1e-6), key
    # the Triton attention (the interpreter here): the same training as sdpa, alone and with every switch on
    for name, base in (("fused/triton", "fused/sdpa"), ("fused+all-switches/triton", "fused+all-switches"),
                       ("deepspeed+all-switches/triton", "deepspeed+all-switches"), ("fused/triton-swept", "fused/sdpa")):
        assert rows[name]["status"] == "ok" and rows[name]["attention"] == "triton", rows[name]
        for key in ("loss_first", "loss_last"):
            assert rows[name][key] == pytest.approx(rows[base][key], rel=1e-5, abs=1e-6), (name, key)
    # fused+mlp-recompute: the fused model with mlp="recompute" trains the same (same losses, fp32)
    rec = rows["fused+mlp-recompute"]
    assert rec["mlp"] == "recompute" and rows["fused"]["mlp"] == "plain" and rows["eager"]["mlp"] is None
    for key in ("loss_first", "loss_last"):
        assert rec[key] == pytest.approx(rows["fused"][key], rel=1e-5, abs=1e-6), key
    fold = rows["fused+mlp-fold"]                 # GELU backward + bias gradient in one pass: the same training
    assert fold["mlp"] == "fold" and rows["fused+mlp-recompute-fold"]["mlp"] == "recompute-fold"
    for key in ("loss_first", "loss_last"):
        assert fold[key] == pytest.approx(rows["fused"][key], rel=1e-5, abs=1e-6), key
        assert rows["fused+mlp-recompute-fold"][key] == pytest.approx(rows["fused"][key], rel=1e-5, abs=1e-6), key
    for name in ("fused+mlp-epilogue", "fused+mlp-recompute-epilogue"):   # GELU in the GEMMs: the same training
        epi = rows[name]
        assert epi["mlp"] == name.split("+mlp-")[1] and epi["bias_fold"] is False
        for key in ("loss_first", "loss_last"):
            assert epi[key] == pytest.approx(rows["fused"][key], rel=1e-5, abs=1e-6), (name, key)
    folds = rows["fused+bias-fold"]               # every bias gradient from a kernel: the same training
    assert folds["mlp"] == "fold" and folds["bias_fold"] is True and rows["fused"]["bias_fold"] is False
    for key in ("loss_first", "loss_last"):
        assert folds[key] == pytest.approx(rows["fused"][key], rel=1e-5, abs=1e-6), key
    # fused+all-switches: the folds and the kernels' own switches (environment variables set for the row only)
    alls = rows["fused+all-switches"]
    assert (alls["mlp"], alls["bias_fold"]) == ("fold", True) and alls["env"] == dict(tp.KERNEL_SWITCHES)
    assert "env" not in rows["fused"] and "env" not in folds
    assert rows["fused/triton-swept"]["env"] == {"FASTDIT_ATTENTION_TILING": "swept"}
    for name in ("fused+mlp-fold/sums-once", "fused+bias-fold/sums-once"):   # the column sums reduced once
        once, base = rows[name], rows[name.split("/")[0]]
        assert once["env"] == {"FASTDIT_COLUMN_SUMS": "once"} and (once["mlp"], once["bias_fold"]) == \
            (base["mlp"], base["bias_fold"])
        for key in ("loss_first", "loss_last"):
            assert once[key] == pytest.approx(base[key], rel=1e-5, abs=1e-6), (name, key)
    direct = rows["fused+direct-dispatch"]        # the same kernels without the library dispatch: the same training
    assert direct["env"] == {"FASTDIT_KERNEL_DISPATCH": "direct"} and direct["mlp"] == "plain"
    for key in ("loss_first", "loss_last"):
        assert direct[key] == rows["fused"][key], key
    for key in ("loss_first", "loss_last"):
        assert alls[key] == pytest.approx(rows["fused"][key], rel=1e-5, abs=1e-6), key
    assert ds["mlp"] == "plain"
    # deepspeed+compile: the same engine with train.compile (engine.compile() with the harness's backend)
    dsc = rows["deepspeed+compile"]
    assert dsc["step"] == ds["step"] and dsc["deepspeed"]["zero_stage"] == 2
    assert dsc["compile"] == {"backend": "aot_eager", "mode": None, "via": "engine.compile()"}
    assert dsc["deepspeed"]["compile"] is True and ds["deepspeed"]["compile"] is False
    assert dsc["compile_graph_breaks"] == 0, dsc
    for key in ("loss_first", "loss_last"):
        assert dsc[key] == pytest.approx(ds[key], rel=1e-5, abs=1e-6), key
    # deepspeed+fused-step: the smoke run trains in fp32, where the fused step (bf16 only) says why it is
    # refused and DeepSpeed's step runs: the same losses as the deepspeed row, which takes the switch from
    # configs/xl2_zero2.json (on), and as deepspeed/ds-step, which turns it off
    dsf, dso = rows["deepspeed+fused-step"], rows["deepspeed/ds-step"]
    assert ds["fused_optimizer_step"].startswith("refused") and dsf["fused_optimizer_step"].startswith("refused")
    assert ds["deepspeed"]["fused_optimizer_step"] is True and dsf["deepspeed"]["fused_optimizer_step"] is True
    assert dso["fused_optimizer_step"] == "off" and dso["deepspeed"]["fused_optimizer_step"] is False
    for key in ("loss_first", "loss_last"):
        assert dso[key] == pytest.approx(ds[key], rel=1e-5, abs=1e-6), key
    assert "train.fused_optimizer_step: DeepSpeed's own optimizer step kept: the model dtype is torch.float32" \
        in smoke_run["stdout"]
    for key in ("loss_first", "loss_last"):
        assert dsf[key] == pytest.approx(ds[key], rel=1e-5, abs=1e-6), key
    # deepspeed+all-switches: the engine's step with the model's folds (and the fused step, refused in fp32):
    # the same training as the deepspeed row
    dsa = rows["deepspeed+all-switches"]
    assert (dsa["mlp"], dsa["bias_fold"], ds["mlp"], ds["bias_fold"]) == ("fold", True, "plain", False)
    assert dsa["env"] == dict(tp.KERNEL_SWITCHES) and "env" not in ds
    for key in ("loss_first", "loss_last"):
        assert dsa[key] == pytest.approx(ds[key], rel=1e-5, abs=1e-6), key
    dno = rows["deepspeed/no-overlap"]            # overlap_comm off: the same training, the row's override recorded
    assert dno["config_sets"] == ["deepspeed.zero_optimization.overlap_comm=false"] and "config_sets" not in ds
    assert dno["deepspeed"]["overlap_comm"] is False and ds["deepspeed"]["overlap_comm"] is True
    for key in ("loss_first", "loss_last"):
        assert dno[key] == pytest.approx(ds[key], rel=1e-5, abs=1e-6), key
    dde = rows["deepspeed+deferred-check"]        # the fused step's deferred check (refused in fp32): recorded
    assert dde["config_sets"] == ["train.fused_step_deferred_check=true"]
    assert dde["deepspeed"]["fused_step_deferred_check"] is True and ds["deepspeed"]["fused_step_deferred_check"] is False
    for key in ("loss_first", "loss_last"):
        assert dde[key] == pytest.approx(ds[key], rel=1e-5, abs=1e-6), key
    dsb = rows["deepspeed+bias-fold/sums-once"]   # the folds, column sums reduced once, in the engine's step
    assert (dsb["mlp"], dsb["bias_fold"], dsb["env"]) == ("fold", True, {"FASTDIT_COLUMN_SUMS": "once"})
    for key in ("loss_first", "loss_last"):
        assert dsb[key] == pytest.approx(ds[key], rel=1e-5, abs=1e-6), key
    # the candidate rows: every switch predicted to win, together (graphed, so emulated on CPU): the same training
    fc, dc = rows["fused+candidates"], rows["deepspeed+candidates"]
    assert fc["env"] == dc["env"] == dict(tp.CANDIDATE_ENV) == {"FASTDIT_COLUMN_SUMS": "once",
                                                                "FASTDIT_LN_ROW_SUMS": "paired"}
    assert (fc["mlp"], fc["bias_fold"], dc["mlp"], dc["bias_fold"]) == ("fold", False, "fold", False)
    assert fc["cuda_graph"] == dc["cuda_graph"] == "emulated (no CUDA device)" and dc["deepspeed"]["cuda_graph"] is True
    assert dc["config_sets"] == list(tp.CANDIDATE_SETS) and dc["deepspeed"]["overlap_comm"] is False
    assert dc["deepspeed"]["fused_step_deferred_check"] is True
    for key in ("loss_first", "loss_last"):
        assert fc[key] == pytest.approx(rows["fused"][key], rel=1e-5, abs=1e-6), key
        assert dc[key] == pytest.approx(ds[key], rel=1e-5, abs=1e-6), key
    assert "ZeRO-2 fp32 AdamW (DeepSpeedZeroOptimizer)" in smoke_run["stdout"]
    # the graphed rows (emulated on CPU: the same static buffers and checks, replayed eagerly): the same
    # training as their eager rows, bit for bit
    fg, dg = rows["fused+graphs"], rows["deepspeed+graphs"]
    assert fg["cuda_graph"] == dg["cuda_graph"] == "emulated (no CUDA device)" and rows["fused"]["cuda_graph"] is None
    assert dg["deepspeed"]["cuda_graph"] is True and ds["deepspeed"]["cuda_graph"] is False
    for key in ("loss_first", "loss_last"):
        assert fg[key] == rows["fused"][key] and dg[key] == ds[key], key
    steps = 1 + 1 + 2 * 1                                          # smoke: warmup, untimed, repeats x steps
    assert fg["graphs"] == dg["graphs"] == dict(captures=1, replays=steps, eager_calls=0)
    assert "train.cuda_graph: no CUDA device, so the graphs are emulated" in smoke_run["stdout"]
    assert data["config"]["deepspeed_config"] == eng["config"]
    # progress: one line per row, then the table
    for i, name in enumerate(EXPECTED_ROWS, 1):
        assert f"[{i}/{len(EXPECTED_ROWS)}] {name}" in smoke_run["stdout"]


def test_smoke_row_figures(smoke_run):
    data = smoke_run["data"]
    cfg = data["config"]
    smoke = (cfg["batch"], cfg["warmup"], cfg["steps"], cfg["repeats"], cfg["precision"])
    assert smoke == (2, 1, 1, 2, "fp32")
    ok = [r for r in data["rows"] if r["status"] == "ok"]
    eager = next(r for r in ok if r["name"] == "eager")["img_per_s"]["median"]
    comp = next(r for r in ok if r["name"] == "compile")["img_per_s"]["median"]
    esdpa = next(r for r in ok if r["name"] == "eager/sdpa")["img_per_s"]["median"]
    fused = next(r for r in ok if r["name"] == "fused")["img_per_s"]["median"]
    for r in ok:
        assert len(r["repeat_ms"]) == cfg["repeats"] and all(ms > 0 for ms in r["repeat_ms"])
        ms = [v / cfg["steps"] for v in r["repeat_ms"]]
        ips = [cfg["batch"] * 1000.0 / v for v in ms]
        assert r["ms_per_step"]["median"] == pytest.approx(statistics.median(ms))
        assert r["ms_per_step"]["min"] == pytest.approx(min(ms))
        assert r["ms_per_step"]["max"] == pytest.approx(max(ms))
        assert r["img_per_s"]["median"] == pytest.approx(statistics.median(ips))
        assert r["img_per_s"]["min"] == pytest.approx(min(ips))
        achieved = cfg["flops_per_image"] * r["img_per_s"]["median"]
        assert r["model_tflops_per_s"] == pytest.approx(achieved / 1e12)
        assert r["mfu"] is None and r["peak_mem_gib"] is None  # CPU: n/a
        assert r["speedup_vs_eager"] == pytest.approx(r["img_per_s"]["median"] / eager)
        assert r["speedup_vs_compile"] == pytest.approx(r["img_per_s"]["median"] / comp)
        assert r["speedup_vs_eager_sdpa"] == pytest.approx(r["img_per_s"]["median"] / esdpa)
        assert r["speedup_vs_fused"] == pytest.approx(r["img_per_s"]["median"] / fused)
        assert math.isfinite(r["loss_first"]) and math.isfinite(r["loss_last"])
        assert r["first_step_s"] > 0 and r["warmup_s"] >= r["first_step_s"]
    assert cfg["peak_flops"] is None and "n/a" in cfg["peak_flops_source"]
    assert "MFU n/a" in smoke_run["stdout"]


def test_smoke_environment(smoke_run):
    import triton
    env = smoke_run["data"]["environment"]
    assert "NaN" not in smoke_run["text"] and "Infinity" not in smoke_run["text"]  # strict JSON
    assert env["torch"] == torch.__version__ and env["triton"] == triton.__version__
    assert env["cuda"] == torch.version.cuda and env["gpu"] is None and env["device"] == "cpu"
    assert env["python"] == ".".join(map(str, sys.version_info[:3]))
    head = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:
        assert env["git_commit"].split("-")[0] == head.stdout.strip()
    date = datetime.datetime.fromisoformat(env["date"])
    age = datetime.datetime.now(datetime.timezone.utc) - date
    assert datetime.timedelta(0) <= age < datetime.timedelta(minutes=30)
    assert env["command"].startswith("python benchmarks/throughput.py --smoke --json ")
    assert env["argv"][1:3] == ["--smoke", "--json"]
    assert env["env"].get("TRITON_INTERPRET") == "1"


# ----------------------------------------------------------------------------------------------
# Figures: FLOPs, MFU, statistics
# ----------------------------------------------------------------------------------------------
def test_flops_per_image_matches_a_flop_counter():
    """The FLOPs behind MFU, counted independently: torch's FlopCounterMode over the reference forward
    (every matmul/conv, attention included) plus fastdit's convention of one MAC per LayerNorm element;
    a training step = 3 forwards."""
    from torch.utils.flop_counter import FlopCounterMode

    from fastdit.models.reference import DiT
    args = tp.parse_args(["--smoke"])
    a = tp.SMOKE_ARCH
    model = DiT(**a, num_classes=tp.NUM_CLASSES)
    n = 3
    x = torch.randn(n, a["in_channels"], a["input_size"], a["input_size"])
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x, torch.randint(0, 1000, (n,)), torch.randint(0, 1000, (n,)))
    tokens = (a["input_size"] // a["patch_size"]) ** 2
    ln_macs = (2 * a["depth"] + 1) * tokens * a["hidden_size"]
    fwd_flops = counter.get_total_flops() / n + 2 * ln_macs
    assert tp.flops_per_image(args) == pytest.approx(3 * fwd_flops, rel=1e-12)


def test_throughput_metrics_by_hand():
    m = tp.throughput_metrics([100.0, 300.0, 200.0], steps=2, batch=4, flops_per_image=1e12, peak=80e12)
    # ms/step 50, 150, 100 -> img/s 80, 26.67, 40
    assert m["ms_per_step"] == dict(median=100.0, min=50.0, max=150.0, n=3)
    assert m["img_per_s"]["median"] == pytest.approx(40.0)
    assert m["img_per_s"]["min"] == pytest.approx(4 / 0.15) and m["img_per_s"]["max"] == pytest.approx(80.0)
    assert m["model_tflops_per_s"] == pytest.approx(40.0)
    assert m["mfu"] == pytest.approx(0.5)
    assert tp.throughput_metrics([10.0], 1, 1, 1e9, None)["mfu"] is None


def test_speedups():
    def row(name, ips, status="ok"):
        return dict(name=name, status=status, img_per_s=dict(median=ips) if status == "ok" else None)
    rows = [row("eager", 100.0), row("compile", 125.0), row("fused", 200.0),
            row("fused/xformers", 0, "error")]
    tp.add_speedups(rows)
    assert [r["speedup_vs_eager"] for r in rows] == [1.0, 1.25, 2.0, None]
    assert [r["speedup_vs_compile"] for r in rows] == [0.8, 1.0, 1.6, None]
    assert all(r["speedup_vs_eager_sdpa"] is None for r in rows)  # that baseline was not run
    rows = [row("eager", 0, "error"), row("fused", 200.0)]
    tp.add_speedups(rows)
    assert rows[1]["speedup_vs_eager"] is None and rows[1]["speedup_vs_compile"] is None


def test_summarize():
    assert common.summarize([3, 1, 2, 10]) == dict(median=2.5, min=1.0, max=10.0, n=4)
    with pytest.raises(ValueError, match="at least one"):
        common.summarize([])
    with pytest.raises(ValueError, match="non-finite"):
        common.summarize([1.0, float("nan")])


def test_interval_timer_cpu():
    timer = common.IntervalTimer("cpu")
    with pytest.raises(RuntimeError, match="before start"):
        timer.stop()
    timer.start()
    time.sleep(0.05)
    ms = timer.stop()
    assert 50.0 <= ms < 2000.0
    assert timer.method == "time.perf_counter"


def test_mark_timer_cpu():
    timer = common.MarkTimer("cpu")
    timer.mark()
    with pytest.raises(RuntimeError, match="at least two marks"):
        timer.intervals()
    time.sleep(0.03)
    timer.mark()
    timer.mark()
    a, b = timer.intervals()
    assert 30.0 <= a < 2000.0 and 0.0 <= b < 30.0
    assert timer.method == "time.perf_counter"


def test_write_json_strict(tmp_path):
    path = tmp_path / "a" / "b" / "r.json"
    common.write_json(str(path), dict(x=float("nan"), y=[1.5, float("inf")], z={"k": (1, 2)}))
    assert json.loads(path.read_text()) == dict(x=None, y=[1.5, None], z={"k": [1, 2]})
    assert not os.path.exists(str(path) + ".tmp")


def test_eager_sdpa_row_is_the_reference_with_sdpa_attention():
    """The eager/sdpa model has the reference's parameters and computes the reference's function."""
    from fastdit.models.dit import Attention as BackendAttention
    args = tp.parse_args(["--smoke"])
    ref = tp.build_model(tp.row_specs(["eager"])[0], args, torch.device("cpu"), "torch")
    alt = tp.build_model(tp.row_specs(["eager/sdpa"])[0], args, torch.device("cpu"), "torch")
    assert type(alt) is type(ref)
    assert all(isinstance(b.attn, BackendAttention) and b.attn.backend == "sdpa" for b in alt.blocks)
    alt.load_state_dict(ref.state_dict())  # strict: same keys and shapes
    for b in ref.blocks:  # non-zero gates and output layer, so the blocks matter
        torch.nn.init.normal_(b.adaLN_modulation[1].weight, std=0.2)
    torch.nn.init.normal_(ref.final_layer.linear.weight, std=0.2)
    alt.load_state_dict(ref.state_dict())
    a = tp.SMOKE_ARCH
    x = torch.randn(3, a["in_channels"], a["input_size"], a["input_size"])
    t, y = torch.randint(0, 1000, (3,)), torch.randint(0, 1000, (3,))
    ref.eval(), alt.eval()
    out_ref, out_alt = ref(x, t, y), alt(x, t, y)
    assert out_ref.abs().max() > 1e-2
    torch.testing.assert_close(out_alt, out_ref, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Precision and the optimizer
# ----------------------------------------------------------------------------------------------
def test_master_weight_adamw_matches_fp32_adamw():
    """bf16 params + fp32 masters: the masters follow torch AdamW on fp32 copies fed the same
    (bf16) gradients; the bf16 params are the masters rounded."""
    torch.manual_seed(1)
    p32 = [torch.randn(5, 7), torch.randn(7)]
    params = [torch.nn.Parameter(p.to(torch.bfloat16)) for p in p32]
    frozen = torch.nn.Parameter(torch.ones(3, dtype=torch.bfloat16), requires_grad=False)
    opt = tp.MasterWeightAdamW(params + [frozen], lr=1e-2, fused=False)
    refs = [torch.nn.Parameter(p.to(torch.bfloat16).float()) for p in p32]
    ref_opt = torch.optim.AdamW(refs, lr=1e-2, weight_decay=0.0)
    for _ in range(3):
        grads = [torch.randn_like(p, dtype=torch.float32).to(torch.bfloat16) for p in params]
        for p, r, g in zip(params, refs, grads):
            p.grad, r.grad = g.clone(), g.float()
        opt.step()
        opt.zero_grad()
        ref_opt.step()
        assert all(p.grad is None for p in params)
    for p, m, r in zip(params, opt.master, refs):
        assert p.dtype == torch.bfloat16 and m.dtype == torch.float32
        torch.testing.assert_close(m, r.detach(), rtol=0, atol=0)
        torch.testing.assert_close(p.detach(), r.detach().to(torch.bfloat16), rtol=0, atol=0)
    assert torch.equal(frozen, torch.ones(3, dtype=torch.bfloat16))  # not optimised
    params[0].grad = None
    params[1].grad = torch.zeros_like(params[1])
    with pytest.raises(RuntimeError, match="no gradient"):
        opt.step()


@pytest.mark.parametrize("precision", ["bf16", "autocast"])
def test_precisions_run(precision):
    res = tp.run(["--smoke", "--rows", "eager,fused", "--kernels", "torch", "--precision", precision])
    assert [r["status"] for r in res["rows"]] == ["ok", "ok"], [r["error"] for r in res["rows"]]
    assert res["config"]["precision"] == precision
    assert res["config"]["optimizer"].startswith("AdamW on fp32 master" if precision == "bf16" else "AdamW,")


@pytest.mark.slow
@pytest.mark.triton
def test_bf16_smoke_engine_rows_run_the_fused_step(tmp_path):
    """In bf16 (the smoke run is fp32, where the fused optimizer step is refused) the engine rows run the fused
    step: plain, with the deferred non-finite check, and the candidate row (graphs emulated, mlp fold, column sums
    once, paired row sums, overlap_comm off, the deferred check) all train alike."""
    out = tmp_path / "bf16.json"
    proc = subprocess.run([sys.executable, "benchmarks/throughput.py", "--smoke", "--precision", "bf16", "--rows",
                           "deepspeed,deepspeed+deferred-check,deepspeed+candidates", "--json", str(out)],
                          cwd=ROOT, env=dict(os.environ, TRITON_INTERPRET="1"), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {r["name"]: r for r in json.loads(out.read_text())["rows"]}
    assert all(r["status"] == "ok" and r["fused_optimizer_step"] == "on" for r in rows.values()), rows
    assert [rows[n]["deepspeed"]["fused_step_deferred_check"] for n in rows] == [False, True, True]
    assert rows["deepspeed+candidates"]["graphs"]["captures"] == 1
    assert "the update queued before the host reads the non-finite check" in proc.stdout
    for name in ("deepspeed+deferred-check", "deepspeed+candidates"):
        for key in ("loss_first", "loss_last"):
            assert rows[name][key] == pytest.approx(rows["deepspeed"][key], rel=1e-3), (name, key)


# ----------------------------------------------------------------------------------------------
# Failures are recorded, not fatal; bad arguments are refused
# ----------------------------------------------------------------------------------------------
def test_failing_row_is_recorded_and_run_goes_on(monkeypatch, capsys):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # kernels="triton" cannot run on CPU now
    threads = torch.get_num_threads()
    res = tp.run(["--smoke", "--rows", "fused,eager", "--kernels", "triton"])
    assert torch.get_num_threads() == threads  # smoke's single thread is not left behind
    fused, eager = res["rows"]
    assert fused["status"] == "error" and "TRITON_INTERPRET" in fused["error"]
    assert eager["status"] == "ok" and res["complete"]
    assert fused["speedup_vs_eager"] is None
    assert "1 row(s) failed: fused" in capsys.readouterr().out


def test_deepspeed_row_frees_its_engine_when_it_fails_after_building_it(monkeypatch):
    """An error between build_engine and the row's step (the caller never gets the engine) destroys the engine
    there, so its memory is not left for the next row to run out of."""
    import fastdit.training.trainer as trainer_mod
    destroyed = []

    class Setup:
        def describe(self):
            raise RuntimeError("describe failed")

        def destroy(self):
            destroyed.append(True)

    monkeypatch.setattr(trainer_mod, "init_distributed", lambda *a, **k: None)
    monkeypatch.setattr(trainer_mod, "build_engine", lambda *a, **k: Setup())
    args = tp.parse_args(["--smoke", "--rows", "deepspeed"])
    with pytest.raises(RuntimeError, match="describe failed"):
        tp.build_deepspeed_step(args, torch.device("cpu"), "torch", [], {})
    assert destroyed == [True]


def test_non_finite_loss_is_an_error():
    res = tp.run(["--smoke", "--rows", "eager", "--lr", "1e30", "--repeats", "3"])
    (row,) = res["rows"]
    assert row["status"] == "error" and row["error"].startswith("FloatingPointError: non-finite")


def test_main_exit_code_when_every_row_fails(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert tp.main(["--smoke", "--rows", "fused", "--kernels", "triton"]) == 1


def test_deepspeed_row_refuses_autocast():
    res = tp.run(["--smoke", "--rows", "deepspeed", "--precision", "autocast"])
    (row,) = res["rows"]
    assert row["status"] == "unavailable" and "--precision bf16 or fp32" in row["error"]


@pytest.mark.parametrize("precision, bf16", [("bf16", True), ("fp32", False)])
def test_deepspeed_row_config(precision, bf16):
    """--config with the row's batch, model and precision; gradient accumulation removed."""
    args = tp.parse_args(["--model", "DiT-B/4", "--image-size", "128", "--batch", "48", "--precision", precision,
                          "--rows", "deepspeed", "--config", os.path.join(ROOT, "configs", "xl2_zero3.json")])
    cfg = tp.deepspeed_row_config(args)
    ds = cfg.deepspeed
    assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] == 48
    assert "gradient_accumulation_steps" not in ds and ds["bf16"]["enabled"] is bf16
    assert ds["zero_optimization"]["stage"] == 3
    assert cfg.model.name == "DiT-B/4" and cfg.model.depth is None and cfg.data.image_size == 128
    assert cfg.data.kind == "synthetic" and cfg.model.num_classes == tp.NUM_CLASSES


@pytest.mark.parametrize("argv, message", [
    (["--rows", "eager,bogus"], "unknown row"),
    (["--rows", "deepspeed", "--config", "configs/nope.json"], "does not exist"),
    (["--rows", "eager,eager"], "twice"),
    (["--warmup", "0"], "--warmup must be >= 1"),
    (["--batch", "0"], "--batch must be >= 1"),
    (["--peak-tflops", "-5"], "--peak-tflops must be a positive"),
    (["--model", "DiT-XXL/2"], "unknown --model"),
    (["--image-size", "250"], "multiple of 8"),
    (["--model", "DiT-XL/8", "--image-size", "96"], "not divisible by the patch size"),
])
def test_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit):
        tp.parse_args(argv)
    assert message in capsys.readouterr().err


def test_full_size_on_cpu_needs_explicit_device():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(SystemExit, match="--smoke"):
        tp.resolve_device(tp.parse_args([]))


@pytest.mark.gpu
def test_small_gpu_run():
    """On a CUDA device: a short real run of a small registry model, every figure filled in."""
    res = tp.run(["--model", "DiT-S/2", "--batch", "8", "--rows", "eager,eager/sdpa,compile,fused,fused/sdpa",
                  "--warmup", "2", "--steps", "2", "--repeats", "2", "--peak-tflops", "100"])
    assert res["environment"]["gpu"] and res["config"]["precision"] == "bf16"
    for r in res["rows"]:
        assert r["status"] == "ok", (r["name"], r["error"])
        assert r["peak_mem_gib"] > 0 and r["mfu"] == pytest.approx(r["model_tflops_per_s"] / 100)
        assert r["kernels"] in (None, "triton")


@pytest.mark.gpu
def test_deepspeed_row_on_gpu(tmp_path):
    """On a CUDA device: the deepspeed row between two harness rows, in its own process (it initialises
    torch.distributed, NCCL); bf16 from the config, MFU and peak memory filled in, the engine torn down."""
    out = tmp_path / "ds.json"
    proc = subprocess.run([sys.executable, "benchmarks/throughput.py", "--model", "DiT-S/2", "--batch", "8",
                           "--rows", "fused,deepspeed,eager", "--warmup", "2", "--steps", "2", "--repeats", "2",
                           "--peak-tflops", "100", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {r["name"]: r for r in json.loads(out.read_text())["rows"]}
    for r in rows.values():
        assert r["status"] == "ok", (r["name"], r["error"])
    ds = rows["deepspeed"]
    assert ds["deepspeed"]["bf16"] is True and ds["deepspeed"]["zero_stage"] == 2
    assert ds["kernels"] == "triton" and ds["mfu"] == pytest.approx(ds["model_tflops_per_s"] / 100)
    # the engine's state (weights, fp32 masters, Adam moments, EMA: ~0.5 GiB for DiT-S/2) was released
    assert ds["peak_mem_gib"] > 0 and ds["mem_left_gib"] < 0.25
