"""fastdit.models.mlp: the MLP with GELU recomputed in backward is the reference MLP, and keeps less."""
import pytest
import torch

from fastdit.kernels.gelu import gelu_tanh_bwd_op, gelu_tanh_bwd_ref
from fastdit.kernels.gemm_gelu import linear_dgelu_op, linear_dgelu_ref, linear_gelu_op, linear_gelu_ref
from fastdit.models.mlp import epilogue_gelu_mlp, fold_gelu_mlp, recompute_gelu_mlp
from fastdit.models.reference import Mlp

# The MLP variants under test, each as fn(mlp, h). "fold" variants with the PyTorch reference of the
# one-pass GELU backward run in fp64; with the Triton kernel in fp32/bf16 only, on CUDA when there is
# one, else on the CPU through the interpreter (tests/conftest.py).
VARIANTS = {
    "recompute": recompute_gelu_mlp,
    "fold/torch": lambda m, x: fold_gelu_mlp(m, x, gelu_tanh_bwd_ref),
    "recompute-fold/torch": lambda m, x: fold_gelu_mlp(m, x, gelu_tanh_bwd_ref, recompute=True),
    "epilogue/torch": lambda m, x: epilogue_gelu_mlp(m, x, linear_gelu_ref, linear_dgelu_ref),
    "recompute-epilogue/torch": lambda m, x: epilogue_gelu_mlp(m, x, linear_gelu_ref, linear_dgelu_ref,
                                                               recompute=True),
}
TRITON_VARIANTS = {
    "fold/triton": lambda m, x: fold_gelu_mlp(m, x, gelu_tanh_bwd_op),
    "recompute-fold/triton": lambda m, x: fold_gelu_mlp(m, x, gelu_tanh_bwd_op, recompute=True),
    "epilogue/triton": lambda m, x: epilogue_gelu_mlp(m, x, linear_gelu_op, linear_dgelu_op),
    "recompute-epilogue/triton": lambda m, x: epilogue_gelu_mlp(m, x, linear_gelu_op, linear_dgelu_op,
                                                                recompute=True),
}


DEV = "cuda" if torch.cuda.is_available() else "cpu"


def make(dim=24, hidden=96, dtype=torch.float64, seed=0, device="cpu"):
    torch.manual_seed(seed)
    mlp = Mlp(dim, hidden).to(device, dtype)
    h = torch.randn(3, 5, dim, dtype=dtype).to(device).requires_grad_()
    return mlp, h


def grads(mlp, h, fn):
    mlp.zero_grad(set_to_none=True)
    h.grad = None
    y = fn(mlp, h)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(y.device, y.dtype)
    (y * g).sum().backward()
    return y.detach(), [h.grad.clone()] + [p.grad.clone() for p in mlp.parameters()]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_forward_and_every_gradient_match_the_reference_fp64(variant):
    mlp, h = make()
    y_ref, g_ref = grads(mlp, h, lambda m, x: m(x))
    y, g = grads(mlp, h, VARIANTS[variant])
    torch.testing.assert_close(y, y_ref)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("variant", list(TRITON_VARIANTS))
def test_triton_fold_matches_the_reference_fp32(variant):
    mlp, h = make(dtype=torch.float32, device=DEV)
    y_ref, g_ref = grads(mlp, h, lambda m, x: m(x))
    y, g = grads(mlp, h, TRITON_VARIANTS[variant])
    torch.testing.assert_close(y, y_ref)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("variant", ["recompute"] + list(TRITON_VARIANTS))
def test_bf16_error_is_the_plain_paths(variant):
    """In bf16 the variants round as the plain path does (the fold sums the bias gradient before rounding
    dz): each one's error vs fp64 is at most the plain path's (x1.5 slack)."""
    mlp64, h64 = make()
    y64, g64 = grads(mlp64, h64, lambda m, x: m(x))
    mlp, _ = make(dtype=torch.bfloat16, device=DEV)
    h = h64.detach().to(DEV, torch.bfloat16).requires_grad_()
    y_plain, g_plain = grads(mlp, h, lambda m, x: m(x))
    y_rec, g_rec = grads(mlp, h, {**VARIANTS, **TRITON_VARIANTS}[variant])
    for a, p, r in zip([y_rec] + g_rec, [y_plain] + g_plain, [y64] + g64):
        err_rec = (a.cpu().double() - r).abs().max().item()
        err_plain = (p.cpu().double() - r).abs().max().item()
        assert err_rec <= 1.5 * err_plain + 1e-3 * r.abs().max().item(), (err_rec, err_plain)


def _saved_activation_bytes(fn, mlp, h):
    """Bytes of the non-parameter tensors autograd keeps for the backward of fn(mlp, h) (each storage once)."""
    params = {p.data_ptr() for p in mlp.parameters()}
    seen = {}

    def pack(t):
        if t.data_ptr() not in params:
            seen[t.data_ptr()] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(mlp, h)
    return sum(seen.values())


@pytest.mark.parametrize("variant,less", [("recompute", 1), ("fold/torch", 0), ("recompute-fold/torch", 1),
                                          ("epilogue/torch", 0), ("recompute-epilogue/torch", 1)])
def test_keeps_one_hidden_wide_tensor_less(variant, less):
    mlp, h = make(dtype=torch.float32)
    plain = _saved_activation_bytes(lambda m, x: m(x), mlp, h)
    rec = _saved_activation_bytes(VARIANTS[variant], mlp, h)
    hidden_bytes = h.shape[0] * h.shape[1] * 96 * 4  # one (N, T, 4D) fp32 tensor
    assert plain - rec == less * hidden_bytes, (plain, rec)


def test_autocast_runs_the_plain_module():
    mlp, h = make(dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = recompute_gelu_mlp(mlp, h)
        y_ref = mlp(h)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, y_ref)
