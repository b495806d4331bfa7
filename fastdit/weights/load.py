"""Load DiT weights from every checkpoint layout fastdit meets, and build the matching model.

Layouts (`load_checkpoint`):
1. official raw state dict `.pt` (e.g. `DiT-XL-2-256x256.pt`): {param name: tensor};
2. official training checkpoint `.pt`: {"model", "ema", "opt", "args"} (EMA weights by default);
3. a `fastdit.export` file: a plain state dict like 1, `.safetensors` (read with safetensors) or `.pt` (metadata, when given, in a sibling
   `<file>.json` or `<file-without-suffix>.json`);
4. a training checkpoint directory: `<output_dir>`, `<output_dir>/checkpoints` or a tag directory
   `<output_dir>/checkpoints/<tag>` (fastdit.weights.layout). EMA weights come from `ema.pt`; raw
   weights from DeepSpeed's files (`raw_training_weights`: the ZeRO partitions through
   `deepspeed.utils.zero_to_fp32`, the frozen pos_embed rebuilt where ZeRO-1 left it out; without
   ZeRO, the module of mp_rank_00_model_states.pt).

Every file, fastdit's own and DeepSpeed's (zero_to_fp32 included), is read with
`torch.load(..., weights_only=True)` and the short allowlist of fastdit.weights.safe_load (the official
training dict's `args` Namespace, DeepSpeed's loss scaler ...): loading a checkpoint never runs code
from it. `trust=True` (the commands' --trust-checkpoint) unpickles fully, for files you wrote yourself
that need more.

`build_model` turns a state dict (+ optional metadata) into a model: the architecture is read off
the tensor shapes (input size, patch, channels, width, depth, classes, learn_sigma, block type);
only the head count needs a registry name (`DiT-S/2` ...) or metadata; the reference or the fast model
is fastdit.models.build's decision. Loads are strict: mismatched keys or shapes raise an error that
lists them (fastdit.state_dict).
"""
from __future__ import annotations

import argparse
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

import torch

from fastdit.models.reference import get_2d_sincos_pos_embed
from fastdit.models.build import build_dit, resolve_impl
from fastdit.models.empty import for_loading
from fastdit.models.registry import MODEL_NAMES, model_config
from fastdit.weights import layout, safe_load
from fastdit.state_dict import check_state_dict_keys, strip_prefixes

WEIGHT_CHOICES = ("ema", "model")


@dataclass
class LoadedCheckpoint:
    """A state dict with where it came from and the training metadata when known."""

    state_dict: Dict[str, torch.Tensor]
    source: str  # human-readable layout description
    path: str
    meta: Optional[Dict[str, Any]] = None
    notes: list = field(default_factory=list)


# ----------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------
def torch_load_safe(path: str, trust: bool = False):
    """fastdit.weights.safe_load.load_file: weights_only=True with the allowlist (argparse.Namespace
    for the official `args`, ...); CheckpointFileError naming the file otherwise."""
    return safe_load.load_file(path, trust=trust)


def _is_tensor_dict(obj) -> bool:
    return isinstance(obj, dict) and len(obj) > 0 and all(
        isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items())


def _read_json(path: str) -> Optional[dict]:
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    return None


# ----------------------------------------------------------------------------------------------
# Training checkpoint directories (layout: fastdit.weights.layout)
# ----------------------------------------------------------------------------------------------
def raw_training_weights(ckpt_root: str, tag: str, meta: Optional[dict],
                         notes: list, trust: bool = False) -> Dict[str, torch.Tensor]:
    """The training (non-EMA) weights of a checkpoint, fp32, official keys.

    Under ZeRO they are the fp32 master weights, reassembled from the partitions by DeepSpeed's
    zero_to_fp32 (any world size); ZeRO-1 does not save frozen parameters, so the fixed pos_embed is
    rebuilt. Without ZeRO they are the module of mp_rank_00_model_states.pt (the bf16 copies under
    bf16: said in `notes`). DeepSpeed's reader runs inside safe_load.restricted_torch_load (`trust`: full
    unpickling).
    """
    tag_dir = os.path.join(ckpt_root, tag)
    if layout.has_zero_shards(tag_dir):
        try:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        except ImportError as e:
            raise ImportError("raw (non-EMA) weights of a DeepSpeed checkpoint need deepspeed; "
                              "install it or load the EMA weights (ema.pt) instead") from e
        with safe_load.restricted_torch_load(trust):
            sd = get_fp32_state_dict_from_zero_checkpoint(ckpt_root, tag=tag)
    else:
        path = os.path.join(tag_dir, layout.MODEL_STATES)
        states = torch_load_safe(path, trust)
        if not isinstance(states, dict) or not _is_tensor_dict(states.get("module")):
            raise ValueError(f"{path} holds no module state dict (a DeepSpeed model-states file has 'module')")
        sd = states["module"]
        if (meta or {}).get("bf16"):
            notes.append("ZeRO-0 bf16 checkpoint: the module weights are the bf16 copies")
    sd = {k: v.float() for k, v in strip_prefixes(dict(sd)).items()}
    _fill_pos_embed(sd, meta, notes)
    return sd


