"""Training checkpoints: DeepSpeed's own files plus the EMA, every rank's RNG states and data position.

Layout (readable by `fastdit.export` and `fastdit.sample`):

    <output_dir>/checkpoints/
        latest                       the tag of the newest complete checkpoint (one line)
        step_0000500/                DeepSpeed files (mp_rank_00_model_states.pt, *_optim_states.pt)
            ema.pt                   official-layout fp32 state dict of the EMA weights
            trainer_state_rank00000.pt   per rank: RNG states, data position, fault counters
            meta.json                model name + constructor kwargs, step, vae, latent scale, image size
        .tmp/                        checkpoints being written

A save writes everything under `.tmp/<tag>/`, writes meta.json last, renames the folder into place and
only then replaces `latest` (write + fsync + rename), so a kill at any moment leaves the previous
checkpoint and `latest` intact. Old checkpoints beyond `keep_last` are removed after the switch.
Assumes the checkpoint folder is on a file system every rank shares (as DeepSpeed does by default).
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

LATEST = "latest"
TMP = ".tmp"
META = "meta.json"
EMA = "ema.pt"
TAG_RE = re.compile(r"^step_(\d+)$")
KILL_HOOK_ENV = "FASTDIT_TEST_KILL_DURING_SAVE"  # test hook: SIGKILL rank 0 mid-save at this step


def tag_for(step: int) -> str:
    return f"step_{step:07d}"


def step_of(tag: str) -> int:
    m = TAG_RE.match(tag)
    if not m:
        raise ValueError(f"{tag!r} is not a checkpoint tag (step_NNNNNNN)")
    return int(m.group(1))


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


# ----------------------------------------------------------------------------------------------
# Small file helpers
# ----------------------------------------------------------------------------------------------
def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text_atomic(path: str, text: str) -> None:
    """Write `text` to `path` through a temporary file, fsync and rename (never a half file)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def write_json_atomic(path: str, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def torch_save_atomic(obj: Any, path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# RNG state of this process
# ----------------------------------------------------------------------------------------------
def rng_state() -> Dict[str, Any]:
    """Every RNG the training loop touches: torch CPU, CUDA (all devices), numpy, python."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": _py_state_to_plain(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    npst = state["numpy"]
    np.random.set_state((npst["kind"], npst["keys"].numpy().astype(np.uint32), npst["pos"],
                         npst["has_gauss"], npst["gauss"]))
    random.setstate(_py_state_from_plain(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _py_state_to_plain(st):
    version, internal, gauss = st
    return {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss}


def _py_state_from_plain(d):
    return (d["version"], tuple(int(v) for v in d["internal"].tolist()), d["gauss"])


# ----------------------------------------------------------------------------------------------
# Finding checkpoints
# ----------------------------------------------------------------------------------------------
def is_complete(tag_dir: str) -> bool:
    return os.path.isfile(os.path.join(tag_dir, META)) and os.path.isfile(os.path.join(tag_dir, EMA))


def complete_tags(ckpt_root: str) -> List[str]:
    """Complete checkpoint tags under ckpt_root, oldest first."""
    if not os.path.isdir(ckpt_root):
        return []
    tags = [d for d in os.listdir(ckpt_root)
            if TAG_RE.match(d) and is_complete(os.path.join(ckpt_root, d))]
    return sorted(tags, key=step_of)


def latest_tag(ckpt_root: str) -> Optional[str]:
    """The tag `latest` names when that checkpoint is complete, else the newest complete one."""
    path = os.path.join(ckpt_root, LATEST)
    if os.path.isfile(path):
        with open(path) as f:
            tag = f.read().strip()
        if tag and is_complete(os.path.join(ckpt_root, tag)):
            return tag
    tags = complete_tags(ckpt_root)
    return tags[-1] if tags else None


def resolve_checkpoint(path: str) -> Tuple[str, str]:
    """(checkpoints root, tag) from a tag folder, a checkpoints folder or a run's output folder."""
    path = os.path.abspath(path.rstrip("/"))
    if os.path.isfile(os.path.join(path, META)):
        if not is_complete(path):
            raise FileNotFoundError(f"checkpoint {path!r} is incomplete (no {EMA})")
        return os.path.dirname(path), os.path.basename(path)
    for root in (path, os.path.join(path, "checkpoints")):
        if os.path.isdir(root):
            tag = latest_tag(root)
            if tag is not None:
                return root, tag
    raise FileNotFoundError(f"no complete checkpoint at {path!r}: pass a checkpoint folder "
                            f"(.../checkpoints/step_NNNNNNN), a checkpoints folder or a run's output_dir")


def read_meta(tag_dir: str) -> Dict[str, Any]:
    with open(os.path.join(tag_dir, META)) as f:
        return json.load(f)


# ----------------------------------------------------------------------------------------------
# Save / load
# ----------------------------------------------------------------------------------------------
def save_checkpoint(engine, ckpt_root: str, step: int, ema, meta: Dict[str, Any],
                    trainer_state: Dict[str, Any], keep_last: int) -> str:
    """Write a complete checkpoint atomically (see the module docstring); every rank calls it.

    Returns the tag folder. `trainer_state` is this rank's state (RNG, data position, counters).
    """
    rank = _rank()
    tag = tag_for(step)
    tmp_root = os.path.join(ckpt_root, TMP)
    tmp_dir = os.path.join(tmp_root, tag)
    if rank == 0:
        os.makedirs(tmp_root, exist_ok=True)
        if os.path.exists(tmp_dir):
            shutil.rmtree(tmp_dir)
    _barrier()
    engine.save_checkpoint(tmp_root, tag=tag, save_latest=False)
    os.makedirs(tmp_dir, exist_ok=True)
    torch_save_atomic(trainer_state, os.path.join(tmp_dir, f"trainer_state_rank{rank:05d}.pt"))
    _maybe_test_kill(step, "after the DeepSpeed files")
    ema_sd = ema.full_state_dict(dst=0)
    if rank == 0:
        torch_save_atomic(ema_sd, os.path.join(tmp_dir, EMA))
        del ema_sd
    _barrier()
    final = os.path.join(ckpt_root, tag)
    if rank == 0:
        write_json_atomic(os.path.join(tmp_dir, META), meta)  # the completion marker, written last
        _fsync_dir(tmp_dir)
        if os.path.exists(final):  # a stale folder of the same step (e.g. from an older branch)
            trash = os.path.join(tmp_root, f"trash-{tag}-{time.time_ns()}")
            os.rename(final, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.rename(tmp_dir, final)
        _fsync_dir(ckpt_root)
        write_text_atomic(os.path.join(ckpt_root, LATEST), tag + "\n")
        prune(ckpt_root, keep_last)
    _barrier()
    return final


def _maybe_test_kill(step: int, where: str) -> None:
    """Test hook: SIGKILL rank 0 in the middle of saving the checkpoint of step $KILL_HOOK_ENV."""
    value = os.environ.get(KILL_HOOK_ENV)
    if value and int(value) == step and _rank() == 0:
        print(f"[fastdit test hook] SIGKILL during the save of step {step} ({where})", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


def prune(ckpt_root: str, keep_last: int) -> None:
    """Remove complete checkpoints older than the newest `keep_last`, never the `latest` one."""
    tags = complete_tags(ckpt_root)
    keep = set(tags[-keep_last:]) if keep_last > 0 else set(tags)
    current = latest_tag(ckpt_root)
    for tag in tags:
        if tag in keep or tag == current:
            continue
        trash = os.path.join(ckpt_root, TMP, f"trash-{tag}-{time.time_ns()}")
        os.makedirs(os.path.dirname(trash), exist_ok=True)
        os.rename(os.path.join(ckpt_root, tag), trash)  # atomic: the tag disappears in one step
        shutil.rmtree(trash, ignore_errors=True)


def clean_tmp(ckpt_root: str) -> None:
    """Remove leftovers of interrupted saves (rank 0, before training starts)."""
    tmp_root = os.path.join(ckpt_root, TMP)
    if os.path.isdir(tmp_root):
        shutil.rmtree(tmp_root, ignore_errors=True)


def load_checkpoint(engine, ckpt_root: str, tag: str, ema) -> Optional[Dict[str, Any]]:
    """Restore DeepSpeed state (weights, optimizer, scheduler), the EMA, and return this rank's
    trainer state (None when it was saved with another world size; the caller then reseeds)."""
    tag_dir = os.path.join(ckpt_root, tag)
    if not is_complete(tag_dir):
        raise FileNotFoundError(f"checkpoint {tag_dir!r} is incomplete or missing")
    load_path, _ = engine.load_checkpoint(ckpt_root, tag=tag, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {tag_dir!r}")
    ema.load_full_state_dict(torch.load(os.path.join(tag_dir, EMA), map_location="cpu", weights_only=True))
    path = os.path.join(tag_dir, f"trainer_state_rank{_rank():05d}.pt")
    if not os.path.isfile(path):
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if state.get("world_size") != world:
        return None
    return state


# ----------------------------------------------------------------------------------------------
# Model from a checkpoint's meta.json
# ----------------------------------------------------------------------------------------------
ARCH_KEYS = ("depth", "hidden_size", "num_heads", "patch_size")


def full_model_kwargs(meta: Dict[str, Any]) -> Dict[str, Any]:
    """Every DiT constructor argument of a checkpoint (registry dims merged with model_kwargs)."""
    from fastdit.models.reference import model_config

    kwargs = dict(meta["model_kwargs"])
    if meta.get("model"):
        arch = model_config(meta["model"])
        for k in ARCH_KEYS:
            kwargs.setdefault(k, arch[k])
    return kwargs


def build_model_from_meta(meta: Dict[str, Any], impl: str = "reference", **fast_kwargs):
    """The DiT a checkpoint was trained with, freshly initialised (load ema.pt into it).

    meta["model"] is a registry name (then meta["model_kwargs"] are the extra constructor kwargs,
    `DiT_models[name](**model_kwargs)`) or null for a custom architecture (then model_kwargs hold
    every constructor kwarg).
    impl: "reference" (the eager oracle) or "fast" (fastdit.models.dit, taking fast_kwargs such as
    kernels="torch").
    """
    if impl == "fast":
        from fastdit.models.dit import DiT
    elif impl == "reference":
        from fastdit.models.reference import DiT
        fast_kwargs = {}
    else:
        raise ValueError(f"impl must be 'reference' or 'fast', got {impl!r}")
    return DiT(**full_model_kwargs(meta), **fast_kwargs)
