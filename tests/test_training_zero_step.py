"""fastdit.training.zero_step against DeepSpeed's own ZeRO-1/2 bf16 step, on 2 CPU ranks (gloo).

Three engines from the same seed train the same batches for 6 steps, one with DeepSpeed's step, one
with the fused step (installed with a flat EMA) and one with the fused step queuing its update before it reads
the non-finite check (deferred_check), without and with gradient accumulation (2 micro-batches, as the GPU
configs accumulate); a NaN loss on one rank at step 4 must be skipped by all three.
On CPU the fused step runs its PyTorch reference of the kernel (tests/test_kernels_adamw.py checks the
kernel against that reference), so the two must agree bit for bit: masters, moments, step count, the
bf16 parameters and the EMA.
"""
import json

import pytest

from _helpers import run_two_ranks

pytestmark = pytest.mark.slow

SCRIPT = r'''
from fastdit.training import zero_checks, zero_step
from fastdit.training.ema import ShardedEMA


def engine_for(stage, clip=0.0, bf16=True, ga=1):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8), torch.nn.LayerNorm(8))
    net[3].weight.requires_grad_(False)             # frozen: outside the optimizer's partition, still in the EMA
    cfg = {"train_batch_size": 4 * world * ga, "train_micro_batch_size_per_gpu": 4,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.05, "torch_adam": True}},
           "bf16": {"enabled": bf16}, "gradient_clipping": clip,
           "zero_optimization": {"stage": stage}, "steps_per_print": 10**9}
    engine, opt, _, _ = deepspeed.initialize(model=net, model_parameters=[p for p in net.parameters() if p.requires_grad],
                                             config=cfg)
    return engine, opt


out = {}
for stage, ga in ((1, 1), (2, 1), (1, 2), (2, 2)):
    runs = {}
    for fused in (False, True, "deferred"):
        engine, opt = engine_for(stage, ga=ga)
        zero_checks.install(opt)
        ema = ShardedEMA(engine.module, 0.9, one_pass=True, flat=bool(fused))
        why = zero_step.install(opt, ema, deferred_check=fused == "deferred") if fused else None
        applied, norms = [], []
        for step in range(6):
            for micro in range(ga):                 # gradient accumulation: DeepSpeed steps at the boundary
                torch.manual_seed(100 + 10 * step + 3 * micro + rank)
                loss = engine(torch.randn(4, 8, dtype=torch.bfloat16)).float().square().mean()
                if step == 3 and rank == world - 1 and micro == ga - 1:
                    loss = loss * float("nan")
                engine.backward(loss)
                engine.step()
            applied.append(engine.was_step_applied())
            norms.append(float(engine.get_global_grad_norm()) if applied[-1] else None)
            f = getattr(opt, "fastdit_fused_step", None)
            if applied[-1] and (f is None or not f.ema_updated):
                ema.update()
        st = opt.optimizer.state[opt.optimizer.param_groups[0]["params"][0]]
        f = getattr(opt, "fastdit_fused_step", None)
        runs[{False: "deepspeed", True: "fused", "deferred": "deferred"}[fused]] = dict(
            why=why, applied=applied, norms=norms, passes=f.norm_passes if f else None, step=float(st["step"]), master=opt.single_partition_of_fp32_groups[0].tolist(),
            exp_avg=st["exp_avg"].tolist(), exp_avg_sq=st["exp_avg_sq"].tolist(),
            bf16=[p.detach().float().reshape(-1).tolist() for p in engine.module.parameters()],
            ema={k: v.reshape(-1).tolist() for k, v in ema.full_state_dict().items()},
            fused_steps=f.fused_steps if f else 0, views=f.flat_views if f else 0, copies=f.flat_copies if f else 0,
            segments=f.flat_segments if f else 0, builds=f.segment_builds if f else 0,
            deferred_steps=f.deferred_steps if f else 0, deferred_skips=f.deferred_skips if f else 0)
    out[f"{stage}" if ga == 1 else f"{stage}ga{ga}"] = runs
_, opt = engine_for(2, clip=1.0)
out["refused_clip"] = zero_step.install(opt)
_, opt = engine_for(2, bf16=False)
out["refused_fp32"] = zero_step.install(opt)
out["refused_torch"] = zero_step.install(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))]))
with open(f"result_{rank}.json", "w") as f:
    json.dump(out, f)
'''


