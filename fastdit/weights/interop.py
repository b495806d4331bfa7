"""Move DiT weights between fastdit, the official DiT code and diffusers' DiTTransformer2DModel.

Official <-> fastdit: the layouts are the same (fastdit's state dict is byte-compatible with
`DiT-XL-2-256x256.pt`), so conversion is a validated copy: `to_official` / `from_official` strip
wrapper prefixes, check every key and shape against the architecture and return fp32 CPU tensors;
`save_official` writes the raw-state-dict file the official `sample.py` loads (optionally the
official training dict {"model", "ema", "opt", "args"}).

fastdit <-> diffusers (`DiTTransformer2DModel`; mapping checked against diffusers 0.42.1):

    official key                         diffusers key
    x_embedder.proj.*                    pos_embed.proj.*
    pos_embed (fixed sin-cos)            (not stored: diffusers rebuilds the same table)
    t_embedder.mlp.0.* / mlp.2.*         transformer_blocks.{i}.norm1.emb.timestep_embedder.linear_1/2.*
    y_embedder.embedding_table.weight    transformer_blocks.{i}.norm1.emb.class_embedder.embedding_table.weight
                                         (one shared embedder becomes a copy in every block)
    blocks.i.adaLN_modulation.1.*        transformer_blocks.i.norm1.linear.*
    blocks.i.attn.qkv.* (rows q|k|v)     transformer_blocks.i.attn1.to_q/to_k/to_v.*
    blocks.i.attn.proj.*                 transformer_blocks.i.attn1.to_out.0.*
    blocks.i.mlp.fc1.* / fc2.*           transformer_blocks.i.ff.net.0.proj.* / ff.net.2.*
    final_layer.adaLN_modulation.1.*     proj_out_1.*
    final_layer.linear.*                 proj_out_2.*

Numerical differences between the two designs (same weights; see `compare_with_diffusers` and the
tests, which measure them):
1. Timestep frequencies. DiT uses exp(-ln(10^4) k / 128), k < 128; diffusers' DiT builds its
   `Timesteps` with downscale_freq_shift=1, i.e. exp(-ln(10^4) k / 127). The embedding of t differs
   (by O(1) for large t), so outputs differ noticeably. `match_official_timesteps(model)` sets the
   shift to 0 in every block of a loaded diffusers model, which makes the two agree to float
   rounding; the attribute is not part of the diffusers config and must be set again after each
   `from_pretrained`: `load_diffusers(folder)` does both in one call. Exported folders carry a model
   card (README.md) with the difference measured on their weights and this fix; diffusers' DiTPipeline
   (a VAE, 1000 classes) cannot run pixel-space or non-1000-class models (`pipeline_problem` says why).
2. LayerNorm eps of the MLP branch: official 1e-6; diffusers' `norm_eps` defaults to 1e-5 (the
   attention branch and final layer use 1e-6 in both). Exports set norm_eps=1e-6; imports of a
   model with another eps warn, since fastdit always uses 1e-6.
3. Attention is computed by SDPA in diffusers and by an explicit softmax in the eager reference:
   float-rounding differences only.
Classifier-free guidance also differs at the pipeline level: diffusers' DiTPipeline guides all
latent channels, the official code the first 3.

Measured (`python benchmarks/diffusers_difference.py --model M`, CPU fp32, random weights N(0, 0.02^2) on
every parameter but the fixed pos_embed, input 32x32x4, t in {0, 250, 500, 999}, batch 2 per t for
S/2 and 1 for XL/2; relative L2 difference of the outputs):

    model     diffusers as designed   frequencies fixed   frequencies fixed, norm_eps 1e-5
    DiT-S/2   1.2e-2 (max 0.029)      2.1e-7 (max 6.6e-7)  6.3e-7
    DiT-XL/2  1.2e-1 (max 0.39)       4.1e-7 (max 1.3e-6)  3.9e-6

("max" = max |difference|; outputs reach |1.2| (S/2), |2.3| (XL/2).) With trained weights the
size of the first column will differ; it is not a rounding effect and does not vanish.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Any, Dict, Optional, Tuple

import torch

from fastdit.models.reference import get_2d_sincos_pos_embed
from fastdit.models.build import build_dit
from fastdit.models.empty import for_loading
from fastdit.weights import load as weights_load
from fastdit.state_dict import check_state_dict_keys, strip_prefixes

OFFICIAL_EPS = 1e-6


# ----------------------------------------------------------------------------------------------
# Official <-> fastdit
# ----------------------------------------------------------------------------------------------
def _clean(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", torch.float32).contiguous().clone()
            for k, v in strip_prefixes(dict(sd)).items()}


def to_official(state_dict_or_model, model_kwargs: Optional[dict] = None,
                model_name: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """fastdit weights (a model or state dict) -> official-layout fp32 CPU state dict (validated)."""
    sd = (state_dict_or_model.state_dict() if isinstance(state_dict_or_model, torch.nn.Module)
          else state_dict_or_model)
    sd = _clean(sd)
    validate_official(sd, model_kwargs, model_name)
    return sd


def from_official(state_dict: Dict[str, torch.Tensor], model_kwargs: Optional[dict] = None,
                  model_name: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """Official state dict -> fastdit state dict (the same layout; validated, fp32, CPU)."""
    sd = _clean(state_dict)
    validate_official(sd, model_kwargs, model_name)
    return sd


def validate_official(sd: Dict[str, torch.Tensor], model_kwargs: Optional[dict] = None,
                      model_name: Optional[str] = None) -> None:
    """Raise listing missing/unexpected keys or wrong shapes against the implied architecture."""
    # any head count dividing the width gives the same keys and shapes
    meta = {"model_kwargs": dict({"num_heads": 1}, **(model_kwargs or {}))}
    _, kwargs = weights_load.resolve_model_config(sd, model_name, meta)
    with torch.device("meta"):
        skeleton = build_dit("reference", **kwargs)
    check_state_dict_keys(skeleton, sd)


def save_official(model_or_sd, path: str, ema=None, training_dict: bool = False,
                  args: Optional[argparse.Namespace] = None) -> None:
    """Write an official checkpoint: raw state dict, or {"model", "ema", "opt", "args"}."""
    sd = to_official(model_or_sd)
    if not training_dict:
        torch.save(sd, path)
        return
    ema_sd = to_official(ema) if ema is not None else sd
    torch.save({"model": sd, "ema": ema_sd, "opt": {}, "args": args or argparse.Namespace()}, path)


# ----------------------------------------------------------------------------------------------
# fastdit -> diffusers
# ----------------------------------------------------------------------------------------------
def diffusers_config(model_kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """DiTTransformer2DModel config for fastdit constructor kwargs (full set, incl. num_heads)."""
    if model_kwargs.get("block_type", "adaln_zero") != "adaln_zero":
        raise ValueError("diffusers' DiTTransformer2DModel implements only the adaLN-Zero block")
    if float(model_kwargs.get("mlp_ratio", 4.0)) != 4.0:
        raise ValueError("diffusers' DiT MLP is fixed at 4x the width; "
                         f"mlp_ratio {model_kwargs['mlp_ratio']} cannot be exported")
    hidden, heads = model_kwargs["hidden_size"], model_kwargs["num_heads"]
    in_ch = model_kwargs.get("in_channels", 4)
    return dict(
        num_attention_heads=heads, attention_head_dim=hidden // heads, in_channels=in_ch,
        out_channels=in_ch * 2 if model_kwargs.get("learn_sigma", True) else in_ch,
        num_layers=model_kwargs["depth"], sample_size=model_kwargs["input_size"],
        patch_size=model_kwargs["patch_size"], num_embeds_ada_norm=model_kwargs.get("num_classes", 1000),
        activation_fn="gelu-approximate", attention_bias=True, norm_type="ada_norm_zero",
        norm_elementwise_affine=False, norm_eps=OFFICIAL_EPS, dropout=0.0,
    )


# The key pairs (official layout, diffusers DiTTransformer2DModel), used in both directions. The embedders
# are one module in the official DiT and a copy in every diffusers block; qkv is split into to_q/k/v.
_EMBEDDER_KEYS = {
    "t_embedder.mlp.0.weight": "norm1.emb.timestep_embedder.linear_1.weight",
    "t_embedder.mlp.0.bias": "norm1.emb.timestep_embedder.linear_1.bias",
    "t_embedder.mlp.2.weight": "norm1.emb.timestep_embedder.linear_2.weight",
    "t_embedder.mlp.2.bias": "norm1.emb.timestep_embedder.linear_2.bias",
    "y_embedder.embedding_table.weight": "norm1.emb.class_embedder.embedding_table.weight",
}
_BLOCK_LINEARS = (("adaLN_modulation.1", "norm1.linear"), ("attn.proj", "attn1.to_out.0"),
                  ("mlp.fc1", "ff.net.0.proj"), ("mlp.fc2", "ff.net.2"))
_FINAL_LINEARS = (("final_layer.adaLN_modulation.1", "proj_out_1"), ("final_layer.linear", "proj_out_2"))


def fastdit_to_diffusers_state_dict(sd: Dict[str, torch.Tensor], depth: int
                                    ) -> Dict[str, torch.Tensor]:
    """Official-layout state dict -> DiTTransformer2DModel state dict (mapping in the docstring)."""
    sd = _clean(sd)
    out: Dict[str, torch.Tensor] = {}
    used = set()

    def take(key):
        used.add(key)
        return sd[key]

    out["pos_embed.proj.weight"] = take("x_embedder.proj.weight")
    out["pos_embed.proj.bias"] = take("x_embedder.proj.bias")
    shared = {theirs: take(ours) for ours, theirs in _EMBEDDER_KEYS.items()}
    for i in range(depth):
        b, d = f"blocks.{i}.", f"transformer_blocks.{i}."
        for k, v in shared.items():
            out[d + k] = v.clone()
        for kind in ("weight", "bias"):
            for ours, theirs in _BLOCK_LINEARS:
                out[d + f"{theirs}.{kind}"] = take(b + f"{ours}.{kind}")
            for n, part in zip("qkv", take(b + f"attn.qkv.{kind}").chunk(3, dim=0)):
                out[d + f"attn1.to_{n}.{kind}"] = part.clone()
    for kind in ("weight", "bias"):
        for ours, theirs in _FINAL_LINEARS:
            out[f"{theirs}.{kind}"] = take(f"{ours}.{kind}")
    used.add("pos_embed")
    left = sorted(set(sd) - used)
    if left:
        raise KeyError(f"keys with no diffusers counterpart: {left[:20]}")
    return out


def _check_pos_embed(sd: Dict[str, torch.Tensor], hidden: int, grid: int) -> None:
    table = torch.from_numpy(get_2d_sincos_pos_embed(hidden, grid)).float().unsqueeze(0)
    if "pos_embed" in sd and not torch.allclose(sd["pos_embed"].float(), table, atol=1e-5):
        raise ValueError("pos_embed is not the fixed 2-D sin-cos table; diffusers' DiT cannot "
                         "store a different one")


def to_diffusers(model_or_sd, model_kwargs: Optional[dict] = None, model_name: Optional[str] = None):
    """A diffusers DiTTransformer2DModel holding these weights (fp32, eval mode)."""
    from diffusers import DiTTransformer2DModel

    if isinstance(model_or_sd, torch.nn.Module):
        sd = model_or_sd.state_dict()
        if model_kwargs is None and hasattr(model_or_sd, "num_heads"):
            model_kwargs = {"num_heads": model_or_sd.num_heads}
    else:
        sd = model_or_sd
    sd = _clean(sd)
    _, kwargs = weights_load.resolve_model_config(sd, model_name, {"model_kwargs": model_kwargs or {}})
    if sd["y_embedder.embedding_table.weight"].shape[0] != kwargs["num_classes"] + 1:
        raise ValueError("diffusers' DiT always has a null-class row (label dropout > 0)")
    _check_pos_embed(sd, kwargs["hidden_size"], kwargs["input_size"] // kwargs["patch_size"])
    dsd = fastdit_to_diffusers_state_dict(sd, kwargs["depth"])
    dmodel = DiTTransformer2DModel(**diffusers_config(kwargs))
    missing, unexpected = dmodel.load_state_dict(dsd, strict=False)
    if missing or unexpected:
        raise KeyError(f"diffusers model mismatch: missing {missing[:20]}, unexpected {unexpected[:20]}")
    return dmodel.eval()


def export_diffusers(model_or_sd, out_dir: str, model_kwargs: Optional[dict] = None,
                     model_name: Optional[str] = None, safe_serialization: bool = True,
                     vae: Optional[str] = None):
    """Save a DiTTransformer2DModel folder (`from_pretrained`-loadable) with these weights, and a model
    card (README.md) with the output difference measured on these weights, how to load the model so that
    it matches fastdit (`load_diffusers`), and whether diffusers' DiTPipeline can run it (`vae`: the
    VAE the latents belong to; None for a pixel-space model)."""
    dmodel = to_diffusers(model_or_sd, model_kwargs, model_name)
    dmodel.save_pretrained(out_dir, safe_serialization=safe_serialization)
    sd = model_or_sd.state_dict() if isinstance(model_or_sd, torch.nn.Module) else model_or_sd
    if model_kwargs is None and hasattr(model_or_sd, "num_heads"):
        model_kwargs = {"num_heads": model_or_sd.num_heads}
    _, kwargs = weights_load.resolve_model_config(_clean(sd), model_name, {"model_kwargs": model_kwargs or {}})
    model = for_loading(lambda: build_dit("reference", **kwargs), "cpu")
    model.load_state_dict(_clean(sd))  # strict: every entry
    diff = measure_difference(model.eval(), dmodel)
    with open(os.path.join(out_dir, "README.md"), "w") as f:
        f.write(model_card(kwargs, diff, pipeline_problem(kwargs, vae)))
    match_official_timesteps(dmodel)
    return dmodel


@torch.no_grad()
def measure_difference(model, dmodel, seed: int = 0) -> Dict[str, float]:
    """Relative L2 output difference fastdit vs diffusers on these weights (random inputs, t in
    {0, 250, 500, 999}, 2 samples per t), as diffusers designs it and with match_official_timesteps.
    Leaves dmodel as it was."""
    cfg = dmodel.config
    g = torch.Generator().manual_seed(seed)
    t = torch.tensor([0, 250, 500, 999]).repeat_interleave(2)
    x = torch.randn(len(t), cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    y = torch.randint(0, cfg.num_embeds_ada_norm, (len(t),), generator=g)
    shifts = [b.norm1.emb.time_proj.downscale_freq_shift for b in dmodel.transformer_blocks]
    for b in dmodel.transformer_blocks:
        b.norm1.emb.time_proj.downscale_freq_shift = 1
    designed = compare_with_diffusers(model, dmodel, x, t, y)["rel_diff"]
    match_official_timesteps(dmodel)
    matched = compare_with_diffusers(model, dmodel, x, t, y)["rel_diff"]
    for b, s in zip(dmodel.transformer_blocks, shifts):
        b.norm1.emb.time_proj.downscale_freq_shift = s
    return {"as_designed": designed, "matched": matched}


def pipeline_problem(kwargs: Dict[str, Any], vae: Optional[str]) -> Optional[str]:
    """Why diffusers' DiTPipeline cannot run this model, or None when it can."""
    why = []
    if vae is None or kwargs.get("in_channels", 4) != 4:
        why.append(f"the model works in pixel space ({kwargs.get('in_channels')} channel(s), no VAE) and "
                   "DiTPipeline always decodes its output with a VAE")
    if kwargs.get("num_classes", 1000) != 1000:
        why.append(f"the model has {kwargs.get('num_classes')} classes and DiTPipeline's null class for "
                   "guidance is fixed at label 1000 (ImageNet's 1000 classes)")
    return "; ".join(why) or None


