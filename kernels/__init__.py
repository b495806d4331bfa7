"""fastdit.kernels: fused Triton kernels for the DiT block (installed from the top-level kernels/).

Public ops (each differentiable, registered with torch.library under the "fastdit" namespace so
torch.compile(fullgraph=True) traces them, each with a plain PyTorch `*_ref` beside it):

* `modulate_layernorm(x, shift, scale, eps=1e-6) -> y`
      y = LayerNorm(x) * (1 + scale[:, None]) + shift[:, None]; x (N, T, D), shift/scale (N, D).
* `gated_residual(x, y, gate) -> x + gate[:, None] * y`
* `gated_residual_modulate_layernorm(x, y, gate, shift, scale, eps=1e-6) -> (x', h)`
      x' = x + gate * y, h = LayerNorm(x') * (1 + scale) + shift, in one pass.
* `patch_embed(x, weight, bias, pos_embed, patch_size) -> (N, T, D)`
      Conv2d(kernel=stride=p) + flatten + transpose + pos_embed as a patch-gathering GEMM.

Which inputs raise (the caller, e.g. the fast model, decides whether to fall back to the `*_ref`):
* TypeError: a non-tensor argument; a dtype other than float32 / bfloat16 / float16 (integers,
  bool, float64, complex, fp8); for patch_embed, weight or bias of another dtype than x.
* ValueError: wrong rank or mismatched shapes (shift/scale/gate must be exactly (N, D), y exactly
  x's shape); D > KERNEL_MAX_D (row kernels only; patch_embed tiles over D); tensors on different
  devices; CPU tensors when triton is not running in interpreter mode (TRITON_INTERPRET=1);
  patch sizes that do not divide H and W; a pos_embed that is not (1, T, D) or (T, D).
Taken as they are (no error, no copy): any strides (views, chunks, transposes, expanded
stride-0 tensors) and mixed float dtypes among the row-op inputs (outputs get PyTorch's promoted
dtype, gradients their input's dtype), as under autocast.

`kernels_supported(x, *others) -> (ok, reason)` answers the dtype/size/device part up front.
Set FASTDIT_KERNEL_POISON=1 to NaN-fill every output buffer before launch (used by the tests), and
FASTDIT_KERNEL_DISPATCH=direct to run the ops in eager mode as plain autograd.Functions over their launchers
(the same kernels; less host work; see kernels/README.md).
"""
if __name__ != "fastdit.kernels":
    # The folder is installed as fastdit.kernels (pyproject.toml package-dir). Imported as a top-level
    # `kernels` (PyPI's package of that name), it would register the "fastdit::" ops a second time.
    raise ImportError(f"this is fastdit.kernels; import it as fastdit.kernels, not {__name__!r}")

from ._common import KERNEL_MAX_D, POISON_ENV, SUPPORTED_DTYPES, kernels_supported
from .gated_residual import gated_residual, gated_residual_ref
from .modulate_layernorm import (gated_residual_modulate_layernorm, gated_residual_modulate_layernorm_ref,
                                 modulate_layernorm, modulate_layernorm_ref)
from .patch_embed import patch_embed, patch_embed_ref

__all__ = [
    "KERNEL_MAX_D",
    "POISON_ENV",
    "SUPPORTED_DTYPES",
    "kernels_supported",
    "modulate_layernorm",
    "modulate_layernorm_ref",
    "gated_residual",
    "gated_residual_ref",
    "gated_residual_modulate_layernorm",
    "gated_residual_modulate_layernorm_ref",
    "patch_embed",
    "patch_embed_ref",
]
