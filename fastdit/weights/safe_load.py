"""Reading checkpoint files without running code: the one place where fastdit unpickles.

`torch.load(..., weights_only=False)` runs whatever callable a file names (a `__reduce__` payload), so a
checkpoint someone sent you could run code when you resume or sample from it. fastdit reads every
checkpoint file, its own and DeepSpeed's, with `weights_only=True`: tensors, containers, numbers and
strings, plus the few classes of ALLOWED_GLOBALS, and nothing else.

DeepSpeed 0.19 calls `torch.load(..., weights_only=False)` itself (its checkpoint engine, zero_to_fp32).
`restricted_torch_load()` turns every torch.load inside it into this module's restricted load; the
resume (fastdit.training.checkpoint) and the raw-weights reader (fastdit.weights.load) run DeepSpeed
inside it.

The allowlist is exactly what a genuine checkpoint of fastdit holds beyond torch's own defaults
(found by loading checkpoints of ZeRO-0/1/2/3 x fp32/bf16 runs with weights_only=True; see
tests/test_weights_safe_load.py). Allowing a class lets a file call its constructor (or `__new__`) with
tensors, numbers and strings as arguments and set its attributes; none of these does more than store
values:

- `deepspeed.runtime.fp16.loss_scaler.LossScaler`: the static loss scaler in every ZeRO optimizer shard
  (`__init__(scale)` stores a number).
- `deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler`: its fp16 counterpart (fp16 configs; stores
  numbers).
- `deepspeed.runtime.zero.config.ZeroStageEnum`: the ZeRO stage in ZeRO-3 optimizer shards (an int
  Enum; unpickling looks a member up by value).
- `deepspeed.utils.tensor_fragment.fragment_address`: (numel, start) of each partition in ZeRO-1/2
  optimizer shards (a two-field dataclass).
- `argparse.Namespace`: the `args` of the official DiT training checkpoints (sets attributes).

A file that needs anything else is refused with UnsafeCheckpointError, which says so. If you wrote the
file yourself (e.g. with another DeepSpeed version), pass `trust=True` (the commands'
`--trust-checkpoint`): the file is then unpickled fully, which runs any code it names.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import pickle
from typing import Any, Dict, Iterator, List, Optional

import torch

TRUST_FLAG = "--trust-checkpoint"

# (module, name): the globals allowed beyond torch's defaults (see the module docstring).
ALLOWED_GLOBALS = (
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
    ("argparse", "Namespace"),
)

_SAVED_LOADS: List[Any] = []  # torch.load as it was before restricted_torch_load() swapped it


def _torch_load():
    """torch.load itself (looked up at call time), never this module's stand-in for it (the first
    one saved is the original when restricted_torch_load() contexts nest)."""
    return _SAVED_LOADS[0] if _SAVED_LOADS else torch.load


class CheckpointFileError(RuntimeError):
    """A checkpoint file cannot be used; `path` is the file, the message says why and what to do."""

    def __init__(self, path: str, message: str):
        super().__init__(message)
        self.path = path


class UnsafeCheckpointError(CheckpointFileError):
    """The file holds pickled objects outside the allowlist (loading it fully could run code)."""


class DamagedCheckpointError(CheckpointFileError):
    """The file is missing, truncated or otherwise unreadable."""


def allowed_globals() -> List[Any]:
    """The objects of ALLOWED_GLOBALS that can be imported here (DeepSpeed's only when installed)."""
    out: List[Any] = [argparse.Namespace]
    for module, name in ALLOWED_GLOBALS:
        if module == "argparse":
            continue
        try:
            out.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):  # no deepspeed (e.g. sampling on a machine without it)
            continue
    return out


# What torch's weights_only unpickler says when a file names something it does not allow.
_REFUSALS = ("GLOBAL", "Trying to call reduce", "Can only build", "Can only create", "Can only append")


def _refusal_reason(e: BaseException) -> str:
    """The line of torch's weights_only error that says what was refused."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    for line in lines:
        if any(w in line for w in ("GLOBAL", "WeightsUnpickler error", "Trying to", "Can only", "Unsupported")):
            return line.replace("WeightsUnpickler error: ", "")
    return lines[-1] if lines else type(e).__name__


def load_file(path: str, map_location: Any = "cpu", *, trust: bool = False, mmap: bool = None) -> Any:
    """torch.load of one checkpoint file with weights_only=True and ALLOWED_GLOBALS.

    Raises UnsafeCheckpointError (something else is pickled there) or DamagedCheckpointError (missing,
    truncated, unreadable), each naming the file. trust=True unpickles fully (runs any code in the file).
    """
    kwargs = {} if mmap is None else {"mmap": mmap}
    if not os.path.isfile(path):
        raise DamagedCheckpointError(path, f"{path} is missing")
    try:
        if trust:
            return _torch_load()(path, map_location=map_location, weights_only=False, **kwargs)
        with torch.serialization.safe_globals(allowed_globals()):
            return _torch_load()(path, map_location=map_location, weights_only=True, **kwargs)
    except pickle.UnpicklingError as e:
        reason = _refusal_reason(e)
        if any(w in reason for w in _REFUSALS):
            raise UnsafeCheckpointError(
                path, f"{path} holds pickled objects that fastdit does not load, since loading them could run "
                      f"code (torch.load with weights_only=True: {reason}). If you wrote this file yourself, "
                      f"pass {TRUST_FLAG} to unpickle it fully (this runs any code it contains)") from None
        raise DamagedCheckpointError(path, f"{path} is damaged or truncated (UnpicklingError: {reason})") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, TypeError, AttributeError,
            MemoryError, ImportError) as e:
        raise DamagedCheckpointError(path, f"{path} is damaged or truncated ({type(e).__name__}: "
                                           f"{_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    """The first sentence of an error message (torch's zip errors go on for lines)."""
    text = str(e).strip().splitlines()
    if not text:
        return "no details"
    return text[0].split(". ")[0][:200]


def _restricted(trust: bool, preloaded: Dict[str, Any]):
    def load(f, map_location=None, pickle_module=None, *, weights_only=None, mmap=None, **kwargs):
        if isinstance(f, (str, os.PathLike)) and os.path.abspath(f) in preloaded:
            return preloaded.pop(os.path.abspath(f))
        if not isinstance(f, (str, os.PathLike)):  # a buffer: keep torch's loader, restricted
            with torch.serialization.safe_globals(allowed_globals()):
                return _torch_load()(f, map_location=map_location, weights_only=not trust, mmap=mmap,
                                        **kwargs)
        return load_file(os.fspath(f), map_location, trust=trust, mmap=mmap)
    return load


@contextlib.contextmanager
def restricted_torch_load(trust: bool = False, preloaded: Optional[Dict[str, Any]] = None) -> Iterator[None]:
    """Inside: every `torch.load` (DeepSpeed's own calls with weights_only=False included) is
    load_file's restricted load; trust=True: full unpickling, as the caller asked.

    `preloaded` ({absolute path: object} already read by load_file) answers a load of that file
    once, so that a checked file is not read twice. Not thread-safe (torch.load is swapped for the
    duration): wrap single-threaded loading code only."""
    _SAVED_LOADS.append(torch.load)
    torch.load = _restricted(trust, preloaded if preloaded is not None else {})
    try:
        yield
    finally:
        torch.load = _SAVED_LOADS.pop()