def _fill_pos_embed(sd: Dict[str, torch.Tensor], meta: Optional[dict], notes: list) -> None:
    """ZeRO stage 1 does not save frozen parameters: rebuild the fixed sin-cos pos_embed."""
    if "pos_embed" in sd or "x_embedder.proj.weight" not in sd:
        return
    kwargs = (meta or {}).get("model_kwargs") or {}
    hidden = sd["x_embedder.proj.weight"].shape[0]
    patch = sd["x_embedder.proj.weight"].shape[-1]
    input_size = kwargs.get("input_size")
    if input_size is None:
        raise KeyError("pos_embed is missing and input_size is unknown (no meta.json)")
    grid = input_size // patch
    table = get_2d_sincos_pos_embed(hidden, grid)
    sd["pos_embed"] = torch.from_numpy(table).float().unsqueeze(0)
    notes.append("pos_embed was not in the DeepSpeed checkpoint (frozen parameter); "
                 "rebuilt as the fixed 2-D sin-cos table")


def _load_training_checkpoint(path: str, weights: str, trust: bool = False) -> LoadedCheckpoint:
    ckpt_root, tag = layout.resolve_checkpoint(path, need_ema=weights == "ema")
    tag_dir = os.path.join(ckpt_root, tag)
    meta = layout.read_meta(tag_dir)
    notes: list = []
    if weights == "model":
        sd = raw_training_weights(ckpt_root, tag, meta, notes, trust)
        return LoadedCheckpoint(sd, f"training checkpoint {tag} (raw weights)", tag_dir, meta, notes)
    ema_path = os.path.join(tag_dir, layout.EMA)
    if not os.path.isfile(ema_path):
        raise FileNotFoundError(f"{tag_dir} has no {layout.EMA}; load the raw weights with weights='model' "
                                "(--weights model; fastdit.export --raw) instead")
    obj = torch_load_safe(ema_path, trust)
    if not _is_tensor_dict(obj):
        raise ValueError(f"{ema_path} is not a plain state dict of tensors")
    return LoadedCheckpoint(strip_prefixes(obj), f"training checkpoint {tag} (ema.pt)", tag_dir, meta, notes)


def _load_file(path: str, weights: str, trust: bool = False) -> LoadedCheckpoint:
    if path.lower().endswith(".safetensors"):  # fastdit.export's default: tensors only, nothing to unpickle
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            obj = load_file(path)
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{path}: not a readable safetensors file ({' '.join(str(e).split())})") from e
    else:
        obj = torch_load_safe(path, trust)
    meta = None
    for candidate in (path + ".json", os.path.splitext(path)[0] + ".json"):
        meta = _read_json(candidate)
        if meta is not None:
            break
    if _is_tensor_dict(obj):
        return LoadedCheckpoint(strip_prefixes(obj), "state dict file", path, meta)
    if isinstance(obj, dict) and ("ema" in obj or "model" in obj):
        key = weights if weights in obj else None
        if key is None:
            raise KeyError(f"{path} has no {weights!r} entry (it has {sorted(obj)}); "
                           f"choose weights={'model' if weights == 'ema' else 'ema'!r}")
        sd = obj[key]
        if not _is_tensor_dict(sd):
            raise ValueError(f"{path}[{key!r}] is not a state dict of tensors")
        if meta is None and isinstance(obj.get("args"), argparse.Namespace):
            a = vars(obj["args"])
            if "model" in a:
                meta = {"model": a["model"], "model_kwargs": {}}
        return LoadedCheckpoint(strip_prefixes(sd), f"training dict ({key})", path, meta)
    if isinstance(obj, dict) and "module" in obj and _is_tensor_dict(obj["module"]):
        return LoadedCheckpoint(strip_prefixes(obj["module"]), "DeepSpeed model-states file "
                                "(module; under ZeRO these may be low-precision copies)", path, meta)
    desc = sorted(obj)[:20] if isinstance(obj, dict) else type(obj).__name__
    raise ValueError(f"{path}: unrecognised checkpoint layout ({desc}); expected a state dict, "
                     "a dict with 'ema'/'model', or a fastdit checkpoint directory")


