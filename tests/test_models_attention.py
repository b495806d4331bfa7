"""fastdit.models.attention: every backend computes the math attention; the probe decides what can run.

Tensors live on DEV (the CUDA device where there is one, else the CPU). The probe tests replace the
optional libraries with fakes (tests/_helpers.py): a backend that imports but cannot run is unavailable,
with its reason; "auto" never picks it; asking for it is a one-line error.
"""
import types

import pytest
import torch
from _helpers import KNOWN_CUDA_BUG, assert_flash_rule, fake_attention_probe

from fastdit.models import DiT
from fastdit.models import attention as attn_backends

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TINY = dict(hidden_size=72, num_heads=2, depth=2, input_size=6, patch_size=2)  # a fast DiT to construct


@pytest.mark.parametrize("backend", ["sdpa", "sdpa_packed", "flash_attn", "xformers",
                                     pytest.param("triton", marks=[pytest.mark.triton, KNOWN_CUDA_BUG])])
def test_attention_backends_match_math(backend):
    ok, why = attn_backends.backend_status()[backend]
    if not ok:
        pytest.skip(f"{backend} cannot run here: {why}")
    dtype = torch.bfloat16 if DEV.type == "cuda" else torch.float32
    for t, hd in ((16, 72), (7, 64), (256, 72)):
        qkv = torch.randn(2, t, 3, 3, hd, device=DEV, dtype=torch.float32)
        ref = attn_backends.attention(qkv.double(), "math").float()
        got = attn_backends.attention(qkv.to(dtype), backend).float()
        same = attn_backends.attention(qkv.to(dtype), "math").float()
        # atol 1e-5 absolute: softmax(q k^T) v of unit-scale inputs, one op deep
        assert_flash_rule(got, same, ref, 1e-5, f"T={t} hd={hd}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sdpa_packed_gradient_is_sdpas_in_qkvs_layout(dtype):
    """sdpa_packed: the same output and dqkv as sdpa (autograd through the views), dqkv contiguous in qkv's
    (N, T, 3, H, hd) layout, so the qkv projection's backward reads it without another copy."""
    if dtype == torch.bfloat16 and DEV.type != "cuda":
        pytest.skip("bf16 SDPA kernels: CUDA")
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(2, 256, 3, 4, 72, generator=g).to(DEV, dtype).requires_grad_()
    dout = torch.randn(2, 256, 4 * 72, generator=g).to(DEV, dtype)
    out_a = attn_backends.attention(qkv, "sdpa")
    (d_a,) = torch.autograd.grad(out_a, qkv, dout)
    out_b = attn_backends.attention(qkv, "sdpa_packed")
    (d_b,) = torch.autograd.grad(out_b, qkv, dout)
    assert d_b.shape == qkv.shape and d_b.is_contiguous()
    torch.testing.assert_close(out_b, out_a, rtol=0, atol=0)  # the same kernel on the same views
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=0, atol=0)
    torch.testing.assert_close(d_b, d_a, **tol)
    with torch.no_grad():  # inference runs the plain path
        torch.testing.assert_close(attn_backends.attention(qkv, "sdpa_packed"), out_a, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# The probe, with fake libraries
# ----------------------------------------------------------------------------------------------
XFORMERS_WITHOUT_CUDA_OPS = NotImplementedError(
    "No operator found for `memory_efficient_attention_forward` with inputs:\n"
    "     query       : shape=(1, 16, 1, 72) (torch.bfloat16)\n"
    "`cutlassF-pt` is not supported because:\n"
    "    xFormers wasn't build with CUDA support")


def _fake_flash2(calls, error=None):
    """A flash_attn module whose qkv-packed call computes attention (or raises `error`)."""
    def flash_attn_qkvpacked_func(qkv):
        calls.append(qkv.shape)
        if error is not None:
            raise error
        n, t, _, h, hd = qkv.shape
        return attn_backends._math(qkv).view(n, t, h, hd)
    return types.SimpleNamespace(flash_attn_qkvpacked_func=flash_attn_qkvpacked_func)


def _fake_xformers(calls, error):
    def memory_efficient_attention(q, k, v):
        calls.append(q.shape)
        raise error
    return types.SimpleNamespace(memory_efficient_attention=memory_efficient_attention)


def test_probe_xformers_without_cuda_ops_is_unavailable(monkeypatch):
    """xformers 0.0.35 on torch 2.11 (seen on an H100): it imports, but no operator can run."""
    calls = []
    attn = fake_attention_probe(monkeypatch, {"xformers.ops": _fake_xformers(calls, XFORMERS_WITHOUT_CUDA_OPS)})
    status = attn.backend_status()
    ok, why = status["xformers"]
    assert not ok and "NotImplementedError" in why and "wasn't build with CUDA support" in why, why
    assert "\n" not in why
    assert status["flash_attn"] == (False, f"not installed ({attn._INSTALL_HINT['flash_attn']})")
    assert attn.available_backends() == {"math": True, "sdpa": True, "sdpa_packed": True, "flash_attn": False,
                                         "xformers": False, "triton": attn._triton_status()[0]}
    assert attn.resolve_backend("auto", "cuda", torch.bfloat16) == "sdpa_packed"
    with pytest.raises(ImportError, match="'xformers' cannot run here: a test call failed") as e:
        DiT(**TINY, attention="xformers")
    assert "\n" not in str(e.value) and "wasn't build with CUDA support" in str(e.value)
    with pytest.raises(ImportError, match="cannot run here"):
        attn.attention(torch.randn(1, 4, 3, 1, 8, device=DEV), "xformers")
    assert len(calls) == 1, "the probe runs its test call once per process"


def test_probe_flash_attn(monkeypatch):
    """auto picks flash_attn for CUDA half inputs when a test call ran, and never when it failed."""
    calls = []
    attn = fake_attention_probe(monkeypatch, {"flash_attn": _fake_flash2(calls)})
    assert attn.backend_status()["flash_attn"] == (True, "")
    assert calls == [(1, 16, 3, 1, 72)]
    assert attn.resolve_backend("auto", "cuda", torch.bfloat16) == "flash_attn"
    assert attn.resolve_backend("auto", "cuda", torch.float32) == "sdpa_packed"
    assert attn.resolve_backend("auto", "cpu", torch.bfloat16) == "sdpa"
    assert attn.resolve_backend("flash_attn") == "flash_attn"

    attn = fake_attention_probe(monkeypatch, {"flash_attn": _fake_flash2(
        [], RuntimeError("CUDA error: no kernel image is available for execution on the device"))})
    ok, why = attn.backend_status()["flash_attn"]
    assert not ok and "RuntimeError: CUDA error: no kernel image" in why, why
    assert attn.resolve_backend("auto", "cuda", torch.bfloat16) == "sdpa_packed"
    with pytest.raises(ImportError, match="no kernel image"):
        attn.resolve_backend("flash_attn")


def test_probe_broken_import_and_no_cuda(monkeypatch):
    """An import that fails is not "not installed"; without CUDA an importable library cannot run."""
    attn = fake_attention_probe(monkeypatch, {
        "flash_attn": ImportError("libcudart.so.12: cannot open shared object file"),
        "xformers.ops": _fake_xformers([], AssertionError("must not be called"))}, device=None)
    status = attn.backend_status()
    assert status["flash_attn"] == (False, "import failed: flash_attn: ImportError: libcudart.so.12: "
                                           "cannot open shared object file")
    assert status["xformers"] == (False, "needs a CUDA device and none is visible to torch")
    assert attn.resolve_backend("auto", "cuda", torch.bfloat16) == "sdpa_packed"


@pytest.mark.triton
def test_triton_backend_gradient_in_qkvs_layout_and_strided_input():
    """attention="triton": the kernels' dqkv reaches a qkv made by the projection in its own layout; a qkv in
    another layout is copied to the packed one first (the same values and gradient)."""
    qkv = torch.randn(2, 12, 3, 2, 24, device=DEV, requires_grad=True)
    out = attn_backends.attention(qkv, "triton")
    ref = attn_backends.attention(qkv, "math")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=2e-6)
    g = torch.randn_like(out)
    (dqkv,) = torch.autograd.grad(out, qkv, g)
    (ref_g,) = torch.autograd.grad(ref, qkv, g)
    torch.testing.assert_close(dqkv, ref_g, rtol=1e-5, atol=2e-6)
    strided = qkv.detach().transpose(2, 3).contiguous().transpose(2, 3)     # (N, T, 3, H, hd), hd not packed
    torch.testing.assert_close(attn_backends.attention(strided, "triton"), ref.detach(), rtol=1e-5, atol=2e-6)


