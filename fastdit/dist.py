"""Processes and devices: rank, world size, barrier, the commands' process group, rank-0 printing, NVTX.

One home for what the training loop, the checkpoint writer, the EMA, FID sampling and latent extraction
each need. Every helper also works without a process group (one process: rank 0 of 1). DeepSpeed's
own initialisation (its accelerator, gloo on CPU ranks) belongs to the training engine
(fastdit.training.trainer.init_distributed); the inference commands use `init_process_group` here.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import socket
from typing import ContextManager, Tuple

import torch
import torch.distributed as tdist


def is_initialized() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def rank() -> int:
    """This process's rank in the default group (0 without one)."""
    return tdist.get_rank() if is_initialized() else 0


def world_size() -> int:
    """Processes in the default group (1 without one)."""
    return tdist.get_world_size() if is_initialized() else 1


def barrier() -> None:
    """Wait for every rank (a no-op without a process group)."""
    if is_initialized():
        tdist.barrier()


def all_gather_object(obj):
    """[obj of rank 0, obj of rank 1, ...] (any picklable object; [obj] without a process group)."""
    if not is_initialized():
        return [obj]
    out = [None] * tdist.get_world_size()
    tdist.all_gather_object(out, obj)
    return out


def env_rank() -> int:
    """The launcher's RANK (0 when none): usable before the process group exists."""
    return int(os.environ.get("RANK", "0"))


def say(msg: str, all_ranks: bool = False) -> None:
    """Print on rank 0 (or on every rank, prefixed) and flush."""
    r = env_rank()
    if all_ranks:
        print(f"[rank {r}] {msg}", flush=True)
    elif r == 0:
        print(msg, flush=True)


def free_port() -> int:
    """A TCP port nobody listens on right now (for a one-process group)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process_group(timeout_minutes: int = 180) -> Tuple[int, int, torch.device]:
    """(rank, world size, device) of a process started by torchrun or the deepspeed launcher.

    The device is cuda:LOCAL_RANK (made current) when CUDA is present, else the CPU. With WORLD_SIZE > 1
    the default group is created (NCCL on GPUs, gloo on CPU) unless it exists; one process gets none.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world > 1 and not is_initialized():
        tdist.init_process_group("nccl" if use_cuda else "gloo",
                                 timeout=datetime.timedelta(minutes=timeout_minutes))
    return rank(), world_size(), device


def destroy_process_group() -> None:
    if is_initialized():
        tdist.destroy_process_group()


def nvtx_range(name: str, enabled: bool = True) -> ContextManager:
    """An NVTX range named `name` for Nsight Systems; a no-op when not enabled, without CUDA, or inside
    a torch.compile trace (a range there would break the graph)."""
    if not enabled or not torch.cuda.is_available() or torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return torch.cuda.nvtx.range(name)