# ----------------------------------------------------------------------------------------------
# The loader
# ----------------------------------------------------------------------------------------------
def load_checkpoint(path: str, weights: str = "ema", trust: bool = False) -> LoadedCheckpoint:
    """Load DiT weights from any supported layout (see the module docstring).

    :param weights: "ema" (default, as the official sample.py) or "model" (raw weights). Plain
        state-dict files hold a single set and are returned as they are.
    :param trust: unpickle fully (runs any code in the files; only for files you wrote yourself).
    """
    if weights not in WEIGHT_CHOICES:
        raise ValueError(f"weights must be one of {WEIGHT_CHOICES}, got {weights!r}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if os.path.isdir(path):
        return _load_training_checkpoint(path, weights, trust)
    return _load_file(path, weights, trust)


# ----------------------------------------------------------------------------------------------
# Architecture from weights
# ----------------------------------------------------------------------------------------------
def infer_model_kwargs(sd: Dict[str, torch.Tensor]) -> Dict[str, Any]:
    """Constructor arguments readable from an official-layout state dict (all but num_heads).

    Assumes label dropout > 0 (an extra null-class row), as every official/fastdit DiT trains.
    """
    need = ("x_embedder.proj.weight", "pos_embed", "y_embedder.embedding_table.weight",
            "final_layer.linear.weight", "blocks.0.mlp.fc1.weight")
    missing = [k for k in need if k not in sd]
    if missing:
        raise KeyError(f"not a DiT state dict: missing {missing}")
    hidden, in_ch, p, _ = sd["x_embedder.proj.weight"].shape
    tokens = sd["pos_embed"].shape[1]
    grid = int(round(tokens ** 0.5))
    if grid * grid != tokens:
        raise ValueError(f"pos_embed has {tokens} tokens, not a square grid")
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    out_ch = sd["final_layer.linear.weight"].shape[0] // (p * p)
    if out_ch not in (in_ch, 2 * in_ch):
        raise ValueError(f"final layer has {out_ch} output channels for {in_ch} input channels")
    kwargs: Dict[str, Any] = dict(
        input_size=grid * p, patch_size=p, in_channels=in_ch, hidden_size=hidden, depth=depth,
        mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / hidden,
        num_classes=sd["y_embedder.embedding_table.weight"].shape[0] - 1,
        learn_sigma=out_ch == 2 * in_ch,
    )
    mod = sd.get("blocks.0.adaLN_modulation.1.weight")
    if mod is not None and mod.shape[0] == 4 * hidden:
        kwargs["block_type"] = "adaln"
    elif mod is None:
        kwargs["block_type"] = "cross_attention" if "blocks.0.cross_attn.q.weight" in sd else "in_context"
    return kwargs


def resolve_model_config(sd: Dict[str, torch.Tensor], model_name: Optional[str] = None,
                         meta: Optional[dict] = None, overrides: Optional[dict] = None
                         ) -> Tuple[Optional[str], Dict[str, Any]]:
    """(registry name or None, full constructor kwargs) for a state dict.

    Priority: explicit `overrides` > metadata > shapes of the weights. With a registry name the
    registry's depth/width/patch must agree with the weights (error naming the mismatch).
    """
    meta = meta or {}
    inferred = infer_model_kwargs(sd)
    name = model_name or meta.get("model")
    if name and not model_name and name not in MODEL_NAMES:
        name = None  # metadata naming a custom architecture: its model_kwargs describe it
    kwargs = dict(inferred)
    kwargs.update({k: v for k, v in (meta.get("model_kwargs") or {}).items() if v is not None})
    kwargs.update({k: v for k, v in (overrides or {}).items() if v is not None})
    if name:
        cfg = model_config(name)  # KeyError lists valid names
        clash = {k: (inferred[k], v) for k, v in cfg.items() if k in inferred and inferred[k] != v}
        if clash:
            desc = ", ".join(f"{k}: checkpoint {a} vs {name} {b}" for k, (a, b) in clash.items())
            raise ValueError(f"checkpoint does not match model {name}: {desc}")
        kwargs.update(cfg)
    if "num_heads" not in kwargs:
        raise ValueError("the head count cannot be read from the weights: give a registry model "
                         "name (--model DiT-S/2 ...) or num_heads (--num-heads)")
    return name, kwargs


def build_model(sd: Dict[str, torch.Tensor], model_name: Optional[str] = None,
                meta: Optional[dict] = None, overrides: Optional[dict] = None, impl: str = "auto",
                **fast_options):
    """Construct the model for `sd` (fastdit.models.build.build_dit decides reference or fast) and
    load it strictly; returns (model, name, kwargs, impl used)."""
    name, kwargs = resolve_model_config(sd, model_name, meta, overrides)
    used = resolve_impl(impl, kwargs.get("block_type", "adaln_zero"))
    model = for_loading(lambda: build_dit(used, **kwargs, **fast_options), "cpu")
    load_strict(model, sd)  # every entry (its key check raises before anything is copied)
    return model, name, kwargs, used


def load_strict(model: torch.nn.Module, sd: Dict[str, torch.Tensor]) -> None:
    """Strict load; KeyError/ValueError listing missing, unexpected and mis-shaped entries."""
    check_state_dict_keys(model, sd)
    own = model.state_dict()
    converted = {k: v.to(dtype=own[k].dtype) for k, v in sd.items()}
    model.load_state_dict(converted, strict=True)