def test_triton_backend_is_off_on_cuda_unless_asked(monkeypatch):
    """On a CUDA device the Triton attention runs only with FASTDIT_ATTENTION_TRITON=1 (a wrong output on an
    H100 is not fixed yet): otherwise a reason naming the switch, and a one-line error at model construction."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("FASTDIT_ATTENTION_TRITON", raising=False)
    ok, why = attn_backends._triton_status()
    assert not ok and "wrong output on an H100" in why and "FASTDIT_ATTENTION_TRITON=1" in why
    attn = fake_attention_probe(monkeypatch, {}, device=None)
    assert attn.backend_status()["triton"] == (False, why)
    with pytest.raises(ImportError, match="'triton' cannot run here: its kernels gave a wrong output"):
        DiT(**TINY, attention="triton")
    for value in ("0", "yes", ""):
        monkeypatch.setenv("FASTDIT_ATTENTION_TRITON", value)
        assert not attn_backends._triton_status()[0]
    monkeypatch.setenv("FASTDIT_ATTENTION_TRITON", "1")
    assert attn_backends._triton_status() == (True, "")


def test_triton_backend_status_without_a_device(monkeypatch):
    """Without CUDA and without the interpreter the Triton backend cannot run: a reason, and a one-line error
    at model construction; auto never picks it."""
    import fastdit.kernels._common as common
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(common, "INTERPRETED", False)
    ok, why = attn_backends._triton_status()
    assert not ok and "needs a CUDA device" in why and "TRITON_INTERPRET=1" in why
    attn = fake_attention_probe(monkeypatch, {}, device=None)
    assert attn.backend_status()["triton"] == (False, why)
    assert attn.resolve_backend("auto", "cpu", torch.float32) == "sdpa"
    with pytest.raises(ImportError, match="'triton' cannot run here: needs a CUDA device"):
        DiT(**TINY, attention="triton")
