"""fastdit.weights.interop: official <-> fastdit (validated copies), fastdit <-> diffusers' DiT."""
import pytest
import torch

from fastdit.models.reference import DiT
from fastdit.weights import interop
from fastdit.weights import load as C

from _helpers import TINY_DIT as KW
from _helpers import assert_same_function as same_outputs
from _helpers import dit_inputs as inputs
from _helpers import random_dit


# ----------------------------------------------------------------------------------------------
# Official <-> fastdit
# ----------------------------------------------------------------------------------------------
def test_official_raw_state_dict_round_trip(tmp_path):
    model = random_dit()
    path = tmp_path / "DiT-custom.pt"
    interop.save_official(model, str(path))
    raw = torch.load(path, weights_only=True)
    assert set(raw) == set(model.state_dict()) and all(v.dtype == torch.float32 for v in raw.values())
    # official -> fastdit (the fast model when available) -> same function
    loaded = C.load_checkpoint(str(path))
    assert loaded.source == "state dict file"
    fast, name, kwargs, impl = C.build_model(loaded.state_dict, overrides={"num_heads": 2})
    assert kwargs == dict(KW, mlp_ratio=4.0, learn_sigma=True)
    same_outputs(model, fast.eval())
    # fastdit -> official: the eager reference (the official code's math) loads it strictly
    back = DiT(**KW)
    back.load_state_dict(interop.to_official(fast))
    same_outputs(model, back.eval(), atol=0)


# ----------------------------------------------------------------------------------------------
# fastdit <-> diffusers
# ----------------------------------------------------------------------------------------------
def test_diffusers_round_trip_and_measured_difference(tmp_path):
    model = random_dit(7)
    dmodel = interop.to_diffusers(model)
    assert dmodel.config.norm_eps == 1e-6
    x, t, y = inputs()
    # as designed, diffusers' timestep frequencies differ from DiT's: a clear output difference
    raw = interop.compare_with_diffusers(model, dmodel, x, t, y)
    assert raw["rel_diff"] > 1e-3
    # with the official frequencies the two designs agree to float rounding
    interop.match_official_timesteps(dmodel)
    matched = interop.compare_with_diffusers(model, dmodel, x, t, y)
    assert matched["rel_diff"] < 1e-5, matched
    # back to fastdit: bit-identical weights
    back, kwargs = interop.from_diffusers(dmodel)
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    # through save_pretrained / from_pretrained on disk
    interop.export_diffusers(model, str(tmp_path / "dit"))
    back2, _ = interop.from_diffusers(str(tmp_path / "dit"))
    for k, v in model.state_dict().items():
        assert torch.equal(back2.state_dict()[k], v), k


def test_diffusers_key_mapping_by_hand():
    """Spot-check the mapping against the layouts: q|k|v rows, shared embedder copies, final layer."""
    model = random_dit(8)
    sd = model.state_dict()
    dsd = interop.fastdit_to_diffusers_state_dict(sd, depth=2)
    q, k, v = sd["blocks.1.attn.qkv.weight"].split(32)
    assert torch.equal(dsd["transformer_blocks.1.attn1.to_k.weight"], k)
    assert torch.equal(dsd["transformer_blocks.1.attn1.to_v.bias"], sd["blocks.1.attn.qkv.bias"][64:])
    for i in range(2):
        assert torch.equal(dsd[f"transformer_blocks.{i}.norm1.emb.class_embedder.embedding_table.weight"],
                           sd["y_embedder.embedding_table.weight"])
    assert torch.equal(dsd["proj_out_2.weight"], sd["final_layer.linear.weight"])
    assert "pos_embed" not in dsd


def test_diffusers_import_errors_and_warnings():
    from diffusers import DiTTransformer2DModel

    dmodel = interop.to_diffusers(random_dit(9))
    with torch.no_grad():
        dmodel.transformer_blocks[1].norm1.emb.timestep_embedder.linear_2.bias.add_(1.0)
    with pytest.raises(ValueError, match="transformer_blocks.1.norm1.emb.timestep_embedder.linear_2.bias"):
        interop.from_diffusers(dmodel)
    default_eps = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                        out_channels=8, num_layers=1, sample_size=8, patch_size=2,
                                        num_embeds_ada_norm=6)
    with pytest.warns(UserWarning, match="eps is 1e-05"):
        interop.from_diffusers(default_eps)
    with pytest.raises(ValueError, match="mlp_ratio"):
        interop.to_diffusers(random_dit(10, mlp_ratio=2.0), {"num_heads": 2})
    with pytest.raises(ValueError, match="null-class"):
        interop.to_diffusers(random_dit(11, class_dropout_prob=0.0), {"num_heads": 2, "num_classes": 6})


