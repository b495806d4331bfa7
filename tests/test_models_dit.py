"""fastdit.models.dit: the fast DiT is the reference DiT: same state dict, same forward, same gradients.

Models and inputs live on DEV: the CUDA device where there is one (the Triton kernels then run as
compiled GPU code, fp32 with TF32 off: see tests/conftest.py), else the CPU, where the Triton path
runs through the interpreter (tests/conftest.py sets TRITON_INTERPRET=1). Weights, inputs and the
output projection are drawn on the CPU from seeded generators and moved to DEV, so both places test
the same values. Weights are random and non-zero everywhere (adaLN-Zero's zero init would hide
gradient bugs).
"""
import pytest
import torch
from _helpers import assert_flash_rule

from fastdit.models import attention as attn_backends
from fastdit.models import DiT, DiT_models, ReferenceDiT, ReferenceDiT_models, from_reference
from fastdit.models.dit import constructor_kwargs
from fastdit.models.empty import hidden_tensors
from fastdit.models.reference import BLOCK_TYPES

# (hidden, heads, depth, input_size, patch): S- and B-width models at small inputs, patch 2 and 4
CONFIGS = {
    "S-width/p2": dict(hidden_size=384, num_heads=6, depth=2, input_size=8, patch_size=2),
    "B-width/p4": dict(hidden_size=768, num_heads=12, depth=1, input_size=16, patch_size=4),
    "odd/p2": dict(hidden_size=72, num_heads=2, depth=2, input_size=6, patch_size=2),
}
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def make_pair(cfg, seed=0, **fast_kw):
    torch.manual_seed(seed)
    ref = ReferenceDiT(in_channels=4, num_classes=10, **cfg)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name == "pos_embed":
                continue
            # unit-gain random weights (std 1/sqrt(fan_in)) so errors are not amplified layer by layer
            std = 1.0 / (p[0].numel() ** 0.5) if p.dim() > 1 and "embedding" not in name else 0.1
            p.copy_(torch.randn(p.shape, generator=g) * std)
    ref = ref.to(DEV)
    fast = from_reference(ref, **fast_kw)  # on ref's device
    return ref.train(), fast.train()


