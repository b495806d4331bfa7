"""Training checkpoints: written atomically by every rank, restored exactly on resume.

The folder layout (DeepSpeed's files, ema.pt, one trainer state per rank, meta.json) is
fastdit.weights.layout, which the readers (fastdit.weights.load, export, the samplers) share.

A save writes everything under `.tmp/<tag>/`, writes meta.json last, renames the folder into place and
only then replaces `latest` (write + fsync + rename), so a kill at any moment leaves the previous
checkpoint and `latest` intact. Old checkpoints beyond `keep_last` are removed after the switch.
Assumes the checkpoint folder is on a file system every rank shares (as DeepSpeed does by default).

`resume` restores the engine (weights, optimizer, scheduler), the EMA, every RNG and the data position,
so a resumed run continues bit for bit (with the same world size; with another one the data order is
kept and the RNG streams are reseeded; another global batch is refused). Before anything is restored
every file the rank reads is checked and read without running code (fastdit.weights.safe_load): a
damaged checkpoint is named, file by file, with the newest older one that is intact (`--resume auto`
sets the damaged one aside and falls back to it, with a warning); a file holding pickled objects
outside the allowlist is refused unless the caller trusts it (train.py --trust-checkpoint).
"""
from __future__ import annotations

import os
import random
import shutil
import signal
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from fastdit import atomic, dist
from fastdit.weights import layout
from fastdit.weights.layout import EMA, META, TMP
from fastdit.weights.safe_load import (CheckpointFileError, UnsafeCheckpointError, load_file,
                                       restricted_torch_load)

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
class ResumeError(RuntimeError):
    """A checkpoint cannot be resumed; the message names the file or the setting and what to do."""


def _check_tag(ckpt_root: str, tag: str, trust: bool) -> Tuple[List[str], bool, Dict[str, Any], Optional[dict]]:
    """This rank's check of one checkpoint before anything is restored: meta.json, ema.pt, the DeepSpeed
    files this rank reads and its trainer state, each file loaded once through fastdit.weights.safe_load.

    Returns (problems, unsafe, preloaded {absolute path: object}, meta). `unsafe`: a file holds pickled
    objects outside the allowlist (not a damage that an older checkpoint repairs)."""
    tag_dir = os.path.join(ckpt_root, tag)
    rank, world = dist.rank(), dist.world_size()
    problems: List[str] = []
    unsafe = False
    meta = None
    if not os.path.isdir(tag_dir):
        return [f"{tag_dir} is missing"], False, {}, None
    try:
        meta = layout.read_meta(tag_dir)
    except FileNotFoundError:
        problems.append(f"{os.path.join(tag_dir, META)} is missing (a checkpoint is complete once it is written)")
    except ValueError as e:
        problems.append(str(e))
    files = [os.path.join(tag_dir, EMA)] + layout.rank_files(tag_dir, rank)
    if meta is not None and meta.get("world_size") == world:
        # same world size: this rank's own files must all be there
        files.append(os.path.join(tag_dir, layout.trainer_state_file(rank)))
        names = set(os.listdir(tag_dir))
        stage = meta.get("zero_stage") or 0
        if stage >= 1 and not any(n.endswith("optim_states.pt") and f"{layout.ZERO_SHARD_PREFIX}{rank}_" in n
                                  for n in names):
            problems.append(f"{tag_dir}: the ZeRO optimizer partition of rank {rank} "
                            f"({layout.ZERO_SHARD_PREFIX}{rank}_mp_rank_00_optim_states.pt) is missing")
        if stage < 3 and layout.MODEL_STATES not in names:
            problems.append(f"{os.path.join(tag_dir, layout.MODEL_STATES)} is missing")
    preloaded: Dict[str, Any] = {}
    for path in files:
        try:
            preloaded[os.path.abspath(path)] = load_file(path, trust=trust)
        except UnsafeCheckpointError as e:
            problems.append(str(e))
            unsafe = True
        except CheckpointFileError as e:
            problems.append(str(e))
    return problems, unsafe, preloaded, meta


def _agree(problems: List[str], unsafe: bool) -> Tuple[List[str], bool]:
    """Every rank's problems with a checkpoint, so that all ranks take the same decision."""
    merged: List[str] = []
    any_unsafe = False
    for probs, uns in dist.all_gather_object((problems, unsafe)):
        merged += [p for p in probs if p not in merged]
        any_unsafe = any_unsafe or uns
    return merged, any_unsafe


def _describe(problems: List[str]) -> str:
    more = f" (and {len(problems) - 1} more problem(s): {'; '.join(problems[1:3])})" if len(problems) > 1 else ""
    return problems[0] + more


def _intact_older(ckpt_root: str, tag: str, trust: bool) -> Optional[str]:
    """The newest checkpoint older than `tag` under ckpt_root whose files all load (collective)."""
    for older in reversed(layout.complete_tags(ckpt_root)):
        if layout.step_of(older) >= layout.step_of(tag):
            continue
        problems, unsafe, _, _ = _check_tag(ckpt_root, older, trust)
        problems, unsafe = _agree(problems, unsafe)
        if not problems:
            return os.path.join(ckpt_root, older)
    return None


