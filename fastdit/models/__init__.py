"""DiT models.

    reference.py  the eager oracle, numerically the official DiT (importable on its own)
    dit.py        the fast model: same parameters and state dict, fused Triton kernels, attention backends
    attention.py  the attention backends (math, sdpa, flash_attn, xformers) and their probe
    registry.py   the 12 configurations (MODEL_SIZES x PATCH_SIZES), model_config, make_registry
    build.py      build_dit / resolve_impl: the one choice of reference or fast model

`fastdit.models.DiT_models` / `DiT` are the fast model; they are imported on first use, so that the
reference never depends on the fast model's imports. `ReferenceDiT` / `ReferenceDiT_models` are the oracle's.
"""
from fastdit.models.build import build_dit, resolve_impl  # noqa: F401
from fastdit.models.registry import MODEL_NAMES, model_config  # noqa: F401

_FAST = ("DiT", "DiT_models", "constructor_kwargs", "from_reference")
_REFERENCE = {"ReferenceDiT": "DiT", "ReferenceDiT_models": "DiT_models"}
__all__ = ["MODEL_NAMES", "build_dit", "model_config", "resolve_impl", *_FAST, *_REFERENCE]


def __getattr__(name):
    if name in _FAST:
        from fastdit.models import dit
        return getattr(dit, name)
    if name in _REFERENCE:
        from fastdit.models import reference
        return getattr(reference, _REFERENCE[name])
    raise AttributeError(f"module 'fastdit.models' has no attribute {name!r}")
