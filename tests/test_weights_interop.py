"""Checkpoint formats and weight interop: official <-> fastdit, fastdit <-> diffusers, DeepSpeed dirs."""
import argparse
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fastdit.weights import load as C
from fastdit.weights import interop
from fastdit.models.reference import DiT

from _helpers import randomize_weights_

KW = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2,
          num_classes=6)



def random_dit(seed=0, **kw):
    """Tiny reference DiT with random non-zero weights (adaLN-Zero's zero init would hide bugs)."""
    cfg = dict(KW, **kw)
    torch.manual_seed(seed)
    model = DiT(**cfg)
    randomize_weights_(model, 0.1)
    return model.eval()


def inputs(n=3, c=4, size=8, num_classes=6):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, c, size, size, generator=g)
    t = torch.tensor([0, 417, 999][:n])
    y = torch.tensor([0, 3, num_classes][:n])  # includes the null class
    return x, t, y


def same_outputs(a, b, atol=1e-5):
    x, t, y = inputs(c=a.in_channels, size=a.input_size, num_classes=a.num_classes)
    with torch.no_grad():
        torch.testing.assert_close(a(x, t, y), b(x, t, y), atol=atol, rtol=1e-5)


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


def test_official_training_dict_with_args_namespace(tmp_path, monkeypatch):
    model, ema = random_dit(1), random_dit(2)
    path = tmp_path / "0010000.pt"
    args = argparse.Namespace(model="DiT-S/2", image_size=256, global_batch_size=256)
    torch.save({"model": model.state_dict(), "ema": ema.state_dict(),
                "opt": torch.optim.AdamW(model.parameters()).state_dict(), "args": args}, path)
    calls = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k) or real_load(*a, **k))
    got_ema = C.load_checkpoint(str(path))
    got_raw = C.load_checkpoint(str(path), weights="model")
    assert calls and all(k.get("weights_only") is True for k in calls)
    assert got_ema.source == "training dict (ema)" and got_raw.source == "training dict (model)"
    for k, v in ema.state_dict().items():
        assert torch.equal(got_ema.state_dict[k], v)
    for k, v in model.state_dict().items():
        assert torch.equal(got_raw.state_dict[k], v)
    assert got_ema.meta == {"model": "DiT-S/2", "model_kwargs": {}}


def test_prefixes_are_stripped_and_unknown_layouts_rejected(tmp_path):
    model = random_dit(3)
    torch.save({f"module._orig_mod.{k}": v for k, v in model.state_dict().items()}, tmp_path / "p.pt")
    assert set(C.load_checkpoint(str(tmp_path / "p.pt")).state_dict) == set(model.state_dict())
    torch.save({"weights": [1, 2]}, tmp_path / "odd.pt")
    with pytest.raises(ValueError, match="unrecognised checkpoint layout"):
        C.load_checkpoint(str(tmp_path / "odd.pt"))
    torch.save({"ema": model.state_dict()}, tmp_path / "ema_only.pt")
    with pytest.raises(KeyError, match="no 'model' entry"):
        C.load_checkpoint(str(tmp_path / "ema_only.pt"), weights="model")


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pickled_code_is_refused(tmp_path):
    torch.save({"model": _Evil()}, tmp_path / "evil.pt")
    with pytest.raises(RuntimeError, match="weights_only=True"):
        C.load_checkpoint(str(tmp_path / "evil.pt"))


def test_mismatched_keys_and_shapes_are_listed(tmp_path):
    model = random_dit(4)
    sd = model.state_dict()
    broken = dict(sd)
    broken.pop("blocks.1.mlp.fc2.bias")
    broken["blocks.1.mlp.fc3.bias"] = torch.zeros(32)
    with pytest.raises(KeyError, match=r"missing keys \(1\): blocks.1.mlp.fc2.bias.*"
                                       r"unexpected keys \(1\): blocks.1.mlp.fc3.bias"):
        C.load_strict(DiT(**KW), broken)
    with pytest.raises(KeyError, match="blocks.1.mlp.fc2.bias"):
        interop.to_official(broken)
    wrong = dict(sd, **{"blocks.0.attn.proj.weight": torch.zeros(32, 16)})
    with pytest.raises(ValueError, match=r"blocks.0.attn.proj.weight: checkpoint \(32, 16\)"):
        C.load_strict(DiT(**KW), wrong)
    # a registry name that does not fit the weights names the differing fields
    with pytest.raises(ValueError, match="checkpoint does not match model DiT-XL/2: .*depth: checkpoint 2 vs DiT-XL/2 28"):
        C.build_model(sd, "DiT-XL/2")
    with pytest.raises(KeyError, match="valid names"):
        C.build_model(sd, "DiT-M/3")


