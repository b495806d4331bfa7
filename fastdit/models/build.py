"""The one place that decides between the eager reference and the fast model.

    build_dit("auto", name="DiT-S/2", input_size=8, kernels="torch")
    build_dit("reference", **constructor_kwargs)

impl: "reference" is the eager oracle (fastdit.models.reference); "fast" is fastdit.models.dit (fused
Triton kernels, attention backends; the other conditioning blocks run the reference block code);
"auto" is the fast model for the adaLN-Zero block, whose work its kernels fuse, and the reference for
the paper's other blocks. The fast model's own options (FAST_OPTIONS) are dropped for the reference.
A fast model that cannot be imported is an ImportError (no silent fallback); the reference imports on
its own.
"""
from __future__ import annotations

from typing import Optional

from fastdit.models.registry import model_config

IMPLS = ("auto", "fast", "reference")
FAST_OPTIONS = ("kernels", "attention", "checkpointing", "nvtx", "mlp", "bias_fold")  # constructor options of the fast model


def resolve_impl(impl: str, block_type: str = "adaln_zero") -> str:
    """The model `impl` asks for: "fast" or "reference" (see the module docstring)."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "fast" if block_type == "adaln_zero" else "reference"
    return impl


def dit_class(impl: str) -> type:
    """The DiT class of a resolved impl ("fast" or "reference")."""
    if impl == "fast":
        from fastdit.models.dit import DiT
    elif impl == "reference":
        from fastdit.models.reference import DiT
    else:
        raise ValueError(f"dit_class takes 'fast' or 'reference', got {impl!r}")
    return DiT


def build_dit(impl: str = "auto", name: Optional[str] = None, **kwargs):
    """A freshly initialised DiT: registry `name`'s architecture (or explicit depth/width/heads/patch in
    kwargs) with the other constructor kwargs, as `impl` decides (resolve_impl). Fast-model options in
    kwargs (FAST_OPTIONS) go to the fast model and are dropped for the reference."""
    used = resolve_impl(impl, kwargs.get("block_type", "adaln_zero"))
    if used == "reference":
        kwargs = {k: v for k, v in kwargs.items() if k not in FAST_OPTIONS}
    if name is not None:
        kwargs = dict(kwargs, **model_config(name))
    return dit_class(used)(**kwargs)
