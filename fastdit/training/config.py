"""Training configuration: a JSON file with sections model / data / diffusion / train / deepspeed.

`load_config(path, overrides)` reads the file, fills defaults, applies `--set section.key=value`
overrides and type-checks every value, all before any work starts. An unknown or ill-typed key raises
`ConfigError` naming the key and the file (and the closest valid key when there is one).

The `deepspeed` section is a real DeepSpeed config: it is passed unchanged to
`deepspeed.initialize(config=...)`, which validates it. Overrides may reach into it
(`--set deepspeed.zero_optimization.stage=3`); an override of an existing key must keep its type.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import os
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple, Union

from fastdit.generate.vae import DOWNSAMPLE, LATENT_SCALE
from fastdit.models.attention import BACKENDS
from fastdit.models.reference import BLOCK_TYPES
from fastdit.models.build import IMPLS
from fastdit.models.mlp import MLP_CHOICES
from fastdit.models.registry import KERNEL_CHOICES, MODEL_NAMES, model_config


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key and the file."""


# ----------------------------------------------------------------------------------------------
# Schema: one typed dataclass per section (field type, default and comment). Allowed types: int,
# float, bool, str, List[int], Literal[...] choices, and Optional[...] of those (null allowed).
# ----------------------------------------------------------------------------------------------
@dataclass
class ModelConfig:
    name: str = "DiT-XL/2"                      # registry name (DiT-S/2 .. DiT-XL/8)
    # auto = the fast model for the adaLN-Zero block, the reference for the others (fastdit.models.registry)
    impl: Literal[IMPLS] = "auto"
    kernels: Literal[KERNEL_CHOICES] = "auto"   # fast model only; auto = Triton on CUDA
    attention: Literal[BACKENDS] = "auto"       # fast model only (fastdit.models.attention)
    checkpointing: bool = False                 # activation checkpointing (fast model only)
    mlp: Literal[MLP_CHOICES] = "plain"         # fast model only; recompute = GELU recomputed in backward;
    #                                             fold = GELU backward + fc1 bias gradient in one pass (kernels/gelu.py);
    #                                             epilogue / recompute-epilogue = GELU in the GEMMs' epilogues
    #                                             (kernels/gemm_gelu.py)
    # fast model only: attention-projection and fc2 biases added in the fused residual kernel, which also
    # gives their gradients (no column-sum reductions); off until a GPU run measures it (docs/performance.md)
    bias_fold: bool = False
    # Architecture overrides; null = the registry value of `name`.
    depth: Optional[int] = None
    hidden_size: Optional[int] = None
    num_heads: Optional[int] = None
    patch_size: Optional[int] = None
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1
    num_classes: Optional[int] = None           # null = from the data
    learn_sigma: bool = True
    block_type: Literal[BLOCK_TYPES] = "adaln_zero"


@dataclass
class DataConfig:
    kind: Literal["latents", "imagefolder", "digits", "synthetic"] = "latents"
    path: Optional[str] = None                  # latents folder (extract_latents output) or ImageFolder root
    image_size: int = 256                       # pixels; latents are image_size // 8
    vae: Optional[str] = None                   # local folder or hub id (from the cache, no network)
    latent_scale: float = LATENT_SCALE
    random_flip: bool = True
    num_workers: int = 4
    synthetic_size: int = 100000                # kind=synthetic: number of random latents
    num_classes: int = 1000                     # kind=synthetic / imagefolder label count check
    # kind=digits: "dit" = the 70% the quality classifier never sees (fastdit.evaluate.digits_quality); "all"
    digits_split: Literal["dit", "all"] = "dit"


@dataclass
class DiffusionConfig:
    diffusion_steps: int = 1000
    noise_schedule: Literal["linear", "squaredcos_cap_v2"] = "linear"
    timestep_respacing: str = ""                # training uses the full chain, as the official code
    sample_steps: str = "ddim50"                # respacing of the sample grids ("250", "ddim50", ...)
    cfg_scale: float = 4.0                      # sample grids
    ddim_eta: float = 0.0
    # CFG on every eps channel; false = the official behaviour (first 3 channels), which on
    # 1-channel pixel data would also guide the learned-variance channel.
    guide_all_channels: bool = False


