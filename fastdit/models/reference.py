"""Eager reference DiT: the numerical oracle every fast path in fastdit is checked against.

Numerically the DiT of Peebles & Xie (ICCV 2023) and its official PyTorch code: same modules, same
state-dict keys, same initialisation, same math. Plain PyTorch only (no timm): attention and MLP are
written out so the parameter names match the official checkpoints
(`blocks.i.attn.qkv`, `blocks.i.attn.proj`, `blocks.i.mlp.fc1`, `blocks.i.mlp.fc2`, ...).

Besides the default adaLN-Zero block, the paper's three other conditioning blocks (§3.1) are
selectable with `block_type`: "in_context", "cross_attention" and "adaln".
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from fastdit.models.registry import make_registry
from fastdit.state_dict import check_state_dict_keys

BLOCK_TYPES = ("adaln_zero", "adaln", "cross_attention", "in_context")


# ----------------------------------------------------------------------------------------------
# Small helpers shared by the reference and the fast model
# ----------------------------------------------------------------------------------------------
def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation: x (N, T, D) * (1 + scale (N, D)) + shift (N, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    """Sinusoidal timestep features [cos | sin], (N,) -> (N, dim); t may be fractional."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = t[:, None].float() * freqs[None]  # (N, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def _sincos_1d(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    """1-D sin-cos features of positions `pos` (any shape) -> (M, embed_dim), [sin | cos]."""
    if embed_dim % 2:
        raise ValueError(f"sin-cos embedding needs an even dimension, got {embed_dim}")
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega  # (D/2,)
    angles = np.outer(pos.reshape(-1), omega)  # (M, D/2)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
    """Fixed 2-D sin-cos position table (grid_size**2, embed_dim), laid out as the official DiT.

    Token k = row * grid_size + col. The first half of the channels encodes the column index and the
    second half the row index (the official code builds the grid with width first).
    """
    if embed_dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs hidden_size divisible by 4, got {embed_dim}")
    coords = np.arange(grid_size, dtype=np.float32)
    col, row = np.meshgrid(coords, coords)  # each (grid, grid); col varies along axis 1
    emb_col = _sincos_1d(embed_dim // 2, col)
    emb_row = _sincos_1d(embed_dim // 2, row)
    return np.concatenate([emb_col, emb_row], axis=1)  # (grid**2, D)


def unpatchify(x: torch.Tensor, patch_size: int, out_channels: int) -> torch.Tensor:
    """(N, T, p*p*C) -> (N, C, H, W), the official einsum 'nhwpqc->nchpwq'."""
    n, t, _ = x.shape
    h = w = int(round(t**0.5))
    if h * w != t:
        raise ValueError(f"unpatchify expects a square token grid, got T={t}")
    p, c = patch_size, out_channels
    x = x.reshape(n, h, w, p, p, c)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(n, c, h * p, w * p)


# ----------------------------------------------------------------------------------------------
# Embedders
# ----------------------------------------------------------------------------------------------
class PatchEmbed(nn.Module):
    """Conv2d(kernel = stride = p) + flatten: (N, C, H, W) -> (N, T, D). Key: x_embedder.proj.*"""

    def __init__(self, input_size: int, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.grid_size = input_size // patch_size
        self.num_patches = self.grid_size**2
        self.proj = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, T, D)


class TimestepEmbedder(nn.Module):
    """t (N,) -> (N, D): 256-dim sinusoid then Linear-SiLU-Linear. Keys: t_embedder.mlp.{0,2}.*"""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels -> (N, D); row `num_classes` is the null class used for CFG label dropout."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        use_cfg_embedding = int(dropout_prob > 0)
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels: torch.Tensor, force_drop_ids: Optional[torch.Tensor] = None):
        if force_drop_ids is None:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop = force_drop_ids == 1
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels, train: bool, force_drop_ids: Optional[torch.Tensor] = None):
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


# ----------------------------------------------------------------------------------------------
# Block parts
# ----------------------------------------------------------------------------------------------
class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (keys attn.qkv.*, attn.proj.*)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden_size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (N, H, T, hd)
        attn = (q * self.scale) @ k.transpose(-2, -1)  # (N, H, T, T)
        attn = attn.softmax(dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(n, t, d)
        return self.proj(out)


class CrossAttention(nn.Module):
    """Attention from image tokens (N, T, D) to a short condition sequence (N, S, D)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, dim * 2)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        s = cond.shape[1]
        q = self.q(x).reshape(n, t, self.num_heads, self.head_dim).transpose(1, 2)
        kv = self.kv(cond).reshape(n, s, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)  # (N, H, S, hd)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # (N, H, T, S)
        return self.proj((attn @ v).transpose(1, 2).reshape(n, t, d))


