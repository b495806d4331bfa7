"""fastdit.kernels against their plain PyTorch references: every output and every gradient.

Tensors live on DEV: the CUDA device where there is one (the kernels run as compiled GPU code), else
the CPU, where they run through the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1
before triton is imported). fp32 is checked tightly against the reference run in float64; bf16 by
the flash-attention rule  max|kernel - ref_fp32| <= 2 * max|ref_bf16 - ref_fp32| + atol, where
ref_bf16 is the reference run in bf16 on the same inputs and ref_fp32 on fp32 copies of them.
Every output buffer is NaN-filled before launch (FASTDIT_KERNEL_POISON=1), so an element a kernel
does not write fails the comparison. Modulation vectors and gates are random, never zero.
"""
import importlib
import json
import os
import subprocess
import sys

import pytest
import torch
import triton
import triton.language as tl

import fastdit.kernels as K
from _helpers import assert_flash_rule

ML = importlib.import_module("fastdit.kernels.modulate_layernorm")
GR = importlib.import_module("fastdit.kernels.gated_residual")
PE = importlib.import_module("fastdit.kernels.patch_embed")
COMMON = importlib.import_module("fastdit.kernels._common")

pytestmark = pytest.mark.triton
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = [torch.float32, torch.bfloat16]
DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    """NaN-fill every kernel output buffer before launch (read by the launchers at call time)."""
    monkeypatch.setenv(K.POISON_ENV, "1")


# ----------------------------------------------------------------------------------------------
# Harness: run a function of leaf tensors forward and backward, compare with its reference
# ----------------------------------------------------------------------------------------------
def _as_list(out):
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _run(fn, leaves, build, grad_outs, to=None):
    """Outputs of fn(*build(leaves)) and the gradients of sum(out * grad_out) wrt the leaves.

    `to` (a dtype) first casts detached copies of the leaves and grad_outs (for the references).
    """
    if to is not None:
        leaves = [l.detach().to(to) for l in leaves]
        grad_outs = [g.to(to) if g is not None else None for g in grad_outs]
    leaves = [l.detach().clone().requires_grad_(l.is_floating_point()) for l in leaves]  # keeps strides
    outs = _as_list(fn(*build(leaves)))
    diff = [l for l in leaves if l.requires_grad]
    used = [(o, g) for o, g in zip(outs, grad_outs) if g is not None]
    grads = torch.autograd.grad([o for o, _ in used], diff, [g for _, g in used], allow_unused=False)
    return [o.detach() for o in outs], [g.detach() for g in grads]


def _check_fp32(name, got, ref64, rtol=1e-5):
    assert torch.isfinite(got).all(), f"{name}: non-finite values (unwritten element?)"
    scale = ref64.abs().max().item() or 1.0
    err = (got.double() - ref64).abs()
    bound = rtol * (ref64.abs() + scale)
    assert (err <= bound).all(), f"{name}: max err {err.max().item():.3e} (max |ref| {scale:.3e})"


def _check_lowp(name, got, ref_lp, ref32, atol_rel=1e-3):
    """The flash-attention rule with atol = 1e-3 of the output's scale (one rounding of an O(1) value)."""
    assert_flash_rule(got, ref_lp, ref32, atol_rel * (ref32.abs().max().item() or 1.0), name)


def check_op(fn, ref, leaves, build, grad_outs, names, dtype):
    """Compare outputs and leaf gradients of `fn` with `ref` (fp32: tight; low precision: rule)."""
    outs, grads = _run(fn, leaves, build, grad_outs)
    got = outs + grads
    for o, l in zip(grads, [l for l in leaves if l.is_floating_point()]):
        assert o.dtype == l.dtype and o.shape == l.shape
    if dtype == torch.float32:
        r_outs, r_grads = _run(ref, leaves, build, grad_outs, to=torch.float64)
        for o, r in zip(outs, r_outs):
            assert o.dtype == torch.float32
        for name, g, r in zip(names, got, r_outs + r_grads):
            _check_fp32(name, g, r)
    else:
        lp_outs, lp_grads = _run(ref, leaves, build, grad_outs)
        r_outs, r_grads = _run(ref, leaves, build, grad_outs, to=torch.float32)
        for o, r in zip(outs, lp_outs):
            assert o.dtype == r.dtype, f"output dtype {o.dtype} != reference {r.dtype}"
        for name, g, lp, r in zip(names, got, lp_outs + lp_grads, r_outs + r_grads):
            _check_lowp(name, g, lp, r)


def randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEV).to(dtype)


def rand_mod(n, d, k, dtype):
    """(N, k*D) 'adaLN output' with clearly non-zero entries, chunked by the build functions."""
    return (0.5 * torch.randn(n, k * d, device=DEV) + 0.3).to(dtype)


# ----------------------------------------------------------------------------------------------
# modulate_layernorm
# ----------------------------------------------------------------------------------------------
ROW_SHAPES = [(2, 16, 384), (1, 7, 768), (2, 4, 1024), (2, 16, 1152), (3, 7, 37), (1, 64, 97),
              (2, 1, 5)]


def _modln_build(leaves):
    x, c = leaves
    shift, scale = c.chunk(6, dim=1)[:2]        # non-contiguous (N, D) views of the (N, 6D) output
    return x, shift, scale


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ROW_SHAPES, ids=str)
def test_modulate_layernorm(shape, dtype):
    n, t, d = shape
    x = 2.0 * randn(n, t, d, dtype=dtype) + 0.5
    c = rand_mod(n, d, 6, dtype)
    dy = randn(n, t, d, dtype=dtype)
    check_op(K.modulate_layernorm, K.modulate_layernorm_ref, [x, c], _modln_build, [dy],
             ["y", "dx", "dc(shift,scale)"], dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_modulate_layernorm_transposed_inputs(dtype):
    n, t, d = 2, 7, 97
    xt = randn(n, d, t, dtype=dtype)                              # x as a transposed view
    c = rand_mod(n, d, 6, dtype)
    dy = randn(n, d, t, dtype=dtype).transpose(1, 2)              # non-contiguous incoming grad

    def build(leaves):
        x_base, c_ = leaves
        return (x_base.transpose(1, 2),) + _modln_build([None, c_])[1:]

    check_op(K.modulate_layernorm, K.modulate_layernorm_ref, [xt, c], build, [dy],
             ["y", "dx", "dc"], dtype)


@pytest.mark.parametrize("block_t,tokens_per_tile", [(1, 1), (2, 2), (4, 8), (16, 16)])
def test_modulate_layernorm_tilings(block_t, tokens_per_tile):
    """Launchers at several tilings (partial last tile, several steps per program) vs float64."""
    n, t, d = 2, 13, 37
    x, dy = randn(n, t, d), randn(n, t, d)
    shift, scale = rand_mod(n, d, 2, torch.float32).chunk(2, 1)
    y, mean, rstd = ML.modulate_layernorm_fwd(x, shift, scale, 1e-6, block_t=block_t)
    dx, dshift, dscale = ML.modulate_layernorm_bwd(dy, x, scale, mean, rstd, torch.float32,
                                                   tokens_per_tile=tokens_per_tile, block_t=block_t)
    (r_outs, r_grads) = _run(K.modulate_layernorm_ref, [x, shift, scale], lambda l: l, [dy],
                             to=torch.float64)
    for name, g, r in zip(["y", "dx", "dshift", "dscale"], [y, dx, dshift, dscale],
                          r_outs + r_grads):
        _check_fp32(name, g, r)
    xd = x.double()
    _check_fp32("mean", mean, xd.mean(-1))
    _check_fp32("rstd", rstd, 1 / torch.sqrt(xd.var(-1, unbiased=False) + 1e-6))


def test_modulate_layernorm_mixed_and_fp16():
    """fp32 activations with bf16 modulation (autocast's mix) and an all-fp16 call."""
    n, t, d = 2, 7, 37
    x = randn(n, t, d)
    c = rand_mod(n, d, 6, torch.bfloat16)
    dy = randn(n, t, d)
    y = K.modulate_layernorm(x, *_modln_build([x, c])[1:])
    assert y.dtype == torch.float32
    # bf16 values are exact in fp32/fp64, so the fp32 comparison stays tight.
    outs, grads = _run(K.modulate_layernorm, [x, c], _modln_build, [dy])
    assert grads[1].dtype == torch.bfloat16
    r_outs, r_grads = _run(K.modulate_layernorm_ref, [x, c], _modln_build, [dy], to=torch.float64)
    _check_fp32("y", outs[0], r_outs[0])
    _check_fp32("dx", grads[0], r_grads[0])
    _check_lowp("dc", grads[1], r_grads[1].to(torch.bfloat16), r_grads[1].float())

    xh, ch, dyh = x.half(), c.half(), dy.half()
    check_op(K.modulate_layernorm, K.modulate_layernorm_ref, [xh, ch], _modln_build, [dyh],
             ["y", "dx", "dc"], torch.float16)


# ----------------------------------------------------------------------------------------------
# gated_residual and gated_residual_modulate_layernorm
# ----------------------------------------------------------------------------------------------
RES_SHAPES = [(2, 16, 384), (1, 7, 1152), (2, 4, 1024), (1, 16, 768), (3, 7, 37), (2, 64, 97)]


def _gr_build(leaves):
    x, y, c = leaves
    return x, y, c.chunk(6, dim=1)[2]               # gate_msa: a non-contiguous (N, D) chunk


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", RES_SHAPES, ids=str)
def test_gated_residual(shape, dtype):
    n, t, d = shape
    x, y, dout = randn(n, t, d, dtype=dtype), randn(n, t, d, dtype=dtype), randn(n, t, d, dtype=dtype)
    c = rand_mod(n, d, 6, dtype)
    check_op(K.gated_residual, K.gated_residual_ref, [x, y, c], _gr_build, [dout],
             ["out", "dx", "dy", "dgate"], dtype)


def _grml_build(leaves):
    x, y, c = leaves
    shift, scale, gate = c.chunk(6, dim=1)[3], c.chunk(6, dim=1)[4], c.chunk(6, dim=1)[2]
    return x, y, gate, shift, scale


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", RES_SHAPES, ids=str)
def test_gated_residual_modulate_layernorm(shape, dtype):
    n, t, d = shape
    x, y = 2.0 * randn(n, t, d, dtype=dtype), randn(n, t, d, dtype=dtype)
    c = rand_mod(n, d, 6, dtype)
    dxnew, dh = randn(n, t, d, dtype=dtype), randn(n, t, d, dtype=dtype)
    check_op(K.gated_residual_modulate_layernorm, K.gated_residual_modulate_layernorm_ref,
             [x, y, c], _grml_build, [dxnew, dh], ["x_new", "h", "dx", "dy", "dc"], dtype)


def _grml_bias(x, y, gate, shift, scale, bias):
    return K.gated_residual_modulate_layernorm(x, y, gate, shift, scale, bias=bias)


def _grml_bias_ref(x, y, gate, shift, scale, bias):
    return K.gated_residual_modulate_layernorm_ref(x, y, gate, shift, scale, bias=bias)


def _grml_bias_build(leaves):
    x, y, c, b = leaves
    return (*_grml_build([x, y, c]), b)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 16, 384), (1, 7, 1152), (3, 7, 37), (2, 64, 97)], ids=str)