@dataclass
class TrainConfig:
    output_dir: str = "runs/dit"
    seed: int = 0
    max_steps: int = 400000
    log_every: int = 100
    ckpt_every: int = 50000
    keep_last: int = 3
    sample_every: int = 0                       # 0 = only at the end (see final_sample)
    final_sample: bool = True
    sample_classes: Optional[List[int]] = None  # null = the first min(num_classes, 10) classes
    samples_per_class: int = 8
    ema_decay: float = 0.9999
    max_nonfinite_in_a_row: int = 10
    compile: bool = False                       # torch.compile through engine.compile()
    # the model's training forward and backward replayed from two CUDA graphs captured at the first step
    # (fastdit/training/graphed.py): no host work per kernel. ZeRO-0/1/2, not with compile or checkpointing.
    # Off until a GPU run shows it faster; on CPU the graphs are emulated (tests)
    cuda_graph: bool = False
    # ZeRO-1/2: DeepSpeed's per-tensor gradient checks (non-finite flag, grad norm) as multi-tensor
    # passes (fastdit/training/zero_checks.py); other optimizers keep their own checks
    fused_grad_checks: bool = False
    ema_one_pass: bool = False                  # EMA update as one lerp pass instead of mul + add
    # ZeRO-1/2 bf16 with torch AdamW: the update, the bf16 parameter copy and the EMA in one kernel over the
    # flat partition, reading the bf16 gradients in place (fastdit/training/zero_step.py); other setups
    # keep DeepSpeed's step. Off here; the bf16 ZeRO-1/2 configs turn it on (an H100 run measured it faster)
    fused_optimizer_step: bool = False
    # With fused_optimizer_step: queue the update before the host reads the gradients' non-finite check (the
    # kernel skips it on the device when the check fails), instead of waiting for the check first. The same
    # updates; less idle GPU time per step, predicted, unmeasured: off until a GPU run shows it
    fused_step_deferred_check: bool = False
    peak_flops: Optional[float] = None          # per device, FLOP/s; null = detect GPU (none on CPU)
    cpu_threads: Optional[int] = None           # torch.set_num_threads per rank on CPU
    resume: Optional[str] = None                # "auto" or a checkpoint folder
    tensorboard: bool = True
    progress: bool = True
    plots: bool = True                          # loss curve PNG at the end
    shm_comm: bool = False                      # CPU only: let DeepSpeed JIT-build its shm all-reduce op
    # "A-B": profile optimizer steps A..B (1-based, at least 3) on rank 0 into output_dir/profile/
    # (fastdit.training.step_profile: step times, phase times, a torch.profiler trace); null = off
    profile_steps: Optional[str] = None
    # Sample quality (fastdit.training.quality): digits accuracy + digits FD, or FID for latent runs
    eval_every: int = 0                         # optimizer steps between evaluations; 0 = only at the end
    final_eval: Optional[bool] = None           # evaluate after the last step; null = as train.final_sample
    eval_cfg: Literal["both", "unguided", "guided"] = "both"  # CFG 1 and/or diffusion.cfg_scale
    eval_sample_steps: str = "ddim25"           # "ddimN" or "N" (DDPM); DDIM 25 vs 50: the same digits numbers
    eval_samples_per_class: int = 50            # digits
    eval_num_samples: int = 50000               # FID (latent runs)
    eval_fid_ref: Optional[str] = None          # ADM reference batch .npz (images or mu/sigma)
    eval_inception_weights: Optional[str] = None  # pt_inception-2015-12-05-6726825d.pth
    eval_batch_size: int = 125                  # samples per chunk; chunks are dealt to the ranks
    eval_seed: Optional[int] = None             # null = train.seed
    eval_cache_dir: Optional[str] = None        # digits classifier cache; null = $FASTDIT_CACHE_DIR or ~/.cache/fastdit


