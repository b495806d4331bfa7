"""Exponential moving average of the weights, in fp32, sharded the way DeepSpeed shards the master weights.

The official DiT keeps `ema = decay * ema + (1 - decay) * param` (decay 0.9999) over every parameter.
Here the average tracks DeepSpeed's fp32 master weights, so it stays exact under bf16 training, and each
rank keeps only the part of each parameter it owns:

* ZeRO-3: the local fp32 partition of each parameter (elements [rank * p, rank * p + p) of the flattened
  tensor, p = the partition size), from `safe_get_local_fp32_param`;
* ZeRO-1/2 and DeepSpeed's bf16 optimizer: the fp32 fragment the rank's optimizer partition holds
  (`param._hp_mapping`, its offset inside the flattened parameter);
* no partitioning (ZeRO-0 in fp32, or frozen parameters such as pos_embed): the whole parameter.

`full_state_dict()` reassembles the official-layout fp32 state dict (a collective: every rank calls
it); `load_full_state_dict()` cuts each rank's pieces out of a full state dict, so a resumed run
restores the average bit for bit, whatever the world size.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.distributed as tdist
import torch.nn as nn

from fastdit import dist


@dataclass
class _Piece:
    name: str
    shape: torch.Size
    numel: int            # elements of the full parameter
    start: int            # offset of this rank's piece in the flattened parameter
    length: int           # elements in this rank's piece (0: the parameter lives on other ranks)
    sharded: bool         # False: every rank holds the whole parameter


def _local_source(param: nn.Parameter):
    """(piece layout without name, 1-D view of this rank's current master values or None)."""
    if hasattr(param, "ds_id"):  # ZeRO-3 partitioned parameter
        part = param.ds_tensor.ds_numel
        start = dist.rank() * part
        length = max(0, min(part, param.ds_numel - start))
        src = None
        if param.requires_grad:
            from deepspeed.utils import safe_get_local_fp32_param
            src = safe_get_local_fp32_param(param)
        if src is None:  # frozen: no fp32 master, the partition itself is the value
            src = param.ds_tensor
        return (param.ds_shape, param.ds_numel, start, length, True), src.reshape(-1)[:length]
    if hasattr(param, "_hp_mapping"):  # ZeRO-1/2 or DeepSpeed's bf16 optimizer
        mapping = param._hp_mapping
        if mapping is None:
            return (param.shape, param.numel(), 0, 0, True), None
        addr = mapping.lp_fragment_address
        return (param.shape, param.numel(), addr.start, addr.numel, True), mapping.hp_fragment.reshape(-1)
    return (param.shape, param.numel(), 0, param.numel(), False), param.detach().reshape(-1)


class ShardedEMA:
    """fp32 EMA of a (possibly DeepSpeed-wrapped) module's parameters; see the module docstring."""

    def __init__(self, module: nn.Module, decay: float, one_pass: bool = False):
        self.module = module
        self.decay = float(decay)
        # one_pass: ema += (1 - decay) * (master - ema) as one torch._foreach_lerp_ (read ema and master, write
        # ema once) instead of _foreach_mul_ then _foreach_add_ (two reads and two writes of ema). The same
        # average up to fp32 rounding (~1e-7 relative per step).
        self.one_pass = bool(one_pass)
        names = [n for n, _ in module.named_parameters()]
        sd_keys = list(module.state_dict().keys())
        if sorted(names) != sorted(sd_keys):
            extra = sorted(set(sd_keys) - set(names))
            raise ValueError(f"EMA expects a model whose state dict holds only parameters; extra: {extra}")
        self.pieces: List[_Piece] = []
        self.shadow: List[torch.Tensor] = []
        for name, p in module.named_parameters():
            (shape, numel, start, length, sharded), src = _local_source(p)
            self.pieces.append(_Piece(name, torch.Size(shape), numel, start, length, sharded))
            value = src.float().clone() if src is not None else torch.zeros(0)
            self.shadow.append(value)

    # ------------------------------------------------------------------------------------------
    def _sources(self) -> List[Optional[torch.Tensor]]:
        out = []
        for (name, p), piece in zip(self.module.named_parameters(), self.pieces):
            (_, _, start, length, _), src = _local_source(p)
            if (start, length) != (piece.start, piece.length):
                raise RuntimeError(f"the partition of {name} moved ({piece.start}+{piece.length} -> "
                                   f"{start}+{length}); the EMA cannot follow a re-partitioned model")
            out.append(src)
        return out

    @torch.no_grad()
    def update(self, decay: Optional[float] = None) -> None:
        """ema = decay * ema + (1 - decay) * master, on this rank's pieces (the official formula)."""
        d = self.decay if decay is None else float(decay)
        emas, srcs = [], []
        for ema, src in zip(self.shadow, self._sources()):
            if src is not None and ema.numel():
                emas.append(ema)
                srcs.append(src.float())
        if emas and self.one_pass:
            torch._foreach_lerp_(emas, srcs, 1.0 - d)
        elif emas:
            torch._foreach_mul_(emas, d)
            torch._foreach_add_(emas, srcs, alpha=1.0 - d)

    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def full_state_dict(self, dst: Optional[int] = None, bucket_elems: int = 64 << 20) -> Dict[str, torch.Tensor]:
        """The whole EMA as an official-layout state dict of fp32 CPU tensors.

        A collective: every rank must call it. dst=None gives the result on every rank; dst=r only on
        rank r (the others get {}). Sharded parameters are summed from disjoint pieces in buckets.
        """
        world, rank = dist.world_size(), dist.rank()
        want = dst is None or dst == rank
        out: Dict[str, torch.Tensor] = {}
        bucket: List[int] = []
        size = 0

        def flush():
            nonlocal bucket, size
            if not bucket:
                return
            dev = next((self.shadow[i].device for i in bucket if self.shadow[i].numel()), torch.device("cpu"))
            dev = _comm_device(dev)
            flat = torch.zeros(size, dtype=torch.float32, device=dev)
            off = 0
            for i in bucket:
                pc = self.pieces[i]
                if pc.length:
                    flat[off + pc.start: off + pc.start + pc.length] = self.shadow[i].to(dev)
                off += pc.numel
            if world > 1:
                if dst is None:
                    tdist.all_reduce(flat, op=tdist.ReduceOp.SUM)
                else:
                    tdist.reduce(flat, dst=dst, op=tdist.ReduceOp.SUM)
            if want:
                off = 0
                flat = flat.cpu()
                for i in bucket:
                    pc = self.pieces[i]
                    out[pc.name] = flat[off: off + pc.numel].view(pc.shape).clone()
                    off += pc.numel
            bucket, size = [], 0

        for i, pc in enumerate(self.pieces):
            if not pc.sharded:
                if want:
                    out[pc.name] = self.shadow[i].view(pc.shape).cpu().clone()
                continue
            bucket.append(i)
            size += pc.numel
            if size >= bucket_elems:
                flush()
        flush()
        if not want:
            return {}
        return {pc.name: out[pc.name] for pc in self.pieces}

    @torch.no_grad()
    def load_full_state_dict(self, state_dict: Dict[str, torch.Tensor]) -> None:
        """Set this rank's pieces from a full official-layout state dict (e.g. a checkpoint's ema.pt)."""
        names = [pc.name for pc in self.pieces]
        missing = sorted(set(names) - set(state_dict))
        extra = sorted(set(state_dict) - set(names))
        if missing or extra:
            raise KeyError(f"EMA state dict does not match the model: missing {missing[:10]}, "
                           f"unexpected {extra[:10]}")
        for pc, ema in zip(self.pieces, self.shadow):
            full = state_dict[pc.name]
            if tuple(full.shape) != tuple(pc.shape):
                raise ValueError(f"EMA {pc.name}: checkpoint shape {tuple(full.shape)} vs model {tuple(pc.shape)}")
            if pc.length:
                ema.copy_(full.reshape(-1)[pc.start: pc.start + pc.length].to(ema))


def _comm_device(dev: torch.device) -> torch.device:
    """Device for collectives: the shard's device, or CUDA when the backend is NCCL."""
    if dist.is_initialized() and tdist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return dev