def test_interop_cli_round_trip(tmp_path):
    model = random_dit(12)
    torch.save(model.state_dict(), tmp_path / "m.pt")
    assert interop.main(["to-diffusers", "--ckpt", str(tmp_path / "m.pt"), "--num-heads", "2",
                         "--out", str(tmp_path / "d")]) == 0
    assert interop.main(["from-diffusers", "--src", str(tmp_path / "d"),
                         "--out", str(tmp_path / "back.pt")]) == 0
    back = torch.load(tmp_path / "back.pt", weights_only=True)
    for k, v in model.state_dict().items():
        assert torch.equal(back[k], v), k


def test_exported_diffusers_folder_loads_matched_with_a_model_card(tmp_path):
    model = random_dit(13)
    interop.export_diffusers(model, str(tmp_path / "d"), {"num_heads": 2})
    x, t, y = inputs()
    matched = interop.load_diffusers(str(tmp_path / "d"))  # one call: no match_official_timesteps needed
    assert interop.compare_with_diffusers(model, matched, x, t, y)["rel_diff"] < 1e-5
    from diffusers import DiTTransformer2DModel
    plain = DiTTransformer2DModel.from_pretrained(str(tmp_path / "d"))
    designed = interop.compare_with_diffusers(model, plain, x, t, y)["rel_diff"]
    assert designed > 1e-3
    card = (tmp_path / "d" / "README.md").read_text()
    assert "load_diffusers" in card and "127" in card and "128" in card
    measured = interop.measure_difference(model, plain)
    assert f"**{measured['as_designed']:.1e}**" in card and f"**{measured['matched']:.1e}**" in card
    # a pixel-space model (TINY_DIT: in_channels 4, but no VAE) cannot go through DiTPipeline: said why
    assert "`DiTPipeline` cannot run this model" in card and "no VAE" in card
    with pytest.raises(ValueError, match="DiTPipeline cannot run this model.*pixel space"):
        interop.load_diffusers_pipeline(str(tmp_path / "d"), vae=None)


def test_pipeline_problem_names_pixel_space_and_class_count():
    digits = dict(in_channels=1, num_classes=10)
    why = interop.pipeline_problem(digits, None)
    assert "pixel space" in why and "10 classes" in why and "1000" in why
    assert interop.pipeline_problem(dict(in_channels=4, num_classes=1000), "/models/vae") is None


def test_cli_outputs_carry_their_metadata_for_sampling(tmp_path, capsys):
    model = random_dit(14)
    torch.save(model.state_dict(), tmp_path / "m.pt")
    assert interop.main(["to-diffusers", "--ckpt", str(tmp_path / "m.pt"), "--num-heads", "2",
                         "--out", str(tmp_path / "d")]) == 0
    assert "DiTPipeline cannot run this model" in capsys.readouterr().out
    assert interop.main(["from-diffusers", "--src", str(tmp_path / "d"), "--out", str(tmp_path / "back.pt")]) == 0
    loaded = C.load_checkpoint(str(tmp_path / "back.pt"))
    assert loaded.meta["model_kwargs"]["num_heads"] == 2
    _, kwargs = C.resolve_model_config(loaded.state_dict, None, loaded.meta)  # no --num-heads needed
    assert kwargs["num_heads"] == 2 and kwargs["num_classes"] == KW["num_classes"]
    # to-official from a file with metadata keeps it
    assert interop.main(["to-official", "--ckpt", str(tmp_path / "back.pt"), "--out", str(tmp_path / "o.pt")]) == 0
    assert C.load_checkpoint(str(tmp_path / "o.pt")).meta["model_kwargs"]["num_heads"] == 2
    # a bad path: one line, exit 2
    assert interop.main(["to-official", "--ckpt", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "x.pt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastdit.interop: error: checkpoint not found") and err.count("\n") == 1
    assert interop.main(["from-diffusers", "--src", str(tmp_path / "none"), "--out", str(tmp_path / "x.pt")]) == 2
    err = capsys.readouterr().err
    assert err == f"fastdit.interop: error: {tmp_path / 'none'} is not a DiTTransformer2DModel folder (no config.json in it)\n"
