"""DeepSpeed ZeRO-1/2's per-step gradient checks, computed in multi-tensor passes.

Every optimizer step, DeepSpeed's ZeRO-1/2 optimizer (`DeepSpeedZeroOptimizer`) checks the gradients of
the rank's partition one tensor at a time: `has_overflow_partitioned_grads_serial` runs amax, amin and
isfinite on each gradient, and `get_grad_norm_direct` copies each gradient to fp64 and takes its norm.
For DiT-XL/2 that is ~290 tensors and well over a thousand small kernels per step; on one H100 the
step's profile showed 291 per-parameter norm reductions and ~580 launches each of isfinite/abs/ne
kernels inside `engine.step` (67.5 ms in all).

`install(optimizer)` replaces those two methods on one optimizer instance by versions that compute the
same two quantities from `torch._foreach_norm` (a handful of multi-tensor launches; each tensor's norm
accumulated in fp32, the sum over tensors in fp64):

    non-finite   sum_i ||g_i||^2 is not finite   (a NaN or inf element makes its tensor's norm NaN or inf)
    grad norm    sqrt(sum_i ||g_i||^2), over the same tensors as DeepSpeed (padding, pipeline-replicated
                 and model-parallel duplicates left out) and all-reduced over the same groups

Everything around them stays DeepSpeed's: the all-reduce of the non-finite flag over the data-parallel
group, skipping the step (`engine.was_step_applied()`), clipping. One difference, documented: a finite
gradient element above ~1.8e19 in magnitude squares to inf in fp32 and counts as non-finite (DeepSpeed's
fp64 norm would accept it; a gradient that large has already ruined the run).

Switch: `train.fused_grad_checks` in the training config. Other optimizers (ZeRO-3, ZeRO-0's bf16
optimizer, CPU offload) are left alone, and `install` says why.
"""
from __future__ import annotations

import types
from typing import List, Optional

import torch


def _sum_of_squares(grads: List[torch.Tensor], device) -> torch.Tensor:
    """sum_i ||g_i||_2^2 as a 0-dim float32 tensor on `device` (per-tensor fp32 norms, fp64 sum)."""
    grads = [g for g in grads if g is not None and g.numel() > 0]
    if not grads:
        return torch.zeros((), dtype=torch.float32, device=device)
    try:
        norms = torch._foreach_norm(grads, 2, dtype=torch.float32)
    except TypeError:  # torch without the dtype argument
        norms = [n.float() for n in torch._foreach_norm(grads, 2)]
    return torch.stack(norms).double().square().sum().float()


def _partition_grads(opt) -> List[torch.Tensor]:
    out = []
    for i in range(len(opt.bit16_groups)):
        group = opt.averaged_gradients.get(i) if isinstance(opt.averaged_gradients, dict) else \
            opt.averaged_gradients[i]
        if group is None:
            continue
        out.extend([group] if isinstance(group, torch.Tensor) else [g for g in group if g is not None])
    return out


def _has_overflow_partitioned_grads(self) -> torch.Tensor:
    """Replaces DeepSpeedZeroOptimizer.has_overflow_partitioned_grads_serial: a (1,) bool tensor."""
    from deepspeed.accelerator import get_accelerator

    device = get_accelerator().current_device_name()
    total = _sum_of_squares(_partition_grads(self), device)
    return (~torch.isfinite(total)).reshape(1)


def _grad_norm_direct(self, gradients, params, norm_type=2):
    """Replaces DeepSpeedZeroOptimizer.get_grad_norm_direct for the L2 norm (others: DeepSpeed's own)."""
    if float(norm_type) != 2.0:
        return self._fastdit_orig_grad_norm_direct(gradients, params, norm_type)
    from deepspeed import comm as dist
    from deepspeed.runtime.constants import PIPE_REPLICATED
    from deepspeed.runtime.utils import is_model_parallel_parameter, mask_nan_or_inf_with_val_inplace
    from deepspeed.accelerator import get_accelerator

    chosen = []
    for g, p in zip((g for g in gradients if not getattr(g, "_zero_padding", False)), params):
        if hasattr(p, PIPE_REPLICATED) and p.ds_pipe_replicated:
            continue  # pipeline parallelism may replicate parameters: count them once
        if is_model_parallel_parameter(p) or self.model_parallel_rank == 0:
            chosen.append(g)
    total = _sum_of_squares(chosen, get_accelerator().current_device_name())
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.dp_process_group)
    self._model_parallel_all_reduce(tensor=total, op=dist.ReduceOp.SUM)
    total = total.sqrt()
    mask_nan_or_inf_with_val_inplace(total, device=self.device)
    return total


def install(optimizer) -> Optional[str]:
    """Swap in the multi-tensor checks on a DeepSpeedZeroOptimizer (ZeRO-1/2). Returns None when installed,
    else the reason it was not (the optimizer keeps DeepSpeed's own checks)."""
    name = type(optimizer).__name__
    if name != "DeepSpeedZeroOptimizer":
        return f"{name} is not DeepSpeed's ZeRO-1/2 optimizer (only that one has these per-tensor checks)"
    needed = ("has_overflow_partitioned_grads_serial", "get_grad_norm_direct", "averaged_gradients",
              "bit16_groups", "dp_process_group", "model_parallel_rank", "_model_parallel_all_reduce")
    missing = [a for a in needed if not hasattr(optimizer, a)]
    if missing:
        return f"this DeepSpeed's ZeRO optimizer lacks {missing} (the checks were written for DeepSpeed 0.19)"
    if getattr(optimizer, "cpu_offload", False):
        return "CPU offload computes its norms on the host"
    optimizer._fastdit_orig_grad_norm_direct = optimizer.get_grad_norm_direct
    optimizer.has_overflow_partitioned_grads_serial = types.MethodType(_has_overflow_partitioned_grads, optimizer)
    optimizer.get_grad_norm_direct = types.MethodType(_grad_norm_direct, optimizer)
    return None
