"""Models built only to be filled by a strict load of every weight, without the initialisation the load
would overwrite. DiT-XL/2, build and strict load on a 2-core CPU: 4.1 s the usual way, 0.2 s this way
(benchmarks/build_for_loading.py; benchmarks/results/cpu-2026-11-27-a7c4068/).

    model = for_loading(lambda: build_dit("fast", **kwargs), device)
    model.load_state_dict(sd)   # strict, every entry: the model's storage is uninitialised until then

The module is built on the meta device and given empty storage on `device`. That is exact only when every
tensor the module holds is in its state dict; a module with a non-persistent buffer or a plain tensor
attribute (none of this project's models has one; `hidden_tensors` says) is built and initialised as usual.
"""
from __future__ import annotations

from typing import Callable, List

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode


def hidden_tensors(module: nn.Module) -> List[str]:
    """Tensors `module` holds outside its state dict: non-persistent buffers and plain tensor attributes."""
    found = []
    for name, m in module.named_modules():
        prefix = f"{name}." if name else ""
        found += [prefix + k for k in getattr(m, "_non_persistent_buffers_set", ())]
        found += [prefix + k for k, v in vars(m).items() if isinstance(v, torch.Tensor)]
    return found


class _SkipInitOnMeta(TorchFunctionMode):
    """Filling a meta tensor does nothing, but Tensor.normal_'s meta kernel is a Python decomposition that imports
    torch._dynamo on its first call in a process (1-3 s measured here). Skip it, and every torch.nn.init function
    (they reach normal_ from inside, where this mode no longer sees the call), on meta tensors only."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.normal_ or getattr(func, "__module__", None) == "torch.nn.init":
            t = args[0] if args else kwargs.get("tensor")  # torch.nn.init passes its tensor by keyword
            if isinstance(t, torch.Tensor) and t.is_meta:
                return t
        return func(*args, **kwargs)


def for_loading(build: Callable[[], nn.Module], device) -> nn.Module:
    """`build()`'s module on `device`, its parameters and buffers uninitialised: load every one next (strict)."""
    with torch.device("meta"), _SkipInitOnMeta():
        module = build()
    if hidden_tensors(module):
        return build().to(device)
    # Module.to_empty would do this with empty_like, whose meta-to-device path runs through torch._refs and
    # imports sympy on its first call in a process (0.6-1.9 s measured here); torch.empty_strided (same
    # sizes and strides) does not.
    device = torch.device(device)
    return module._apply(lambda t: torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device=device))
