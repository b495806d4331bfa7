"""Models built only to be filled by a strict load of every weight, without the initialisation the load
would overwrite (~11 s for DiT-XL/2 on a CPU core; the whole build then costs about what the load does).

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


def hidden_tensors(module: nn.Module) -> List[str]:
    """Tensors `module` holds outside its state dict: non-persistent buffers and plain tensor attributes."""
    found = []
    for name, m in module.named_modules():
        prefix = f"{name}." if name else ""
        found += [prefix + k for k in getattr(m, "_non_persistent_buffers_set", ())]
        found += [prefix + k for k, v in vars(m).items() if isinstance(v, torch.Tensor)]
    return found


def for_loading(build: Callable[[], nn.Module], device) -> nn.Module:
    """`build()`'s module on `device`, its parameters and buffers uninitialised: load every one next (strict)."""
    with torch.device("meta"):
        module = build()
    if hidden_tensors(module):
        return build().to(device)
    return module.to_empty(device=device)
