"""Self-attention backends for the DiT block.

Every backend computes softmax(q k^T / sqrt(hd)) v from the fused qkv projection
`qkv (N, T, 3, H, hd)` and returns `(N, T, H * hd)`:

  math        the reference: explicit scores, softmax, matmul (what fastdit.models.reference does)
  sdpa        torch.nn.functional.scaled_dot_product_attention (flash / cuDNN / memory-efficient on CUDA)
  flash_attn  FlashAttention 3 (flash_attn_interface) or 2 (flash_attn), fp16/bf16 on CUDA
  xformers    xformers.ops.memory_efficient_attention
  auto        flash_attn where importable and the input is CUDA fp16/bf16, else sdpa

head_dim 72 (DiT-XL: 1152 / 16) works on all of them. Asking for a backend that is not installed raises
an error saying how to install it; asking flash_attn for fp32 or CPU tensors raises too (no silent
fallback for an explicit choice).
"""
from __future__ import annotations

import importlib
from typing import Callable, Dict

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "math", "sdpa", "flash_attn", "xformers")
_INSTALL_HINT = {
    "flash_attn": "pip install 'fastdit[flash]' (flash-attn 2) or install flash-attn 3 (flash_attn_interface)",
    "xformers": "pip install 'fastdit[xformers]'",
}


# name -> imported module or None. Filled once by probe(), outside any torch.compile trace (the model
# calls it at construction), so forward() only does dict lookups, which compile traces without breaks.
_MODULES: Dict[str, object] = {}


def _try_import(name: str):
    try:
        return importlib.import_module(name)
    except Exception:  # ImportError, or a broken binary extension
        return None


def probe() -> Dict[str, object]:
    """Import the optional attention libraries once and remember what is there."""
    if not _MODULES:
        for name in ("flash_attn_interface", "flash_attn", "xformers.ops"):
            _MODULES[name] = _try_import(name)
    return _MODULES


def _flash_module():
    """(module, version) of the best importable FlashAttention, or (None, None)."""
    mods = probe()
    if mods["flash_attn_interface"] is not None:
        return mods["flash_attn_interface"], 3
    if mods["flash_attn"] is not None:
        return mods["flash_attn"], 2
    return None, None


def available_backends() -> Dict[str, bool]:
    return {
        "math": True,
        "sdpa": hasattr(F, "scaled_dot_product_attention"),
        "flash_attn": _flash_module()[0] is not None,
        "xformers": probe()["xformers.ops"] is not None,
    }


def _math(qkv: torch.Tensor) -> torch.Tensor:
    n, t, _, h, hd = qkv.shape
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (N, H, T, hd)
    attn = ((q * hd**-0.5) @ k.transpose(-2, -1)).softmax(dim=-1)  # (N, H, T, T)
    return (attn @ v).transpose(1, 2).reshape(n, t, h * hd)


def _sdpa(qkv: torch.Tensor) -> torch.Tensor:
    n, t, _, h, hd = qkv.shape
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (N, H, T, hd), strided views
    out = F.scaled_dot_product_attention(q, k, v)  # (N, H, T, hd)
    return out.transpose(1, 2).reshape(n, t, h * hd)


def _check_half_cuda(qkv: torch.Tensor, backend: str):
    if not qkv.is_cuda:
        raise ValueError(f"attention backend {backend!r} needs CUDA tensors; use 'sdpa' or 'math' on CPU")
    if qkv.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"attention backend {backend!r} takes fp16/bf16, got {qkv.dtype}; "
                         "train in bf16 or use 'sdpa'")


def _flash(qkv: torch.Tensor) -> torch.Tensor:
    _check_half_cuda(qkv, "flash_attn")
    mod, version = _flash_module()
    n, t, _, h, hd = qkv.shape
    if version == 3:
        q, k, v = qkv.unbind(2)  # (N, T, H, hd)
        out = mod.flash_attn_func(q, k, v)
        out = out[0] if isinstance(out, tuple) else out
    else:
        out = mod.flash_attn_qkvpacked_func(qkv)  # (N, T, H, hd)
    return out.reshape(n, t, h * hd)


def _xformers(qkv: torch.Tensor) -> torch.Tensor:
    if not qkv.is_cuda:
        raise ValueError("attention backend 'xformers' needs CUDA tensors; use 'sdpa' or 'math' on CPU")
    xops = probe()["xformers.ops"]
    n, t, _, h, hd = qkv.shape
    q, k, v = qkv.unbind(2)  # (N, T, H, hd)
    return xops.memory_efficient_attention(q, k, v).reshape(n, t, h * hd)


_IMPLS: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "math": _math, "sdpa": _sdpa, "flash_attn": _flash, "xformers": _xformers,
}


def resolve_backend(name: str, device: torch.device | str | None = None,
                    dtype: torch.dtype | None = None) -> str:
    """Validate a backend name and turn 'auto' into a concrete backend for a device/dtype."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {BACKENDS}")
    avail = available_backends()
    if name == "auto":
        is_cuda = device is not None and torch.device(device).type == "cuda"
        half = dtype in (torch.float16, torch.bfloat16)
        if is_cuda and half and avail["flash_attn"]:
            return "flash_attn"
        return "sdpa"
    if not avail[name]:
        raise ImportError(f"attention backend {name!r} is not installed: {_INSTALL_HINT.get(name, '')}")
    return name


def attention(qkv: torch.Tensor, backend: str = "sdpa") -> torch.Tensor:
    """Self-attention of a fused projection qkv (N, T, 3, H, hd) -> (N, T, H * hd)."""
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"attention expects qkv of shape (N, T, 3, H, hd), got {tuple(qkv.shape)}")
    if backend == "auto" or backend in ("flash_attn", "xformers"):
        backend = resolve_backend(backend, qkv.device, qkv.dtype)  # cached imports; raises if missing
    elif backend not in _IMPLS:
        resolve_backend(backend)  # raises the unknown-name error
    return _IMPLS[backend](qkv)
