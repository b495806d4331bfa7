"""The eager reference DiT against the official design: layout, init, math, CFG, bad input."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastdit.flops import count_params, shape_of
from fastdit.models.reference import (
    BLOCK_TYPES, DiT, DiT_models, get_2d_sincos_pos_embed, timestep_embedding, unpatchify,
)

from _helpers import randomize_weights_

ALL_NAMES = [f"DiT-{s}/{p}" for s in ("S", "B", "L", "XL") for p in (2, 4, 8)]


def tiny(**kw):
    args = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=4,
                num_classes=10)
    args.update(kw)
    return DiT(**args)


def randomize(model, seed=0):
    """Random non-zero weights everywhere (zero-init hides bugs); pos_embed stays the fixed table."""
    return randomize_weights_(model, 0.2, torch.Generator().manual_seed(seed))


def official_keys(depth, adaptive_final=True):
    """The official checkpoint's key set, written from the official naming scheme."""
    keys = {"pos_embed", "x_embedder.proj.weight", "x_embedder.proj.bias",
            "t_embedder.mlp.0.weight", "t_embedder.mlp.0.bias",
            "t_embedder.mlp.2.weight", "t_embedder.mlp.2.bias",
            "y_embedder.embedding_table.weight",
            "final_layer.linear.weight", "final_layer.linear.bias",
            "final_layer.adaLN_modulation.1.weight", "final_layer.adaLN_modulation.1.bias"}
    for i in range(depth):
        for part in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1"):
            keys |= {f"blocks.{i}.{part}.weight", f"blocks.{i}.{part}.bias"}
    return keys


@pytest.mark.parametrize("name", ALL_NAMES)
def test_param_counts_all_sizes(name):
    with torch.device("meta"):
        model = DiT_models[name]()
    n = sum(p.numel() for p in model.parameters())
    assert n == count_params(shape_of(name, 256))


def test_xl2_param_count_matches_paper():
    with torch.device("meta"):
        model = DiT_models["DiT-XL/2"]()
    assert sum(p.numel() for p in model.parameters()) == 675_129_632


def test_official_state_dict_layout_and_shapes():
    with torch.device("meta"):
        model = DiT_models["DiT-XL/2"]()
    sd = model.state_dict()
    assert set(sd) == official_keys(28)
    assert sd["y_embedder.embedding_table.weight"].shape == (1001, 1152)  # + null class
    assert sd["blocks.0.adaLN_modulation.1.weight"].shape == (6 * 1152, 1152)
    assert sd["final_layer.adaLN_modulation.1.weight"].shape == (2 * 1152, 1152)
    assert sd["final_layer.linear.weight"].shape == (2 * 2 * 8, 1152)
    assert sd["x_embedder.proj.weight"].shape == (1152, 4, 2, 2)
    assert sd["pos_embed"].shape == (1, 256, 1152)
    assert not model.pos_embed.requires_grad


def test_adaln_zero_blocks_are_identity_at_init():
    model = tiny(depth=3).eval()
    x = torch.randn(3, 16, 32)
    c = torch.randn(3, 32)
    for block in model.blocks:
        assert torch.equal(block(x, c), x)
    # zero-initialised final layer: the whole model outputs zeros at init
    out = model(torch.randn(3, 4, 8, 8), torch.tensor([1, 10, 999]), torch.tensor([0, 3, 9]))
    assert out.shape == (3, 8, 8, 8) and torch.count_nonzero(out) == 0


def test_init_distributions():
    model = DiT_models["DiT-S/8"](num_classes=1000)
    emb = model.y_embedder.embedding_table.weight
    assert abs(emb.std().item() - 0.02) < 0.002
    w = model.blocks[0].attn.qkv.weight
    bound = math.sqrt(6.0 / (w.shape[0] + w.shape[1]))  # xavier uniform
    assert w.abs().max() <= bound and w.abs().max() > 0.95 * bound
    assert torch.count_nonzero(model.blocks[0].attn.qkv.bias) == 0


