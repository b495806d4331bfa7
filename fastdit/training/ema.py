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
from typing import Dict, Iterable, List, Optional

import torch
import torch.distributed as tdist
import torch.nn as nn

from fastdit import dist


# Every this many updates the EMA walks the whole model again: the same Parameter objects, every flat group's
# masters where they were (in between, one piece per flat group is checked).
FULL_CHECK_EVERY = 100


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

    def __init__(self, module: nn.Module, decay: float, one_pass: bool = False, flat: bool = False):
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
        # The parameters, walked once: every update needs them, and module.named_parameters() walks the module
        # tree each time (~290 parameters in DiT-XL/2: milliseconds of host time per step). DeepSpeed and the
        # training loop keep the Parameter objects (they move or re-point .data); a full walk every
        # FULL_CHECK_EVERY updates checks that, and a replaced parameter is an error.
        self._params: List[nn.Parameter] = [p for _, p in module.named_parameters()]
        sources = []
        for name, p in module.named_parameters():
            (shape, numel, start, length, sharded), src = _local_source(p)
            self.pieces.append(_Piece(name, torch.Size(shape), numel, start, length, sharded))
            sources.append(src)
            value = src.float().clone() if src is not None else torch.zeros(0)
            self.shadow.append(value)
        # flat: pieces whose fp32 masters are views of one buffer (DeepSpeed's flat fp32 partition under
        # ZeRO-1/2) get their shadows as views of one flat fp32 buffer, so an update is one lerp per buffer
        # instead of a multi-tensor pass over ~300 tensors (the same elementwise arithmetic).
        self.flat: List[_FlatGroup] = _flat_groups(self.shadow, sources) if flat else []
        self._flat_members = {i for g in self.flat for i in g.members}
        self._updates = 0

    # ------------------------------------------------------------------------------------------
    def _check_params(self) -> None:
        """The module still holds the Parameter objects the EMA was built on (in the same order)."""
        now = [p for _, p in self.module.named_parameters()]
        if len(now) != len(self._params) or any(a is not b for a, b in zip(now, self._params)):
            raise RuntimeError("the model's parameters were replaced since the EMA was built (not moved in place); "
                               "the EMA cannot follow them: build it again from the model")

    def _sources(self, skip_flat: bool = False) -> List[Optional[torch.Tensor]]:
        """This rank's current master of each piece (None for pieces of flat groups when skip_flat)."""
        out = []
        for i, (p, piece) in enumerate(zip(self._params, self.pieces)):
            if skip_flat and i in self._flat_members:
                out.append(None)        # updated through its flat group; checked by _check_flat
                continue
            (_, _, start, length, _), src = _local_source(p)
            if (start, length) != (piece.start, piece.length):
                raise RuntimeError(f"the partition of {piece.name} moved ({piece.start}+{piece.length} -> "
                                   f"{start}+{length}); the EMA cannot follow a re-partitioned model")
            out.append(src)
        return out

    def _check_flat(self, full: bool) -> None:
        """The masters behind each flat group are still where they were: every piece when `full`, else
        the first piece of each group (DeepSpeed does not move its partition during training)."""
        params = self._params
        for g in self.flat:
            for i in (g.members if full else g.members[:1]):
                _, src = _local_source(params[i])
                if src is None or not _same_place(src, g.source, g.offsets[i]):
                    raise RuntimeError(f"the fp32 master of {self.pieces[i].name} moved since the EMA was "
                                       f"built; the EMA cannot follow a re-partitioned model")

    def flat_segment(self, tensor: torch.Tensor):
        """(group index, EMA buffer, lo, hi) when a flat group's masters are tensor[lo:hi] of this 1-D
        contiguous tensor (e.g. DeepSpeed's fp32 partition), for an optimizer step that updates the EMA
        itself (then `update(done=[group index])`); None when no flat group lies in it."""
        if tensor.dim() != 1 or not tensor.is_contiguous():
            return None
        for k, g in enumerate(self.flat):
            if g.source.untyped_storage().data_ptr() != tensor.untyped_storage().data_ptr():
                continue
            lo = g.source.storage_offset() - tensor.storage_offset()
            hi = lo + g.source.numel()
            if 0 <= lo <= hi <= tensor.numel():
                return k, g.buffer, lo, hi
        return None

    @torch.no_grad()
    def update(self, decay: Optional[float] = None, done: Iterable[int] = ()) -> None:
        """ema = decay * ema + (1 - decay) * master, on this rank's pieces (the official formula).

        done: flat groups (indices from flat_segment) the caller has already updated with this decay."""
        d = self.decay if decay is None else float(decay)
        self._updates += 1
        if self._updates % FULL_CHECK_EVERY == 1:
            self._check_params()
        emas, srcs = [], []
        if self.flat:
            self._check_flat(full=self._updates % FULL_CHECK_EVERY == 1)
            skip = set(done)
            for k, g in enumerate(self.flat):
                if k not in skip:
                    emas.append(g.buffer)
                    srcs.append(g.source)
        for ema, src in zip(self.shadow, self._sources(skip_flat=True)):
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


@dataclass
class _FlatGroup:
    source: torch.Tensor          # 1-D view of the masters' buffer spanning every member piece
    buffer: torch.Tensor          # fp32 EMA of `source`, element for element
    members: List[int]            # indices of the pieces whose shadows are views of `buffer`
    offsets: Dict[int, int]       # piece index -> its offset inside `source`


def _same_place(src: torch.Tensor, base: torch.Tensor, offset: int) -> bool:
    return (src.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()
            and src.storage_offset() == base.storage_offset() + offset)


def _flat_groups(shadow: List[torch.Tensor], sources: List[Optional[torch.Tensor]]) -> List[_FlatGroup]:
    """Group the fp32 contiguous 1-D sources by the buffer (storage) they view. Each group of two or more
    non-overlapping pieces gets one fp32 EMA buffer over the span of its pieces (gaps between them, e.g.
    DeepSpeed's alignment padding, are averaged too and never read), and those pieces' shadows become
    views of it, holding the values they had."""
    by_storage: Dict[int, List[int]] = {}
    for i, src in enumerate(sources):
        if (src is not None and src.numel() and src.dtype == torch.float32 and src.dim() == 1
                and src.is_contiguous()):
            by_storage.setdefault(src.untyped_storage().data_ptr(), []).append(i)
    groups = []
    for members in by_storage.values():
        spans = sorted((sources[i].storage_offset(), sources[i].numel()) for i in members)
        if len(members) < 2 or any(a + n > b for (a, n), (b, _) in zip(spans, spans[1:])):
            continue
        lo, hi = spans[0][0], max(a + n for a, n in spans)
        source = sources[members[0]].as_strided((hi - lo,), (1,), lo)
        buffer = source.detach().clone()
        offsets = {}
        for i in members:
            offsets[i] = sources[i].storage_offset() - lo
            view = buffer.narrow(0, offsets[i], sources[i].numel())
            view.copy_(shadow[i])
            shadow[i] = view
        groups.append(_FlatGroup(source, buffer, members, offsets))
    return groups


def _comm_device(dev: torch.device) -> torch.device:
    """Device for collectives: the shard's device, or CUDA when the backend is NCCL."""
    if dist.is_initialized() and tdist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return dev
