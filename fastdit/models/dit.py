"""The fast DiT: the reference model's parameters, state dict and math, with the block's memory-bound
work in fused Triton kernels and attention in FlashAttention-class kernels.

Same registry keys, constructor arguments, methods and state-dict layout as
`fastdit.models.reference` (each loads the other's state dict strictly). Extra keyword arguments:

  kernels       "auto" (default: Triton on CUDA, PyTorch elsewhere) | "triton" | "torch"
  attention     "auto" | "sdpa" | "sdpa_packed" | "flash_attn" | "xformers" | "triton" | "math"
                (see fastdit.models.attention)
  checkpointing per-block activation checkpointing (recompute each block in backward)
  nvtx          emit nvtx ranges around the block's parts (off by default; free when off)
  mlp           "plain" (default) | "recompute": keep only fc1's input and output for the backward and
                recompute GELU there (fastdit.models.mlp; one 4D-wide activation less per block) |
                "fold" / "recompute-fold": the same, with GELU's backward and fc1's bias gradient in one
                pass (kernels/gelu.py) | "epilogue" / "recompute-epilogue": GELU in fc1's GEMM and GELU's
                backward + fc1's bias gradient (and the recomputed GELU) in fc2's data-gradient GEMM
                (kernels/gemm_gelu.py; Triton GEMMs instead of cuBLAS)
  bias_fold     False (default) | True: the attention projection's and fc2's biases are added inside the
                fused residual kernel (x + gate * (y + b)), whose backward pass also gives their gradients,
                and with attention sdpa_packed the qkv bias gradient comes from the pass that assembles dqkv
                (kernels/qkv_grads.py; with attention triton from its backward kernels): no column-sum reduction over those linears' output gradients (with
                mlp="fold", "recompute-fold", "epilogue" or "recompute-epilogue", fc1's bias is folded too)

Data flow of the adaLN-Zero stack (D = hidden size); each arrow is one fused kernel:

  x = patch_embed(img) + pos_embed                                   [patch-gather GEMM, bias+pos epilogue]
  h = LN(x)(1+scale_msa_0)+shift_msa_0                               [modulate_layernorm]
  for block i:
      a = proj(attention(qkv(h)))
      x, h = x + gate_msa*a,  LN(x)(1+scale_mlp)+shift_mlp           [gated_residual_modulate_layernorm]
      m = fc2(gelu(fc1(h)))
      x, h = x + gate_mlp*m,  LN(x)(1+scale_msa_{i+1})+shift_msa_{i+1}   (or the final layer's shift/scale)
  out = final_linear(h)

so every residual add is fused with the LayerNorm + modulation that consumes its result, across block
boundaries too. The other conditioning blocks (in-context, cross-attention, adaLN) run the reference
block code (the paper found adaLN-Zero best, and it is the one official checkpoints use).
"""
from __future__ import annotations

import functools
import os
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as _checkpoint

from fastdit.dist import nvtx_range
from fastdit.models import attention as attn_backends
from fastdit.models.empty import for_loading
from fastdit.models.mlp import MLP_CHOICES, epilogue_gelu_mlp, fold_gelu_mlp, plain_mlp, recompute_gelu_mlp
from fastdit.models import reference as ref
from fastdit.models.registry import KERNEL_CHOICES, make_registry


# ----------------------------------------------------------------------------------------------
# Op tables: the Triton kernels and their pure-PyTorch references share one signature each.
# ----------------------------------------------------------------------------------------------
def _torch_ops():
    from fastdit.kernels import (gated_residual_modulate_layernorm_ref, gated_residual_ref,
                                 modulate_layernorm_ref, patch_embed_ref)
    from fastdit.kernels.gelu import gelu_tanh_bwd_ref
    from fastdit.kernels.gemm_gelu import linear_dgelu_ref, linear_gelu_ref
    from fastdit.kernels.qkv_grads import stack_qkv_grads_ref
    return dict(modulate_layernorm=modulate_layernorm_ref, gated_residual=gated_residual_ref,
                gated_residual_modulate_layernorm=gated_residual_modulate_layernorm_ref,
                patch_embed=patch_embed_ref, gelu_tanh_bwd=gelu_tanh_bwd_ref, stack_qkv_grads=stack_qkv_grads_ref,
                linear_gelu=linear_gelu_ref, linear_dgelu=linear_dgelu_ref)


def _triton_ops():
    from fastdit.kernels import (gated_residual, gated_residual_modulate_layernorm,
                                 modulate_layernorm, patch_embed)
    from fastdit.kernels.gelu import gelu_tanh_bwd_op
    from fastdit.kernels.gemm_gelu import linear_dgelu_op, linear_gelu_op
    from fastdit.kernels.qkv_grads import stack_qkv_grads_op
    return dict(modulate_layernorm=modulate_layernorm, gated_residual=gated_residual,
                gated_residual_modulate_layernorm=gated_residual_modulate_layernorm,
                patch_embed=patch_embed, gelu_tanh_bwd=gelu_tanh_bwd_op, stack_qkv_grads=stack_qkv_grads_op,
                linear_gelu=linear_gelu_op, linear_dgelu=linear_dgelu_op)