def test_strict_state_dict_round_trip():
    a = randomize(tiny()).eval()
    b = tiny().eval()
    b.load_state_dict(a.state_dict())
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.tensor([1, 7])
    assert torch.equal(a(x, t, y), b(x, t, y))


def test_state_dict_errors_name_the_keys():
    model = tiny()
    sd = model.state_dict()
    sd.pop("blocks.1.mlp.fc2.bias")
    sd["blocks.9.extra"] = torch.zeros(1)
    with pytest.raises(KeyError) as e:
        model.load_state_dict(sd)
    assert "blocks.1.mlp.fc2.bias" in str(e.value) and "blocks.9.extra" in str(e.value)
    sd = model.state_dict()
    sd["final_layer.linear.bias"] = torch.zeros(5)
    with pytest.raises(ValueError, match="final_layer.linear.bias"):
        model.load_state_dict(sd)


def test_forward_matches_hand_written_math():
    """One adaLN-Zero block written out with torch.nn.functional, independent of the module code."""
    model = randomize(tiny(depth=1)).eval()
    blk = model.blocks[0]
    x = torch.randn(2, 16, 32)
    c = torch.randn(2, 32)
    mod = F.linear(F.silu(c), blk.adaLN_modulation[1].weight, blk.adaLN_modulation[1].bias)
    sh1, sc1, g1, sh2, sc2, g2 = mod.chunk(6, dim=1)
    h = F.layer_norm(x, (32,), eps=1e-6) * (1 + sc1[:, None]) + sh1[:, None]
    qkv = F.linear(h, blk.attn.qkv.weight, blk.attn.qkv.bias).view(2, 16, 3, 4, 8)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    att = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 16, 32)
    x1 = x + g1[:, None] * F.linear(att, blk.attn.proj.weight, blk.attn.proj.bias)
    h = F.layer_norm(x1, (32,), eps=1e-6) * (1 + sc2[:, None]) + sh2[:, None]
    m = F.gelu(F.linear(h, blk.mlp.fc1.weight, blk.mlp.fc1.bias), approximate="tanh")
    x2 = x1 + g2[:, None] * F.linear(m, blk.mlp.fc2.weight, blk.mlp.fc2.bias)
    torch.testing.assert_close(blk(x, c), x2, rtol=1e-5, atol=1e-5)


def test_timestep_embedding_formula():
    t = torch.tensor([0.0, 1.0, 17.5, 999.0])
    emb = timestep_embedding(t, 256)
    i = torch.arange(128, dtype=torch.float64)
    freqs = torch.exp(-math.log(10000.0) * i / 128)
    ang = t.double()[:, None] * freqs
    torch.testing.assert_close(emb.double(), torch.cat([ang.cos(), ang.sin()], 1), atol=2e-4, rtol=0)
    # (fp32 angles: t * freq at t=999 carries ~6e-5 absolute rounding, as in the official fp32 code)
    assert timestep_embedding(t, 7).shape == (4, 7)  # odd dim is zero-padded
    assert torch.all(timestep_embedding(t, 7)[:, -1] == 0)


def test_pos_embed_properties():
    d, g = 64, 4
    pe = get_2d_sincos_pos_embed(d, g)
    assert pe.shape == (g * g, d)
    # token 0 is the origin: sin parts 0, cos parts 1 in both halves
    np.testing.assert_allclose(pe[0], np.r_[np.zeros(16), np.ones(16), np.zeros(16), np.ones(16)], atol=0)
    # first half encodes the column, second half the row (official, width-first grid)
    row, col = 2, 3
    k = row * g + col
    omega = 1.0 / 10000 ** (np.arange(16) / 16.0)
    np.testing.assert_allclose(pe[k, :32], np.r_[np.sin(col * omega), np.cos(col * omega)], atol=1e-12)
    np.testing.assert_allclose(pe[k, 32:], np.r_[np.sin(row * omega), np.cos(row * omega)], atol=1e-12)
    assert np.all(np.abs(pe) <= 1)
    model = tiny()
    np.testing.assert_allclose(model.pos_embed[0].numpy(), get_2d_sincos_pos_embed(32, 4), atol=1e-7)


