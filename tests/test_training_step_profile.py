"""fastdit.training.step_profile and benchmarks/step_profile.py: phase times, kernel categories, the trace.

The smoke profile runs the real engine (DeepSpeed ZeRO-2 on one CPU rank over gloo) through
benchmarks/step_profile.py; the category rules are checked on kernel names of a real H100 profile of
the training step (measurements of 2026-11-26, profile.txt).
"""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from fastdit.training import step_profile as sp  # noqa: E402

PHASES = ["data", "forward", "backward", "optimizer", "ema"]


def _env():
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("prof") / "out"
    proc = subprocess.run([sys.executable, "benchmarks/step_profile.py", "--smoke", "--out", str(out)],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out / "profile.json") as f:
        summary = json.load(f)
    return dict(out=out, stdout=proc.stdout, summary=summary)


def test_smoke_phases(smoke):
    s = smoke["summary"]
    ph = s["phases"]
    assert list(ph["median_ms"]) == PHASES
    assert all(v > 0 for v in ph["median_ms"].values()), ph
    assert ph["steps"] == [4, 5] and len(ph["per_step_ms"]) == 2  # warm-up 1, then 2 timed whole
    assert ph["sum_ms"] == pytest.approx(sum(ph["median_ms"].values()))
    st = s["step"]
    assert st["steps"] == [2, 3] and len(st["ms_per_step"]) == 2 and st["median_ms"] > 0
    assert st["img_per_s"] == pytest.approx(8 * 1e3 / st["median_ms"])  # global batch 8
    run = s["run"]
    assert (run["zero_stage"], run["micro_batch"], run["grad_accum"], run["world_size"]) == (2, 4, 2, 1)
    assert run["optimizer"]["engine_optimizer"] == "DeepSpeedZeroOptimizer" and run["bf16"] is False
    assert run["data"] == "digits" and s["missing_steps"] == [] and run["nonfinite_steps"] == 0
    for name in PHASES:
        assert f"  {name} " in smoke["stdout"]


