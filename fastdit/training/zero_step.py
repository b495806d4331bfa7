"""DeepSpeed's ZeRO-1/2 bf16 optimizer step with the AdamW update, the parameter copy and the EMA fused.

What DeepSpeed's `DeepSpeedZeroOptimizer.step` does per parameter group after its gradient checks, and
what it cost on one H100 for DiT-XL/2 (675M parameters; trace of commit 5843182, optimizer phase 17.3 ms):

    flatten the rank's bf16 gradient views into one buffer (torch.cat)        1.1 ms
    .to(float32) of that buffer                                               2.2 ms
    torch's fused AdamW over the fp32 master partition                        7.2 ms
    copy the fp32 masters into the bf16 parameter partition                   1.3 ms
    (then, in the training loop, the EMA reads the fp32 masters again)        3.0 ms

`install(optimizer, ema)` replaces `step` on one optimizer instance by a version that, per group, reads the
bf16 gradient partition where it is: as a view when its tensors lie end to end in parameter order (ZeRO-1),
through segment tables when they fill one buffer in another order (ZeRO-2: the order the backward hooks
fired), else from DeepSpeed's own flatten; and runs one kernel (`fastdit.kernels.adamw.adamw_step_`: read
g bf16, p/m/v fp32; write p/m/v, the bf16 parameter and the EMA) - predicted ~9 ms instead of the ~15 ms
above. Everything else is DeepSpeed's, in
DeepSpeed's order: the overflow check and the gradient norm (the multi-tensor ones of zero_checks when
installed), the loss-scale update, freeing the gradients, the all-gather of the updated partitions and
the re-pointing of the model's parameters.

Kept as DeepSpeed's own step (the fused path runs only when every condition holds, checked each step):
* a step whose gradients are not finite (DeepSpeed's skip path, which checks again and then skips);
* the first step, and any step where the AdamW state is not there yet (torch creates the state, so
  checkpoints keep torch's exact layout); from the next step on the state is updated in place;
* CPU offload, ZeRO-3, gradient clipping, fp16 loss scaling, MoE, Muon/ZenFlow, torch autocast,
  amsgrad/maximize, an fp32 gradient accumulation buffer, or a base optimizer other than torch's
  Adam/AdamW (Adam only with weight_decay 0, where the two agree).

The update is torch.optim.AdamW's, in fp32, with the bias corrections computed in float64 on the host
from the optimizer's own `step` count (which is incremented in place, as torch does). On CUDA it runs
the Triton kernel; elsewhere (CPU runs, tests) the same update in PyTorch ops.

Switch: `train.fused_optimizer_step` (default off; on in the bf16 ZeRO-1/2 configs since an H100 run measured
it: the real step 234.7 -> 227.8 ms for DiT-XL/2 at batch 128, the optimizer phase 10.4 ms with the EMA inside;
benchmarks/results/h100-2026-11-27-570862f).

`train.fused_step_deferred_check` (default off, unmeasured; `install(..., deferred_check=True)`): the step above
waits for the gradients' sum of squares (`.item()`, the one host sync) before it queues the update, so the GPU
idles while the host works from that sync to the kernel's launch (DeepSpeed's and this module's Python per
step). Deferred, the sum is copied to pinned host memory behind an event, the update is queued at once with the
sum as the kernel's gate (`adamw_step_(gate=...)`: the kernel loads and writes nothing when it is not finite),
and the host then waits for that copy only. A finite sum: the rest of the step as above (the loss-scale update,
the gradient norm, freeing the gradients, the step count, the all-gather, the EMA's other pieces). Not finite:
nothing was written, the gradients are still there, and DeepSpeed's own step runs its skip path, as without the
switch. The same updates bit for bit (tests/test_training_zero_step.py).
"""
from __future__ import annotations

import math
import types
from typing import List, Optional

import torch

_SUPPORTED_DS = (0, 19)     # the DeepSpeed minor version whose step() this mirrors