def test_fused_step_equals_deepspeed_step_zero1_zero2_with_a_skipped_step(tmp_path):
    proc = run_two_ranks(SCRIPT, tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for rank in (0, 1):
        res = json.loads((tmp_path / f"result_{rank}.json").read_text())
        for stage in ("1", "2", "1ga2", "2ga2"):         # ZeRO stage, gradient accumulation
            ds, fu, de = res[stage]["deepspeed"], res[stage]["fused"], res[stage]["deferred"]
            assert fu["why"] is None and de["why"] is None
            assert ds["applied"] == fu["applied"] == de["applied"] == [True, True, True, False, True, True]
            # deferred: the updates queued before the check, the NaN step's gated out on the device and then
            # DeepSpeed's skip path; the same state, bit for bit, and the same norms as the fused step
            assert de["fused_steps"] == de["deferred_steps"] == 4 and de["deferred_skips"] == 1
            assert fu["deferred_steps"] == fu["deferred_skips"] == 0
            for key in ("step", "master", "exp_avg", "exp_avg_sq", "bf16", "ema", "norms", "passes"):
                assert de[key] == ds[key] if key not in ("norms", "passes") else de[key] == fu[key], (stage, key)
            # the first step is DeepSpeed's (it creates torch's AdamW state), the next four are fused
            assert fu["fused_steps"] == 4 and fu["views"] + fu["segments"] + fu["copies"] == 4
            for key in ("step", "master", "exp_avg", "exp_avg_sq", "bf16", "ema"):
                assert fu[key] == ds[key], (stage, key)
            # the gradient norm from the one-pass checks (one sum of squares, one all-reduce) is DeepSpeed's
            for a, b in zip(fu["norms"], ds["norms"]):
                assert (a is None and b is None) or (b > 0 and abs(a - b) <= 1e-5 * b), (stage, a, b)
            # steps 2, 3, 5, 6 fused; the NaN step 4 is found by the one-pass check and handed to DeepSpeed
            assert sum(fu["passes"].values()) == 5, fu["passes"]
        # ZeRO-1 keeps each rank's gradient partition in parameter order: used in place, no copy; ZeRO-2's
        # gradients fill one buffer in hook order: summed in one pass and read there through segment tables
        for z1, z2 in (("1", "2"), ("1ga2", "2ga2")):
            assert res[z1]["fused"]["views"] == 4
            assert res[z2]["fused"]["passes"]["flat"] == 5 and res[z2]["fused"]["segments"] == 4
            # DeepSpeed hands a new gradient buffer most steps, with the same layout: tables built once
            assert res[z2]["fused"]["builds"] == 1 and res[z1]["fused"]["builds"] == 0
        assert "clipping" in res["refused_clip"]
        assert "bf16 training" in res["refused_fp32"]
        assert "ZeRO-1/2" in res["refused_torch"]


CUDA_SCRIPT = r'''
import json, os, sys
import torch
sys.path.insert(0, os.environ["FASTDIT_ROOT"])
import deepspeed
from fastdit.training import zero_checks, zero_step
from fastdit.training.ema import ShardedEMA

deepspeed.init_distributed(dist_backend="nccl")
out = {}
for stage, mode in ((s, m) for s in (1, 2) for m in ("fused", "deferred")):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64)).cuda()
    cfg = {"train_batch_size": 8, "train_micro_batch_size_per_gpu": 8,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.05, "torch_adam": True}},
           "bf16": {"enabled": True}, "gradient_clipping": 0.0,
           "zero_optimization": {"stage": stage, "overlap_comm": True, "contiguous_gradients": True},
           "steps_per_print": 10**9}    # as the shipped configs: the reduction stream, the contiguous buffer
    engine, opt, _, _ = deepspeed.initialize(model=net, model_parameters=list(net.parameters()), config=cfg)
    zero_checks.install(opt)
    ema = ShardedEMA(engine.module, 0.9, one_pass=True, flat=True)
    assert zero_step.install(opt, ema, deferred_check=mode == "deferred") is None
    applied = []
    for step in range(6):
        torch.manual_seed(100 + step)
        x = torch.randn(8, 64, device="cuda", dtype=torch.bfloat16)
        loss = engine(x).float().square().mean()
        if step == 3:
            loss = loss * float("nan")
        engine.backward(loss)
        engine.step()
        applied.append(engine.was_step_applied())
    torch.cuda.synchronize()
    f = opt.fastdit_fused_step
    st = opt.optimizer.state[opt.optimizer.param_groups[0]["params"][0]]
    out[f"{mode} {stage}"] = dict(applied=applied, fused=f.fused_steps, deferred=f.deferred_steps, skips=f.deferred_skips,
                     step=float(st["step"]), master=opt.single_partition_of_fp32_groups[0].tolist(),
                     exp_avg=st["exp_avg"].tolist(), exp_avg_sq=st["exp_avg_sq"].tolist(),
                     bf16=[p.detach().float().reshape(-1).tolist() for p in engine.module.parameters()],
                     ema={k: v.reshape(-1).tolist() for k, v in ema.full_state_dict().items()})
    if hasattr(engine, "destroy"):
        engine.destroy()
with open("result_cuda.json", "w") as fh:
    json.dump(out, fh)
torch.distributed.destroy_process_group()
'''


@pytest.mark.gpu
def test_deferred_check_on_cuda_equals_the_fused_step(tmp_path):
    """On CUDA (the Triton kernel, the pinned copy of the sum behind an event), ZeRO-1 and ZeRO-2 with the shipped
    configs' overlap_comm and contiguous_gradients: the deferred step gives the fused step's state bit for bit over
    6 steps, and its NaN step is gated out on the device and skipped."""
    import os
    import subprocess
    import sys

    import torch

    from fastdit.dist import free_port
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = tmp_path / "cuda_step.py"
    path.write_text(CUDA_SCRIPT)
    env = dict(os.environ, FASTDIT_ROOT=root, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()), PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=300, env=env,
                          cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "result_cuda.json").read_text())
    for stage in (1, 2):   # ZeRO-1 and -2 with overlap_comm and contiguous_gradients, as the shipped configs
        fu, de = res[f"fused {stage}"], res[f"deferred {stage}"]
        assert fu["applied"] == de["applied"] == [True, True, True, False, True, True], stage
        assert (fu["fused"], fu["deferred"], de["fused"], de["deferred"], de["skips"]) == (4, 0, 4, 4, 1), stage
        for key in ("step", "master", "exp_avg", "exp_avg_sq", "bf16", "ema"):
            assert fu[key] == de[key], (stage, key)


def test_a_deepspeed_step_drops_the_cached_step_counts():
    """The fused step caches torch's per-group step count on the host. DeepSpeed's own step (its skip path, a
    closure, the first step) may step torch's counter in place, so the cache must not outlive it: the next fused
    step reads the count from the device again."""
    import torch

    from fastdit.training import zero_step
    fs = zero_step.FusedZeroStep.__new__(zero_step.FusedZeroStep)
    counter = torch.tensor(3.0)
    fs._steps = {}
    assert fs._next_step(0, counter) == 4 and counter.item() == 4.0
    fs.orig_step = lambda *closure: counter.add_(1)      # a DeepSpeed step that applied an update
    fs._deepspeed_step()
    assert counter.item() == 5.0
    assert fs._step_count(0, counter) == 5 and fs._next_step(0, counter) == 6
