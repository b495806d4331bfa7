"""Atomic file writes: a temporary file beside the target, then a rename onto it.

A reader (or a run resumed after a kill) sees the old file or the new one, never half of one. Used by
the checkpoint writer, the exporter, latent extraction, FID sampling and the metrics log.
"""
from __future__ import annotations

import json
import os
from typing import Any

import torch


def fsync_dir(path: str) -> None:
    """Flush a folder's entries (a rename inside it) to disk, where the file system allows it."""
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


def write_text(path: str, text: str) -> None:
    """Write `text` to `path` through a temporary file, fsync and rename (never a half file)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def write_json(path: str, obj: Any) -> None:
    """`obj` as indented JSON with sorted keys, written atomically."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def torch_save(obj: Any, path: str) -> None:
    """torch.save to a temporary file, then rename onto `path`."""
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)