def model_card(kwargs: Dict[str, Any], diff: Dict[str, float], problem: Optional[str]) -> str:
    """README.md of an exported diffusers folder."""
    pipe = (f"diffusers' `DiTPipeline` cannot run this model: {problem}. Sample it with fastdit instead "
            "(`python -m fastdit.interop from-diffusers --src THIS_FOLDER --out model.pt`, then "
            "`python -m fastdit.sample --ckpt model.pt ...`)." if problem else
            "diffusers' `DiTPipeline(transformer, vae, scheduler)` can run it; build it with "
            "`fastdit.interop.load_diffusers_pipeline(THIS_FOLDER, VAE_FOLDER)`, which matches the timesteps. "
            "Note: DiTPipeline guides every latent channel with classifier-free guidance, the official DiT only "
            "the first 3.")
    return f"""---
library_name: diffusers
tags: [dit, fastdit]
---
# DiT exported by fastdit

A `DiTTransformer2DModel` (diffusers) holding fastdit/official-DiT weights: depth {kwargs['depth']}, width
{kwargs['hidden_size']}, {kwargs['num_heads']} heads, patch {kwargs['patch_size']}, input
{kwargs['input_size']}x{kwargs['input_size']}x{kwargs['in_channels']}, {kwargs['num_classes']} classes.

## Load it so that it matches fastdit

diffusers' DiT divides its timestep frequencies by 127 where DiT divides by 128. Loaded with plain
`DiTTransformer2DModel.from_pretrained`, this model's outputs differ from fastdit's by a relative L2
difference of **{diff['as_designed']:.1e}** (measured at export on these weights: random inputs,
t in {{0, 250, 500, 999}}). With the official frequencies the difference is **{diff['matched']:.1e}**
(float rounding). The setting is not part of the diffusers config, so load the model with

```python
from fastdit.interop import load_diffusers
transformer = load_diffusers("THIS_FOLDER")   # from_pretrained + match_official_timesteps
```

or call `fastdit.interop.match_official_timesteps(model)` after every `from_pretrained`.

## Pipeline

{pipe}
"""