SCHEMA = {"model": ModelConfig, "data": DataConfig, "diffusion": DiffusionConfig, "train": TrainConfig}
SECTIONS = tuple(SCHEMA) + ("deepspeed",)


@dataclass
class Config:
    """Resolved configuration: cfg.model / cfg.data / cfg.diffusion / cfg.train (the dataclasses above)
    and cfg.deepspeed (a dict, the DeepSpeed config); `path` is where it came from."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: Dict[str, Any] = field(default_factory=dict)
    description: Optional[str] = None
    path: str = "<dict>"

    def to_dict(self) -> Dict[str, Any]:
        """The config as the JSON file would spell it (every key filled in)."""
        out = {name: dataclasses.asdict(getattr(self, name)) for name in SCHEMA}
        out["deepspeed"] = copy.deepcopy(self.deepspeed)
        if self.description is not None:
            out["description"] = self.description
        return out


# ----------------------------------------------------------------------------------------------
# Type checking
# ----------------------------------------------------------------------------------------------
def _field_types(section: str) -> Dict[str, Any]:
    return typing.get_type_hints(SCHEMA[section])


def _accepts(tp, value: Any) -> bool:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Union:  # Optional[X]
        return value is None or _accepts(next(a for a in args if a is not type(None)), value)
    if origin is Literal:
        return isinstance(value, str) and value in args
    if origin is list:
        return isinstance(value, list) and all(_accepts(args[0], v) for v in value)
    if tp is bool:
        return isinstance(value, bool)
    if tp in (int, float):
        return isinstance(value, (int, float) if tp is float else int) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    raise AssertionError(f"config field type {tp} is not one of the schema's types")


def _describe(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Union:
        return _describe(next(a for a in args if a is not type(None))) + " or null"
    if origin is Literal:
        return "one of " + ", ".join(repr(v) for v in args)
    if origin is list:
        return "a list of integers"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[tp]


def _suggest(key: str, valid: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_value(section: str, key: str, value: Any, where: str) -> Any:
    tp = _field_types(section)[key]
    if not _accepts(tp, value):
        raise ConfigError(f"{where}: {section}.{key} must be {_describe(tp)}, got {json.dumps(value)}")
    if value is not None and tp in (float, Optional[float]):
        value = float(value)
    return value


# ----------------------------------------------------------------------------------------------
# Overrides
# ----------------------------------------------------------------------------------------------
def parse_override(text: str) -> Tuple[List[str], Any]:
    """'section.key=value' -> (['section', 'key'], value); value parsed as JSON, else a string."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    dotted, raw = text.split("=", 1)
    parts = dotted.strip().split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"--set {text!r}: the key must look like section.key (got {dotted!r})")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw  # a bare string such as runs/digits or DiT-S/2
    return parts, value


def _keys(section: str) -> List[str]:
    return [f.name for f in dataclasses.fields(SCHEMA[section])]


def _apply_override(cfg: Config, parts: List[str], value: Any, where: str, text: str):
    section = parts[0]
    if section not in SECTIONS:
        raise ConfigError(f"{where}: --set {text}: unknown section {section!r}{_suggest(section, SECTIONS)}; "
                          f"valid sections: {', '.join(SECTIONS)}")
    if section == "deepspeed":
        node = cfg.deepspeed
        for p in parts[1:-1]:
            if not isinstance(node.get(p, {}), dict):
                raise ConfigError(f"{where}: --set {text}: deepspeed.{p} is not a section")
            node = node.setdefault(p, {})
        leaf = parts[-1]
        old = node.get(leaf)
        if old is not None and value is not None and not _same_json_type(old, value):
            raise ConfigError(f"{where}: --set {text}: {'.'.join(parts)} was {json.dumps(old)} "
                              f"({type(old).__name__}); the override {json.dumps(value)} has another type")
        node[leaf] = value
        return
    if len(parts) != 2:
        raise ConfigError(f"{where}: --set {text}: {section} keys are not nested (use {section}.key=value)")
    key = parts[1]
    if key not in _keys(section):
        raise ConfigError(f"{where}: --set {text}: unknown key {section}.{key}{_suggest(key, _keys(section))}")
    setattr(getattr(cfg, section), key, _check_value(section, key, value, f"{where} (--set {text})"))