def test_unpatchify_inverts_patchify():
    n, c, p, h = 2, 3, 4, 16
    img = torch.randn(n, c, h, h)
    g = h // p
    # patchify written independently: token (i, j) holds the patch's (p, q, c) values
    tokens = img.reshape(n, c, g, p, g, p).permute(0, 2, 4, 3, 5, 1).reshape(n, g * g, p * p * c)
    assert torch.equal(unpatchify(tokens, p, c), img)


def test_cfg_scale_one_equals_conditional_and_guides_three_channels():
    model = randomize(tiny(), seed=1).eval()
    x = torch.randn(2, 4, 8, 8)
    xx = torch.cat([x, x])
    t = torch.tensor([5, 500, 5, 500])
    y = torch.tensor([1, 2, 10, 10])  # second half: the null class
    cond = model(x, t[:2], y[:2])
    uncond = model(x, t[2:], y[2:])
    out1 = model.forward_with_cfg(xx, t, y, cfg_scale=1.0)
    torch.testing.assert_close(out1[:2], cond, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out1[2:, :3], out1[:2, :3])  # guided eps copied to both halves
    torch.testing.assert_close(out1[2:, 3:], uncond[:, 3:], rtol=1e-5, atol=1e-5)  # rest: as computed
    s = 4.0
    out = model.forward_with_cfg(xx, t, y, cfg_scale=s)
    guided = uncond + s * (cond - uncond)
    torch.testing.assert_close(out[:2, :3], guided[:, :3], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out[:2, 3:], cond[:, 3:], rtol=1e-5, atol=1e-5)  # not guided
    out_all = model.forward_with_cfg(xx, t, y, cfg_scale=s, guide_all_channels=True)
    torch.testing.assert_close(out_all[:2, :4], guided[:, :4], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out_all[:2, 4:], cond[:, 4:], rtol=1e-5, atol=1e-5)  # sigma half


def test_label_dropout_to_null_class():
    model = tiny(num_classes=10, class_dropout_prob=0.5)
    emb = model.y_embedder
    labels = torch.zeros(4000, dtype=torch.long)
    dropped = emb.token_drop(labels)
    frac = (dropped == 10).float().mean().item()
    assert 0.45 < frac < 0.55
    forced = emb.token_drop(torch.tensor([1, 2, 3]), force_drop_ids=torch.tensor([1, 0, 1]))
    assert forced.tolist() == [10, 2, 10]
    assert torch.equal(emb(torch.tensor([1, 2]), train=False), emb.embedding_table.weight[[1, 2]])
    no_drop = tiny(class_dropout_prob=0.0)
    assert no_drop.y_embedder.embedding_table.weight.shape[0] == 10  # no null row


def test_bad_inputs():
    with pytest.raises(KeyError, match="DiT-XL/2"):
        DiT_models["DiT-XXL/2"]
    with pytest.raises(ValueError, match="divisible by patch_size"):
        DiT_models["DiT-S/8"](input_size=12)
    with pytest.raises(ValueError, match="block_type"):
        tiny(block_type="film")


@pytest.mark.parametrize("block_type", BLOCK_TYPES)
def test_each_block_variant_trains(block_type):
    torch.manual_seed(0)
    model = tiny(block_type=block_type, learn_sigma=False, depth=2)
    if block_type != "adaln_zero":
        assert "blocks.0.adaLN_modulation.1.weight" not in model.state_dict() or block_type == "adaln"
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = torch.randn(16, 4, 8, 8)
    t = torch.randint(0, 1000, (16,))
    y = torch.randint(0, 10, (16,))
    target = torch.randn(16, 4, 8, 8) * 0.5 + x * 0.5  # a learnable map
    losses = []
    for _ in range(30):
        loss = F.mse_loss(model(x, t, y), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