def _eligible(opt) -> Optional[str]:
    """None when the fused step applies to this optimizer's configuration, else why not."""
    if getattr(opt, "cpu_offload", False):
        return "CPU offload runs the optimizer on the host"
    if getattr(opt, "zenflow", False) or getattr(opt, "torch_autocast_gradscaler", None) is not None:
        return "ZenFlow / torch autocast steps are DeepSpeed's own"
    if getattr(opt, "has_moe_layers", False):
        return "MoE expert groups average their norms differently"
    if opt.dtype != torch.bfloat16:
        return (f"the model dtype is {opt.dtype}: the fused step is for bf16 training (fp16 needs loss "
                f"scaling, fp32 has no low-precision copy to write)")
    if getattr(opt, "gradient_accumulation_dtype", opt.dtype) != opt.dtype:
        return "gradients accumulate in a separate fp32 buffer (data_types.grad_accum_dtype)"
    if float(getattr(opt, "clip_grad", 0.0) or 0.0) != 0.0:
        return "gradient clipping is on (gradient_clipping > 0)"
    base = opt.optimizer
    if type(base) not in (torch.optim.AdamW, torch.optim.Adam):
        return f"the base optimizer is {type(base).__name__}, not torch.optim.AdamW/Adam"
    for i, group in enumerate(base.param_groups):
        if len(group["params"]) != 1:
            return f"param group {i} holds {len(group['params'])} tensors, not one flat partition"
        if group.get("amsgrad") or group.get("maximize") or group.get("differentiable"):
            return "amsgrad / maximize / differentiable AdamW"
        if isinstance(group["lr"], torch.Tensor) or isinstance(group.get("betas", (0,))[0], torch.Tensor):
            return "tensor learning rates / betas"
        if type(base) is torch.optim.Adam and group.get("weight_decay", 0.0):
            return "Adam with weight decay (L2 in the gradient, not AdamW's decoupled decay)"
    return None


def _flat_view(tensors: List[torch.Tensor], numel: int) -> Optional[torch.Tensor]:
    """One 1-D view of `tensors` when they are contiguous, of one dtype, and lie end to end in one
    storage, covering exactly `numel` elements; else None."""
    if not tensors:
        return None
    first = tensors[0]
    size = first.element_size()
    ptr = first.data_ptr()
    total = 0
    for t in tensors:
        if (t.dtype != first.dtype or not t.is_contiguous() or t.device != first.device
                or t.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
                or t.data_ptr() != ptr):
            return None
        ptr += t.numel() * size
        total += t.numel()
    if total != numel:
        return None
    return first.as_strided((numel,), (1,), first.storage_offset())


def _tiled_view(tensors: List[torch.Tensor]) -> Optional[torch.Tensor]:
    """One 1-D view of the buffer region `tensors` fill exactly, in any order (contiguous, one dtype, one
    storage, no gaps or overlaps), e.g. ZeRO-2's gradients, which lie in the order the backward hooks
    fired; else None."""
    if not tensors:
        return None
    first = tensors[0]
    storage = first.untyped_storage().data_ptr()
    if any(t.dtype != first.dtype or not t.is_contiguous() or t.untyped_storage().data_ptr() != storage
           for t in tensors):
        return None
    spans = sorted((t.storage_offset(), t.numel()) for t in tensors)
    if any(a + n != b for (a, n), (b, _) in zip(spans, spans[1:])):
        return None
    start, end = spans[0][0], spans[-1][0] + spans[-1][1]
    return first.as_strided((end - start,), (1,), start)