class Mlp(nn.Module):
    """fc1 -> GELU(tanh) -> fc2 (keys mlp.fc1.*, mlp.fc2.*)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def _layer_norm(dim: int) -> nn.LayerNorm:
    return nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)


class DiTBlock(nn.Module):
    """One DiT block; `block_type` chooses the conditioning (paper §3.1).

    adaln_zero (default): x += gate_msa * attn(modulate(LN(x))); x += gate_mlp * mlp(modulate(LN(x)))
    adaln:                the same without the gates (shift/scale only, 4D regression)
    cross_attention:      x += attn(LN(x)); x += xattn(LN(x), [t; y]); x += mlp(LN(x))
    in_context:           x += attn(LN(x)); x += mlp(LN(x)) (t, y are extra tokens in x)
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0,
                 block_type: str = "adaln_zero", attention_cls=None):
        super().__init__()
        self.block_type = block_type
        self.norm1 = _layer_norm(hidden_size)
        self.attn = (attention_cls or Attention)(hidden_size, num_heads)
        self.norm2 = _layer_norm(hidden_size)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        if block_type == "adaln_zero":
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
        elif block_type == "adaln":
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 4 * hidden_size))
        elif block_type == "cross_attention":
            self.norm_cross = _layer_norm(hidden_size)
            self.cross_attn = CrossAttention(hidden_size, num_heads)

    def forward(self, x: torch.Tensor, c: torch.Tensor, cond_tokens: Optional[torch.Tensor] = None):
        if self.block_type == "adaln_zero":
            (shift_msa, scale_msa, gate_msa,
             shift_mlp, scale_mlp, gate_mlp) = self.adaLN_modulation(c).chunk(6, dim=1)
            x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
            x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        elif self.block_type == "adaln":
            shift_msa, scale_msa, shift_mlp, scale_mlp = self.adaLN_modulation(c).chunk(4, dim=1)
            x = x + self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
            x = x + self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        elif self.block_type == "cross_attention":
            x = x + self.attn(self.norm1(x))
            x = x + self.cross_attn(self.norm_cross(x), cond_tokens)
            x = x + self.mlp(self.norm2(x))
        else:  # in_context
            x = x + self.attn(self.norm1(x))
            x = x + self.mlp(self.norm2(x))
        return x


