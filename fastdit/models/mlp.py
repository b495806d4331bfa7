"""The DiT block's MLP, fc2(GELU_tanh(fc1(h))), with the GELU output recomputed in backward.

Plain autograd keeps three tensors of every block's MLP for the backward: its input h (N, T, D) for fc1's
weight gradient, the pre-activation z = fc1(h) (N, T, 4D) for GELU's backward, and the activation
g = GELU(z) (N, T, 4D) for fc2's weight gradient. `recompute_gelu_mlp` keeps h and z only and recomputes
g from z in the backward: one 4D-wide tensor less per block (DiT-XL/2, batch 128, bf16:
28 x 128 x 256 x 4608 x 2 bytes = 8.5 GB less at the peak), for one more GELU pass per block in the
backward (read z, write g: about 0.6 GB of traffic per block at that shape, ~0.2 ms on an H100).

The function and its gradients are the reference's (fastdit.models.reference.Mlp): the same tanh GELU
(torch's own forward and backward of it), the same linear algebra. A fused GEMM epilogue was
considered for the forward (torch._addmm_activation(..., use_gelu=True)); it returns GELU(z) but not z,
so the backward would have to recompute z with a second fc1 GEMM, which costs more than it saves.

Model option: mlp="recompute" of fastdit.models.DiT (config `model.mlp`); "plain" (the default) is the
reference Mlp module under autograd. mlp="fold" / "recompute-fold": the same two memory layouts with
GELU's backward and fc1's bias gradient in one pass (kernels/gelu.py with Triton kernels, its PyTorch
reference with kernels="torch"): one read of the 4D-wide dz less per block, and under recompute-fold one
read of z less as well. mlp="epilogue": GELU inside the GEMMs instead (kernels/gemm_gelu.py with Triton, its
PyTorch reference with kernels="torch"): fc1's GEMM writes z and GELU(z), fc2's data-gradient GEMM writes
dz and fc1's bias-gradient sums, so z is not read back in the forward and dg never reaches memory (the
saved tensors are mlp="fold"'s); "recompute-epilogue" keeps h and z only and that backward GEMM's epilogue
rewrites GELU(z) as well (recompute-fold's layout). Under autocast the plain path runs (the custom functions take the
parameters' dtype as they are).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

MLP_CHOICES = ("plain", "recompute", "fold", "recompute-fold", "epilogue", "recompute-epilogue")


class _RecomputeGeluMlp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w1, b1, w2, b2):
        z = F.linear(h, w1, b1)
        y = F.linear(F.gelu(z, approximate="tanh"), w2, b2)
        ctx.save_for_backward(h, z, w1, w2)
        ctx.has_bias = (b1 is not None, b2 is not None)
        return y

    @staticmethod
    def backward(ctx, dy):
        h, z, w1, w2 = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])
        g = F.gelu(z, approximate="tanh")                                     # recomputed, (N, T, 4D)
        dw2 = dy2.t().mm(g.reshape(-1, g.shape[-1]))
        db2 = dy2.sum(0) if ctx.has_bias[1] else None
        dz = torch.ops.aten.gelu_backward(dy.matmul(w2), z, approximate="tanh")
        del g
        dz2 = dz.reshape(-1, dz.shape[-1])
        dw1 = dz2.t().mm(h.reshape(-1, h.shape[-1]))
        db1 = dz2.sum(0) if ctx.has_bias[0] else None
        dh = dz.matmul(w1)
        return dh, dw1, db1, dw2, db2


class _GeluMlp(torch.autograd.Function):
    """fc2(GELU_tanh(fc1(h))) with the GELU work in two pluggable steps:
    `fc1_gelu(h2, w1, b1) -> (z, g)` (fc1 and GELU) and `dgelu(dy2, w2, z, write_g=...) -> (dz, db1, g)` (fc2's
    data gradient, GELU's backward and fc1's bias gradient; g = GELU(z) when write_g). Keeps h, z and g;
    recompute: h and z only, with g rewritten by `dgelu`.
      mlp="fold" / "recompute-fold"    cuBLAS GEMMs, then GELU's backward and fc1's bias gradient in one pass
                                       (`gelu_bwd`, e.g. the Triton kernels/gelu.py op): dz and sum_rows(dz) from
                                       one read of z and dg, where autograd writes dz and reads it again for the
                                       bias (recompute: the same pass rewrites GELU(z), z read once for both)
      mlp="epilogue" / "recompute-epilogue"   kernels/gemm_gelu.py's GEMMs with that work in their epilogues"""

    @staticmethod
    def forward(ctx, h, w1, b1, w2, b2, recompute, fc1_gelu, dgelu):
        z, g = fc1_gelu(h.reshape(-1, h.shape[-1]), w1, b1)
        y = F.linear(g, w2, b2).view(*h.shape[:-1], w2.shape[0])
        ctx.save_for_backward(h, z, w1, w2, *(() if recompute else (g,)))
        ctx.recompute, ctx.dgelu = recompute, dgelu
        ctx.bias = (b1 is not None, b2 is not None, b1.dtype if b1 is not None else None)
        return y

    @staticmethod
    def backward(ctx, dy):
        h, z, w1, w2, *kept = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])
        dz, db1, g = ctx.dgelu(dy2, w2, z, write_g=ctx.recompute)
        g = g if ctx.recompute else kept[0]
        dw2 = dy2.t().mm(g)
        db2 = dy2.sum(0) if ctx.bias[1] else None
        del g
        dw1 = dz.t().mm(h.reshape(-1, h.shape[-1]))
        dh = dz.mm(w1).view(h.shape)
        return dh, dw1, (db1.to(ctx.bias[2]) if ctx.bias[0] else None), dw2, db2, None, None, None