def test_architecture_is_read_from_the_weights():
    sd = random_dit(5, in_channels=1, learn_sigma=False, num_classes=9, input_size=12,
                    patch_size=4).state_dict()
    assert C.infer_model_kwargs(sd) == dict(input_size=12, patch_size=4, in_channels=1,
                                            hidden_size=32, depth=2, mlp_ratio=4.0, num_classes=9,
                                            learn_sigma=False)
    with pytest.raises(ValueError, match="num-heads"):
        C.build_model(sd)


# ----------------------------------------------------------------------------------------------
# Training checkpoint directories
# ----------------------------------------------------------------------------------------------
def _write_training_dir(root, model, kwargs, tag="step_0000500", with_ema=True):
    tag_dir = root / "checkpoints" / tag
    tag_dir.mkdir(parents=True)
    if with_ema:
        torch.save(model.state_dict(), tag_dir / "ema.pt")
    (tag_dir / "meta.json").write_text(json.dumps(
        {"model": None, "model_kwargs": kwargs, "step": 500, "vae": None, "latent_scale": None,
         "image_size": kwargs["input_size"]}))
    (root / "checkpoints" / "latest").write_text(tag + "\n")
    return tag_dir


def test_checkpoint_directory_forms_resolve_to_the_ema_weights(tmp_path):
    model = random_dit(6)
    kwargs = dict(KW, learn_sigma=True)
    tag_dir = _write_training_dir(tmp_path / "out", model, kwargs)
    (tmp_path / "out" / "checkpoints" / "step_0000100").mkdir()  # an older tag
    for path in (tmp_path / "out", tmp_path / "out" / "checkpoints", tag_dir):
        loaded = C.load_checkpoint(str(path))
        assert loaded.path == str(tag_dir) and loaded.meta["step"] == 500
        built, _, got_kwargs, _ = C.build_model(loaded.state_dict, meta=loaded.meta)
        assert got_kwargs["num_heads"] == 2
        same_outputs(model, built.eval())
    with pytest.raises(FileNotFoundError, match="not a fastdit checkpoint directory"):
        C.load_checkpoint(str(tmp_path))
    bare = _write_training_dir(tmp_path / "noema", model, kwargs, with_ema=False)
    with pytest.raises(FileNotFoundError, match="weights='model'"):
        C.load_checkpoint(str(bare))


DS_SCRIPT = textwrap.dedent("""
    import os, sys
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")
    import torch, deepspeed
    from fastdit.models.reference import DiT
    torch.manual_seed(0)
    m = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2,
            num_classes=6)
    cfg = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 1},
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}}}
    engine, *_ = deepspeed.initialize(model=m, model_parameters=[p for p in m.parameters()
                                                                   if p.requires_grad], config=cfg)
    loss = engine(torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), torch.tensor([0, 1])).square().mean()
    engine.backward(loss)
    engine.step()
    engine.save_checkpoint(os.path.join(sys.argv[1], "checkpoints"), tag="step_0000001")
    torch.save(engine.module.state_dict(), os.path.join(sys.argv[1], "truth.pt"))
""")


@pytest.mark.slow
def test_raw_weights_from_a_real_deepspeed_zero1_checkpoint(tmp_path):
    """ZeRO-1 shards -> zero_to_fp32 -> strict load; the frozen pos_embed is rebuilt from meta."""
    import socket

    pytest.importorskip("deepspeed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", DS_SCRIPT, str(tmp_path), str(port)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tag_dir = tmp_path / "checkpoints" / "step_0000001"
    (tag_dir / "meta.json").write_text(json.dumps({"model": None, "model_kwargs": dict(KW)}))
    loaded = C.load_checkpoint(str(tmp_path), weights="model")
    assert any("pos_embed" in n for n in loaded.notes)
    truth = torch.load(tmp_path / "truth.pt", weights_only=True)
    assert set(loaded.state_dict) == set(truth)
    for k, v in truth.items():
        torch.testing.assert_close(loaded.state_dict[k], v.float(), atol=0, rtol=0, msg=k)
    model, *_ = C.build_model(loaded.state_dict, meta=loaded.meta, impl="reference")


# ----------------------------------------------------------------------------------------------
# diffusers
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


def test_registry_name_builds_the_registry_architecture():
    """An official-style raw state dict + a registry name (the DiT-XL-2-256x256.pt path), small."""
    from fastdit.models.reference import DiT_models

    torch.manual_seed(13)
    official = DiT_models["DiT-S/8"](input_size=16, num_classes=3).eval()
    with torch.no_grad():
        for name, p in official.named_parameters():
            if name != "pos_embed":
                p.normal_(0, 0.02)
    model, name, kwargs, impl = C.build_model(official.state_dict(), "DiT-S/8")
    assert name == "DiT-S/8" and kwargs["depth"] == 12 and kwargs["num_heads"] == 6
    assert kwargs["input_size"] == 16 and kwargs["num_classes"] == 3
    same_outputs(official, model.eval())
