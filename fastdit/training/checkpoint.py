"""Training checkpoints: written atomically by every rank, restored exactly on resume.

The folder layout (DeepSpeed's files, ema.pt, one trainer state per rank, meta.json) is
fastdit.weights.layout, which the readers (fastdit.weights.load, export, the samplers) share.

A save writes everything under `.tmp/<tag>/`, writes meta.json last, renames the folder into place and
only then replaces `latest` (write + fsync + rename), so a kill at any moment leaves the previous
checkpoint and `latest` intact. Old checkpoints beyond `keep_last` are removed after the switch.
Assumes the checkpoint folder is on a file system every rank shares (as DeepSpeed does by default).

`resume` restores the engine (weights, optimizer, scheduler), the EMA, every RNG and the data position,
so a resumed run continues bit for bit (with the same world size; with another one the data order is
kept and the RNG streams are reseeded).
"""
from __future__ import annotations

import os
import random
import shutil
import signal
import time
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch

from fastdit import atomic, dist
from fastdit.weights import layout
from fastdit.weights.layout import EMA, META, TMP

KILL_HOOK_ENV = "FASTDIT_TEST_KILL_DURING_SAVE"  # test hook: SIGKILL rank 0 mid-save at this step


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
# Save
# ----------------------------------------------------------------------------------------------
def save_checkpoint(engine, ckpt_root: str, step: int, ema, meta: Dict[str, Any],
                    trainer_state: Dict[str, Any], keep_last: int) -> str:
    """Write a complete checkpoint atomically (see the module docstring); every rank calls it.

    Returns the tag folder. `trainer_state` is this rank's state (RNG, data position, counters).
    """
    rank = dist.rank()
    tag = layout.tag_for(step)
    tmp_root = os.path.join(ckpt_root, TMP)
    tmp_dir = os.path.join(tmp_root, tag)
    if rank == 0:
        os.makedirs(tmp_root, exist_ok=True)
        if os.path.exists(tmp_dir):
            shutil.rmtree(tmp_dir)
    dist.barrier()
    engine.save_checkpoint(tmp_root, tag=tag, save_latest=False)
    os.makedirs(tmp_dir, exist_ok=True)
    atomic.torch_save(trainer_state, os.path.join(tmp_dir, layout.trainer_state_file(rank)))
    _maybe_test_kill(step, "after the DeepSpeed files")
    ema_sd = ema.full_state_dict(dst=0)
    if rank == 0:
        atomic.torch_save(ema_sd, os.path.join(tmp_dir, EMA))
        del ema_sd
    dist.barrier()
    final = os.path.join(ckpt_root, tag)
    if rank == 0:
        atomic.write_json(os.path.join(tmp_dir, META), meta)  # the completion marker, written last
        atomic.fsync_dir(tmp_dir)
        if os.path.exists(final):  # a stale folder of the same step (e.g. from an older branch)
            trash = os.path.join(tmp_root, f"trash-{tag}-{time.time_ns()}")
            os.rename(final, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.rename(tmp_dir, final)
        atomic.fsync_dir(ckpt_root)
        atomic.write_text(os.path.join(ckpt_root, layout.LATEST), tag + "\n")
        prune(ckpt_root, keep_last)
    dist.barrier()
    return final


def _maybe_test_kill(step: int, where: str) -> None:
    """Test hook: SIGKILL rank 0 in the middle of saving the checkpoint of step $KILL_HOOK_ENV."""
    value = os.environ.get(KILL_HOOK_ENV)
    if value and int(value) == step and dist.rank() == 0:
        print(f"[fastdit test hook] SIGKILL during the save of step {step} ({where})", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


def prune(ckpt_root: str, keep_last: int) -> None:
    """Remove complete checkpoints older than the newest `keep_last`, never the `latest` one."""
    tags = layout.complete_tags(ckpt_root)
    keep = set(tags[-keep_last:]) if keep_last > 0 else set(tags)
    current = layout.latest_tag(ckpt_root)
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


# ----------------------------------------------------------------------------------------------
# Resume
# ----------------------------------------------------------------------------------------------
def restore(engine, ckpt_root: str, tag: str, ema) -> Optional[Dict[str, Any]]:
    """Restore DeepSpeed state (weights, optimizer, scheduler), the EMA, and return this rank's
    trainer state (None when it was saved with another world size; the caller then reseeds)."""
    tag_dir = os.path.join(ckpt_root, tag)
    if not layout.is_complete(tag_dir):
        raise FileNotFoundError(f"checkpoint {tag_dir!r} is incomplete or missing")
    load_path, _ = engine.load_checkpoint(ckpt_root, tag=tag, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {tag_dir!r}")
    ema.load_full_state_dict(torch.load(os.path.join(tag_dir, EMA), map_location="cpu", weights_only=True))
    path = os.path.join(tag_dir, layout.trainer_state_file(dist.rank()))
    if not os.path.isfile(path):
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("world_size") != dist.world_size():
        return None
    return state


def resume(resume_from: Optional[str], ckpt_root: str, engine, ema, seed: int) -> Tuple[int, Optional[str], Dict]:
    """train.resume: "auto" (the newest complete checkpoint under ckpt_root, if any), a checkpoint
    folder, or None (a fresh start). Restores the engine, the EMA and every RNG (reseeded from `seed`
    when the checkpoint has no state for this rank and world size).

    Returns (step, tag or None, trainer state: nonfinite_total / nonfinite_in_a_row counters).
    Raises FileNotFoundError when an explicit checkpoint folder holds no checkpoint.
    """
    rank, world = dist.rank(), dist.world_size()
    tag = None
    if resume_from == "auto":
        load_root, tag = ckpt_root, layout.latest_tag(ckpt_root)
        if tag is None:
            dist.say(f"--resume auto: no checkpoint in {ckpt_root}; starting from scratch")
    elif resume_from:
        load_root, tag = layout.resolve_checkpoint(resume_from)
    step, state = 0, None
    if tag is not None:
        state = restore(engine, load_root, tag, ema)
        step = layout.read_meta(os.path.join(load_root, tag))["step"]
        dist.say(f"resumed from {os.path.join(load_root, tag)} at step {step}")
    if state is not None:
        set_rng_state(state["rng"])
        return step, tag, state
    if tag is not None:
        dist.say("the checkpoint was written with another world size: data order is kept, RNG streams "
                 "are reseeded (the run continues, not bit-exact)")
    rng_seed = seed * world + rank + step * 7919
    torch.manual_seed(rng_seed)
    np.random.seed(rng_seed % 2**32)
    random.seed(rng_seed)
    return step, tag, {"nonfinite_total": 0, "nonfinite_in_a_row": 0}
