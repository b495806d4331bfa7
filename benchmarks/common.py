"""Helpers shared by fastdit's benchmark scripts: environment capture, timing, statistics, JSON.

Dependency-free on purpose: the standard library at import time, torch (and triton) imported only
inside the functions that need them, nothing from fastdit (the peak FLOP/s table for MFU is
fastdit.flops.PEAK_FLOPS). Any benchmark script may import it:

    from benchmarks.common import environment, IntervalTimer, summarize, write_json

What each helper computes:
  environment(device)      versions, device, git commit, date and the exact command line of this run
  git_commit(root)         "<sha>" or "<sha>-dirty" (uncommitted changes), "unknown" outside a checkout
  IntervalTimer(device)    wall time of a block of work: CUDA events on a CUDA device, perf_counter else
  MarkTimer(device)        back-to-back intervals between marks, one synchronisation at the end (steady state)
  summarize(samples)       median / min / max / n of repeated measurements
  write_json(path, obj)    pretty JSON, parent folders created, NaN/inf written as null
"""
from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from typing import Any, Dict, Iterable, List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Environment variables that change what a benchmark measures; recorded with every result.
RECORDED_ENV_VARS = ("TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES", "PYTORCH_CUDA_ALLOC_CONF",
                     "TORCHINDUCTOR_MAX_AUTOTUNE", "TORCHINDUCTOR_CACHE_DIR", "NVIDIA_TF32_OVERRIDE",
                     "FASTDIT_KERNEL_POISON", "OMP_NUM_THREADS")


def git_commit(root: str = ROOT) -> str:
    """HEAD's sha of the checkout at `root`, "-dirty" appended when the tree differs from it (changed or
    untracked, not ignored, files); "unknown" outside a checkout. $FASTDIT_GIT_COMMIT, when set, wins: for a
    tree copied to another machine, whose .git (if any) need not be the copy's commit (seen: a copy whose
    .git still said the commit of an older snapshot), whoever made the copy states its commit."""
    if os.environ.get("FASTDIT_GIT_COMMIT"):
        return os.environ["FASTDIT_GIT_COMMIT"]
    try:
        sha = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True,
                             check=True, timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain"],
                               capture_output=True, text=True, timeout=30).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except Exception:  # noqa: BLE001 - git missing, not a checkout, or no commit yet
        return "unknown"