def load_diffusers(folder: str, **from_pretrained_kwargs):
    """A DiTTransformer2DModel from a local folder, with the official timestep frequencies
    (match_official_timesteps), in eval mode: it computes what fastdit computes."""
    from diffusers import DiTTransformer2DModel

    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise FileNotFoundError(f"{folder} is not a DiTTransformer2DModel folder (no config.json in it)")
    from_pretrained_kwargs.setdefault("local_files_only", True)
    from_pretrained_kwargs.setdefault("low_cpu_mem_usage", False)  # no "install accelerate" notice
    dmodel = DiTTransformer2DModel.from_pretrained(folder, **from_pretrained_kwargs)
    match_official_timesteps(dmodel)
    return dmodel.eval()


def load_diffusers_pipeline(folder: str, vae: Optional[str], scheduler=None):
    """diffusers' DiTPipeline around load_diffusers(folder) and the AutoencoderKL in `vae` (a local folder).
    Raises ValueError saying why when DiTPipeline cannot run the model (pixel space, not 1000 classes)."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline

    transformer = load_diffusers(folder)
    cfg = transformer.config
    kwargs = {"in_channels": cfg.in_channels, "num_classes": cfg.num_embeds_ada_norm}
    problem = pipeline_problem(kwargs, vae)
    if problem:
        raise ValueError(f"{folder}: diffusers' DiTPipeline cannot run this model: {problem}")
    return DiTPipeline(transformer=transformer, vae=AutoencoderKL.from_pretrained(vae, local_files_only=True),
                       scheduler=scheduler or DDIMScheduler(num_train_timesteps=1000))


# ----------------------------------------------------------------------------------------------
# diffusers -> fastdit
# ----------------------------------------------------------------------------------------------
def diffusers_to_fastdit_state_dict(dsd: Dict[str, torch.Tensor], config: Dict[str, Any]
                                    ) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """DiTTransformer2DModel state dict + config -> (official-layout state dict, fastdit kwargs).

    The per-block timestep/label embedders must be identical (they are copies of one shared
    embedder in a converted DiT); otherwise ValueError lists the blocks that differ.
    """
    depth = int(config["num_layers"])
    heads = int(config["num_attention_heads"])
    hidden = heads * int(config["attention_head_dim"])
    in_ch = int(config["in_channels"])
    out_ch = int(config.get("out_channels") or in_ch)
    if out_ch not in (in_ch, 2 * in_ch):
        raise ValueError(f"out_channels {out_ch} must be in_channels or twice it ({in_ch})")
    if config.get("norm_type", "ada_norm_zero") != "ada_norm_zero":
        raise ValueError("only ada_norm_zero DiTs map onto the official DiT")
    if config.get("activation_fn", "gelu-approximate") != "gelu-approximate":
        raise ValueError(f"activation {config.get('activation_fn')!r} is not DiT's tanh GELU")
    eps = float(config.get("norm_eps", 1e-5))
    if eps != OFFICIAL_EPS:
        warnings.warn(f"the diffusers model's MLP LayerNorm eps is {eps}; fastdit/official use 1e-6 "
                      "(a small numerical difference)")
    p = int(config["patch_size"])
    input_size = int(config["sample_size"])
    dsd = {k: v.detach().to("cpu", torch.float32) for k, v in dsd.items()}
    used = set()

    def take(key):
        used.add(key)
        return dsd[key]

    sd: Dict[str, torch.Tensor] = {}
    sd["x_embedder.proj.weight"] = take("pos_embed.proj.weight")
    sd["x_embedder.proj.bias"] = take("pos_embed.proj.bias")
    sd["pos_embed"] = torch.from_numpy(
        get_2d_sincos_pos_embed(hidden, input_size // p)).float().unsqueeze(0)
    differ = []
    for ours, theirs in _EMBEDDER_KEYS.items():
        first = take(f"transformer_blocks.0.{theirs}")
        for i in range(1, depth):
            other = take(f"transformer_blocks.{i}.{theirs}")
            if not torch.equal(first, other):
                differ.append(f"transformer_blocks.{i}.{theirs}")
        sd[ours] = first.clone()
    if differ:
        raise ValueError("the diffusers model has per-block timestep/label embedders that differ "
                         f"from block 0 ({len(differ)}: {differ[:10]}); the official DiT shares one "
                         "embedder, so these weights cannot be converted exactly")
    for i in range(depth):
        b, d = f"blocks.{i}.", f"transformer_blocks.{i}."
        for kind in ("weight", "bias"):
            for ours, theirs in _BLOCK_LINEARS:
                sd[b + f"{ours}.{kind}"] = take(d + f"{theirs}.{kind}")
            sd[b + f"attn.qkv.{kind}"] = torch.cat([take(d + f"attn1.to_{n}.{kind}") for n in "qkv"], dim=0)
    for kind in ("weight", "bias"):
        for ours, theirs in _FINAL_LINEARS:
            sd[f"{ours}.{kind}"] = take(f"{theirs}.{kind}")
    left = sorted(set(dsd) - used)
    if left:
        raise KeyError(f"diffusers keys with no official counterpart: {left[:20]}")
    num_classes = int(config["num_embeds_ada_norm"])
    kwargs = dict(input_size=input_size, patch_size=p, in_channels=in_ch, hidden_size=hidden,
                  depth=depth, num_heads=heads, mlp_ratio=4.0, num_classes=num_classes,
                  learn_sigma=out_ch == 2 * in_ch)
    return sd, kwargs


def from_diffusers(dmodel_or_path, impl: str = "reference", **impl_kwargs):
    """(fastdit model, kwargs) from a DiTTransformer2DModel or a local folder of one."""
    if isinstance(dmodel_or_path, str):
        from diffusers import DiTTransformer2DModel

        dmodel_or_path = DiTTransformer2DModel.from_pretrained(dmodel_or_path, local_files_only=True)
    sd, kwargs = diffusers_to_fastdit_state_dict(dmodel_or_path.state_dict(),
                                                 dict(dmodel_or_path.config))
    model, _, kwargs, _ = weights_load.build_model(sd, None, {"model_kwargs": kwargs}, None, impl,
                                                   **impl_kwargs)
    return model.eval(), kwargs


def match_official_timesteps(dmodel) -> None:
    """Make a diffusers DiT embed timesteps with the official frequencies (k / 128, not k / 127)."""
    for block in dmodel.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0


@torch.no_grad()
def compare_with_diffusers(model, dmodel, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor
                           ) -> Dict[str, float]:
    """Max |difference| and the scale of the outputs of a fastdit model and a diffusers DiT."""
    ours = model(x, t, y)
    theirs = dmodel(x, timestep=t, class_labels=y).sample
    return {"max_abs_diff": float((ours - theirs).abs().max()),
            "rel_diff": float((ours - theirs).norm() / ours.norm().clamp_min(1e-30)),
            "output_max_abs": float(ours.abs().max())}


def main(argv=None) -> int:
    """CLI: convert between layouts. Examples:

        python -m fastdit.interop to-diffusers --ckpt CKPT [--model DiT-XL/2] --out DIR
        python -m fastdit.interop from-diffusers --src DIR --out model.pt
        python -m fastdit.interop to-official --ckpt CKPT_DIR --out model.pt

    Weights files are written with `<out>.json` beside them (model name and constructor kwargs), so
    `python -m fastdit.sample --ckpt model.pt` needs no --model / --num-heads. A diffusers folder gets a
    README.md model card: the measured difference to fastdit and how to load it matched
    (fastdit.interop.load_diffusers).
    """
    from fastdit.weights.export import write_side_meta
    from fastdit.weights.safe_load import CheckpointFileError

    p = argparse.ArgumentParser(prog="python -m fastdit.interop", description=main.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    ckpt_help = "a fastdit checkpoint (folder, checkpoints/ or output_dir) or a weights file"
    weights_help = "ema (default) or model: which weights of a training checkpoint"
    a = sub.add_parser("to-diffusers", help="fastdit/official weights -> a DiTTransformer2DModel folder")
    a.add_argument("--ckpt", required=True, help=ckpt_help)
    a.add_argument("--model", default=None, help="registry name (e.g. DiT-XL/2) when the file has no metadata")
    a.add_argument("--num-heads", type=int, default=None,
                   help="attention heads when the file has no metadata (weights do not tell)")
    a.add_argument("--weights", choices=weights_load.WEIGHT_CHOICES, default="ema", help=weights_help)
    a.add_argument("--vae", default=None,
                   help="the VAE of a latent-space model (default: the checkpoint's); only written into the "
                        "model card (whether DiTPipeline can run it)")
    a.add_argument("--out", required=True, help="output folder (config.json, weights, README.md)")
    b = sub.add_parser("from-diffusers", help="a DiTTransformer2DModel folder -> official-layout weights file")
    b.add_argument("--src", required=True, help="local DiTTransformer2DModel folder")
    b.add_argument("--out", required=True, help="output weights file (.pt), with <out>.json beside it")
    c = sub.add_parser("to-official", help="a fastdit checkpoint -> official-layout weights file")
    c.add_argument("--ckpt", required=True, help=ckpt_help)
    c.add_argument("--weights", choices=weights_load.WEIGHT_CHOICES, default="ema", help=weights_help)
    c.add_argument("--out", required=True, help="output weights file (.pt), with <out>.json beside it")
    args = p.parse_args(argv)
    try:
        if args.cmd == "to-diffusers":
            loaded = weights_load.load_checkpoint(args.ckpt, args.weights)
            overrides = {"num_heads": args.num_heads} if args.num_heads else None
            _, kwargs = weights_load.resolve_model_config(loaded.state_dict, args.model, loaded.meta,
                                                           overrides)
            vae = args.vae or (loaded.meta or {}).get("vae")
            export_diffusers(loaded.state_dict, args.out, kwargs, vae=vae)
            problem = pipeline_problem(kwargs, vae)
            if problem:
                print(f"note: diffusers' DiTPipeline cannot run this model ({problem}); "
                      f"see {os.path.join(args.out, 'README.md')}")
        elif args.cmd == "from-diffusers":
            dmodel = load_diffusers(args.src)
            sd, kwargs = diffusers_to_fastdit_state_dict(dmodel.state_dict(), dict(dmodel.config))
            torch.save(sd, args.out)
            write_side_meta(args.out, {"model_kwargs": kwargs, "image_size": None}, weights="ema",
                            source=os.path.abspath(args.src))
        else:
            loaded = weights_load.load_checkpoint(args.ckpt, args.weights)
            sd = from_official(loaded.state_dict, (loaded.meta or {}).get("model_kwargs"))
            save_official(sd, args.out)
            kwargs = dict(weights_load.infer_model_kwargs(sd), **((loaded.meta or {}).get("model_kwargs") or {}))
            meta = dict(loaded.meta or {}, model_kwargs=kwargs)  # num_heads only when the source knew it
            write_side_meta(args.out, meta, weights=args.weights, source=os.path.abspath(args.ckpt))
    except (FileNotFoundError, KeyError, ValueError, OSError, CheckpointFileError) as e:
        text = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"fastdit.interop: error: {' '.join(str(text).split())}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