def _linear_then_gelu(h2, w1, b1):
    """fold's fc1_gelu: cuBLAS's fc1, then GELU_tanh."""
    z = F.linear(h2, w1, b1)
    return z, F.gelu(z, approximate="tanh")


def _matmul_then_gelu_bwd(gelu_bwd, dy2, w2, z, write_g=False):
    """fold's dgelu: cuBLAS's dg = dy2 @ w2, then `gelu_bwd(z, dg, write_g=...) -> (dz, db1, g)`."""
    return gelu_bwd(z, dy2.mm(w2), write_g=write_g)


def plain_mlp(mlp: torch.nn.Module, h: torch.Tensor, fc2_bias: bool = True) -> torch.Tensor:
    """mlp(h) under autograd; fc2_bias=False leaves fc2's bias out (the caller adds it, e.g. the fused
    residual kernel of the model's bias_fold, which also gives its gradient)."""
    if fc2_bias:
        return mlp(h)
    return F.linear(mlp.act(mlp.fc1(h)), mlp.fc2.weight)


def fold_gelu_mlp(mlp: torch.nn.Module, h: torch.Tensor, gelu_bwd, recompute: bool = False,
                  fc2_bias: bool = True) -> torch.Tensor:
    """mlp(h) for a reference Mlp, with `gelu_bwd(z, dg, write_g=...) -> (dz, db, g)` doing GELU's
    backward and fc1's bias gradient in one pass (kernels/gelu.py); recompute: see _GeluMlp;
    fc2_bias: see plain_mlp."""
    if torch.is_autocast_enabled(h.device.type):
        return plain_mlp(mlp, h, fc2_bias)
    return _GeluMlp.apply(h, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias if fc2_bias else None,
                          recompute, _linear_then_gelu, functools.partial(_matmul_then_gelu_bwd, gelu_bwd))


def epilogue_gelu_mlp(mlp: torch.nn.Module, h: torch.Tensor, linear_gelu, linear_dgelu, recompute: bool = False,
                      fc2_bias: bool = True) -> torch.Tensor:
    """mlp(h) for a reference Mlp with GELU in the GEMMs' epilogues (see _GeluMlp; kernels/gemm_gelu.py's
    linear_gelu / linear_dgelu or their references); recompute: keep h and z only; fc2_bias: see plain_mlp."""
    if torch.is_autocast_enabled(h.device.type):
        return plain_mlp(mlp, h, fc2_bias)
    return _GeluMlp.apply(h, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias if fc2_bias else None,
                          recompute, linear_gelu, linear_dgelu)


def recompute_gelu_mlp(mlp: torch.nn.Module, h: torch.Tensor, fc2_bias: bool = True) -> torch.Tensor:
    """mlp(h) for a reference Mlp (fc1, GELU tanh, fc2), keeping h and fc1(h) for the backward only;
    fc2_bias: see plain_mlp."""
    if torch.is_autocast_enabled(h.device.type):
        return plain_mlp(mlp, h, fc2_bias)
    return _RecomputeGeluMlp.apply(h, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight,
                                   mlp.fc2.bias if fc2_bias else None)