def _set_aside(ckpt_root: str, tag: str) -> str:
    """Rename a damaged checkpoint to <tag>.damaged (rank 0): kept for inspection, never pruned or resumed."""
    target = os.path.join(ckpt_root, f"{tag}.damaged")
    n = 1
    while os.path.exists(target):
        n += 1
        target = os.path.join(ckpt_root, f"{tag}.damaged{n}")
    if dist.rank() == 0:
        os.rename(os.path.join(ckpt_root, tag), target)
        atomic.fsync_dir(ckpt_root)
    dist.barrier()
    return target


def _choose(resume_from: str, ckpt_root: str, trust: bool):
    """(checkpoints root, tag, meta, preloaded files) of the checkpoint to resume, or None (auto: none).

    --resume auto tries the newest checkpoint folder first; a damaged one is set aside (<tag>.damaged) with
    a warning and the next older one is tried. An explicit checkpoint that is damaged, and any checkpoint
    holding objects outside the allowlist, raise ResumeError naming the file (and the newest older
    checkpoint that is intact)."""
    if resume_from == "auto":
        root, candidates, explicit = ckpt_root, layout.tag_dirs(ckpt_root)[::-1], False
    else:
        root, tag = layout.resolve_checkpoint(resume_from)
        candidates, explicit = [tag], True
    for tag in candidates:
        problems, unsafe, preloaded, meta = _check_tag(root, tag, trust)
        problems, unsafe = _agree(problems, unsafe)
        if not problems:
            return root, tag, meta, preloaded
        tag_dir = os.path.join(root, tag)
        if unsafe or explicit:
            older = None if unsafe else _intact_older(root, tag, trust)
            hint = ""
            if older:
                hint = (f". The older checkpoint {older} is intact: resume from it with --resume {older}"
                        + (" (or --resume auto, which falls back to it)" if root == os.path.abspath(ckpt_root)
                           else ""))
            elif not unsafe:
                hint = ". No older checkpoint there is intact"
            raise ResumeError(f"cannot resume from {tag_dir}: {_describe(problems)}{hint}")
        aside = _set_aside(root, tag)
        dist.say(f"warning: checkpoint {tag_dir} is damaged: {_describe(problems)}. It was moved to {aside}; "
                 f"trying the next older checkpoint")
    if candidates:
        raise ResumeError(f"--resume auto: no intact checkpoint is left in {ckpt_root} (the damaged ones were "
                          f"moved to <tag>.damaged); run again to start from scratch, or resume from a copy "
                          f"with --resume PATH")
    return None


def resume(resume_from: Optional[str], ckpt_root: str, engine, ema, seed: int,
           global_batch: Optional[int] = None, trust: bool = False) -> Tuple[int, Optional[str], Dict]:
    """train.resume: "auto" (the newest intact checkpoint under ckpt_root, if any), a checkpoint folder,
    or None (a fresh start). Restores the engine (weights, optimizer, scheduler), the EMA and every RNG
    (reseeded from `seed` when the checkpoint was written with another world size).

    Every file is checked and read without running code (fastdit.weights.safe_load; `trust`: full
    unpickling) before anything is restored. Returns (step, tag or None, trainer state: the
    nonfinite_total / nonfinite_in_a_row counters). Raises FileNotFoundError when an explicit folder
    holds no checkpoint, ResumeError when the checkpoint is damaged, holds objects outside the allowlist,
    was trained with another global batch (`global_batch`), or does not fit this engine.
    """
    rank, world = dist.rank(), dist.world_size()
    chosen = None
    if resume_from:
        chosen = _choose(resume_from, ckpt_root, trust)
        if chosen is None:
            dist.say(f"--resume auto: no checkpoint in {ckpt_root}; starting from scratch")
    step, tag, state = 0, None, None
    if chosen is not None:
        root, tag, meta, preloaded = chosen
        tag_dir = os.path.join(root, tag)
        was = meta.get("global_batch")
        if global_batch is not None and was is not None and was != global_batch:
            raise ResumeError(
                f"{tag_dir} was trained with a global batch of {was} images per step; this run's is "
                f"{global_batch}. Resuming would shift the data order and miscount samples_seen: resume with "
                f"the same global batch (deepspeed.train_batch_size={was}, micro batch x gradient accumulation "
                f"x ranks), or start a new run in another train.output_dir")
        with restricted_torch_load(trust, preloaded):
            try:
                load_path, _ = engine.load_checkpoint(root, tag=tag, load_optimizer_states=True,
                                                      load_lr_scheduler_states=True)
            except CheckpointFileError as e:
                raise ResumeError(f"cannot resume from {tag_dir}: {e}") from None
            except (RuntimeError, KeyError, ValueError, AssertionError, TypeError, IndexError) as e:
                raise ResumeError(
                    f"cannot restore {tag_dir} into this run ({type(e).__name__}: {str(e).strip()[:300]}); "
                    f"resume with the model and optimizer settings it was written with (its config: "
                    f"{meta.get('config_path')}, also stored in its {META})") from None
        if load_path is None:
            raise ResumeError(f"DeepSpeed could not load the checkpoint {tag_dir}")
        ema_path = os.path.join(tag_dir, EMA)
        try:
            ema.load_full_state_dict(preloaded.pop(os.path.abspath(ema_path)))
        except (KeyError, ValueError, AttributeError) as e:
            raise ResumeError(f"{ema_path} does not fit this run's model: {e}") from None
        if meta.get("world_size") == world:
            state = preloaded.pop(os.path.abspath(os.path.join(tag_dir, layout.trainer_state_file(rank))))
        step = int(meta["step"])
        dist.say(f"resumed from {tag_dir} at step {step}")
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