def inputs(cfg, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = cfg["input_size"]
    x = torch.randn(n, 4, s, s, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return x.to(DEV), t.to(DEV), y.to(DEV)


def run(model, x, t, y, seed=0):
    """Forward + backward of a fixed random projection of the output; returns (out, grads by name)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # label dropout draws the same ids in both models (seeds CUDA too)
    out = model(x, t, y)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(123)).to(out.device, out.dtype)
    (out * w).sum().backward()
    grads = {k: p.grad.detach().float().clone() for k, p in model.named_parameters() if p.grad is not None}
    return out.detach().float(), grads


def assert_close_rel(a, b, rtol, what):
    err = (a - b).abs().max().item()
    scale = b.abs().max().item() + 1e-12
    assert err <= rtol * scale, f"{what}: max err {err:.3e} vs scale {scale:.3e}"


def assert_fp32_matches_reference(cfg, **fast_kw):
    """The fast model built with fast_kw: the reference's output and every gradient, fp32; returns it."""
    ref, fast = make_pair(cfg, **fast_kw)
    x, t, y = inputs(cfg)
    out_r, g_r = run(ref, x, t, y)
    out_f, g_f = run(fast, x, t, y)
    assert_close_rel(out_f, out_r, 2e-5, "output")
    assert set(g_f) == set(g_r)
    for k in g_r:
        assert_close_rel(g_f[k], g_r[k], 1e-4, f"grad {k}")
    return fast


@pytest.mark.parametrize("kernels", [pytest.param("triton", marks=pytest.mark.triton), "torch"])
@pytest.mark.parametrize("cfg_name", list(CONFIGS))
def test_fp32_forward_and_every_gradient(cfg_name, kernels):
    assert_fp32_matches_reference(CONFIGS[cfg_name], kernels=kernels, attention="sdpa")


@pytest.mark.parametrize("kernels", [pytest.param("triton", marks=pytest.mark.triton), "torch"])
@pytest.mark.parametrize("mlp", ["recompute", "fold", "recompute-fold", "epilogue", "recompute-epilogue"])
def test_mlp_modes_forward_and_every_gradient(kernels, mlp):
    """mlp="recompute" (GELU recomputed in backward), "fold" / "recompute-fold" (GELU backward + fc1's
    bias gradient in one pass, kernels/gelu.py) and "epilogue" / "recompute-epilogue" (GELU in the GEMMs,
    kernels/gemm_gelu.py; fastdit.models.mlp) are the reference, fp32."""
    fast = assert_fp32_matches_reference(CONFIGS["S-width/p2"], kernels=kernels, attention="sdpa", mlp=mlp)
    assert all(b.mlp_mode == mlp for b in fast.blocks)


@pytest.mark.parametrize("kernels", [pytest.param("triton", marks=pytest.mark.triton), "torch"])
@pytest.mark.parametrize("mlp", ["plain", "recompute", "fold", "epilogue"])
def test_bias_fold_forward_and_every_gradient(kernels, mlp):
    """bias_fold=True (the projection's and fc2's biases added in the fused residual op, their gradients
    from its backward) is the reference, fp32, with each MLP mode; with activation checkpointing too."""
    fast = assert_fp32_matches_reference(CONFIGS["S-width/p2"], kernels=kernels, attention="sdpa", mlp=mlp,
                                         bias_fold=True)
    assert all(b.bias_fold for b in fast.blocks)
    assert_fp32_matches_reference(CONFIGS["odd/p2"], kernels=kernels, attention="sdpa", mlp=mlp,
                                  bias_fold=True, checkpointing=True)


@pytest.mark.parametrize("kernels,sums", [pytest.param("triton", "step", marks=pytest.mark.triton),
                                          pytest.param("triton", "once", marks=pytest.mark.triton),
                                          ("torch", "step")])
def test_bias_fold_with_packed_attention_forward_and_every_gradient(kernels, sums, monkeypatch):
    """bias_fold with attention sdpa_packed: the qkv projection and attention in one autograd function
    whose backward assembles dqkv and the qkv bias gradient in one pass; fp32, the reference's values. With
    FASTDIT_COLUMN_SUMS=once the stack and the GELU backward reduce their column sums once, after the loop."""
    monkeypatch.setenv("FASTDIT_COLUMN_SUMS", sums)
    for cfg_name in ("S-width/p2", "odd/p2"):
        fast = assert_fp32_matches_reference(CONFIGS[cfg_name], kernels=kernels, attention="sdpa_packed",
                                             mlp="fold", bias_fold=True)
        assert all(b.attn.backend == "sdpa_packed" for b in fast.blocks)


def _backward_row_sums(model, cfg):
    """Shapes of the inputs of every aten.sum over dim 0 of a 2-D tensor in one backward (the bias
    gradients autograd computes as column sums of a linear layer's output gradient)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Sums(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.shapes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is torch.ops.aten.sum.dim_IntList and args[0].dim() == 2 and list(args[1]) == [0]:
                self.shapes.append(tuple(args[0].shape))
            return func(*args, **kwargs)

    x, t, y = inputs(cfg)
    out = model(x, t, y)
    with Sums() as mode:
        out.square().mean().backward()
    return mode.shapes


@pytest.mark.triton
def test_bias_fold_removes_the_bias_reductions():
    """Without bias_fold, autograd reduces the (N*T, D) output gradients of proj and fc2 for their biases;
    with it (and mlp="fold"), the Triton kernels give those gradients and fc1's: no (N*T, width) gradient of
    those linears is reduced (qkv's stays). (kernels="torch" runs the PyTorch references, which reduce.)"""
    kernels = "triton"
    cfg = CONFIGS["odd/p2"]
    n, d, depth = 2, cfg["hidden_size"], cfg["depth"]
    rows = n * (cfg["input_size"] // cfg["patch_size"]) ** 2
    _, plain = make_pair(cfg, kernels=kernels, attention="sdpa")
    _, folded = make_pair(cfg, kernels=kernels, attention="sdpa", mlp="fold", bias_fold=True)
    before, after = _backward_row_sums(plain, cfg), _backward_row_sums(folded, cfg)
    assert before.count((rows, d)) >= 2 * depth, before
    assert before.count((rows, 4 * d)) == depth, before
    assert (rows, d) not in after and (rows, 4 * d) not in after, after
    assert after.count((rows, 3 * d)) == depth, after   # qkv: not folded with attention sdpa
    _, packed = make_pair(cfg, kernels=kernels, attention="sdpa_packed", mlp="fold", bias_fold=True)
    assert _backward_row_sums(packed, cfg) == [s for s in after if s != (rows, 3 * d)]   # sdpa_packed: folded
    # triton: the bias gradient from its backward kernels' per-program sums (small (programs, width) buffers
    # added up, not the (rows, 3D) gradient)
    _, own = make_pair(cfg, kernels=kernels, attention="triton", mlp="fold", bias_fold=True)
    own_sums = [s for s in _backward_row_sums(own, cfg) if s[0] == rows]
    assert own_sums == [s for s in after if s[0] == rows and s != (rows, 3 * d)], own_sums
    # mlp="epilogue": fc1's bias gradient from the GEMM epilogue's per-tile sums, as the fold's
    _, epi = make_pair(cfg, kernels=kernels, attention="sdpa_packed", mlp="epilogue", bias_fold=True)
    epi_sums = [s for s in _backward_row_sums(epi, cfg) if s[0] == rows]
    assert epi_sums == [s for s in after if s[0] == rows and s != (rows, 3 * d)], epi_sums


def test_sdpa_packed_attention_forward_and_every_gradient():
    assert_fp32_matches_reference(CONFIGS["odd/p2"], kernels="torch", attention="sdpa_packed")


@pytest.mark.triton
def test_triton_attention_forward_and_every_gradient():
    """attention="triton" (fastdit's Triton attention kernels) with the Triton row kernels: the reference's
    output and every gradient in fp32."""
    assert_fp32_matches_reference(CONFIGS["odd/p2"], kernels="triton", attention="triton")


@pytest.mark.triton
def test_triton_attention_with_bias_fold_forward_and_every_gradient():
    """bias_fold with attention="triton": the qkv projection and the attention in one autograd function whose
    bias gradient comes from the attention's backward kernels; every gradient as the reference's (fp32)."""
    fast = assert_fp32_matches_reference(CONFIGS["odd/p2"], kernels="triton", attention="triton", mlp="fold",
                                         bias_fold=True)
    assert all(b.attn.backend == "triton" for b in fast.blocks)


@pytest.mark.triton
def test_bf16_triton_attention_by_the_flash_attention_rule():
    test_bf16_by_the_flash_attention_rule("S-width/p2", "fold", True, attention="triton")


@pytest.mark.triton
@pytest.mark.parametrize("cfg_name,mlp,bias_fold", [("S-width/p2", "plain", False), ("B-width/p4", "plain", False),
                                                    ("S-width/p2", "recompute", False), ("S-width/p2", "fold", False),
                                                    ("S-width/p2", "recompute-fold", False),
                                                    ("S-width/p2", "fold", True), ("S-width/p2", "epilogue", True),
                                                    ("S-width/p2", "recompute-epilogue", False)])
def test_bf16_by_the_flash_attention_rule(cfg_name, mlp, bias_fold, attention="sdpa"):
    """|fast_bf16 - ref_fp32| <= 2 |ref_bf16 - ref_fp32| + atol, for the output and every gradient."""
    cfg = CONFIGS[cfg_name]
    ref, fast = make_pair(cfg, kernels="triton", attention=attention, mlp=mlp, bias_fold=bias_fold)
    x, t, y = inputs(cfg)
    out_32, g_32 = run(ref, x, t, y)
    out_rb, g_rb = run(ref.to(torch.bfloat16), x.bfloat16(), t, y)
    out_fb, g_fb = run(fast.to(torch.bfloat16), x.bfloat16(), t, y)

    def check(fb, rb, r32, what):
        # atol: 1e-2 of the tensor's scale (a whole model's depth of bf16 roundings), + 1e-6 for zeros
        assert_flash_rule(fb, rb, r32, 1e-2 * r32.abs().max().item() + 1e-6, what)

    check(out_fb, out_rb, out_32, "output")
    for k in g_32:
        check(g_fb[k], g_rb[k], g_32[k], f"grad {k}")


@pytest.mark.triton
def test_bf16_every_fold_with_packed_attention():
    """bias_fold + mlp="fold" with sdpa_packed in bf16 (the Triton qkv stack kernel, the residual kernel
    with bias, the GELU fold): the flash-attention rule, output and every gradient."""
    test_bf16_by_the_flash_attention_rule("S-width/p2", "fold", True, attention="sdpa_packed")


def test_state_dicts_load_both_ways_strictly():
    cfg = CONFIGS["odd/p2"]
    ref, fast = make_pair(cfg, kernels="torch")
    assert list(ref.state_dict()) == list(fast.state_dict())
    ref2 = ReferenceDiT(in_channels=4, num_classes=10, **cfg).to(DEV)
    ref2.load_state_dict(fast.state_dict())  # strict
    x, t, y = inputs(cfg)
    ref.eval(), ref2.eval()
    torch.testing.assert_close(ref2(x, t, y), ref(x, t, y))
    bad = fast.state_dict()
    bad.pop("blocks.0.attn.qkv.weight")
    with pytest.raises(KeyError, match="blocks.0.attn.qkv.weight"):
        fast.load_state_dict(bad)


@pytest.mark.parametrize("fast_kw", [dict(kernels="torch"), dict(kernels="torch", mlp="recompute-epilogue"),
                                     dict(kernels="torch", mlp="fold", bias_fold=True, attention="sdpa_packed")])
def test_from_reference_equals_building_and_loading(fast_kw):
    """from_reference skips the fast model's own init (meta build): every tensor and every output as if built eagerly."""
    cfg = CONFIGS["odd/p2"]
    ref, fast = make_pair(cfg, **fast_kw)
    eager = DiT(**constructor_kwargs(ref), **fast_kw).to(DEV)
    eager.load_state_dict(ref.state_dict())
    assert hidden_tensors(fast) == []
    for (k, a), (k2, b) in zip(fast.state_dict().items(), eager.state_dict().items(), strict=True):
        assert k == k2 and a.device == b.device and torch.equal(a, b), k
    assert [p.requires_grad for p in fast.parameters()] == [p.requires_grad for p in eager.parameters()]
    x, t, y = inputs(cfg)
    out_f, g_f = run(fast.train(), x, t, y)
    out_e, g_e = run(eager.train(), x, t, y)
    assert torch.equal(out_f, out_e) and g_f.keys() == g_e.keys()
    assert all(torch.equal(g_f[k], g_e[k]) for k in g_e)


def test_from_reference_builds_eagerly_when_a_tensor_is_outside_the_state_dict(monkeypatch):
    """A tensor a meta build could not fill from the state dict makes from_reference initialise as usual."""
    original_init = DiT.__init__

    def init_with_hidden_state(self, *a, **kw):
        original_init(self, *a, **kw)
        self.register_buffer("scale_table", torch.arange(4.0), persistent=False)
        self.lookup = torch.ones(3)

    monkeypatch.setattr(DiT, "__init__", init_with_hidden_state)
    ref, fast = make_pair(CONFIGS["odd/p2"], kernels="torch")
    assert hidden_tensors(fast) == ["scale_table", "lookup"]
    # by type: a CUDA tensor's device is cuda:0 where DEV is plain "cuda"
    assert fast.scale_table.device.type == DEV.type and torch.equal(fast.scale_table.cpu(), torch.arange(4.0))
    assert torch.equal(fast.lookup, torch.ones(3))  # a real tensor, not a meta one
    assert all(torch.equal(a, b) for a, b in zip(fast.state_dict().values(), ref.state_dict().values()))


def test_xl2_loads_an_official_layout_state_dict_strictly():
    with torch.device("meta"):
        official = ReferenceDiT_models["DiT-XL/2"]()
        fast = DiT_models["DiT-XL/2"]()
    assert list(official.state_dict()) == list(fast.state_dict())
    fast.load_state_dict(official.state_dict(), assign=True)
    assert sum(p.numel() for p in fast.parameters()) == 675_129_632


@pytest.mark.triton
def test_cfg_matches_reference():
    cfg = CONFIGS["odd/p2"]
    ref, fast = make_pair(cfg, kernels="triton")
    ref.eval(), fast.eval()
    x, t, _ = inputs(cfg)
    xx, tt = torch.cat([x, x]), torch.cat([t, t])
    yy = torch.tensor([1, 2, 10, 10], device=DEV)
    for all_ch in (False, True):
        torch.testing.assert_close(fast.forward_with_cfg(xx, tt, yy, 1.5, guide_all_channels=all_ch),
                                   ref.forward_with_cfg(xx, tt, yy, 1.5, guide_all_channels=all_ch),
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("attention,bias_fold", [
    ("auto", False), ("sdpa_packed", False),              # sdpa_packed: its inner graph when recomputed
    pytest.param("triton", True, marks=pytest.mark.triton)])   # the Triton attention + projection function
def test_activation_checkpointing_same_gradients(attention, bias_fold):
    cfg = CONFIGS["odd/p2"]
    _, fast = make_pair(cfg, kernels="triton" if bias_fold else "torch", attention=attention, bias_fold=bias_fold)
    x, t, y = inputs(cfg)
    out_a, g_a = run(fast, x, t, y)
    fast.checkpointing = True
    out_b, g_b = run(fast, x, t, y)
    torch.testing.assert_close(out_a, out_b)
    for k in g_a:
        torch.testing.assert_close(g_a[k], g_b[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("block_type", [b for b in BLOCK_TYPES if b != "adaln_zero"])
def test_other_conditioning_blocks_match_reference(block_type):
    cfg = dict(CONFIGS["odd/p2"], block_type=block_type)
    ref, fast = make_pair(cfg, kernels="torch", attention="sdpa")
    x, t, y = inputs(cfg)
    out_r, g_r = run(ref, x, t, y)
    out_f, g_f = run(fast, x, t, y)
    assert_close_rel(out_f, out_r, 2e-5, "output")
    for k in g_r:
        assert_close_rel(g_f[k], g_r[k], 1e-4, f"grad {k}")


@pytest.mark.triton
@pytest.mark.parametrize("attention,mlp,bias_fold", [("sdpa", "plain", False), ("sdpa_packed", "plain", False),
                                                     ("auto", "plain", False), ("sdpa", "fold", False),
                                                     ("sdpa", "recompute-fold", False), ("sdpa", "fold", True),
                                                     ("sdpa", "epilogue", True),
                                                     ("triton", "fold", True)])   # compiled: runs sdpa
def test_torch_compile_fullgraph_matches_eager(attention, mlp, bias_fold):
    cfg = CONFIGS["odd/p2"]
    _, fast = make_pair(cfg, kernels="triton", attention=attention, mlp=mlp, bias_fold=bias_fold)
    x, t, y = inputs(cfg)
    out_e, g_e = run(fast, x, t, y)
    compiled = torch.compile(fast, backend="aot_eager", fullgraph=True)
    out_c, g_c = run(compiled, x, t, y)
    torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-5)
    g_c = {k.removeprefix("_orig_mod."): v for k, v in g_c.items()}
    assert set(g_c) == set(g_e)
    for k in g_e:
        torch.testing.assert_close(g_c[k], g_e[k], rtol=1e-4, atol=1e-5)


def test_bad_switches():
    with pytest.raises(ValueError, match="kernels"):
        DiT(**CONFIGS["odd/p2"], kernels="cuda")
    with pytest.raises(ValueError, match="attention"):
        DiT(**CONFIGS["odd/p2"], attention="flash")
    with pytest.raises(ValueError, match="mlp='fused'; choose one of"):
        DiT(**CONFIGS["odd/p2"], mlp="fused")
    with pytest.raises(TypeError, match="bias_fold must be True or False"):
        DiT(**CONFIGS["odd/p2"], bias_fold="yes")
    for backend, (ok, why) in attn_backends.backend_status().items():
        if not ok:
            with pytest.raises(ImportError, match=f"{backend!r} cannot run here") as e:
                DiT(**CONFIGS["odd/p2"], attention=backend)
            assert why in str(e.value)
    with pytest.raises(ValueError, match="qkv"):
        attn_backends.attention(torch.randn(2, 4, 8), "sdpa")


def test_triton_without_device_or_interpreter_is_a_clear_error(monkeypatch):
    """CPU tensors without the interpreter (on every machine: the model is moved to the CPU)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    cfg = CONFIGS["odd/p2"]
    fast = make_pair(cfg, kernels="triton")[1].cpu()
    with pytest.raises(ValueError, match="kernels='torch'"):
        fast(*[a.cpu() for a in inputs(cfg)])
    fast.kernels = "auto"  # documented fallback: the PyTorch path
    assert torch.isfinite(fast(*[a.cpu() for a in inputs(cfg)])).all()
