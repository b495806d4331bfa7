"""fastdit.training.zero_checks against DeepSpeed's own per-tensor checks, on 2 CPU ranks (gloo), ZeRO-1 and ZeRO-2."""
import json

import pytest

from _helpers import run_two_ranks

pytestmark = pytest.mark.slow

SCRIPT = r'''
from fastdit.training import zero_checks
for stage in (1, 2):
    torch.manual_seed(0)
    net = torch.nn.Sequential(*[m for _ in range(6) for m in (torch.nn.Linear(8, 8), torch.nn.GELU())])
    cfg = {"train_batch_size": 8, "train_micro_batch_size_per_gpu": 4,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
           "zero_optimization": {"stage": stage}, "steps_per_print": 10**9}
    engine, opt, _, _ = deepspeed.initialize(model=net, model_parameters=net.parameters(), config=cfg)
    torch.manual_seed(1 + rank)
    loss = engine(torch.randn(4, 8) * 3).square().mean()
    engine.backward(loss)
    grads = [opt.averaged_gradients[i] for i in range(len(opt.bit16_groups))]
    orig_flag = bool(opt.has_overflow_partitioned_grads_serial())
    orig_norm = [float(opt.get_grad_norm_direct(grads[i], opt.params_in_partition[i])) for i in range(len(grads))]
    why = zero_checks.install(opt)
    patched = (opt.get_grad_norm_direct.__func__ is zero_checks._grad_norm_direct
               and opt.has_overflow_partitioned_grads_serial.__func__ is zero_checks._has_overflow_partitioned_grads)
    new_flag = bool(opt.has_overflow_partitioned_grads_serial())
    new_norm = [float(opt.get_grad_norm_direct(grads[i], opt.params_in_partition[i])) for i in range(len(grads))]
    # a NaN in one gradient element on the last rank only: both ranks must see the overflow after the all-reduce
    if rank == dist.get_world_size() - 1:
        next(g for g in grads[0] if g.numel() > 1).view(-1)[1] = float("nan")
    flag_nan = bool(opt.has_overflow())
    norm_nan = [float(opt.get_grad_norm_direct(grads[i], opt.params_in_partition[i])) for i in range(len(grads))]
    if rank == dist.get_world_size() - 1:
        next(g for g in grads[0] if g.numel() > 1).view(-1)[1] = float("inf")
    flag_inf = bool(opt.has_overflow())
    with open(f"result_{stage}_{rank}.json", "w") as f:
        json.dump(dict(rank=rank, installed=why, patched=patched, orig_flag=orig_flag, new_flag=new_flag, orig_norm=orig_norm,
                       new_norm=new_norm, flag_nan=flag_nan, norm_nan=norm_nan, flag_inf=flag_inf,
                       n_grads=sum(len(g) for g in grads)), f)
'''


def test_multi_tensor_checks_match_deepspeed_and_catch_nonfinite_on_any_rank(tmp_path):
    proc = run_two_ranks(SCRIPT, tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = [json.loads((tmp_path / f"result_{s}_{r}.json").read_text()) for s in (1, 2) for r in (0, 1)]
    for r in res:
        assert r["installed"] is None and r["patched"] and r["n_grads"] >= 3
        assert r["orig_flag"] is False and r["new_flag"] is False
        for a, b in zip(r["new_norm"], r["orig_norm"]):
            assert b > 0 and abs(a - b) <= 1e-5 * b, (a, b)
        assert r["flag_nan"] is True and r["flag_inf"] is True      # every rank sees the other rank's NaN
        assert all(n == -1.0 for n in r["norm_nan"])                 # DeepSpeed's invalid-norm sentinel
    assert res[0]["orig_norm"] == res[1]["orig_norm"] and res[2]["orig_norm"] == res[3]["orig_norm"]  # global


def test_install_refuses_other_optimizers():
    from fastdit.training import zero_checks
    import torch
    why = zero_checks.install(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))]))
    assert why and "ZeRO-1/2" in why
