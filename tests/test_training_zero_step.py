"""fastdit.training.zero_step against DeepSpeed's own ZeRO-1/2 bf16 step, on 2 CPU ranks (gloo).

Two engines from the same seed train the same batches for 6 steps, one with DeepSpeed's step and one
with the fused step (installed with a flat EMA), without and with gradient accumulation (2 micro-batches,
as the GPU configs accumulate); a NaN loss on one rank at step 4 must be skipped by both.
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
    for fused in (False, True):
        engine, opt = engine_for(stage, ga=ga)
        zero_checks.install(opt)
        ema = ShardedEMA(engine.module, 0.9, one_pass=True, flat=fused)
        why = zero_step.install(opt, ema) if fused else None
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
        runs["fused" if fused else "deepspeed"] = dict(
            why=why, applied=applied, norms=norms, passes=f.norm_passes if f else None, step=float(st["step"]), master=opt.single_partition_of_fp32_groups[0].tolist(),
            exp_avg=st["exp_avg"].tolist(), exp_avg_sq=st["exp_avg_sq"].tolist(),
            bf16=[p.detach().float().reshape(-1).tolist() for p in engine.module.parameters()],
            ema={k: v.reshape(-1).tolist() for k, v in ema.full_state_dict().items()},
            fused_steps=f.fused_steps if f else 0, views=f.flat_views if f else 0, copies=f.flat_copies if f else 0,
            segments=f.flat_segments if f else 0, builds=f.segment_builds if f else 0)
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
            ds, fu = res[stage]["deepspeed"], res[stage]["fused"]
            assert fu["why"] is None
            assert ds["applied"] == fu["applied"] == [True, True, True, False, True, True]
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