def command_line(argv: Optional[List[str]] = None) -> str:
    """The command that ran this process, shell-quoted: `python <script> <args...>`."""
    argv = list(sys.argv if argv is None else argv)
    return " ".join(shlex.quote(a) for a in ["python"] + argv)


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _cpu_name() -> Optional[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def environment(device: Any = None, argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """Everything needed to reproduce or judge a measurement made on `device` (None: CUDA if present).

    Keys: gpu, gpu_count, gpu_capability, gpu_memory_gib, device, cpu, cpu_count, torch, triton, cuda,
    cudnn, python, platform, git_commit, date, command, argv, env (the RECORDED_ENV_VARS that are set).
    """
    env: Dict[str, Any] = {}
    try:
        import torch
    except Exception:  # noqa: BLE001 - a benchmark without torch still gets the rest
        torch = None
    if torch is not None:
        cuda = torch.cuda.is_available()
        dev = torch.device(device) if device is not None else torch.device("cuda" if cuda else "cpu")
        on_gpu = dev.type == "cuda" and cuda
        if on_gpu:
            props = torch.cuda.get_device_properties(dev)
            env.update(gpu=props.name, gpu_count=torch.cuda.device_count(),
                       gpu_capability=f"{props.major}.{props.minor}",
                       gpu_memory_gib=round(props.total_memory / 2**30, 2))
        else:
            env.update(gpu=None, gpu_count=torch.cuda.device_count() if cuda else 0,
                       gpu_capability=None, gpu_memory_gib=None)
        env.update(device=str(dev), torch=torch.__version__, cuda=torch.version.cuda,
                   cudnn=(torch.backends.cudnn.version() if on_gpu else None))
    else:
        env.update(gpu=None, gpu_count=0, gpu_capability=None, gpu_memory_gib=None, device=str(device),
                   torch=None, cuda=None, cudnn=None)
    try:
        import triton
        env["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        env["triton"] = None
    env.update(cpu=_cpu_name(), cpu_count=os.cpu_count(), python=platform.python_version(),
               platform=platform.platform(), git_commit=git_commit(), date=utc_now(),
               command=command_line(argv), argv=list(sys.argv if argv is None else argv),
               env={k: os.environ[k] for k in RECORDED_ENV_VARS if k in os.environ})
    return env


@contextlib.contextmanager
def env_vars(pairs: Iterable[Tuple[str, str]]):
    """Environment variables set inside the block (e.g. the kernels' switches), the previous values restored
    after (unset ones unset again)."""
    pairs = list(pairs)
    saved = {k: os.environ.get(k) for k, _ in pairs}
    os.environ.update(dict(pairs))
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def synchronize(device: Any) -> None:
    """Wait for all queued work on `device` (a no-op off CUDA)."""
    import torch
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


class IntervalTimer:
    """Milliseconds of the work issued between start() and stop().

    On CUDA: events recorded on the current stream, so the interval is GPU time from the start event to
    the stop event (stop() synchronizes on the stop event). Elsewhere: time.perf_counter around the block.
    start() first waits for earlier work, so it is not billed to this interval.
    """

    def __init__(self, device: Any):
        import torch
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self._t0: Optional[float] = None
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._stop = torch.cuda.Event(enable_timing=True)

    @property
    def method(self) -> str:
        return "cuda events" if self.cuda else "time.perf_counter"

    def start(self) -> None:
        synchronize(self.device)
        if self.cuda:
            self._start.record()
        self._t0 = time.perf_counter()

    def stop(self) -> float:
        if self._t0 is None:
            raise RuntimeError("IntervalTimer.stop() called before start()")
        if self.cuda:
            self._stop.record()
            self._stop.synchronize()
            ms = self._start.elapsed_time(self._stop)
        else:
            ms = (time.perf_counter() - self._t0) * 1e3
        self._t0 = None
        return ms


class MarkTimer:
    """Milliseconds between consecutive mark() calls, for work measured in its steady state.

    On CUDA each mark records an event on the current stream and nothing waits for the device until
    intervals(), so an interval starts behind the work queued before it, as a training step does in a run
    (IntervalTimer synchronises at its start: the host code before the first kernel is then billed to the
    interval with the device idle). Mark after some queued work (e.g. one untimed step) for the first interval
    to be steady too. Elsewhere: time.perf_counter at each mark.
    """

    def __init__(self, device: Any):
        import torch
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self._marks: List[Any] = []

    @property
    def method(self) -> str:
        return "cuda events, back to back" if self.cuda else "time.perf_counter"

    def mark(self) -> None:
        if self.cuda:
            import torch
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self._marks.append(ev)
        else:
            self._marks.append(time.perf_counter())

    def intervals(self) -> List[float]:
        """ms between each mark and the next (waits for the last mark's work on CUDA)."""
        if len(self._marks) < 2:
            raise RuntimeError(f"MarkTimer.intervals() needs at least two marks, got {len(self._marks)}")
        if self.cuda:
            self._marks[-1].synchronize()
            return [a.elapsed_time(b) for a, b in zip(self._marks, self._marks[1:])]
        return [(b - a) * 1e3 for a, b in zip(self._marks, self._marks[1:])]


def summarize(samples: Iterable[float]) -> Dict[str, Any]:
    """median, min, max and n of a non-empty sequence of finite numbers."""
    xs = [float(v) for v in samples]
    if not xs:
        raise ValueError("summarize() needs at least one sample")
    bad = [v for v in xs if not math.isfinite(v)]
    if bad:
        raise ValueError(f"summarize() got non-finite samples {bad}")
    return dict(median=statistics.median(xs), min=min(xs), max=max(xs), n=len(xs))


def _finite_or_none(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    return obj


def write_json(path: str, obj: Any) -> str:
    """Write `obj` as indented JSON to `path` (parents created; NaN/inf as null, strict JSON).

    Written to a temporary file and renamed, so a reader never sees half a file. Returns the path.
    """
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(_finite_or_none(obj), f, indent=1, allow_nan=False, default=str)
        f.write("\n")
    os.replace(tmp, path)
    return path
