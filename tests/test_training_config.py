"""fastdit.training.config: the shipped files, overrides, and errors that name the key and the file."""
import json
import os
import re

import pytest

from fastdit.training.config import (ConfigError, config_from_dict, load_config, parse_override,
                                     parse_step_range)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")


def _write(tmp_path, obj, name="cfg.json"):
    path = tmp_path / name
    path.write_text(json.dumps(obj) if not isinstance(obj, str) else obj)
    return str(path)


def _digits():
    with open(os.path.join(CONFIGS, "digits.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("name", sorted(f for f in os.listdir(CONFIGS) if f.endswith(".json")))
def test_every_shipped_config_loads(name):
    cfg = load_config(os.path.join(CONFIGS, name))
    assert cfg.deepspeed["zero_optimization"]["stage"] in (0, 1, 2, 3)


def test_xl2_zero2_is_the_paper_recipe():
    cfg = load_config(os.path.join(CONFIGS, "xl2_zero2.json"))
    ds = cfg.deepspeed
    assert cfg.model.name == "DiT-XL/2" and cfg.data.kind == "latents" and cfg.data.image_size == 256
    assert ds["train_batch_size"] == 256
    assert ds["optimizer"]["type"] == "AdamW"
    assert ds["optimizer"]["params"]["lr"] == 1e-4 and ds["optimizer"]["params"]["weight_decay"] == 0.0
    assert ds["bf16"]["enabled"] is True and ds["zero_optimization"]["stage"] == 2
    assert "scheduler" not in ds  # constant learning rate, as the paper
    assert cfg.train.ema_decay == 0.9999 and cfg.model.class_dropout_prob == 0.1
    assert cfg.diffusion.diffusion_steps == 1000 and cfg.diffusion.timestep_respacing == ""
    z3 = load_config(os.path.join(CONFIGS, "xl2_zero3.json"))
    assert z3.deepspeed["zero_optimization"]["stage"] == 3 and z3.deepspeed["train_batch_size"] == 256
    x512 = load_config(os.path.join(CONFIGS, "xl2_512_zero2.json"))
    assert x512.data.image_size == 512


def test_digits_config_runs_torch_kernels_on_cpu():
    cfg = load_config(os.path.join(CONFIGS, "digits.json"))
    assert cfg.data.kind == "digits" and cfg.model.kernels == "torch"
    assert cfg.data.random_flip is False  # a mirrored digit is not a digit


def test_defaults_fill_missing_keys(tmp_path):
    raw = _digits()
    del raw["train"]["keep_last"]
    cfg = load_config(_write(tmp_path, raw))
    assert cfg.train.keep_last == 3


def test_overrides_apply_with_types(tmp_path):
    path = _write(tmp_path, _digits())
    cfg = load_config(path, ["train.max_steps=7", "train.ema_decay=1", "data.image_size=8",
                             "train.output_dir=runs/x y", "model.name=DiT-B/4",
                             "deepspeed.zero_optimization.stage=3", "train.sample_classes=[1,2]",
                             "train.peak_flops=null", "deepspeed.bf16.enabled=true"])
    assert cfg.train.max_steps == 7
    assert cfg.train.ema_decay == 1.0 and isinstance(cfg.train.ema_decay, float)
    assert cfg.train.output_dir == "runs/x y" and cfg.model.name == "DiT-B/4"
    assert cfg.deepspeed["zero_optimization"]["stage"] == 3 and cfg.deepspeed["bf16"]["enabled"] is True
    assert cfg.train.sample_classes == [1, 2] and cfg.train.peak_flops is None


@pytest.mark.parametrize("override, words", [
    ("train.max_steps=abc", ["train.max_steps", "integer", "abc"]),
    ("train.max_step=5", ["train.max_step", "max_steps"]),
    ("trian.max_steps=5", ["trian", "train"]),
    ("train.ema_decay=true", ["train.ema_decay", "number"]),
    ("model.impl=cuda", ["model.impl", "'fast'"]),
    ("train.max_steps", ["section.key=value"]),
    ("deepspeed.train_batch_size=big", ["deepspeed.train_batch_size", "type"]),
    ("train.max_steps=0", ["train.max_steps", "positive"]),
    ("model.name=DiT-XXL/2", ["DiT-XXL/2", "DiT-XL/2"]),
])
def test_bad_override_names_key_and_file(tmp_path, override, words):
    path = _write(tmp_path, _digits())
    with pytest.raises(ConfigError) as e:
        load_config(path, [override])
    msg = str(e.value)
    assert path in msg or "--set" in msg
    for w in words:
        assert w in msg, (w, msg)


def test_unknown_and_ill_typed_keys_in_file(tmp_path):
    raw = _digits()
    raw["train"]["lr"] = 1e-3
    path = _write(tmp_path, raw)
    with pytest.raises(ConfigError, match=r"unknown key train\.lr") as e:
        load_config(path)
    assert path in str(e.value)
    raw = _digits()
    raw["data"]["image_size"] = "16"
    path = _write(tmp_path, raw, "typed.json")
    with pytest.raises(ConfigError, match=r"data\.image_size must be an integer") as e:
        load_config(path)
    assert path in str(e.value)
    raw = _digits()
    raw["optimizer"] = {}
    with pytest.raises(ConfigError, match="unknown section 'optimizer'"):
        load_config(_write(tmp_path, raw, "section.json"))
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(_write(tmp_path, "{ nope", "broken.json"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.json"))


def test_semantic_errors_say_what_to_pass():
    base = _digits()
    base["data"] = {"kind": "latents"}
    with pytest.raises(ConfigError, match="data.path"):
        config_from_dict(base, "x.json")
    base["data"] = {"kind": "imagefolder", "path": "/somewhere"}
    with pytest.raises(ConfigError, match="data.vae"):
        config_from_dict(base, "x.json")
    raw = _digits()
    del raw["deepspeed"]
    with pytest.raises(ConfigError, match="deepspeed section is missing"):
        config_from_dict(raw, "x.json")


@pytest.mark.parametrize("override,message", [
    ("diffusion.sample_steps=fifty", "diffusion.sample_steps='fifty'.*not an integer step count"),
    ("diffusion.sample_steps=ddim0", "diffusion.sample_steps='ddim0'.*need >= 1"),
    ("diffusion.timestep_respacing=x", "diffusion.timestep_respacing='x'"),
])
def test_respacings_used_later_are_checked_at_load(tmp_path, override, message):
    """The grids' respacing is first used when a grid is drawn (maybe hours in): checked before any work."""
    with pytest.raises(ConfigError, match=message):
        load_config(_write(tmp_path, _digits()), [override])
    load_config(_write(tmp_path, _digits()), ["diffusion.sample_steps=ddim7"])


def test_parse_override_values():
    assert parse_override("a.b=1e-4") == (["a", "b"], 1e-4)
    assert parse_override("a.b=DiT-S/2") == (["a", "b"], "DiT-S/2")
    assert parse_override("a.b.c=[1, 2]") == (["a", "b", "c"], [1, 2])
    assert parse_override('a.b="3"') == (["a", "b"], "3")


@pytest.mark.parametrize("text, message", [
    ("5", "must be a string"), ("5-", "must look like A-B"), ("a-b", "must look like A-B"),
    ("5-6", "B >= A + 2"), ("0-3", "1 <= A"), ("7-4", "B >= A + 2")])
def test_profile_steps_config_errors(text, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(os.path.join(CONFIGS, "digits.json"), [f"train.profile_steps={text}"])


def test_profile_steps_config():
    path = os.path.join(CONFIGS, "digits.json")
    assert load_config(path).train.profile_steps is None  # off by default
    cfg = load_config(path, ["train.profile_steps=10-14"])
    assert parse_step_range(cfg.train.profile_steps) == (10, 14)
    with pytest.raises(ConfigError, match="ends after train.max_steps=12"):
        load_config(path, ["train.profile_steps=10-14", "train.max_steps=12"])


def test_config_by_packaged_name_or_path_and_unknown_names_listed(tmp_path, monkeypatch):
    from fastdit.training.config import PACKAGED_CONFIGS, packaged_config_names

    monkeypatch.chdir(tmp_path)  # outside the repository: no configs/ folder here
    assert {"digits", "xl2_zero2", "xl2_zero3"} <= set(packaged_config_names())
    for name in ("xl2_zero2", "xl2_zero2.json", "configs/xl2_zero2.json"):
        cfg = load_config(name)
        assert os.path.samefile(cfg.path, os.path.join(PACKAGED_CONFIGS, "xl2_zero2.json"))
    own = _write(tmp_path, _digits(), "xl2_zero2.json")  # a path that exists wins over the packaged name
    assert load_config(own).path == own
    with pytest.raises(ConfigError, match="does not exist") as e:
        load_config("xl9_zero7")
    assert "packaged configs: b2_zero2, digits" in str(e.value)


def test_repository_configs_folder_is_the_packaged_one():
    # one copy only: configs/ at the root is a link to fastdit/configs/ (no duplicates that can drift)
    from fastdit.training.config import PACKAGED_CONFIGS

    assert os.path.islink(CONFIGS) and os.path.samefile(CONFIGS, PACKAGED_CONFIGS)


@pytest.mark.parametrize("overrides, message", [
    (["train.compile=true"], "train.cuda_graph and train.compile both take over"),
    (["model.checkpointing=true"], "cannot capture model.checkpointing"),
    (["deepspeed.zero_optimization.stage=3"], "ZeRO-3 gathers them for every forward"),
])
def test_cuda_graph_refuses_what_it_cannot_replay(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(os.path.join(CONFIGS, "xl2_zero2.json"), ["train.cuda_graph=true"] + overrides)
    assert load_config(os.path.join(CONFIGS, "xl2_zero2.json"), ["train.cuda_graph=true"]).train.cuda_graph


def test_fused_step_deferred_check_needs_the_fused_step():
    """train.fused_step_deferred_check changes the fused optimizer step: without it, a one-line error."""
    xl2 = os.path.join(CONFIGS, "xl2_zero2.json")
    assert load_config(xl2, []).train.fused_step_deferred_check is False          # off by default
    assert load_config(xl2, ["train.fused_step_deferred_check=true"]).train.fused_step_deferred_check
    with pytest.raises(ConfigError, match="train.fused_step_deferred_check .* needs train.fused_optimizer_step=true"):
        load_config(xl2, ["train.fused_step_deferred_check=true", "train.fused_optimizer_step=false"])
