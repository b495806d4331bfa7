"""The on-disk layout of a training checkpoint: the one description the writer and the readers share.

    <output_dir>/checkpoints/
        latest                       the tag of the newest complete checkpoint (one line)
        step_0000500/                DeepSpeed's files: mp_rank_00_model_states.pt, and under ZeRO
                                     zero_pp_rank_<r>_mp_rank_00_{optim,model}_states.pt
            ema.pt                   official-layout fp32 state dict of the EMA weights
            trainer_state_rank00000.pt   per rank: RNG states, data position, fault counters
            meta.json                model name + constructor kwargs, step, vae, latent scale, image size,
                                     ZeRO stage, precision, the resolved config
        .tmp/                        checkpoints being written

meta.json is written last: a tag folder that has it (and ema.pt) is complete. The writer is
fastdit.training.checkpoint (atomic saves, resume); the readers are fastdit.weights.load (every weight
layout, raw or EMA), fastdit.weights.export and the samplers.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Dict, List, Optional, Tuple

LATEST = "latest"
TMP = ".tmp"
META = "meta.json"
EMA = "ema.pt"
MODEL_STATES = "mp_rank_00_model_states.pt"  # DeepSpeed's module (and, without ZeRO, optimizer) file
ZERO_SHARD_PREFIX = "zero_pp_rank_"          # DeepSpeed's ZeRO partition files
TAG_RE = re.compile(r"^step_(\d+)$")
ARCH_KEYS = ("depth", "hidden_size", "num_heads", "patch_size")


def tag_for(step: int) -> str:
    return f"step_{step:07d}"


def step_of(tag: str) -> int:
    m = TAG_RE.match(tag)
    if not m:
        raise ValueError(f"{tag!r} is not a checkpoint tag (step_NNNNNNN)")
    return int(m.group(1))


def trainer_state_file(rank: int) -> str:
    return f"trainer_state_rank{rank:05d}.pt"


def is_complete(tag_dir: str, need_ema: bool = True) -> bool:
    """meta.json (written last) is there, and ema.pt unless `need_ema` is False (raw weights only)."""
    return (os.path.isfile(os.path.join(tag_dir, META))
            and (not need_ema or os.path.isfile(os.path.join(tag_dir, EMA))))


def rank_files(tag_dir: str, rank: int) -> List[str]:
    """DeepSpeed's files of `tag_dir` that rank `rank` reads on resume: the module file (every rank)
    and its own ZeRO partitions (optimizer states; under ZeRO-3 also its module partition)."""
    own = re.compile(rf"^(bf16_)?{ZERO_SHARD_PREFIX}{rank}_mp_rank_\d+_(optim|model)_states\.pt$")
    names = sorted(f for f in os.listdir(tag_dir) if own.match(f)) if os.path.isdir(tag_dir) else []
    if os.path.isfile(os.path.join(tag_dir, MODEL_STATES)):
        names.insert(0, MODEL_STATES)
    return [os.path.join(tag_dir, f) for f in names]


def has_zero_shards(tag_dir: str) -> bool:
    """Whether DeepSpeed wrote ZeRO partition files here (ZeRO-1/2/3; not ZeRO-0). Under bf16 DeepSpeed
    names them bf16_zero_pp_rank_..."""
    return any(f.startswith(ZERO_SHARD_PREFIX) or f.startswith("bf16_" + ZERO_SHARD_PREFIX)
               for f in os.listdir(tag_dir))


def tag_dirs(ckpt_root: str) -> List[str]:
    """Every checkpoint tag folder under ckpt_root, complete or not, oldest first."""
    if not os.path.isdir(ckpt_root):
        return []
    return sorted((d for d in os.listdir(ckpt_root) if TAG_RE.match(d)
                   and os.path.isdir(os.path.join(ckpt_root, d))), key=step_of)


def complete_tags(ckpt_root: str, need_ema: bool = True) -> List[str]:
    """Complete checkpoint tags under ckpt_root, oldest first."""
    if not os.path.isdir(ckpt_root):
        return []
    tags = [d for d in os.listdir(ckpt_root)
            if TAG_RE.match(d) and is_complete(os.path.join(ckpt_root, d), need_ema)]
    return sorted(tags, key=step_of)


def latest_tag(ckpt_root: str, need_ema: bool = True) -> Optional[str]:
    """The tag `latest` names when that checkpoint is complete, else the newest complete one."""
    path = os.path.join(ckpt_root, LATEST)
    if os.path.isfile(path):
        with open(path) as f:
            tag = f.read().strip()
        if tag and is_complete(os.path.join(ckpt_root, tag), need_ema):
            return tag
    tags = complete_tags(ckpt_root, need_ema)
    return tags[-1] if tags else None


def resolve_checkpoint(path: str, need_ema: bool = True) -> Tuple[str, str]:
    """(checkpoints root, tag) from a tag folder, a checkpoints folder or a run's output folder.

    A tag folder is taken when it holds meta.json (its ema.pt is checked by whoever reads the EMA);
    the other two forms give their newest complete checkpoint (`need_ema=False`: with or without ema.pt,
    for the raw weights).
    """
    path = os.path.abspath(path.rstrip("/"))
    if os.path.isfile(os.path.join(path, META)):
        return os.path.dirname(path), os.path.basename(path)
    if TAG_RE.match(os.path.basename(path)) and os.path.isdir(path):
        step = step_of(os.path.basename(path))
        older = [t for t in complete_tags(os.path.dirname(path), need_ema) if step_of(t) < step]
        hint = (f"; the older checkpoint {os.path.join(os.path.dirname(path), older[-1])} is complete"
                if older else "")
        raise FileNotFoundError(f"{path} is an incomplete checkpoint: {META} is missing (a checkpoint is "
                                f"complete once {META} is written){hint}")
    for root in (path, os.path.join(path, "checkpoints")):
        if os.path.isdir(root):
            tag = latest_tag(root, need_ema)
            if tag is not None:
                return root, tag
    raise FileNotFoundError(f"{path} is not a fastdit checkpoint directory (no complete checkpoint): pass a "
                            f"checkpoint folder (.../checkpoints/step_NNNNNNN), a checkpoints folder or a "
                            f"run's output_dir")


def read_meta(tag_dir: str) -> Dict[str, Any]:
    """meta.json of a tag folder; ValueError naming the file when it is damaged."""
    path = os.path.join(tag_dir, META)
    with open(path) as f:
        text = f.read()
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is damaged or truncated (not valid JSON: {e})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path} is damaged (not a JSON object)")
    return meta


def model_kwargs(meta: Dict[str, Any]) -> Dict[str, Any]:
    """Every DiT constructor argument a meta.json describes.

    meta["model"] is a registry name (then meta["model_kwargs"] are the extra constructor kwargs,
    `DiT_models[name](**model_kwargs)`) or null for a custom architecture (then model_kwargs hold every
    constructor kwarg).
    """
    from fastdit.models.registry import model_config

    kwargs = dict(meta["model_kwargs"])
    if meta.get("model"):
        arch = model_config(meta["model"])
        for k in ARCH_KEYS:
            kwargs.setdefault(k, arch[k])
    return kwargs