def _same_json_type(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return True
    return type(a) is type(b)


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------
def config_from_dict(raw: Dict[str, Any], where: str = "<dict>",
                     overrides: Sequence[str] = ()) -> Config:
    """Fill defaults, check every key and type, apply overrides; raise ConfigError on any problem."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: the top level must be a JSON object")
    cfg = Config(path=where)
    for key, value in raw.items():
        if key == "description":
            if not isinstance(value, str):
                raise ConfigError(f"{where}: {key} must be a string")
            cfg.description = value
            continue
        if key not in SECTIONS:
            raise ConfigError(f"{where}: unknown section {key!r}{_suggest(key, SECTIONS)}; "
                              f"valid sections: {', '.join(SECTIONS)}")
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: section {key!r} must be a JSON object")
        if key == "deepspeed":
            cfg.deepspeed = copy.deepcopy(value)
            continue
        for k, v in value.items():
            if k not in _keys(key):
                raise ConfigError(f"{where}: unknown key {key}.{k}{_suggest(k, _keys(key))}; "
                                  f"valid keys in {key}: {', '.join(_keys(key))}")
            setattr(getattr(cfg, key), k, _check_value(key, k, v, where))
    for text in overrides:
        parts, value = parse_override(text)
        _apply_override(cfg, parts, value, where, text)
    _check_semantics(cfg, where)
    return cfg


PACKAGED_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def packaged_config_names() -> List[str]:
    """Names of the configs shipped in fastdit/configs/ (the repository's configs/ links there)."""
    if not os.path.isdir(PACKAGED_CONFIGS):
        return []
    return sorted(f[:-5] for f in os.listdir(PACKAGED_CONFIGS) if f.endswith(".json"))


def resolve_config_path(name_or_path: str) -> str:
    """A config file: an existing path as given, else a packaged config by name (`xl2_zero2` or
    `xl2_zero2.json`, found in fastdit/configs/). Anything else raises ConfigError listing the names."""
    if os.path.isfile(name_or_path):
        return name_or_path
    base = os.path.basename(name_or_path)
    if base and os.path.dirname(name_or_path) in ("", "configs"):
        candidate = os.path.join(PACKAGED_CONFIGS, base if base.endswith(".json") else base + ".json")
        if os.path.isfile(candidate):
            return candidate
    raise ConfigError(f"config {name_or_path!r} does not exist (no such file, no packaged config of that name); "
                      f"packaged configs: "
                      f"{', '.join(packaged_config_names()) or '(none found)'} (pass --config <name> or a path)")


def load_config(path: str, overrides: Sequence[str] = ()) -> Config:
    """Read a JSON config file (a path, or a packaged config's name: resolve_config_path), apply
    `section.key=value` overrides, validate; see module docstring."""
    path = resolve_config_path(path)
    with open(path) as f:
        try:
            raw = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON: {e}") from None
    return config_from_dict(raw, path, overrides)


def _check_semantics(cfg: Config, where: str) -> None:
    """Checks that need more than one value or a value range."""
    if cfg.model.name not in MODEL_NAMES:
        raise ConfigError(f"{where}: model.name {cfg.model.name!r} is not a DiT model; "
                          f"valid names: {', '.join(MODEL_NAMES)}")
    positive = [("train", "max_steps"), ("train", "log_every"), ("train", "ckpt_every"),
                ("train", "keep_last"), ("train", "samples_per_class"),
                ("train", "max_nonfinite_in_a_row"), ("data", "image_size"),
                ("diffusion", "diffusion_steps")]
    for s, k in positive:
        if getattr(getattr(cfg, s), k) <= 0:
            raise ConfigError(f"{where}: {s}.{k} must be positive, got {getattr(getattr(cfg, s), k)}")
    for s, k in [("train", "sample_every"), ("data", "num_workers")]:
        if getattr(getattr(cfg, s), k) < 0:
            raise ConfigError(f"{where}: {s}.{k} must be >= 0, got {getattr(getattr(cfg, s), k)}")
    if not 0.0 <= cfg.train.ema_decay <= 1.0:
        raise ConfigError(f"{where}: train.ema_decay must be in [0, 1], got {cfg.train.ema_decay}")
    if not 0.0 <= cfg.model.class_dropout_prob < 1.0:
        raise ConfigError(f"{where}: model.class_dropout_prob must be in [0, 1)")
    _check_data(cfg.data, where)
    _check_respacing(cfg.diffusion, where)
    _check_eval(cfg, where)
    if cfg.train.profile_steps is not None:
        first, last = parse_step_range(cfg.train.profile_steps, f"{where}: train.profile_steps")
        if last > cfg.train.max_steps:
            raise ConfigError(f"{where}: train.profile_steps {first}-{last} ends after train.max_steps="
                              f"{cfg.train.max_steps}")
    if cfg.train.cuda_graph:
        _check_cuda_graph(cfg, where)
    if cfg.train.fused_step_deferred_check and not cfg.train.fused_optimizer_step:
        raise ConfigError(f"{where}: train.fused_step_deferred_check changes the fused optimizer step; it needs "
                          f"train.fused_optimizer_step=true")
    if not cfg.deepspeed:
        raise ConfigError(f"{where}: the deepspeed section is missing; it is the DeepSpeed config "
                          f"(batch sizes, optimizer, bf16, zero_optimization)")
    if "train_micro_batch_size_per_gpu" not in cfg.deepspeed and "train_batch_size" not in cfg.deepspeed:
        raise ConfigError(f"{where}: deepspeed.train_batch_size or deepspeed.train_micro_batch_size_per_gpu "
                          f"is required")


def _check_cuda_graph(cfg: Config, where: str) -> None:
    """train.cuda_graph replays a fixed kernel sequence over fixed memory: what changes either is refused."""
    if cfg.train.compile:
        raise ConfigError(f"{where}: train.cuda_graph and train.compile both take over the model's forward; "
                          f"choose one")
    if cfg.model.checkpointing:
        raise ConfigError(f"{where}: train.cuda_graph cannot capture model.checkpointing's recomputation "
                          f"(it saves and restores the random state inside the backward); turn one off")
    zero = (cfg.deepspeed or {}).get("zero_optimization") or {}
    stage = zero.get("stage", 0) if isinstance(zero, dict) else 0
    if stage == 3:
        raise ConfigError(f"{where}: train.cuda_graph needs the parameters in place between steps; ZeRO-3 "
                          f"gathers them for every forward (use ZeRO-1/2, or train.cuda_graph=false)")


def _check_data(data: DataConfig, where: str) -> None:
    kind = data.kind
    if kind in ("latents", "imagefolder") and not data.path:
        folder = "latents" if kind == "latents" else "imagenet/train"
        raise ConfigError(f"{where}: data.kind={kind!r} needs data.path (pass --set data.path=/path/to/{folder})")
    if kind == "imagefolder" and not data.vae:
        raise ConfigError(f"{where}: data.kind='imagefolder' encodes images on the fly and needs data.vae "
                          f"(a local AutoencoderKL folder or a cached hub id such as stabilityai/sd-vae-ft-ema)")
    if kind in ("latents", "imagefolder", "synthetic") and data.image_size % DOWNSAMPLE:
        raise ConfigError(f"{where}: data.image_size must be a multiple of {DOWNSAMPLE} (the VAE downsamples "
                          f"{DOWNSAMPLE}x), got {data.image_size}")


def _check_respacing(diffusion: DiffusionConfig, where: str) -> None:
    """timestep_respacing (training) and sample_steps (the sample grids, maybe hours in) are valid
    respacings of the diffusion_steps chain."""
    from fastdit.diffusion.respace import space_timesteps

    for key in ("timestep_respacing", "sample_steps"):
        value = getattr(diffusion, key)
        if key == "timestep_respacing" and value == "":
            continue
        try:
            space_timesteps(diffusion.diffusion_steps, value)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{where}: diffusion.{key}={value!r} does not respace the "
                              f"{diffusion.diffusion_steps}-step chain: {e}") from None


def final_eval(cfg: Config) -> bool:
    """train.final_eval, or (null) the same as train.final_sample: the last grid and its number go together."""
    return cfg.train.final_sample if cfg.train.final_eval is None else cfg.train.final_eval


def _check_eval(cfg: Config, where: str) -> None:
    """The quality evaluation's settings (fastdit.training.quality), first used maybe hours in: checked
    at load. Whether its files exist is checked before training (fastdit.training.quality.check_files)."""
    from fastdit.diffusion.respace import space_timesteps
    from fastdit.generate.sample import parse_sample_steps, respacing

    t = cfg.train
    if t.eval_every < 0:
        raise ConfigError(f"{where}: train.eval_every must be >= 0 (0 = only at the end), got {t.eval_every}")
    if t.eval_batch_size < 1:
        raise ConfigError(f"{where}: train.eval_batch_size must be positive, got {t.eval_batch_size}")
    try:
        spacing = respacing(*parse_sample_steps(t.eval_sample_steps))
        space_timesteps(cfg.diffusion.diffusion_steps, spacing)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{where}: train.eval_sample_steps={t.eval_sample_steps!r}: {e}") from None
    evaluating = final_eval(cfg) or t.eval_every > 0
    if cfg.data.kind == "digits":
        if evaluating and t.eval_samples_per_class < 2:
            raise ConfigError(f"{where}: train.eval_samples_per_class={t.eval_samples_per_class} is too small to "
                              f"evaluate: the digits FD needs at least 2 samples per class (50 gives a stable "
                              f"number)")
        if t.eval_every > t.max_steps and not final_eval(cfg):
            raise ConfigError(f"{where}: train.eval_every={t.eval_every} is beyond train.max_steps={t.max_steps} "
                              f"and train.final_eval is off: the budget is too small to evaluate anything")
        return
    given = [k for k in ("eval_fid_ref", "eval_inception_weights") if getattr(t, k)]
    if len(given) == 1:
        missing = ({"eval_fid_ref", "eval_inception_weights"} - set(given)).pop()
        raise ConfigError(f"{where}: FID during training needs both train.eval_fid_ref and "
                          f"train.eval_inception_weights; train.{missing} is missing")
    if given and t.eval_num_samples < 2:
        raise ConfigError(f"{where}: train.eval_num_samples must be >= 2 for an FID, got {t.eval_num_samples}")


def parse_step_range(text: str, what: str = "step range") -> Tuple[int, int]:
    """'A-B' -> (A, B): optimizer steps A..B, 1-based, at least three (A + 2 <= B); ConfigError otherwise."""
    m = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", text)
    if not m:
        raise ConfigError(f"{what} must look like A-B (optimizer steps A to B, e.g. 10-15), got {text!r}")
    first, last = int(m.group(1)), int(m.group(2))
    if first < 1 or last < first + 2:
        raise ConfigError(f"{what} {text!r}: needs 1 <= A and B >= A + 2 (at least three steps: timed "
                          f"whole, timed by phase, traced), got A={first}, B={last}")
    return first, last


def resolved_architecture(cfg: Config) -> Dict[str, Any]:
    """depth / hidden_size / num_heads / patch_size after applying the overrides to the registry entry."""
    arch = model_config(cfg.model.name)
    for k in ("depth", "hidden_size", "num_heads", "patch_size"):
        if getattr(cfg.model, k) is not None:
            arch[k] = getattr(cfg.model, k)
    return arch


def is_registry_architecture(cfg: Config) -> bool:
    """True when no override changes the registry entry's depth/width/heads/patch."""
    return resolved_architecture(cfg) == model_config(cfg.model.name)
