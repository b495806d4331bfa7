"""Preemption: SIGTERM (a scheduler's "stop now", a spot instance's notice) is turned into a checkpoint
at the next step boundary and a clean exit, so that `--resume auto` continues with nothing lost.

The signal handler only records the signal; the training loop asks `requested()` after each optimizer
step, which all-reduces the flag, so every rank stops after the same step even when the signal reached
only some of them. Test hook (environment): FASTDIT_TEST_SIGTERM_AFTER_STEP=N makes rank
FASTDIT_TEST_SIGTERM_RANK (default: the last rank) send itself SIGTERM right after step N.
"""
from __future__ import annotations

import os
import signal
from typing import Optional

import torch

HOOK_STEP_ENV, HOOK_RANK_ENV = "FASTDIT_TEST_SIGTERM_AFTER_STEP", "FASTDIT_TEST_SIGTERM_RANK"


class StopOnSignal:
    """Records SIGTERM (and the `signals` given) instead of dying; `requested()` says whether any rank got one."""

    def __init__(self, signals=(signal.SIGTERM,)):
        self.signum: Optional[int] = None
        self._previous = {}
        for s in signals:
            self._previous[s] = signal.signal(s, self._record)

    def _record(self, signum, frame) -> None:
        self.signum = signum

    def requested(self, device: torch.device, step: int = 0) -> bool:
        """Whether any rank received a stop signal (a collective: every rank calls it after each step)."""
        _test_hook(step)
        flag = torch.tensor([1.0 if self.signum is not None else 0.0], device=device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item() > 0)

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}


def _test_hook(step: int) -> None:
    text = os.environ.get(HOOK_STEP_ENV)
    if not text or int(text) != step:
        return
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if int(os.environ.get("RANK", "0")) == int(os.environ.get(HOOK_RANK_ENV, world - 1)):
        os.kill(os.getpid(), signal.SIGTERM)
