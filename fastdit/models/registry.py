"""The DiT registry: the paper's 12 configurations (sizes x patch 2/4/8) and their names.

    DiT_models["DiT-XL/2"](input_size=32)            # fastdit.models (fast) / fastdit.models.reference
    model_config("DiT-XL/2")                           # {depth, hidden_size, patch_size, num_heads}

Both model files build their `DiT_models` with make_registry; this module imports neither (the choice
between them is fastdit.models.build).
"""
from __future__ import annotations

from typing import Callable, Dict

MODEL_SIZES = {  # name: (depth, hidden_size, num_heads) -- the paper's Table 1
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}
PATCH_SIZES = (2, 4, 8)
KERNEL_CHOICES = ("auto", "triton", "torch")  # the fast model's kernels= (Triton on CUDA for "auto")


class _Registry(dict):
    """dict whose missing-key error lists the valid model names."""

    def __missing__(self, key):
        raise KeyError(f"unknown DiT model {key!r}; valid names: {', '.join(self)}")


def make_registry(model_cls) -> Dict[str, Callable]:
    """{"DiT-S/2": constructor, ...}: the 12 configurations (sizes x patch 2/4/8) of `model_cls`."""
    reg = _Registry()
    for size, (depth, hidden, heads) in MODEL_SIZES.items():
        for p in PATCH_SIZES:
            def ctor(_d=depth, _h=hidden, _n=heads, _p=p, **kwargs):
                return model_cls(depth=_d, hidden_size=_h, patch_size=_p, num_heads=_n, **kwargs)
            ctor.__name__ = f"DiT_{size}_{p}"
            reg[f"DiT-{size}/{p}"] = ctor
    return reg


MODEL_NAMES = tuple(make_registry(None))


def model_config(name: str) -> dict:
    """depth / hidden_size / patch_size / num_heads of a registry name (error lists valid names)."""
    if name not in MODEL_NAMES:
        raise KeyError(f"unknown DiT model {name!r}; valid names: {', '.join(MODEL_NAMES)}")
    size, p = name[len("DiT-"):].split("/")
    depth, hidden, heads = MODEL_SIZES[size]
    return dict(depth=depth, hidden_size=hidden, patch_size=int(p), num_heads=heads)