class FusedZeroStep:
    """State of the fused step on one optimizer (host copy of each group's step count, the EMA)."""

    def __init__(self, optimizer, ema=None, deferred_check: bool = False):
        self.optimizer = optimizer
        self.ema = ema
        self.deferred_check = bool(deferred_check)
        self.deferred_steps = 0         # fused steps whose update was queued before the host read the check
        self.deferred_skips = 0         # steps the gate skipped on the device (then DeepSpeed's skip path ran)
        self._host_sum = None           # (1,) fp32 host copy of the sum of squares (pinned on CUDA)
        self.orig_step = optimizer.step
        self.fused_steps = 0            # steps taken by the fused path (tests, logs)
        self.ema_updated = False        # whether the last step() also updated the EMA (all of it)
        self.flat_views = 0             # groups whose gradient partition was used as a view (no copy)
        self.flat_copies = 0            # groups flattened by DeepSpeed's copy
        self.flat_segments = 0          # groups read in place from a buffer in another order (segment tables)
        self._segment_cache = {}        # group -> (layout key, buffer offset, GradSegments), None: not tiled
        self.segment_builds = 0         # layouts examined (once per group, unless the layout changes)
        self.norm_passes = {"flat": 0, "per-tensor": 0}   # how the one-pass checks summed the squares
        from deepspeed.runtime.constants import PIPE_REPLICATED
        from deepspeed.runtime.utils import is_model_parallel_parameter
        self.parallel_model = any(hasattr(p, PIPE_REPLICATED) or is_model_parallel_parameter(p)
                                  for group in optimizer.bit16_groups for p in group)
        # group index -> (torch's step tensor, its value): the count is read from the device once, and
        # again whenever the tensor object changes (a state loaded from a checkpoint); holding the
        # tensor keeps its identity from being reused
        self._steps = {}

    def _deepspeed_step(self, closure=None):
        """DeepSpeed's own step (its skip path, or a step the fused one does not take). It may step torch's
        counters in place, so the cached counts are dropped: the next fused step reads them from the device."""
        self._steps.clear()
        return self.orig_step(closure) if closure is not None else self.orig_step()

    def _next_step(self, i: int, state_step: torch.Tensor) -> int:
        """The step count after this update for group i; increments torch's counter in place."""
        count = self._step_count(i, state_step)
        self._commit_step(i, state_step, count)
        return count + 1

    def _step_count(self, i: int, state_step: torch.Tensor) -> int:
        """Group i's step count before this update (read from the device only when its tensor is new)."""
        held = self._steps.get(i)
        return held[1] if held is not None and held[0] is state_step else int(state_step.item())

    def _commit_step(self, i: int, state_step: torch.Tensor, count: int) -> None:
        state_step.add_(1)
        self._steps[i] = (state_step, count + 1)

    def _segments(self, i: int, grads, size: int, device):
        """(buffer, GradSegments) when the group's gradient tensors (in partition order) fill one buffer
        exactly in some other order, e.g. ZeRO-2's, which holds them in the order the backward hooks
        fired: the kernel reads them there instead of from a concatenated copy. Else (None, None).
        The layout does not change between steps: after the first, one pass over the tensors compares
        it with the cached one (this runs after the overflow check's sync, while the GPU waits)."""
        from fastdit.kernels.adamw import GradSegments

        grads = [t for t in grads if t is not None]
        if not grads:
            return None, None
        # The key is the layout inside the storage, not the storage's address: DeepSpeed may hand a new
        # buffer each step (seen on CPU under ZeRO-2), with the same layout and the same tables.
        storage = grads[0].untyped_storage().data_ptr()
        key = tuple((t.untyped_storage().data_ptr() == storage, t.storage_offset(), t.numel(), t.dtype,
                     t.is_contiguous(), getattr(t, "_zero_padding", False)) for t in grads)
        cached = self._segment_cache.get(i)
        if cached is None or cached[0] != key:
            self.segment_builds += 1
            buf = None if any(k[5] for k in key) else _tiled_view(grads)   # padding lies outside the buffer
            if buf is None or buf.numel() != size:
                cached = (key, None, None)
            else:
                lengths = [t.numel() for t in grads]
                offsets = [t.storage_offset() - buf.storage_offset() for t in grads]
                starts = [sum(lengths[:k]) for k in range(len(lengths))]
                cached = (key, buf.storage_offset(), GradSegments(starts, offsets, lengths, buf.numel(), device))
            self._segment_cache[i] = cached
        if cached[2] is None:
            return None, None
        # a fresh view each step: the cache holds no tensor, so it never keeps an old gradient buffer alive
        return grads[0].as_strided((size,), (1,), cached[1]), cached[2]

    def _ready(self) -> bool:
        base = self.optimizer.optimizer
        for group in base.param_groups:
            st = base.state.get(group["params"][0])
            if not st or "exp_avg" not in st or "exp_avg_sq" not in st or "step" not in st:
                return False
        return _eligible(self.optimizer) is None

    def _one_pass_checks(self, opt):
        """(non-finite, norm) from one sum of squares of the rank's gradients, one all-reduce and one host
        sync, where DeepSpeed computes the same two things in two passes with two collectives: the
        overflow flag (any non-finite element on any rank) and the global L2 norm. None (DeepSpeed's, or
        zero_checks', two passes run) unless both are wanted and the run is data-parallel only: model- or
        pipeline-parallel runs count some gradients once per group, which the one sum does not."""
        total = self._global_sum_of_squares(opt)
        if total is None:
            return None
        if not math.isfinite(float(total.item())):  # the one host sync (DeepSpeed's overflow check has it)
            return True, None
        return False, total.sqrt().reshape(())

    def _global_sum_of_squares(self, opt) -> Optional[torch.Tensor]:
        """The one-pass checks' sum of squares over every rank's gradients, all-reduced, as a (1,) fp32 tensor
        on the device (no host sync), or None where the one-pass checks do not apply (_one_pass_checks)."""
        from deepspeed import comm as dist
        from deepspeed.comm import pg_utils

        if not (opt.check_grad_overflow and opt.compute_grad_norm) or self.parallel_model:
            return None
        if pg_utils.is_parallel(getattr(opt, "model_parallel_group", None)):
            return None
        grads = []
        for i in range(len(opt.bit16_groups)):
            group = opt.averaged_gradients.get(i) if isinstance(opt.averaged_gradients, dict) else \
                opt.averaged_gradients[i]
            if group is not None:
                grads.extend(t for t in group if t is not None and t.numel()
                             and not getattr(t, "_zero_padding", False))    # padding: zeros
        device = opt.single_partition_of_fp32_groups[0].device
        tiled = _tiled_view(grads)
        from fastdit.training.zero_checks import _sum_of_squares
        if tiled is not None:                       # one reduction over the buffer the gradients fill
            self.norm_passes["flat"] += 1
            total = _sum_of_squares([tiled], device)   # the multi-tensor norm: bf16 read, fp32 accumulated
        else:
            self.norm_passes["per-tensor"] += 1
            total = _sum_of_squares(grads, device)
        total = total.reshape(1)
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=opt.dp_process_group)
        return total

    def step(self, closure=None):
        self.ema_updated = False
        if closure is not None or not self._ready():
            return self._deepspeed_step(closure)
        return self._fused(self.optimizer)

    def _fused(self, opt):
        import deepspeed.runtime.zero.stage_1_and_2 as s12

        opt.micro_step_id = s12.INITIAL_MICRO_STEP_ID
        if not opt.compute_grad_norm:
            opt._global_grad_norm = None
        opt.overflow = False
        if self.deferred_check:
            total = self._global_sum_of_squares(opt)
            if total is not None:
                return self._fused_deferred(opt, total)
        checked = self._one_pass_checks(opt)
        if checked is not None:
            bad, norm = checked
            if bad:
                return self._deepspeed_step()             # DeepSpeed's skip path (it checks again: same verdict)
        else:
            if opt.check_grad_overflow:
                opt.check_overflow(partition_gradients=opt.partition_gradients)
            if opt.overflow:
                return self._deepspeed_step()
            norm = None
            if opt.compute_grad_norm:
                norm = opt.scaled_global_norm()
                if s12.is_invalid_grad_norm(norm):
                    return self._deepspeed_step()         # its norm check turns this into a skipped step
        self._commit_scale(opt, norm)

        done = []
        for i in range(len(opt.bit16_groups)):
            opt.free_grad_in_param_list(opt.params_not_in_partition[i])
            grad, segments = self._group_grad(opt, i)
            self._free_group_grads(opt, i, not_in_partition=False)
            state = opt.optimizer.state[opt.optimizer.param_groups[i]["params"][0]]
            step = self._next_step(i, state["step"])
            seg = self._launch(opt, i, grad, segments, step)
            if seg is not None:
                done.append(seg)
            del grad
        self._finish(opt, done)

    def _fused_deferred(self, opt, total: torch.Tensor):
        """train.fused_step_deferred_check: the update queued with `total` (the all-reduced sum of squares) as
        the kernel's gate before the host reads it; see the module docstring."""
        event = self._copy_to_host(total)
        done, counts = [], []
        for i in range(len(opt.bit16_groups)):
            grad, segments = self._group_grad(opt, i)
            state_step = opt.optimizer.state[opt.optimizer.param_groups[i]["params"][0]]["step"]
            count = self._step_count(i, state_step)
            counts.append((state_step, count))
            seg = self._launch(opt, i, grad, segments, count + 1, gate=total)
            if seg is not None:
                done.append(seg)
            del grad
        if event is not None:
            event.synchronize()                     # the sum's copy only: the update keeps the GPU busy
        if not math.isfinite(float(self._host_sum[0])):
            self.deferred_skips += 1
            return self._deepspeed_step()                 # nothing was written: DeepSpeed's skip path (it checks again)
        self._commit_scale(opt, total.sqrt().reshape(()))
        for i, (state_step, count) in enumerate(counts):
            self._free_group_grads(opt, i, not_in_partition=True)
            self._commit_step(i, state_step, count)
        self.deferred_steps += 1
        self._finish(opt, done)

    @staticmethod
    def _commit_scale(opt, norm: Optional[torch.Tensor]) -> None:
        """An applied step's bookkeeping before the update, as DeepSpeed's step does it: the loss scale's
        update (no overflow), the Muon momentum's commit where the optimizer has one, and the gradient norm
        (unscaled; left as it is when `norm` is None)."""
        prev_scale = opt.loss_scale
        opt._update_scale(False)
        if hasattr(opt, "_commit_muon_momentum"):
            opt._commit_muon_momentum()
        if norm is not None:
            opt._global_grad_norm = norm / prev_scale

    def _copy_to_host(self, total: torch.Tensor):
        """Start copying the (1,) sum to host memory; the CUDA event to wait on (None on CPU: copied)."""
        if not total.is_cuda:
            self._host_sum = total.detach().reshape(1).to(torch.float32).clone()
            return None
        if self._host_sum is None:
            self._host_sum = torch.empty(1, dtype=torch.float32, pin_memory=True)
        self._host_sum.copy_(total.detach().reshape(1), non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(total.device))   # the stream the copy was queued on
        return event

    def _group_grad(self, opt, i: int):
        """Group i's bf16 gradient partition as (tensor, GradSegments or None): DeepSpeed's preflattened
        partition, a view of its tensors (ZeRO-1), the buffer they fill read through segment tables (ZeRO-2), or
        DeepSpeed's flatten (a copy). Frees nothing."""
        from deepspeed import comm as dist

        master = opt.single_partition_of_fp32_groups[i]
        size = int(opt.partition_size[i])
        grad = opt._get_preflattened_grad_partition(i) if hasattr(opt, "_get_preflattened_grad_partition") \
            else None
        segments = None
        if grad is None:
            grad = _flat_view(opt.averaged_gradients[i], size)
            self.flat_views += grad is not None
        if grad is None:
            grad, segments = self._segments(i, opt.averaged_gradients[i], size, master.device)
            self.flat_segments += grad is not None
        if grad is None:                            # DeepSpeed's own flatten (a copy)
            self.flat_copies += 1
            partition_id = dist.get_rank(group=opt.real_dp_process_group[i])
            if partition_id == dist.get_world_size(group=opt.real_dp_process_group[i]) - 1:
                grad = opt.flatten_dense_tensors_aligned(opt.averaged_gradients[i], size)
            else:
                grad = opt.flatten(opt.averaged_gradients[i])
        return grad, segments

    @staticmethod
    def _free_group_grads(opt, i: int, not_in_partition: bool) -> None:
        """Release group i's gradients as DeepSpeed's step does (those outside the rank's partition too when
        `not_in_partition`)."""
        if not_in_partition:
            opt.free_grad_in_param_list(opt.params_not_in_partition[i])
        opt.free_grad_in_param_list(opt.params_in_partition[i])
        if hasattr(opt, "_release_preflattened_grad_buffers"):
            opt._release_preflattened_grad_buffers(i)
        opt.averaged_gradients[i] = None
        if hasattr(opt, "all_grad_tensors"):
            opt.all_grad_tensors[i] = None

    def _launch(self, opt, i: int, grad, segments, step: int, gate: Optional[torch.Tensor] = None):
        """Queue group i's update (AdamW, the bf16 copy, its EMA groups) with step count `step`; the EMA's flat
        group index it updated, or None."""
        from deepspeed import comm as dist

        base = opt.optimizer
        group = base.param_groups[i]
        state = base.state[group["params"][0]]
        master = opt.single_partition_of_fp32_groups[i]
        partition_id = dist.get_rank(group=opt.real_dp_process_group[i])
        seg = self.ema.flat_segment(master) if self.ema is not None else None
        beta1, beta2 = group["betas"]
        kwargs = dict(lr=float(group["lr"]), beta1=float(beta1), beta2=float(beta2), eps=float(group["eps"]),
                      weight_decay=float(group.get("weight_decay", 0.0)), step=step,
                      lp=opt.parallel_partitioned_bit16_groups[i][partition_id],
                      ema=seg[1] if seg else None,
                      ema_weight=1.0 - self.ema.decay if seg else 0.0,
                      ema_range=seg[2:] if seg else None, segments=segments)
        if gate is not None:
            kwargs["gate"] = gate
        _update(master, grad, state["exp_avg"], state["exp_avg_sq"], **kwargs)
        return seg[0] if seg is not None else None

    def _finish(self, opt, done: List[int]) -> None:
        """After the updates: the all-gather of the partitions, the model's bf16 parameters, the EMA's other
        pieces."""
        import deepspeed.runtime.zero.stage_1_and_2 as s12

        s12.all_gather_dp_groups(groups_flat=opt.bit16_groups_flat,
                                 partitioned_param_groups=opt.parallel_partitioned_bit16_groups,
                                 dp_process_group=opt.real_dp_process_group,
                                 start_alignment_factor=opt.nccl_start_alignment_factor,
                                 allgather_bucket_size=opt.allgather_bucket_size)
        for i in range(len(opt.bit16_groups)):
            opt._update_model_bit16_weights(i)
        if self.ema is not None:
            self.ema.update(done=done)              # pieces outside the partitions (frozen parameters)
            self.ema_updated = True
        self.fused_steps += 1


