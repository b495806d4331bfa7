"""fastdit.weights.load: weights from every layout (official files, exports, training checkpoint folders)
and the model that matches them; strict, readable errors; no pickled code."""
import argparse
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fastdit.dist import free_port
from fastdit.models.reference import DiT
from fastdit.weights import interop
from fastdit.weights import load as C

from _helpers import TINY_DIT as KW
from _helpers import assert_same_function as same_outputs
from _helpers import random_dit


# ----------------------------------------------------------------------------------------------
# Files: official state dicts and training dicts, fastdit exports
# ----------------------------------------------------------------------------------------------
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
    pytest.importorskip("deepspeed")
    port = free_port()
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


@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_build_model_holds_exactly_the_loaded_weights(impl):
    """build_model skips the model's own init (fastdit.models.empty): every tensor is the checkpoint's."""
    sd = random_dit(6).state_dict()
    model, _, _, used = C.build_model(sd, None, {"model_kwargs": {"num_heads": KW["num_heads"]}}, None, impl,
                                      **({"kernels": "torch"} if impl == "fast" else {}))
    assert used == impl and model.state_dict().keys() == sd.keys()
    assert all(torch.equal(v, sd[k]) and v.device.type == "cpu" for k, v in model.state_dict().items())
    assert [p.requires_grad for p in model.parameters()] == [p.requires_grad for p in random_dit(6).parameters()]