def triton_usable(device: torch.device) -> tuple[bool, str]:
    """Whether Triton kernels can run on `device` here (CUDA, or CPU under TRITON_INTERPRET=1)."""
    try:
        import triton  # noqa: F401
    except Exception as e:  # pragma: no cover - triton is a dependency
        return False, f"triton is not importable ({e})"
    if device.type == "cuda":
        return True, ""
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return True, ""
    return False, (f"Triton kernels need a CUDA device (got {device.type}); set TRITON_INTERPRET=1 to run "
                   "them through the (slow) interpreter, or use kernels='torch'")


# ----------------------------------------------------------------------------------------------
# Modules (parameter names identical to the reference)
# ----------------------------------------------------------------------------------------------
class Attention(nn.Module):
    """qkv projection -> attention backend -> output projection (keys attn.qkv.*, attn.proj.*)."""

    def __init__(self, dim: int, num_heads: int, backend: str = "auto"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden_size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.backend = backend
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, proj_bias: bool = True, stack_grads=None) -> torch.Tensor:
        """proj(attention(qkv(x))); proj_bias=False leaves the projection's bias out (the caller adds it);
        stack_grads: the qkv projection's bias gradient from the pass that assembles dqkv
        (attention.projected_attention; sdpa_packed, and triton, whose kernels need no stack)."""
        n, t, d = x.shape
        if stack_grads is not None:
            o = attn_backends.projected_attention(x, self.qkv.weight, self.qkv.bias, self.num_heads, self.backend,
                                                  stack_grads)
        else:
            qkv = self.qkv(x).view(n, t, 3, self.num_heads, self.head_dim)  # (N, T, 3, H, hd)
            o = attn_backends.attention(qkv, self.backend)
        return self.proj(o) if proj_bias else F.linear(o, self.proj.weight)  # (N, T, D)