def test_gated_residual_modulate_layernorm_bias(shape, dtype):
    """x' = x + gate * (y + bias): every output and gradient, the bias's included (bias_fold)."""
    n, t, d = shape
    x, y = 2.0 * randn(n, t, d, dtype=dtype), randn(n, t, d, dtype=dtype)
    c, b = rand_mod(n, d, 6, dtype), randn(d, dtype=dtype)
    dxnew, dh = randn(n, t, d, dtype=dtype), randn(n, t, d, dtype=dtype)
    check_op(_grml_bias, _grml_bias_ref, [x, y, c, b], _grml_bias_build, [dxnew, dh],
             ["x_new", "h", "dx", "dy", "dc", "dbias"], dtype)


def test_gated_residual_modulate_layernorm_bias_tilings_strides_and_h_only():
    """The bias path at small tiles (several token tiles per sample, a partial last one), a strided
    bias, h-only gradients, and mixed dtypes (fp32 x, bf16 y / gate / bias)."""
    n, t, d = 3, 9, 37
    x, y, dh, dxn = randn(n, t, d), randn(n, t, d), randn(n, t, d), randn(n, t, d)
    gate, shift, scale = rand_mod(n, d, 3, torch.float32).chunk(3, 1)
    bias = randn(2 * d)[::2]                                        # stride 2
    for dxnew in (dxn, None):
        xnew, h, mean, rstd = ML.gated_residual_modulate_layernorm_fwd(x, y, gate, shift, scale, bias=bias,
                                                                      block_t=2)
        grads = ML.gated_residual_modulate_layernorm_bwd(dh, dxnew, xnew, y, gate, scale, mean, rstd,
                                                         torch.float32, torch.float32, bias=bias,
                                                         tokens_per_tile=4, block_t=2)
        assert len(grads) == 6
        r_outs, r_grads = _run(K.gated_residual_modulate_layernorm_ref, [x, y, gate, shift, scale, bias],
                               lambda l: (*l[:5], 1e-6, l[5]), [dxnew, dh], to=torch.float64)
        for name, g, r in zip(["x_new", "h", "dx", "dy", "dgate", "dshift", "dscale", "dbias"],
                              [xnew, h, *grads], r_outs + r_grads):
            _check_fp32(name, g, r)
    yb, gb, bb = y.bfloat16(), gate.bfloat16(), bias.bfloat16()
    xnew, h = K.gated_residual_modulate_layernorm(x, yb, gb, shift, scale, bias=bb)
    assert xnew.dtype == torch.float32
    r_x, r_h = K.gated_residual_modulate_layernorm_ref(x.double(), yb.double(), gb.double(), shift.double(),
                                                       scale.double(), bias=bb.double())
    _check_fp32("mixed x_new", xnew, r_x)
    _check_fp32("mixed h", h, r_h)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gated_residual_modulate_layernorm_h_only_and_transposed(dtype):
    """Only h feeds the loss (x' gets no gradient); x, y transposed views; 2-D grad strides."""
    n, t, d = 2, 7, 37
    xt, yt = randn(n, d, t, dtype=dtype), randn(n, d, t, dtype=dtype)
    c = rand_mod(n, d, 6, dtype)
    dh = randn(n, d, t, dtype=dtype).transpose(1, 2)

    def build(leaves):
        x_, y_, c_ = leaves
        return _grml_build([x_.transpose(1, 2), y_.transpose(1, 2), c_])

    check_op(K.gated_residual_modulate_layernorm, K.gated_residual_modulate_layernorm_ref,
             [xt, yt, c], build, [None, dh], ["x_new", "h", "dx", "dy", "dc"], dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_row_ops_with_no_tokens_forward_and_backward(dtype):
    """T = 0 (an empty token axis): outputs and every gradient are empty or zero, as the references'
    (the backward launchers' tiling divided by zero)."""
    n, t, d = 2, 0, 37
    x, y = randn(n, t, d, dtype=dtype), randn(n, t, d, dtype=dtype)
    c = rand_mod(n, d, 6, dtype)
    cases = [(K.modulate_layernorm, K.modulate_layernorm_ref, [x, c], _modln_build, 1),
             (K.gated_residual, K.gated_residual_ref, [x, y, c], _gr_build, 1),
             (K.gated_residual_modulate_layernorm, K.gated_residual_modulate_layernorm_ref, [x, y, c],
              _grml_build, 2)]
    for fn, ref, leaves, build, n_out in cases:
        grad_outs = [randn(n, t, d, dtype=dtype) for _ in range(n_out)]
        outs, grads = _run(fn, leaves, build, grad_outs)
        r_outs, r_grads = _run(ref, leaves, build, grad_outs)
        for got, want in zip(outs + grads, r_outs + r_grads):
            assert got.shape == want.shape and got.dtype == want.dtype
            assert torch.equal(got, torch.zeros_like(want)) and torch.equal(want, torch.zeros_like(want))


def test_residual_tilings_and_mixed():
    """Fused residual launchers at small tiles; gated residual with fp32 x and bf16 y/gate."""
    n, t, d = 2, 9, 37
    x, y, dh, dxn = randn(n, t, d), randn(n, t, d), randn(n, t, d), randn(n, t, d)
    gate, shift, scale = rand_mod(n, d, 3, torch.float32).chunk(3, 1)
    xnew, h, mean, rstd = ML.gated_residual_modulate_layernorm_fwd(x, y, gate, shift, scale, block_t=2)
    grads = ML.gated_residual_modulate_layernorm_bwd(dh, dxn, xnew, y, gate, scale, mean, rstd,
                                                     torch.float32, torch.float32,
                                                     tokens_per_tile=4, block_t=2)
    r_outs, r_grads = _run(K.gated_residual_modulate_layernorm_ref, [x, y, gate, shift, scale],
                           lambda l: l, [dxn, dh], to=torch.float64)
    for name, g, r in zip(["x_new", "h", "dx", "dy", "dgate", "dshift", "dscale"],
                          [xnew, h, *grads], r_outs + r_grads):
        _check_fp32(name, g, r)
    dy, dgate = GR.gated_residual_bwd(dh, y, gate, tokens_per_tile=2, block_t=1)
    _check_fp32("dy", dy, dh.double() * gate.double()[:, None])
    _check_fp32("dgate", dgate, (dh.double() * y.double()).sum(1))

    yb, gb = y.bfloat16(), gate.bfloat16()
    out = K.gated_residual(x, yb, gb)
    assert out.dtype == torch.float32
    _check_fp32("mixed out", out, K.gated_residual_ref(x.double(), yb.double(), gb.double()))


@pytest.mark.parametrize("shape", [(2, 9, 37), (1, 7, 1152)], ids=str)
def test_paired_row_sums_switch(monkeypatch, shape):
    """FASTDIT_LN_ROW_SUMS=paired (the LN backward's two row sums in one reduction) against float64, with and without
    the residual and the bias, at a multi-step token loop; the same sums as `separate` up to fp32 rounding; a bad
    value is one line."""
    n, t, d = shape
    x, y, dh, dxn = randn(n, t, d), randn(n, t, d), randn(n, t, d), randn(n, t, d)
    gate, shift, scale = rand_mod(n, d, 3, torch.float32).chunk(3, 1)
    bias = randn(d)
    r_outs, r_grads = _run(_grml_bias_ref, [x, y, gate, shift, scale, bias], lambda l: l, [dxn, dh],
                           to=torch.float64)
    got = {}
    for mode in ("separate", "paired"):
        monkeypatch.setenv("FASTDIT_LN_ROW_SUMS", mode)
        xnew, h, mean, rstd = ML.gated_residual_modulate_layernorm_fwd(x, y, gate, shift, scale, bias=bias)
        grads = ML.gated_residual_modulate_layernorm_bwd(dh, dxn, xnew, y, gate, scale, mean, rstd, torch.float32,
                                                         torch.float32, bias=bias, tokens_per_tile=4, block_t=2)
        for name, g, r in zip(["dx", "dy", "dgate", "dshift", "dscale", "dbias"], grads, r_grads):
            _check_fp32(f"{mode} {name}", g, r)
        dx1, dshift1, dscale1 = ML.modulate_layernorm_bwd(dh, xnew, scale, mean, rstd, torch.float32,
                                                          tokens_per_tile=4, block_t=2)   # no residual
        got[mode] = (grads[0], dx1, dshift1, dscale1)
    for a, b in zip(got["separate"], got["paired"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    monkeypatch.setenv("FASTDIT_LN_ROW_SUMS", "pairs")
    with pytest.raises(ValueError, match=r"FASTDIT_LN_ROW_SUMS='pairs'; choose one of \('separate', 'paired'\)"):
        ML.modulate_layernorm_bwd(dh, x, scale, mean, rstd, torch.float32)


def test_residual_bwd_tiling_applies_where_measured(monkeypatch):
    """RESIDUAL_BWD_TILING: bf16/fp16 rows of its widths on sm_90+ only; elsewhere row_tile and a plain loop."""
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(ML, "shared_memory_per_block", lambda device: 232448)      # an H100's opt-in limit
    assert ML.residual_bwd_tiling(1152, 2, cuda) == ML.RESIDUAL_BWD_TILING[2048] == (4, 8, 3)
    assert ML.residual_bwd_tiling(1536, 2, cuda) == (4, 8, 3)       # the same BLOCK_D, 2048
    assert ML.residual_bwd_tiling(1024, 2, cuda) is None            # BLOCK_D 1024: not measured
    assert ML.residual_bwd_tiling(1152, 4, cuda) is None            # fp32: 3 stages of 4-byte rows overflow
    assert ML.residual_bwd_tiling(768, 2, cuda) is None             # a width not measured
    assert ML.residual_bwd_tiling(1152, 2, torch.device("cpu")) is None
    assert ML.residual_bwd_tiling(1152, 2, cuda, bias=True) == (4, 8, 3)   # bias_fold: the same tiling
    monkeypatch.setattr(ML, "shared_memory_per_block", lambda device: 150 * 1024)   # enough without the bias only
    assert ML.residual_bwd_tiling(1152, 2, cuda) == (4, 8, 3)
    assert ML.residual_bwd_tiling(1152, 2, cuda, bias=True) is None       # 147.6 KB does not leave room
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (12, 0))
    monkeypatch.setattr(ML, "shared_memory_per_block", lambda device: 101376)      # a consumer Blackwell part
    assert ML.residual_bwd_tiling(1152, 2, cuda) is None            # the 3 stages would not fit
    monkeypatch.setattr(ML, "shared_memory_per_block", lambda device: None)        # unknown: the plain loop
    assert ML.residual_bwd_tiling(1152, 2, cuda) is None
    monkeypatch.setattr(ML, "shared_memory_per_block", lambda device: 232448)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert ML.residual_bwd_tiling(1152, 2, cuda) is None            # before sm_90: not measured
    assert COMMON.shared_memory_per_block(torch.device("cpu")) is None


def test_residual_bwd_launch_takes_the_measured_tiling(monkeypatch):
    """The launcher asks residual_bwd_tiling only when no tiling is given (saying whether the op has a bias), and
    what it returns is launched (here a small tiling on the interpreter, still matching the reference)."""
    asked, launched = [], []
    monkeypatch.setattr(ML, "residual_bwd_tiling",
                        lambda d, itemsize, device, bias=False: asked.append((d, itemsize, bias)) or (1, 2, 2))
    real_launch_tile, real_stages = ML.launch_tile, ML.loop_stages
    monkeypatch.setattr(ML, "launch_tile", lambda d, bt, nw: launched.append((bt, nw)) or real_launch_tile(d, bt, nw))
    monkeypatch.setattr(ML, "loop_stages", lambda k: launched.append(k) or real_stages(k))
    n, t, d = 2, 9, 37
    x, y, dh, dxn = randn(n, t, d), randn(n, t, d), randn(n, t, d), randn(n, t, d)
    gate, shift, scale = rand_mod(n, d, 3, torch.float32).chunk(3, 1)
    xnew, _, mean, rstd = ML.gated_residual_modulate_layernorm_fwd(x, y, gate, shift, scale)
    launched.clear()
    grads = ML.gated_residual_modulate_layernorm_bwd(dh, dxn, xnew, y, gate, scale, mean, rstd,
                                                     torch.float32, torch.float32)
    assert asked == [(d, 4, False)] and launched == [(1, 2), 2]
    r_outs, r_grads = _run(K.gated_residual_modulate_layernorm_ref, [x, y, gate, shift, scale],
                           lambda l: l, [dxn, dh], to=torch.float64)
    for name, g, r in zip(["dx", "dy", "dgate", "dshift", "dscale"], grads, r_grads):
        _check_fp32(name, g, r)
    # with the bias (bias_fold): asked with bias=True, and its tiling launched; the sums against the reference
    bias = randn(d)
    xnew_b, _, mean_b, rstd_b = ML.gated_residual_modulate_layernorm_fwd(x, y, gate, shift, scale, bias=bias)
    asked.clear(), launched.clear()
    grads_b = ML.gated_residual_modulate_layernorm_bwd(dh, dxn, xnew_b, y, gate, scale, mean_b, rstd_b,
                                                       torch.float32, torch.float32, bias=bias)
    assert asked == [(d, 4, True)] and launched == [(1, 2), 2]
    r_outs, r_grads = _run(lambda *a: K.gated_residual_modulate_layernorm_ref(*a[:5], bias=a[5]),
                           [x, y, gate, shift, scale, bias], lambda l: l, [dxn, dh], to=torch.float64)
    for name, g, r in zip(["dx", "dy", "dgate", "dshift", "dscale", "dbias"], grads_b, r_grads):
        _check_fp32(name, g, r)
    asked.clear(), launched.clear()
    ML.gated_residual_modulate_layernorm_bwd(dh, dxn, xnew, y, gate, scale, mean, rstd, torch.float32,
                                             torch.float32, num_stages=1)
    ML.modulate_layernorm_bwd(dh, x, scale, mean, rstd, torch.float32)
    assert asked == [] and launched == [(None, None), 1, (None, None), None]


# ----------------------------------------------------------------------------------------------
# patch_embed
# ----------------------------------------------------------------------------------------------
# (N, C, H, W, p, D): p = 2/4/8 at tiny images, C = 4 and 3, odd and DiT hidden sizes.
PE_CASES = [(2, 4, 4, 4, 2, 37), (1, 4, 8, 8, 2, 384), (2, 3, 16, 16, 4, 97), (1, 4, 16, 16, 8, 33),
            (1, 4, 16, 16, 2, 1152), (1, 3, 6, 14, 2, 768), (2, 4, 8, 8, 4, 1024)]


def _pe_leaves(n, c, h, w, p, d, dtype, pos=True):
    t = (h // p) * (w // p)
    x = randn(n, c, h, w, dtype=dtype)
    weight = (randn(d, c, p, p) / (c * p * p) ** 0.5).to(dtype)
    bias = randn(d, dtype=dtype)
    pos_embed = randn(1, t, d, dtype=dtype) if pos else None
    return x, weight, bias, pos_embed


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", PE_CASES, ids=str)
def test_patch_embed(case, dtype):
    n, c, h, w, p, d = case
    x, weight, bias, pos = _pe_leaves(*case, dtype)
    dout = randn(n, (h // p) * (w // p), d, dtype=dtype)
    check_op(lambda *a: K.patch_embed(*a, pos, p), lambda *a: K.patch_embed_ref(*a, pos, p),
             [x, weight, bias], lambda l: l, [dout], ["out", "dx", "dweight", "dbias"], dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_patch_embed_strided_no_pos_no_bias(dtype):
    """x in channels_last (non-contiguous NCHW strides), no pos_embed; then no bias."""
    n, c, h, w, p, d = 2, 3, 8, 8, 2, 37
    x, weight, bias, _ = _pe_leaves(n, c, h, w, p, d, dtype, pos=False)
    x = x.to(memory_format=torch.channels_last)
    dout = randn(n, d, (h // p) * (w // p), dtype=dtype).transpose(1, 2)

    def build(leaves):
        x_, w_, b_ = leaves
        return x_.contiguous(memory_format=torch.channels_last), w_, b_

    check_op(lambda *a: K.patch_embed(*a, None, p), lambda *a: K.patch_embed_ref(*a, None, p),
             [x, weight, bias], build, [dout], ["out", "dx", "dweight", "dbias"], dtype)
    check_op(lambda a, b_: K.patch_embed(a, b_, None, None, p),
             lambda a, b_: K.patch_embed_ref(a, b_, None, None, p),
             [x, weight], lambda l: l, [dout], ["out", "dx", "dweight"], dtype)


@pytest.mark.parametrize("blocks,split", [((16, 16, 16), 3), ((32, 16, 32), 1), ((16, 32, 16), 64)])
def test_patch_embed_tilings(blocks, split):
    """Several K steps, partial M/N/K tiles and split-M partial sums for dW/db, vs float64."""
    n, c, h, w, p, d = 2, 4, 32, 16, 4, 37         # K = 64, T = 32, M = 64
    x, weight, bias, pos = _pe_leaves(n, c, h, w, p, d, torch.float32)
    dout = randn(n, 32, d)
    out = PE.patch_embed_fwd(x, weight, bias, pos, p, blocks=blocks)
    dx, dw, db = PE.patch_embed_bwd(dout, x, weight, p, True, True, blocks=blocks, split=split)
    r_outs, r_grads = _run(lambda *a: K.patch_embed_ref(*a, pos.double(), p), [x, weight, bias],
                           lambda l: l, [dout], to=torch.float64)
    for name, g, r in zip(["out", "dx", "dweight", "dbias"], [out, dx, dw, db], r_outs + r_grads):
        _check_fp32(name, g, r)
    _, dw2, db2 = PE.patch_embed_bwd(dout, x, weight, p, False, False, blocks=blocks, split=split)
    _check_fp32("dweight (no bias, no dx)", dw2, r_grads[1])
    assert db2 is None


def _count_calls(monkeypatch, module, name):
    calls = []
    real = getattr(module, name)

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)
    monkeypatch.setattr(module, name, spy)
    return calls


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", [PE_CASES[0], PE_CASES[2], PE_CASES[5], PE_CASES[6]], ids=str)
def test_patch_embed_gemm_backward(case, dtype, monkeypatch):
    """FASTDIT_PATCH_EMBED_BWD=gemm: the backward from library GEMMs (dweight and dbias in one GEMM against
    the patch rows and a column of ones; dx as a GEMM folded back) matches the reference, as the kernels do."""
    monkeypatch.setenv(PE.BWD_ENV, "gemm")
    calls = _count_calls(monkeypatch, PE, "patch_embed_bwd_gemm")
    n, c, h, w, p, d = case
    x, weight, bias, pos = _pe_leaves(*case, dtype)
    dout = randn(n, (h // p) * (w // p), d, dtype=dtype)
    check_op(lambda *a: K.patch_embed(*a, pos, p), lambda *a: K.patch_embed_ref(*a, pos, p),
             [x, weight, bias], lambda l: l, [dout], ["out", "dx", "dweight", "dbias"], dtype)
    assert calls
    # channels_last images, a transposed dout, no bias (K = 12: zero-padded to 16; K = 16: no padding)
    for c_ in (3, 4):
        x, weight, _, _ = _pe_leaves(2, c_, 8, 8, 2, 37, dtype, pos=False)
        x = x.to(memory_format=torch.channels_last)
        dout = randn(2, 37, 16, dtype=dtype).transpose(1, 2)
        check_op(lambda a, b_: K.patch_embed(a, b_, None, None, 2),
                 lambda a, b_: K.patch_embed_ref(a, b_, None, None, 2),
                 [x, weight], lambda l: l, [dout], ["out", "dx", "dweight"], dtype)


def test_patch_embed_gemm_backward_matches_the_kernels():
    """The two backward implementations on one input (fp32: to rounding), with and without dx and bias; the
    mode argument wins over the environment; bad values raise one clear error."""
    n, c, h, w, p, d = 2, 4, 16, 8, 2, 40
    x, weight, _, _ = _pe_leaves(n, c, h, w, p, d, torch.float32)
    dout = randn(n, (h // p) * (w // p), d)
    for has_bias in (True, False):
        for need_dx in (True, False):
            a = PE.patch_embed_bwd(dout, x, weight, p, has_bias, need_dx, mode="triton")
            b = PE.patch_embed_bwd(dout, x, weight, p, has_bias, need_dx, mode="gemm")
            for u, v in zip(a, b):
                assert (u is None) == (v is None)
                if u is not None:
                    assert u.shape == v.shape and u.dtype == v.dtype
                    torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="mode must be one of"):
        PE.patch_embed_bwd(dout, x, weight, p, mode="cublas")
    os.environ[PE.BWD_ENV] = "cublas"
    try:
        with pytest.raises(ValueError, match="FASTDIT_PATCH_EMBED_BWD='cublas'; choose one of"):
            PE.patch_embed_bwd(dout, x, weight, p)
        assert PE.patch_embed_bwd(dout, x, weight, p, mode="triton")[1].shape == weight.shape
    finally:
        del os.environ[PE.BWD_ENV]
    assert PE.bwd_mode() == "triton"


def test_patch_embed_pos_dtype_and_grad():
    """bf16 images with an fp32 pos_embed give fp32 (as conv(x) + pos); pos grads when asked."""
    n, c, h, w, p, d = 1, 4, 4, 4, 2, 37
    x, weight, bias, _ = _pe_leaves(n, c, h, w, p, d, torch.bfloat16)
    pos = randn(1, 4, d).requires_grad_()
    out = K.patch_embed(x, weight, bias, pos, p)
    assert out.dtype == torch.float32
    ref = K.patch_embed_ref(x.double(), weight.double(), bias.double(), pos.detach().double(), p)
    _check_lowp("out", out, K.patch_embed_ref(x, weight, bias, pos.detach(), p), ref.float())
    g = randn(n, 4, d)
    (dpos,) = torch.autograd.grad(out, [pos], g)
    _check_fp32("dpos", dpos, g.double())


# ----------------------------------------------------------------------------------------------
# Poisoning, bad inputs, kernels_supported
# ----------------------------------------------------------------------------------------------
def test_poison_catches_unwritten_rows():
    """A launch that skips the last token tile leaves NaN rows, which the checks above reject."""
    assert COMMON.poison_enabled()
    n, t, d = 1, 8, 37
    x = randn(n, t, d)
    shift, scale = rand_mod(n, d, 2, torch.float32).chunk(2, 1)
    out = COMMON.alloc((n, t, d), torch.float32, x.device)
    stats = [COMMON.alloc((n * t,), torch.float32, x.device) for _ in range(2)]
    bt, block_d, _ = COMMON.row_tile(d)
    bt = 2
    ML._modln_fwd_kernel[(t // bt - 1, n)](
        x, *x.stride(), x, 0, 0, 0, shift, 0, 0, shift, 0, shift, *shift.stride(), scale, *scale.stride(),
        out, out, *stats, t, d, 1e-6, HAS_RESIDUAL=False, HAS_BIAS=False, BLOCK_T=bt, BLOCK_D=block_d)
    assert torch.isnan(out[:, -bt:]).all() and torch.isfinite(out[:, :-bt]).all()
    with pytest.raises(AssertionError, match="non-finite"):
        _check_fp32("y", out, K.modulate_layernorm_ref(x, shift, scale).double())


@triton.jit
def _loop_sum_kernel(X, OUT, n, BLOCK: tl.constexpr):
    # OUT[0] = sum of X[:n] over a loop bounded by the run-time scalar n, as the kernels' loops are.
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in range(0, n, BLOCK):
        offs = i + tl.arange(0, BLOCK)
        acc += tl.load(X + offs, mask=offs < n, other=0.0)
    tl.store(OUT, tl.sum(acc, axis=0))


def test_runtime_scalar_loop_bound():
    """The interpreter of triton < 3.7 cannot bound a loop by a scalar argument under NumPy >= 2.4
    unless _common's fix is installed (it is, there and only there)."""
    x = randn(37)
    out = torch.full((1,), float("nan"), device=DEV)
    _loop_sum_kernel[(1,)](x, out, 37, BLOCK=8)
    _check_fp32("sum", out, x.double().sum().reshape(1))
    assert COMMON.INTERPRETER_INDEX_FIXED == (COMMON.INTERPRETED and COMMON._triton_version() < (3, 7))


def test_interpreter_that_drops_stores_is_refused(monkeypatch):
    """triton 3.0/3.1's interpreter writes nothing under NumPy 2: a clear error, not wrong numbers."""
    major = int(COMMON.np.__version__.split(".")[0])
    monkeypatch.setattr(COMMON, "_triton_version", lambda: (3, 1))
    assert (COMMON.interpreter_problem() is not None) == (major >= 2)
    monkeypatch.setattr(COMMON, "_triton_version", lambda: (3, 2))
    assert COMMON.interpreter_problem() is None
    if DEV == "cpu" and major >= 2:
        monkeypatch.setattr(COMMON, "_triton_version", lambda: (3, 1))
        ok, why = K.kernels_supported(randn(2, 3, 8))
        assert not ok and "drops stores" in why
        with pytest.raises(ValueError, match="fastdit needs triton >= 3.3"):
            K.modulate_layernorm(randn(2, 3, 8), randn(2, 8), randn(2, 8))


def _bad_row_inputs():
    n, t, d = 2, 3, 8
    x, y = randn(n, t, d), randn(n, t, d)
    v = randn(n, d)
    meta = torch.empty(n, d, device="meta")
    big = randn(1, 1, K.KERNEL_MAX_D + 1)
    bigv = randn(1, K.KERNEL_MAX_D + 1)
    return [
        ("int x", lambda: K.modulate_layernorm(x.long(), v, v), TypeError, "dtype"),
        ("fp64 x", lambda: K.modulate_layernorm(x.double(), v.double(), v.double()), TypeError, "dtype"),
        ("bool gate", lambda: K.gated_residual(x, y, v > 0), TypeError, "dtype"),
        ("float gate", lambda: K.gated_residual(x, y, 0.5), TypeError, "torch.Tensor"),
        ("2-D x", lambda: K.modulate_layernorm(x[0], v, v), ValueError, "3 dimensions"),
        ("shift (1, D)", lambda: K.modulate_layernorm(x, v[:1], v), ValueError, r"\(N, D\)"),
        ("scale D+1", lambda: K.modulate_layernorm(x, v, randn(n, d + 1)), ValueError, r"\(N, D\)"),
        ("y shape", lambda: K.gated_residual(x, y[:, :2], v), ValueError, "shape of x"),
        ("fused y shape", lambda: K.gated_residual_modulate_layernorm(x, y[:1], v, v, v), ValueError,
         "shape of x"),
        ("bias (N, D)", lambda: K.gated_residual_modulate_layernorm(x, y, v, v, v, bias=v), ValueError,
         "must have 1 dimension"),
        ("bias D+1", lambda: K.gated_residual_modulate_layernorm(x, y, v, v, v, bias=randn(d + 1)),
         ValueError, r"\(D,\)"),
        ("int bias", lambda: K.gated_residual_modulate_layernorm(x, y, v, v, v, bias=v[0].long()),
         TypeError, "dtype"),
        ("D too big", lambda: K.modulate_layernorm(big, bigv, bigv), ValueError, "KERNEL_MAX_D"),
        ("D too big residual", lambda: K.gated_residual(big, big, bigv), ValueError, "KERNEL_MAX_D"),
        ("mixed devices", lambda: K.modulate_layernorm(x, meta, v), ValueError, "same device"),
        ("meta device", lambda: K.gated_residual(x.to("meta"), y.to("meta"), meta), ValueError,
         "not supported"),
    ]


@pytest.mark.parametrize("case", _bad_row_inputs(), ids=lambda c: c[0] if isinstance(c, tuple) else "")
def test_row_ops_bad_inputs_raise(case):
    _, call, exc, pattern = case
    with pytest.raises(exc, match=pattern):
        call()


def test_patch_embed_bad_inputs_raise():
    x, weight, bias, pos = _pe_leaves(1, 4, 8, 8, 2, 16, torch.float32)
    cases = [
        (lambda: K.patch_embed(x[:, :, :7], weight, bias, None, 2), ValueError, "divisible"),
        (lambda: K.patch_embed(x[:, :3], weight, bias, pos, 2), ValueError, r"\(D, C, p, p\)"),
        (lambda: K.patch_embed(x, weight, bias, pos, 4), ValueError, r"\(D, C, p, p\)"),
        (lambda: K.patch_embed(x, weight.half(), bias, pos, 2), TypeError, "weight dtype"),
        (lambda: K.patch_embed(x, weight, bias[:3], pos, 2), ValueError, "bias"),
        (lambda: K.patch_embed(x, weight, bias.double(), pos, 2), TypeError, "dtype"),
        (lambda: K.patch_embed(x, weight, bias, pos[:, :3], 2), ValueError, "pos_embed"),
        (lambda: K.patch_embed(x.int(), weight.int(), bias.int(), None, 2), TypeError, "dtype"),
        (lambda: K.patch_embed(x[0], weight, bias, pos, 2), ValueError, "4 dimensions"),
        (lambda: K.patch_embed(x, weight, bias, pos, 0), ValueError, "patch_size"),
        (lambda: K.patch_embed(x, weight.to("meta"), bias, pos, 2), ValueError, "same device"),
    ]
    for call, exc, pattern in cases:
        with pytest.raises(exc, match=pattern):
            call()


def test_kernels_supported(monkeypatch):
    x = randn(2, 3, 8)
    assert K.kernels_supported(x) == (True, "")
    assert K.kernels_supported(x, randn(2, 8).bfloat16(), None) == (True, "")
    for bad, word in [(x.long(), "dtype"), (x.double(), "dtype"), (x[0], "3 dimensions"),
                      (randn(1, 1, K.KERNEL_MAX_D + 1), "KERNEL_MAX_D"), ("x", "torch.Tensor")]:
        ok, why = K.kernels_supported(bad)
        assert not ok and word in why, why
    ok, why = K.kernels_supported(x, torch.empty(2, 8, device="meta"))
    assert not ok and "same device" in why
    ok, why = K.kernels_supported(x, torch.ones(2, 8, dtype=torch.int32))
    assert not ok and "dtype" in why
    if DEV == "cpu":
        # Without the interpreter, Triton cannot take CPU tensors: say so instead of crashing.
        monkeypatch.setattr(COMMON, "INTERPRETED", False)
        ok, why = K.kernels_supported(x)
        assert not ok and "TRITON_INTERPRET" in why
        with pytest.raises(ValueError, match="TRITON_INTERPRET"):
            K.modulate_layernorm(x, randn(2, 8), randn(2, 8))


# ----------------------------------------------------------------------------------------------
# torch.library registration: opcheck and torch.compile(fullgraph=True)
# ----------------------------------------------------------------------------------------------
def test_opcheck():
    n, t, d = 2, 3, 8
    x, y = randn(n, t, d).requires_grad_(), randn(n, t, d).requires_grad_()
    shift, scale, gate = [randn(n, d).requires_grad_() for _ in range(3)]
    torch.library.opcheck(ML._modulate_layernorm_fwd_op, (x, shift, scale, 1e-6))
    torch.library.opcheck(GR._gated_residual_fwd_op, (x, y, gate))
    torch.library.opcheck(ML._gated_residual_modulate_layernorm_fwd_op, (x, y, gate, shift, scale, 1e-6, None))
    bias = randn(d).requires_grad_()
    torch.library.opcheck(ML._gated_residual_modulate_layernorm_fwd_op, (x, y, gate, shift, scale, 1e-6, bias))
    xi = randn(1, 3, 4, 4).requires_grad_()
    w, b = randn(5, 3, 2, 2).requires_grad_(), randn(5).requires_grad_()
    torch.library.opcheck(PE._pe_fwd_op, (xi, w, b, randn(1, 4, 5), 2))


def _dispatch_cases():
    n, t, d = 2, 9, 37
    x, y = randn(n, t, d), randn(n, t, d)
    g, s_, c = [randn(n, d) for _ in range(3)]
    b = randn(d)
    img, w, pb, pos = randn(n, 4, 6, 6), randn(d, 4, 2, 2), randn(d), randn(1, 9, d)
    return [(lambda x_, s1, c1: K.modulate_layernorm(x_, s1, c1), [x, s_, c]),
            (lambda x_, y_, g_: K.gated_residual(x_, y_, g_), [x, y, g]),
            (lambda x_, y_, g_, s1, c1, b_: K.gated_residual_modulate_layernorm(x_, y_, g_, s1, c1, bias=b_),
             [x, y, g, s_, c, b]),
            (lambda i, w_, b_: K.patch_embed(i, w_, b_, pos, 2), [img, w, pb])]


def test_direct_dispatch_is_the_same_computation():
    """FASTDIT_KERNEL_DISPATCH=direct: the ops as plain autograd.Functions over the same launchers (no
    torch.library dispatch): bitwise the library path's outputs and gradients; compile ignores it."""
    for fn, leaves in _dispatch_cases():
        def run():
            xs = [a.clone().requires_grad_() for a in leaves]
            out = _as_list(fn(*xs))
            torch.autograd.backward(out, [torch.ones_like(o) for o in out])
            return out, [a.grad for a in xs]
        lib_out, lib_grads = run()
        with COMMON.kernel_dispatch("direct"):
            out, grads = run()
            assert "Direct" in type(out[0].grad_fn).__name__, type(out[0].grad_fn).__name__
        assert "Direct" not in type(lib_out[0].grad_fn).__name__
        for a, b in zip(out + grads, lib_out + lib_grads):
            assert torch.equal(a, b)


def test_direct_dispatch_switch(monkeypatch):
    monkeypatch.setenv(COMMON.DISPATCH_ENV, "direct")
    assert COMMON.direct_dispatch()
    with COMMON.kernel_dispatch("library"):
        assert not COMMON.direct_dispatch()
    monkeypatch.setenv(COMMON.DISPATCH_ENV, "fast")
    with pytest.raises(ValueError, match="FASTDIT_KERNEL_DISPATCH='fast'; choose one of"):
        K.modulate_layernorm(randn(1, 2, 8), randn(1, 8), randn(1, 8))
    with pytest.raises(ValueError, match="choose one of"):
        COMMON.kernel_dispatch("turbo")
    monkeypatch.setenv(COMMON.DISPATCH_ENV, "direct")   # torch.compile traces the library ops regardless
    torch._dynamo.reset()
    x, sh, sc = randn(2, 3, 8).requires_grad_(), randn(2, 8), randn(2, 8)
    f = torch.compile(lambda a: K.modulate_layernorm(a, sh, sc).sum(), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(torch.autograd.grad(f(x), x)[0],
                               torch.autograd.grad(K.modulate_layernorm(x, sh, sc).sum(), x)[0])


def test_torch_compile_fullgraph():
    """All four ops inside one torch.compile(fullgraph=True) graph, forward and backward."""
    n, t, d = 2, 4, 8
    torch._dynamo.reset()
    xi = randn(n, 3, 4, 4).requires_grad_()
    w, b = randn(d, 3, 2, 2).requires_grad_(), randn(d).requires_grad_()
    pos = randn(1, t, d)
    y = randn(n, t, d).requires_grad_()
    c = rand_mod(n, d, 6, torch.float32).requires_grad_()
    rb = randn(d).requires_grad_()

    def block(xi, w, b, y, c, rb):
        shift1, scale1, gate1, shift2, scale2, gate2 = c.chunk(6, dim=1)
        x = K.patch_embed(xi, w, b, pos, 2)                          # (N, T, D)
        h = K.modulate_layernorm(x, shift1, scale1)
        x, h = K.gated_residual_modulate_layernorm(x, h * y, gate1, shift2, scale2)
        x, h = K.gated_residual_modulate_layernorm(x, h, gate2, shift1, scale1, bias=rb)
        x = K.gated_residual(x, torch.tanh(h), gate2)
        return (x * y).sum()

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    args = [xi, w, b, y, c, rb]
    loss_c = compiled(*args)
    grads_c = torch.autograd.grad(loss_c, args)
    loss_e = block(*args)
    grads_e = torch.autograd.grad(loss_e, args)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-5)
    for gc, ge in zip(grads_c, grads_e):
        torch.testing.assert_close(gc, ge, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Benchmark harness smoke test
# ----------------------------------------------------------------------------------------------
def _subprocess_env(**overrides):
    """This process's environment with `overrides`, and ROOT put first on PYTHONPATH (kept)."""
    env = dict(os.environ, **overrides)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    return env


def test_benchmark_smoke(tmp_path):
    """benchmarks/kernels.py end to end at tiny shapes, fused and eager rows. On CPU: --smoke, the
    kernels through the Triton interpreter. On a CUDA machine: the GPU path users run (compiled
    kernels, do_bench timing, no interpreter), in fp32 with TF32 off so the error check stays tight."""
    out = tmp_path / "rows.json"
    if DEV == "cuda":
        args = ["--dims", "64", "--tokens-per-sample", "16", "--tokens", "32", "--dtype", "fp32",
                "--impls", "fused", "eager", "--warmup", "1", "--rep", "5", "--copy-mib", "16"]
        env = _subprocess_env(NVIDIA_TF32_OVERRIDE="0")  # cuBLAS/cuDNN: the eager rows in real fp32
        env.pop("TRITON_INTERPRET", None)
    else:
        args = ["--smoke"]
        env = _subprocess_env(TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "kernels.py"), *args,
                           "--json", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["meta"]["smoke"] is (DEV == "cpu") and data["meta"]["command"]
    assert data["meta"]["complete"] is True
    assert data["meta"]["device"].startswith(DEV) and data["meta"]["interpreter"] is (DEV == "cpu")
    if DEV == "cpu":  # the first line and the JSON say where the timings come from
        assert proc.stdout.splitlines()[0].startswith("--smoke: every timing below comes from the Triton "
                                                      "interpreter")
        assert "Triton interpreter" in data["meta"]["note"]
    else:
        assert "interpreter" not in proc.stdout and data["meta"]["note"] is None
    assert {r["impl"] for r in data["rows"]} == ({"fused", "fused-direct", "fused-gemm-bwd", "fused-tile-sums",
                                                  "fused-paired-sums", "eager"} if DEV == "cpu" else {"fused", "eager"})
    assert {r["op"] for r in data["rows"] if r["impl"] == "fused-paired-sums"} <= {"modulate_layernorm",
                                                                                  "gated_residual_modulate_layernorm"}
    assert {r["op"] for r in data["rows"] if r["impl"] == "fused-gemm-bwd"} <= {"patch_embed"}
    assert "patch_embed" not in {r["op"] for r in data["rows"] if r["impl"] == "fused-tile-sums"}
    if DEV == "cpu":   # the same kernels either way: the same values
        err = {(r["op"], r["impl"]): r["max_abs_err"] for r in data["rows"] if r["pass"] == "fwd"}
        assert all(err[(op, "fused-direct")] == err[(op, "fused")] for op, _ in err)
        assert err[("patch_embed", "fused-gemm-bwd")] == err[("patch_embed", "fused")]   # the same forward
        assert err[("modulate_layernorm", "fused-tile-sums")] == err[("modulate_layernorm", "fused")]
    ops = {r["op"] for r in data["rows"]}
    assert ops == {"modulate_layernorm", "gated_residual", "gated_residual_modulate_layernorm",
                   "patch_embed"}
    for r in data["rows"]:
        assert r["ms"] > 0 and r["gbps"] > 0 and r["bytes"] > 0
        assert r["max_abs_err"] is not None and r["max_abs_err"] < 1e-3
        assert r["host_ms"] > 0
        if DEV == "cpu":   # no CUDA graphs on the CPU: said, not faked
            assert r["ms_graph"] is None and "CUDA" in r["graph_error"]
        elif r["pass"] == "bwd":   # never captured alone: fwd+bwd minus fwd, or why not
            assert (r["ms_graph"] and r["graph_basis"] == "fwd+bwd minus fwd") or r["graph_error"], r
        else:
            assert (r["ms_graph"] or 0) > 0 or r["graph_error"], r


@pytest.mark.skipif(DEV != "cpu", reason="the --smoke path (interpreter)")
def test_benchmark_cut_short_keeps_the_rows_timed(tmp_path, monkeypatch):
    """A deadline that kills benchmarks/kernels.py mid-run (gpu-check's kernels stage) leaves the rows timed so far
    in its JSON, marked incomplete: here the third timing of the run raises instead."""
    kb = importlib.import_module("benchmarks.kernels")
    out = tmp_path / "rows.json"
    calls = []
    real = kb._host_ms

    def host_ms(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("the stage's deadline")
        return real(*args, **kwargs)

    monkeypatch.setattr(kb, "_host_ms", host_ms)
    with pytest.raises(KeyboardInterrupt):
        kb.run(kb._parse(["--smoke", "--ops", "gated_residual", "--impls", "fused", "--json", str(out)]))
    data = json.loads(out.read_text())
    assert data["meta"]["complete"] is False and data["meta"]["copy_gbps"] > 0
    assert [(r["op"], r["impl"], r["pass"]) for r in data["rows"]] == [("gated_residual", "fused", "fwd"),
                                                                       ("gated_residual", "fused", "bwd")]


def test_benchmark_graph_call_differentiates_fresh_leaves():
    """benchmarks/kernels.py's fwd+bwd for a CUDA graph: the same gradients as the plain fwd+bwd, taken through new
    leaf views of the inputs (same storage, no copy), never through the inputs' own autograd nodes."""
    kb = importlib.import_module("benchmarks.kernels")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, generator=g, dtype=torch.float64).requires_grad_()
    w = torch.randn(5, 4, generator=g, dtype=torch.float64).requires_grad_()
    c = torch.randn(3, 4, generator=g, dtype=torch.float64)          # needs no gradient
    fn = lambda a, b, k: (torch.tanh(a @ b) * k, (a @ b).sum(0))      # noqa: E731
    grad_outs = [torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)]
    plain = kb._pass_fns(fn, [x, w, c], grad_outs)["fwd+bwd"]()
    seen = []
    spy = lambda a, b, k: (seen.append((a, b, k)), fn(a, b, k))[1]    # noqa: E731
    fresh = kb.fresh_leaves_fwd_bwd(spy, [x, w, c], grad_outs)()
    assert len(fresh) == 2 and all(torch.equal(p, f) for p, f in zip(plain, fresh))
    a, b, k = seen[0]
    assert a is not x and b is not w and a.is_leaf and a.requires_grad and b.is_leaf
    assert a.data_ptr() == x.data_ptr() and b.data_ptr() == w.data_ptr() and k is c
    assert x.grad is None and w.grad is None


def test_benchmark_bwd_graph_time_is_fwd_bwd_minus_fwd():
    kb = importlib.import_module("benchmarks.kernels")
    shape = dict(op="gated_residual", N=1, T=2, D=3, dtype="bfloat16")
    def row(impl, pas, ms_graph):
        return dict(shape, impl=impl, **{"pass": pas}, ms=2.0, bytes=4e9, gbps=2000.0, copy_share=0.5,
                    ms_graph=ms_graph, graph_error=None)
    rows = [row("fused", "fwd", 0.1), row("fused", "bwd", None), row("fused", "fwd+bwd", 0.4),
            row("eager", "fwd", 0.5), row("eager", "bwd", None), row("eager", "fwd+bwd", 0.45),
            row("compile", "fwd", None), row("compile", "bwd", None), row("compile", "fwd+bwd", 0.3)]
    kb.derive_bwd_graph_times(rows)
    fused, eager, comp = rows[1], rows[4], rows[7]
    assert fused["ms_graph"] == pytest.approx(0.3) and fused["graph_basis"] == "fwd+bwd minus fwd"
    assert fused["gbps_graph"] == pytest.approx(4e9 / 0.3e-3 / 1e9)
    assert fused["copy_share_graph"] == pytest.approx(fused["gbps_graph"] / 4000.0)   # copy 4000 GB/s in this row
    assert eager["ms_graph"] is None and "not above" in eager["graph_error"]       # noise: no figure
    assert comp["ms_graph"] is None and comp["graph_error"] is None                 # no fwd graph time: untouched
    assert rows[0]["ms_graph"] == 0.1 and rows[2]["ms_graph"] == 0.4                # the others unchanged


# ----------------------------------------------------------------------------------------------
# GPU code generation without a GPU: compile every kernel for sm_90, no register spills
# ----------------------------------------------------------------------------------------------
def test_kernels_compile_for_sm90_without_spills(tmp_path):
    """The interpreter never runs Triton's GPU compiler; this does (in a process without it)."""
    out = tmp_path / "sm90.json"
    env = _subprocess_env()
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-m", "fastdit.kernels._sm90_check", "--json", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode == 3:
        pytest.skip(f"no NVIDIA toolchain in this triton install: {proc.stderr[-300:]}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) >= 25 and all(r["ok"] for r in rows)
    # Row kernels read D-contiguous rows with 128-bit loads once the JIT specialises stride 1.
    # (The GELU-epilogue GEMMs at their default tiling move every tile by TMA: no vector loads at all.)
    assert all(r["vector_loads"] > 0 for r in rows
               if not r["kernel"].startswith("patch_embed_d") and "/tma" not in r["kernel"])
    tma_rows = [r for r in rows if r["kernel"].startswith("gemm_gelu") and r["kernel"].endswith("/tma")]
    assert len(tma_rows) == 3 and all(r["vector_loads"] == 0 and r["shared_bytes"] > 0 for r in tma_rows)
    # Every global access is reported by width and by the pointer argument it goes through.
    for r in rows:
        assert {"load_bytes", "store_bytes", "accesses", "narrow_bulk", "bulk_128bit"} <= set(r)
        assert "?" not in " ".join(r["accesses"]), r["accesses"]
    by_label = {r["kernel"]: r for r in rows}
    # DiT-XL (D = 1152, bf16, contiguous rows, (N, 6D) adaLN chunks): the row tiles and the
    # modulation vectors move 16 bytes per access, at N = 32 and at N = 256.
    for res in (False, True):
        acc = by_label[f"modln_fwd D=1152 residual={res}"]["accesses"]
        keys = ["ld X", "st OUT", "ld SHIFT", "ld SCALE"] + (["ld Y", "ld GATE", "st RES"] if res else [])
        for key in keys:
            assert set(acc[key]) == {"16"}, (key, acc[key])
    # The backward's token loop: plain (no cp.async) by default; with num_stages > 1 Triton pipelines its row
    # loads through shared memory.
    for r in rows:
        if r["kernel"].startswith("modln_bwd") or r["kernel"].startswith("gated_residual_bwd"):
            piped = "stages=" in r["kernel"]
            assert (r["async_loads"] > 0) == piped, r
    plain = by_label["modln_bwd D=1152 residual=True N=256"]
    piped = by_label["modln_bwd D=1152 residual=True N=256 stages=3"]
    assert piped["shared_bytes"] > plain["shared_bytes"] and piped["programs_per_sm"] >= 1
    # The Triton attention at DiT-XL/2's shape: its q/k/v/dout tiles (64 of hd 72's columns) move 16 bytes per
    # load, straight from the packed qkv buffer; nothing spills (checked for every row above).
    for label in ("attention_fwd hd=72", "attention_bwd_dq hd=72", "attention_bwd_dkdv hd=72"):
        assert "16" in by_label[label]["accesses"]["ld QKV"], by_label[label]["accesses"]
    # Tensor cores: every bf16 tl.dot (the attention's, patch_embed's) is Hopper's wgmma (HGMMA in the SASS), none
    # the older mma.sync (HMMA, about half the rate); the fp32 GEMM (IEEE products) and the row ops use none.
    if all("sass_mma" in r for r in rows):
        for r in rows:
            dots = r["kernel"].startswith(("attention", "patch_embed", "gemm_gelu")) and "fp32" not in r["kernel"]
            assert (r["sass_mma"]["HGMMA"] > 0) == dots and r["sass_mma"]["HMMA"] == 0, (r["kernel"], r["sass_mma"])
    xl_rows = [r for r in rows if "D=1152" in r["kernel"]]
    assert len(xl_rows) >= 9
    assert all(r["bulk_128bit"] for r in xl_rows), [(r["kernel"], r["narrow_bulk"]) for r in xl_rows]
    # The column-sum kernels (the qkv stack, the GELU backward): summed per step, each step's rows are reduced
    # across warps, with barriers inside the loop; accumulated per tile (FASTDIT_COLUMN_SUMS=once), none.
    if all("loop_barriers" in r for r in rows):
        sums = [r for r in rows if r["kernel"].startswith(("stack_qkv_grads", "gelu_bwd"))]
        assert len(sums) == 9 and all(r["loops"] >= 1 for r in sums)
        for r in sums:
            assert (r["loop_barriers"] == 0) == r["kernel"].endswith(" once"), (r["kernel"], r["loop_barriers"])


# ----------------------------------------------------------------------------------------------
# GPU: DiT-XL/2 shapes (N=32, T=256, D=1152) in bf16, one test per op
# ----------------------------------------------------------------------------------------------
XL = (32, 256, 1152)


@pytest.mark.gpu
def test_gpu_modulate_layernorm_xl():
    n, t, d = XL
    check_op(K.modulate_layernorm, K.modulate_layernorm_ref,
             [randn(n, t, d, dtype=torch.bfloat16), rand_mod(n, d, 6, torch.bfloat16)],
             _modln_build, [randn(n, t, d, dtype=torch.bfloat16)], ["y", "dx", "dc"], torch.bfloat16)


@pytest.mark.gpu
def test_gpu_gated_residual_xl():
    n, t, d = XL
    bf = torch.bfloat16
    check_op(K.gated_residual, K.gated_residual_ref,
             [randn(n, t, d, dtype=bf), randn(n, t, d, dtype=bf), rand_mod(n, d, 6, bf)],
             _gr_build, [randn(n, t, d, dtype=bf)], ["out", "dx", "dy", "dgate"], bf)


@pytest.mark.gpu
def test_gpu_gated_residual_modulate_layernorm_xl():
    n, t, d = XL
    bf = torch.bfloat16
    check_op(K.gated_residual_modulate_layernorm, K.gated_residual_modulate_layernorm_ref,
             [randn(n, t, d, dtype=bf), randn(n, t, d, dtype=bf), rand_mod(n, d, 6, bf)],
             _grml_build, [randn(n, t, d, dtype=bf), randn(n, t, d, dtype=bf)],
             ["x_new", "h", "dx", "dy", "dc"], bf)


@pytest.mark.gpu
def test_gpu_gated_residual_modulate_layernorm_bias_xl():
    n, t, d = XL
    bf = torch.bfloat16
    check_op(_grml_bias, _grml_bias_ref,
             [randn(n, t, d, dtype=bf), randn(n, t, d, dtype=bf), rand_mod(n, d, 6, bf), randn(d, dtype=bf)],
             _grml_bias_build, [randn(n, t, d, dtype=bf), randn(n, t, d, dtype=bf)],
             ["x_new", "h", "dx", "dy", "dc", "dbias"], bf)


@pytest.mark.gpu
@pytest.mark.parametrize("num_stages", [2, 3])
def test_gpu_pipelined_token_loop_equals_plain_xl(num_stages):
    """The backward kernels' token loop software-pipelined (cp.async through shared memory, num_stages > 1;
    benchmarks/kernel_sweep.py times it) gives the plain loop's outputs exactly, at DiT-XL/2 shapes."""
    ml, gr = ML, GR
    n, t, d = XL
    bf = torch.bfloat16
    x, y, dh, dxnew = (randn(n, t, d, dtype=bf) for _ in range(4))
    c = rand_mod(n, d, 6, bf)
    gate, shift, scale = c[:, 2 * d:3 * d], c[:, 3 * d:4 * d], c[:, 4 * d:5 * d]
    bias = randn(d, dtype=bf)
    with torch.no_grad():
        _, mean, rstd = ml.modulate_layernorm_fwd(x, shift, scale)
        xnew, _, m2, r2 = ml.gated_residual_modulate_layernorm_fwd(x, y, gate, shift, scale, bias=bias)
        calls = [
            lambda **o: ml.modulate_layernorm_bwd(dh, x, scale, mean, rstd, bf, **o),
            lambda **o: ml.gated_residual_modulate_layernorm_bwd(dh, dxnew, xnew, y, gate, scale, m2, r2, bf, bf,
                                                                 **o),
            lambda **o: ml.gated_residual_modulate_layernorm_bwd(dh, dxnew, xnew, y, gate, scale, m2, r2, bf, bf,
                                                                 bias=bias, **o),
            lambda **o: gr.gated_residual_bwd(dh, y, gate, **o),
        ]
        for call in calls:   # num_stages=1: the plain loop at row_tile's tiling (None may pick a measured one)
            for a, b in zip(call(num_stages=num_stages), call(num_stages=1)):
                assert torch.equal(a, b)


@pytest.mark.gpu
def test_gpu_residual_bwd_default_tiling_xl():
    """The fused residual+LN backward's measured default tiling (RESIDUAL_BWD_TILING, bf16 at DiT-XL/2's width
    on sm_90+) gives the plain loop's dx and dy exactly and its per-sample sums up to their summation order,
    with and without the gradient from x's other uses, and with the branch's bias (bias_fold; its dbias too)."""
    ml = ML
    n, t, d = XL
    bf = torch.bfloat16
    x, y, dh, dxnew = (randn(n, t, d, dtype=bf) for _ in range(4))
    c = rand_mod(n, d, 6, bf)
    gate, shift, scale = c[:, 2 * d:3 * d], c[:, 3 * d:4 * d], c[:, 4 * d:5 * d]
    bias_vec = 0.1 * randn(d, dtype=bf)
    measured = ml.residual_bwd_tiling(d, 2, x.device)
    if measured is None:
        pytest.skip(f"no measured tiling for this device ({torch.cuda.get_device_name()})")
    with torch.no_grad():
        for bias in (None, bias_vec):
            if bias is not None and ml.residual_bwd_tiling(d, 2, x.device, bias=True) is None:
                continue                                  # the bias case's tiling needs more shared memory
            xnew, _, m2, r2 = ml.gated_residual_modulate_layernorm_fwd(x, y, gate, shift, scale, bias=bias)
            for dx_other in (dxnew, None):
                got = ml.gated_residual_modulate_layernorm_bwd(dh, dx_other, xnew, y, gate, scale, m2, r2, bf, bf,
                                                               bias=bias)
                plain = ml.gated_residual_modulate_layernorm_bwd(dh, dx_other, xnew, y, gate, scale, m2, r2, bf,
                                                                 bf, bias=bias, num_stages=1)
                assert len(got) == (5 if bias is None else 6)
                assert torch.equal(got[0], plain[0]) and torch.equal(got[1], plain[1])
                for a, b in zip(got[2:], plain[2:]):      # dgate, dshift, dscale (, dbias): fp32 sums rounded to bf16
                    torch.testing.assert_close(a.float(), b.float(), rtol=2 ** -7, atol=1e-3 * b.abs().max().item())


@pytest.mark.gpu
def test_gpu_patch_embed_xl():
    n, _, d = XL
    bf = torch.bfloat16
    x, weight, bias, pos = _pe_leaves(n, 4, 32, 32, 2, d, bf)
    dout = randn(n, 256, d, dtype=bf)
    check_op(lambda *a: K.patch_embed(*a, pos, 2), lambda *a: K.patch_embed_ref(*a, pos, 2),
             [x, weight, bias], lambda l: l, [dout], ["out", "dx", "dweight", "dbias"], bf)


@pytest.mark.gpu
def test_gpu_torch_compile_inductor():
    n, t, d = 4, 64, 1152
    bf = torch.bfloat16
    x, y = randn(n, t, d, dtype=bf).requires_grad_(), randn(n, t, d, dtype=bf).requires_grad_()
    c = rand_mod(n, d, 6, bf).requires_grad_()

    def f(x, y, c):
        s1, c1, g1, s2, c2, g2 = c.chunk(6, dim=1)
        h = K.modulate_layernorm(x, s1, c1)
        x2, h2 = K.gated_residual_modulate_layernorm(x, h * y, g1, s2, c2)
        return K.gated_residual(x2, h2, g2).float().square().mean()

    torch._dynamo.reset()
    loss_c = torch.compile(f, fullgraph=True)(x, y, c)
    loss_e = f(x, y, c)
    torch.testing.assert_close(loss_c, loss_e, rtol=2e-2, atol=1e-3)