def _update(master, grad, exp_avg, exp_avg_sq, **kwargs) -> None:
    """The AdamW update: the Triton kernel on CUDA, PyTorch ops elsewhere."""
    from fastdit.kernels import adamw
    if master.is_cuda:
        adamw.adamw_step_(master, grad, exp_avg, exp_avg_sq, **kwargs)
    else:
        adamw.adamw_step_ref_(master, grad, exp_avg, exp_avg_sq, **kwargs)


def install(optimizer, ema=None, deferred_check: bool = False) -> Optional[str]:
    """Put the fused step on a DeepSpeedZeroOptimizer (ZeRO-1/2). `ema`: a ShardedEMA built with
    flat=True whose groups the step updates with the parameters (the Trainer then skips its own update
    when `optimizer.fastdit_fused_step.ema_updated`). `deferred_check`: queue the update before the host
    reads the non-finite check (train.fused_step_deferred_check; module docstring). Returns None when
    installed, else why not (the optimizer keeps DeepSpeed's step)."""
    name = type(optimizer).__name__
    if name != "DeepSpeedZeroOptimizer":
        return f"{name} is not DeepSpeed's ZeRO-1/2 optimizer"
    try:
        import deepspeed
        ds = tuple(int(x) for x in deepspeed.__version__.split(".")[:2])
    except (ImportError, ValueError):
        return "the DeepSpeed version cannot be read"
    if ds != _SUPPORTED_DS:
        return (f"DeepSpeed {deepspeed.__version__}: the fused step mirrors the step() of DeepSpeed "
                f"{_SUPPORTED_DS[0]}.{_SUPPORTED_DS[1]}")
    needed = ("bit16_groups", "averaged_gradients", "single_partition_of_fp32_groups", "partition_size",
              "parallel_partitioned_bit16_groups", "params_in_partition", "params_not_in_partition",
              "real_dp_process_group", "bit16_groups_flat", "nccl_start_alignment_factor",
              "allgather_bucket_size", "check_grad_overflow", "compute_grad_norm", "partition_gradients",
              "free_grad_in_param_list", "flatten_dense_tensors_aligned", "flatten", "_update_model_bit16_weights",
              "scaled_global_norm", "check_overflow", "_update_scale", "loss_scale")
    missing = [a for a in needed if not hasattr(optimizer, a)]
    if missing:
        return f"this DeepSpeed's ZeRO optimizer lacks {missing}"
    why = _eligible(optimizer)
    if why:
        return why
    fused = FusedZeroStep(optimizer, ema, deferred_check)
    optimizer.fastdit_fused_step = fused
    optimizer.step = types.MethodType(lambda self, closure=None: fused.step(closure), optimizer)
    return None