class FinalLayer(nn.Module):
    """adaLN (shift, scale) + LN + linear to p*p*C_out (keys final_layer.*)."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, adaptive: bool = True):
        super().__init__()
        self.adaptive = adaptive
        self.norm_final = _layer_norm(hidden_size)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        if adaptive:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if self.adaptive:
            shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
            x = modulate(self.norm_final(x), shift, scale)
        else:
            x = self.norm_final(x)
        return self.linear(x)


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------
class DiT(nn.Module):
    """Diffusion Transformer. forward(x (N, C, H, W), t (N,), y (N,)) -> (N, C_out, H, W)."""

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        block_type: str = "adaln_zero",
    ):
        super().__init__()
        _check_config(input_size, patch_size, hidden_size, num_heads, block_type)
        self.input_size = input_size
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        self.depth = depth
        self.class_dropout_prob = class_dropout_prob
        self.num_classes = num_classes
        self.block_type = block_type

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        num_patches = self.x_embedder.num_patches
        # Fixed sin-cos table; a Parameter (not a buffer) so the state dict matches the official one.
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([self.make_block() for _ in range(depth)])
        adaptive_final = block_type in ("adaln_zero", "adaln")
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, adaptive_final)
        self.initialize_weights()

    def make_block(self) -> nn.Module:
        """One transformer block (the fast model overrides this; parameter names stay the same)."""
        return DiTBlock(self.hidden_size, self.num_heads, self.mlp_ratio, self.block_type)

    def initialize_weights(self):
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                torch.nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)

        self.apply(_basic_init)
        pos = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], self.x_embedder.grid_size)
        self.pos_embed.data.copy_(torch.from_numpy(pos).float().unsqueeze(0))
        # Patch embedding initialised like a linear layer (xavier on the flattened kernel).
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.proj.bias, 0)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        if self.block_type == "adaln_zero":
            # adaLN-Zero: every block starts as the identity function.
            for block in self.blocks:
                nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
                nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
        if self.final_layer.adaptive and self.block_type == "adaln_zero":
            nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        return unpatchify(x, self.patch_size, self.out_channels)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = self.x_embedder(x) + self.pos_embed  # (N, T, D)
        t_emb = self.t_embedder(t)  # (N, D)
        y_emb = self.y_embedder(y, self.training)  # (N, D)
        c = t_emb + y_emb  # (N, D)
        cond_tokens = None
        if self.block_type == "in_context":
            x = torch.cat([t_emb.unsqueeze(1), y_emb.unsqueeze(1), x], dim=1)  # (N, 2 + T, D)
        elif self.block_type == "cross_attention":
            cond_tokens = torch.stack([t_emb, y_emb], dim=1)  # (N, 2, D)
        for block in self.blocks:
            x = block(x, c, cond_tokens)
        if self.block_type == "in_context":
            x = x[:, 2:]  # drop the condition tokens before the final layer
        x = self.final_layer(x, c)  # (N, T, p*p*C_out)
        return self.unpatchify(x)

    def forward_with_cfg(self, x, t, y, cfg_scale: float, guide_all_channels: bool = False):
        """Classifier-free guidance. The batch holds [cond half; uncond half] of the same x.

        Like the official code, only the first 3 channels are guided by default (this reproduces the
        paper's FID 2.27 at scale 1.5); `guide_all_channels=True` guides every eps channel.
        """
        return cfg_combine(self, x, t, y, cfg_scale, self.in_channels, guide_all_channels)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        if strict:
            check_state_dict_keys(self, state_dict)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def cfg_combine(model, x, t, y, cfg_scale: float, in_channels: int, guide_all_channels: bool):
    half = x[: len(x) // 2]
    combined = torch.cat([half, half], dim=0)
    out = model(combined, t, y)
    n_guided = in_channels if guide_all_channels else 3
    eps, rest = out[:, :n_guided], out[:, n_guided:]
    cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
    half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
    eps = torch.cat([half_eps, half_eps], dim=0)
    return torch.cat([eps, rest], dim=1)


def _check_config(input_size, patch_size, hidden_size, num_heads, block_type):
    if block_type not in BLOCK_TYPES:
        raise ValueError(f"unknown block_type {block_type!r}; choose one of {BLOCK_TYPES}")
    if patch_size <= 0 or input_size % patch_size:
        raise ValueError(
            f"input_size {input_size} is not divisible by patch_size {patch_size}; "
            f"use an input_size that is a multiple of {patch_size}")
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
    if hidden_size % 4:
        raise ValueError(f"hidden_size must be divisible by 4 for the 2-D pos_embed, got {hidden_size}")


# ----------------------------------------------------------------------------------------------
# Registry: the paper's 12 configurations (Table 1 sizes x patch 2/4/8; fastdit.models.registry)
# ----------------------------------------------------------------------------------------------
DiT_models = make_registry(DiT)