class FastDiTBlock(nn.Module):
    """adaLN-Zero DiT block whose forward takes and returns the (residual, modulated-LN) pair."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, attention: str, mlp: str = "plain",
                 bias_fold: bool = False):
        super().__init__()
        self.attn = Attention(hidden_size, num_heads, attention)
        self.mlp = ref.Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.mlp_mode = mlp
        self.bias_fold = bias_fold
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x, h, gate_msa, shift_mlp, scale_mlp, gate_mlp, next_shift, next_scale,
                ops, nvtx: bool = False):
        """x: residual stream (N, T, D); h = modulate(LN(x)) with this block's msa shift/scale.

        Returns (x_out, h_next) with h_next = modulate(LN(x_out), next_shift, next_scale).
        """
        fold = self.bias_fold
        residual_ln = ops["gated_residual_modulate_layernorm"]
        with nvtx_range("attention", nvtx):
            a = self.attn(h, proj_bias=not fold, stack_grads=ops["stack_qkv_grads"] if fold else None)
        with nvtx_range("residual+ln", nvtx):
            x, h = residual_ln(x, a, gate_msa, shift_mlp, scale_mlp, **self._folded_bias(self.attn.proj, a))
        with nvtx_range("mlp", nvtx):
            if self.mlp_mode == "recompute":
                m = recompute_gelu_mlp(self.mlp, h, fc2_bias=not fold)
            elif self.mlp_mode in ("fold", "recompute-fold"):
                m = fold_gelu_mlp(self.mlp, h, ops["gelu_tanh_bwd"], recompute=self.mlp_mode == "recompute-fold",
                                  fc2_bias=not fold)
            elif self.mlp_mode in ("epilogue", "recompute-epilogue"):
                m = epilogue_gelu_mlp(self.mlp, h, ops["linear_gelu"], ops["linear_dgelu"],
                                      recompute=self.mlp_mode == "recompute-epilogue", fc2_bias=not fold)
            else:
                m = plain_mlp(self.mlp, h, fc2_bias=not fold)
        with nvtx_range("residual+ln", nvtx):
            x, h = residual_ln(x, m, gate_mlp, next_shift, next_scale, **self._folded_bias(self.mlp.fc2, m))
        return x, h

    def _folded_bias(self, linear: nn.Linear, y: torch.Tensor) -> dict:
        """The residual op's `bias=` argument under bias_fold: the linear's bias in the dtype of its bias-free
        output y (under autocast the parameter is fp32 and the output bf16, and F.linear would have added the
        bias in bf16); without bias_fold no argument (the linear added its own bias)."""
        if not self.bias_fold:
            return {}
        b = linear.bias
        return {"bias": b if b.dtype == y.dtype else b.to(y.dtype)}


class DiT(ref.DiT):
    """Fast DiT; see the module docstring. State dict identical to fastdit.models.reference.DiT."""

    def __init__(self, *args, kernels: str = "auto", attention: str = "auto",
                 checkpointing: bool = False, nvtx: bool = False, mlp: str = "plain", bias_fold: bool = False,
                 **kwargs):
        if kernels not in KERNEL_CHOICES:
            raise ValueError(f"unknown kernels={kernels!r}; choose one of {KERNEL_CHOICES}")
        if attention not in attn_backends.BACKENDS:
            raise ValueError(f"unknown attention={attention!r}; choose one of {attn_backends.BACKENDS}")
        if mlp not in MLP_CHOICES:
            raise ValueError(f"unknown mlp={mlp!r}; choose one of {MLP_CHOICES}")
        if not isinstance(bias_fold, bool):
            raise TypeError(f"bias_fold must be True or False, got {bias_fold!r}")
        self.mlp_mode = mlp
        self.bias_fold = bias_fold
        attn_backends.probe()  # import and check the optional backends now, not in a compiled forward
        if attention != "auto":
            attn_backends.resolve_backend(attention)  # fail now if the backend cannot run here
        self._attention_choice = attention
        super().__init__(*args, **kwargs)
        self.kernels = kernels
        self.checkpointing = checkpointing
        self.nvtx = nvtx
        self._warned_fallback = False

    def make_block(self) -> nn.Module:
        attention_cls = functools.partial(Attention, backend=self._attention_choice)
        if self.block_type == "adaln_zero":
            return FastDiTBlock(self.hidden_size, self.num_heads, self.mlp_ratio, self._attention_choice,
                                self.mlp_mode, self.bias_fold)
        # other conditioning blocks: the reference block code with the chosen attention backend
        return ref.DiTBlock(self.hidden_size, self.num_heads, self.mlp_ratio, self.block_type,
                            attention_cls=attention_cls)

    # ------------------------------------------------------------------ kernel selection
    def _ops_for(self, x: torch.Tensor):
        if self.kernels == "torch":
            return _torch_ops()
        ok, why = triton_usable(x.device)
        if ok:
            from fastdit.kernels import kernels_supported
            ok, why = kernels_supported(x.new_empty((1, 1, self.hidden_size)))
        if ok:
            return _triton_ops()
        if self.kernels == "triton":
            raise ValueError(f"kernels='triton' cannot run this input: {why}")
        if not self._warned_fallback and x.device.type == "cuda":
            warnings.warn(f"fastdit: falling back to the PyTorch path ({why})")
            self._warned_fallback = True
        return _torch_ops()

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.block_type != "adaln_zero":
            return super().forward(x, t, y)
        ops = self._ops_for(x)
        with nvtx_range("patch_embed", self.nvtx):
            pe = self.x_embedder.proj
            x = ops["patch_embed"](x, pe.weight, pe.bias, self.pos_embed, self.patch_size)  # (N, T, D)
        with nvtx_range("conditioning", self.nvtx):
            c = self.t_embedder(t) + self.y_embedder(y, self.training)  # (N, D)
            c_act = F.silu(c)
            mods = [F.linear(c_act, b.adaLN_modulation[1].weight, b.adaLN_modulation[1].bias).chunk(6, 1)
                    for b in self.blocks]  # per block: shift_msa, scale_msa, gate_msa, shift_mlp, ...
            fl = self.final_layer.adaLN_modulation[1]
            final_shift, final_scale = F.linear(c_act, fl.weight, fl.bias).chunk(2, 1)
        with nvtx_range("modulate_ln", self.nvtx):
            h = ops["modulate_layernorm"](x, mods[0][0], mods[0][1])
        for i, block in enumerate(self.blocks):
            _, _, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods[i]
            if i + 1 < len(self.blocks):
                next_shift, next_scale = mods[i + 1][0], mods[i + 1][1]
            else:
                next_shift, next_scale = final_shift, final_scale
            args = (x, h, gate_msa, shift_mlp, scale_mlp, gate_mlp, next_shift, next_scale)
            with nvtx_range(f"block{i}", self.nvtx):
                if self.checkpointing and self.training and torch.is_grad_enabled():
                    x, h = _checkpoint(block, *args, ops, self.nvtx, use_reentrant=False)
                else:
                    x, h = block(*args, ops, self.nvtx)
        with nvtx_range("final_layer", self.nvtx):
            out = self.final_layer.linear(h)  # (N, T, p*p*C_out)
        return self.unpatchify(out)


DiT_models = make_registry(DiT)


def constructor_kwargs(model: ref.DiT) -> dict:
    """The official constructor arguments (plus block_type) that rebuild `model`'s architecture."""
    return dict(input_size=model.input_size, patch_size=model.patch_size, in_channels=model.in_channels,
                hidden_size=model.hidden_size, depth=model.depth, num_heads=model.num_heads,
                mlp_ratio=model.mlp_ratio, class_dropout_prob=model.class_dropout_prob,
                num_classes=model.num_classes, learn_sigma=model.learn_sigma,
                block_type=model.block_type)


def from_reference(model: ref.DiT, device=None, **fast_kwargs) -> DiT:
    """A fast DiT with the same configuration and weights as a reference model, on `device` (default: the
    reference's; another device gets the weights copied straight there, with no second copy on the host).
    Built without the initialisation the load overwrites (fastdit.models.empty)."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    fast = for_loading(lambda: DiT(**constructor_kwargs(model), **fast_kwargs), device)
    fast.load_state_dict(model.state_dict())
    return fast