def test_smoke_with_the_fused_optimizer_step(tmp_path):
    """bf16 with train.fused_optimizer_step: the EMA is updated inside the optimizer phase (no ema phase)."""
    out = tmp_path / "fused"
    proc = subprocess.run([sys.executable, "benchmarks/step_profile.py", "--smoke", "--out", str(out),
                           "--set", "deepspeed.bf16.enabled=true", "--set", "deepspeed.gradient_clipping=0.0",
                           "--set", "train.fused_optimizer_step=true"],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "train.fused_optimizer_step: AdamW, the bf16 parameter copy and the EMA in one pass" in proc.stdout
    s = json.loads((out / "profile.json").read_text())
    assert list(s["phases"]["median_ms"]) == [p for p in PHASES if p != "ema"]
    assert s["run"]["bf16"] is True and s["run"]["fused_optimizer_step"] is True


def test_smoke_categories_and_trace(smoke):
    tr = smoke["summary"]["trace"]
    assert tr["trace_steps"] == [6] and tr["steps"] == 1 and "CPU ops" in tr["source"]
    cats = tr["by_category_ms"]
    assert set(cats) == set(sp.CATEGORIES) | {"idle"}
    assert all(v >= 0 for v in cats.values())
    assert sum(v for k, v in cats.items() if k != "idle") == pytest.approx(tr["kernel_ms"])
    assert 0 < tr["busy_ms"] <= tr["wall_ms"]
    # idle against the untraced step time (tracing slows the host down)
    assert tr["step_ms"] == smoke["summary"]["step"]["median_ms"] and "plain steps" in tr["idle_basis"]
    assert cats["idle"] == pytest.approx(max(0.0, tr["step_ms"] - tr["busy_ms"]))
    assert cats["gemm"] > 0 and cats["elementwise"] > 0 and cats["copy/cast"] > 0
    assert tr["top"] and all(t["category"] == sp.kernel_category(t["name"]) for t in tr["top"])
    assert not any(t["name"] in PHASES or t["name"].startswith("step ") for t in tr["top"])  # annotations
    with open(smoke["out"] / "trace.json") as f:
        events = json.load(f)["traceEvents"]
    names = {e.get("name") for e in events}
    assert set(PHASES) <= names and "step 6" in names  # the phases are marked in the trace
    assert "CPU ops" in smoke["stdout"] and "trace.json" in smoke["stdout"]


# Kernel names from the H100 profile of the training step (profile.txt, DiT-XL/2, ZeRO-2 bf16), plus
# fastdit's Triton kernels and CPU op names.
KERNELS = [
    ("nvjet_sm90_tst_192x192_64x3_2x1_v_bz_coopB_NNN", "gemm"),
    ("nvjet_sm90_tst_192x192_64x4_2x1_v_bz_coopB_bias_TNN", "gemm"),
    ("nvjet_sm90_tst_64x32_64x16_2x4_h_bz_NNT", "gemm"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26_64x64x128_1x4x1_cga1x1x1_kernel0_0",
     "attention"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x128_4x1x1_cga1x1x1_kernel0_0",
     "attention"),
    ("void cudnn::fusion::compute_dot_do_o<true>(void const*, void const*, void*, void*, unsigned int, "
     "unsigned int,", "attention"),
    ("void cudnn::fusion::convert_dq_to_16bits<true>(void const*, void*, unsigned int, unsigned int, "
     "unsigned int, u", "attention"),
    ("_modln_bwd_kernel", "fastdit"),
    ("_modln_fwd_kernel", "fastdit"),
    ("_gated_residual_fwd_kernel", "fastdit"),
    ("_patch_embed_dw_kernel", "fastdit"),
    ("_gelu_bwd_kernel", "fastdit"), ("_stack_qkv_kernel", "fastdit"), ("_adamw_kernel", "optimizer"),
    ("void at::native::(anonymous namespace)::CatArrayBatchedCopy<at::native::(anonymous namespace)::"
     "OpaqueType<2u>,", "copy/cast"),
    ("void at::native::elementwise_kernel<128, 4, at::native::gpu_kernel_impl_nocast<at::native::"
     "direct_copy_kernel_", "copy/cast"),
    ("void at::native::vectorized_elementwise_kernel<8, at::native::bfloat16_copy_kernel_cuda(at::"
     "TensorIteratorBase", "copy/cast"),
    ("Memcpy DtoD (Device -> Device)", "copy/cast"),
    ("Memset (Device)", "copy/cast"),
    ("void at::native::reduce_kernel<128, 4, at::native::ReduceOp<c10::BFloat16, at::native::"
     "func_wrapper_t<c10::BFl", "reduce"),
    ("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<double, at::native::NormTwoOps<double, "
     "double, dou", "reduce"),
    ("void at::native::vectorized_elementwise_kernel<8, at::native::GeluBackwardCUDAKernelImpl(at::"
     "TensorIteratorBas", "elementwise"),
    ("void at::native::vectorized_elementwise_kernel<8, at::native::GeluCUDAKernelImpl(at::"
     "TensorIteratorBase&, at::", "elementwise"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::BinaryFunctor<bool, bool, bool, "
     "at::native::bina", "elementwise"),
    ("void at::native::vectorized_elementwise_kernel<8, at::native::AbsFunctor<c10::BFloat16>, "
     "std::array<char*, 2ul", "elementwise"),
    ("void at::native::unrolled_elementwise_kernel<at::native::CUDAFunctor_add<float>, std::array<char*, "
     "3ul>, 4, Tr", "elementwise"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::(anonymous namespace)::"
     "TensorLis", "optimizer"),
    ("ncclDevKernel_AllReduce_Sum_bf16_RING_LL(ncclDevKernelArgsStorage<4096ul>)", "communication"),
    ("flash_fwd_kernel<Flash_fwd_kernel_traits<72, 128, 64, 4, false, false, cutlass::bfloat16_t>>",
     "attention"),
    ("triton_poi_fused_add_mul_0", "elementwise"),
    ("triton_red_fused_native_layer_norm_1", "reduce"),
    ("aten::addmm", "gemm"), ("aten::mm", "gemm"), ("aten::convolution_backward", "gemm"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
    ("aten::_foreach_add_", "optimizer"), ("aten::copy_", "copy/cast"), ("aten::_to_copy", "copy/cast"),
    ("aten::cat", "copy/cast"), ("aten::sum", "reduce"), ("aten::native_layer_norm", "reduce"),
    ("aten::mul", "elementwise"), ("aten::add_", "elementwise"), ("aten::gelu_backward", "elementwise"),
    ("aten::maximum", "elementwise"), ("c10d::allreduce_", "communication"),
    ("aten::view", "other"), ("torch::autograd::AccumulateGrad", "other"), ("aten::empty", "other"),
]


@pytest.mark.parametrize("name, category", KERNELS)
def test_kernel_category(name, category):
    assert sp.kernel_category(name) == category


def test_analyse_device_trace():
    """Per-step totals over 2 steps; busy = the union of overlapping kernels; host events ignored."""
    ev = [dict(ph="X", cat="kernel", name="nvjet_a", ts=0, dur=100),
          dict(ph="X", cat="kernel", name="nvjet_a", ts=1000, dur=100),
          dict(ph="X", cat="kernel", name="_modln_fwd_kernel", ts=50, dur=100),   # overlaps nvjet_a
          dict(ph="X", cat="gpu_memcpy", name="Memcpy DtoD (Device -> Device)", ts=300, dur=20),
          dict(ph="X", cat="gpu_memset", name="Memset (Device)", ts=400, dur=10),
          dict(ph="X", cat="cpu_op", name="aten::mm", ts=0, dur=5000),            # host: not device time
          dict(ph="X", cat="cuda_runtime", name="cudaLaunchKernel", ts=0, dur=7),
          dict(ph="i", cat="kernel", name="marker", ts=0)]
    out = sp.analyse_device_trace({"traceEvents": ev}, steps=2, wall_ms=1.0)
    cats = out["by_category_ms"]
    assert cats["gemm"] == pytest.approx(0.1) and cats["fastdit"] == pytest.approx(0.05)
    assert cats["copy/cast"] == pytest.approx(0.015)
    assert out["kernel_ms"] == pytest.approx(0.165)
    assert out["busy_ms"] == pytest.approx((150 + 100 + 20 + 10) / 1e3 / 2)  # [0,150) [300,320) [400,410) [1000,1100)
    assert cats["idle"] == pytest.approx(1.0 - out["busy_ms"])
    top = out["top"][0]
    assert top == dict(name="nvjet_a", category="gemm", ms_per_step=pytest.approx(0.1), calls_per_step=1.0)


def test_idle_gaps_by_the_phase_that_launched_the_next_kernel():
    """Two steps: a gap is charged to the phase whose host range holds the launch of the kernel after it
    (its correlation id); launches outside every phase, and kernels without a launch, are said so."""
    def kernel(ts, dur, corr):
        return dict(ph="X", cat="kernel", name="k", ts=ts, dur=dur, args=dict(correlation=corr))

    def launch(ts, corr):
        return dict(ph="X", cat="cuda_runtime", name="cudaLaunchKernel", ts=ts, dur=2, args=dict(correlation=corr))
    ev = [dict(ph="X", cat="user_annotation", name="forward", ts=0, dur=500),
          dict(ph="X", cat="user_annotation", name="optimizer", ts=600, dur=300),
          dict(ph="X", cat="user_annotation", name="not a phase", ts=950, dur=40),
          launch(10, 1), kernel(20, 100, 1),             # first kernel: no gap before it
          launch(400, 2), kernel(420, 50, 2),            # 300 us idle, launched in forward
          launch(700, 3), kernel(700, 10, 3),            # 230 us idle, launched in optimizer
          launch(960, 4), kernel(960, 10, 4),            # 250 us, launched outside any phase
          kernel(1000, 10, 99),                          # 30 us, no launch event in the trace
          kernel(1005, 20, None)]                        # overlaps the one before: no gap
    gaps = sp.idle_by_phase({"traceEvents": ev}, steps=2)
    assert gaps["forward"] == pytest.approx(0.15) and gaps["optimizer"] == pytest.approx(0.115)
    assert gaps["between phases"] == pytest.approx(0.125) and gaps["unattributed"] == pytest.approx(0.015)
    assert gaps["backward"] == 0 and set(sp.PHASES) <= set(gaps)
    out = sp.analyse_device_trace({"traceEvents": ev}, 2, 1.0)   # no "step N" ranges: one traced step
    assert out["idle_gaps_by_phase_ms"] == gaps and "only traced step" in out["idle_gaps_basis"]


def test_idle_gaps_leave_out_the_first_traced_step():
    """With two or more traced steps the first (its forward starts on a device the profiler's sync idled)
    is reported alone; the steady steps' gaps are averaged over the steps after it."""
    def kernel(ts, dur, corr):
        return dict(ph="X", cat="kernel", name="k", ts=ts, dur=dur, args=dict(correlation=corr))

    def launch(ts, corr):
        return dict(ph="X", cat="cuda_runtime", name="cudaLaunchKernel", ts=ts, dur=2, args=dict(correlation=corr))

    def rng(name, ts, dur, cat="user_annotation"):
        return dict(ph="X", cat=cat, name=name, ts=ts, dur=dur)
    ev = [rng("step 7", 0, 1000), rng("step 8", 1000, 1000), rng("step 9", 2000, 1000),
          rng("step 8", 1000, 1000, cat="gpu_user_annotation"),         # device-side copy: not a host range
          rng("forward", 0, 400), rng("forward", 1000, 400), rng("forward", 2000, 400),
          rng("optimizer", 600, 300), rng("optimizer", 1600, 300), rng("optimizer", 2600, 300),
          launch(10, 1), kernel(20, 10, 1),
          launch(300, 2), kernel(330, 100, 2),           # step 7's forward: 300 us, the drained-queue start
          launch(700, 3), kernel(700, 400, 3),           # step 7's optimizer: 270 us
          launch(1050, 4), kernel(1150, 50, 4),          # step 8's forward: 50 us (device busy until 1100)
          launch(1650, 5), kernel(1700, 10, 5),          # step 8's optimizer: 500 us
          launch(2020, 6), kernel(2030, 10, 6),          # step 9's forward: 320 us
          kernel(2100, 10, 99)]                          # no launch event, starts in step 9: 60 us
    gaps = sp.idle_gaps({"traceEvents": ev}, 3)
    assert "steps 2-3" in gaps["basis"]
    assert gaps["first_step_ms"]["forward"] == pytest.approx(0.3)
    assert gaps["first_step_ms"]["optimizer"] == pytest.approx(0.27)
    steady = gaps["by_phase_ms"]
    assert steady["forward"] == pytest.approx((0.05 + 0.32) / 2)
    assert steady["optimizer"] == pytest.approx(0.5 / 2)
    assert steady["unattributed"] == pytest.approx(0.06 / 2)
    out = sp.analyse_device_trace({"traceEvents": ev}, 3, 1.0)
    assert out["idle_gaps_by_phase_ms"] == steady and out["idle_gaps_first_step_ms"] == gaps["first_step_ms"]
    assert [r[2] for r in sp.step_ranges({"traceEvents": ev})] == [7, 8, 9]


def test_phase_timer_sums_repeated_phases():
    timer = sp.PhaseTimer(torch.device("cpu"))
    for _ in range(3):
        timer.new_step()
        for name in ("data", "forward", "data", "forward", "optimizer"):  # 2 micro-batches
            with timer(name):
                pass
    assert len(timer.steps) == 3 and list(timer.medians()) == ["data", "forward", "optimizer"]
    assert all(v >= 0 for v in timer.medians().values())


def test_step_profiler_refuses_bad_plans(tmp_path):
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="trace steps must be consecutive"):
        sp.StepProfiler(cpu, str(tmp_path), 1, trace_steps=[3, 5])
    with pytest.raises(ValueError, match="both a plain and a phase step"):
        sp.StepProfiler(cpu, str(tmp_path), 1, plain_steps=[1, 2], phase_steps=[2])
    with pytest.raises(ValueError, match="both a phase and a trace step"):
        sp.StepProfiler(cpu, str(tmp_path), 1, phase_steps=[2, 3], trace_steps=[3, 4])


@pytest.mark.parametrize("argv, message", [
    ([], "--config is required"),
    (["--smoke", "--steps", "0"], "--steps must be >= 1"),
    (["--config", "configs/nope.json"], "does not exist"),
    (["--config", "configs/digits.json", "--data", "synthetic"], "use --data config"),
    (["--config", "configs/xl2_zero2.json", "--set", "train.bogus=1"], "unknown key train.bogus"),
])
def test_step_profile_bad_arguments(argv, message):
    proc = subprocess.run([sys.executable, "benchmarks/step_profile.py", *argv], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


@pytest.mark.gpu
def test_step_profile_on_gpu(tmp_path):
    """On a CUDA device: a small model's step, CUDA kernels in every main category."""
    out = tmp_path / "prof"
    proc = subprocess.run([sys.executable, "benchmarks/step_profile.py", "--config", "configs/xl2_zero2.json",
                           "--set", "model.name=DiT-S/2", "--set", "deepspeed.train_micro_batch_size_per_gpu=16",
                           "--set", "deepspeed.train_batch_size=16", "--warmup", "2", "--steps", "2",
                           "--trace-steps", "1", "--out", str(out)],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    s = json.loads((out / "profile.json").read_text())
    assert all(v > 0 for v in s["phases"]["median_ms"].values()) and s["run"]["bf16"] is True
    tr = s["trace"]
    assert tr["source"].startswith("CUDA kernels") and 0 < tr["busy_ms"] <= tr["wall_ms"]
    for cat in ("gemm", "attention", "fastdit", "optimizer", "copy/cast"):
        assert tr["by_category_ms"][cat] > 0, (cat, tr["by_category_ms"])
    assert s["run"]["peak_mem_gib"] > 0
