"""Where a training step spends its time: per-phase times and device time by kernel category.

A StepProfiler wraps chosen optimizer steps of a fastdit.training.trainer.Trainer
(`with profiler.around(step, trainer): trainer.train_step()`); each chosen step has one role:

  plain   steps timed whole: CUDA events at the start and end of each step (no host sync; perf_counter
          on CPU). Gives the step time and img/s.
  phase   the Trainer's phase hook is a PhaseTimer, which synchronises the device at every phase
          boundary: time of data, forward, backward, optimizer and EMA, median over the steps.
  trace   consecutive steps under torch.profiler (phases marked with record_function), the device
          synchronised only before the first and after the last: device time by category
          (kernel_category), the top kernels, and idle = step time - busy time (busy: the union of the
          kernel intervals; idle: launch-bound stretches, host syncs), and that idle by phase (each gap
          before a kernel counted in the phase whose host code launched the kernel; over the traced steps
          after the first, whose forward starts on a device idled by the sync). The step time is the plain
          steps' median when there are plain steps (tracing slows the host down, not the kernels),
          else the traced wall time. Without a GPU the "kernels" are the CPU ops (self CPU time; busy
          = time inside any op).

finish() writes <out>/trace.json (Chrome trace: chrome://tracing or https://ui.perfetto.dev) and
<out>/profile.json, prints a short table and returns the summary. benchmarks/step_profile.py runs it on
one rank; fastdit/train.py with train.profile_steps=A-B profiles those steps of a real run.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import statistics
import time
from collections import defaultdict
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

import torch

from fastdit import atomic
from fastdit.training.trainer import PHASES

# Kernel (or CPU op) name -> category: the first rule whose pattern is found in the name wins.
CATEGORY_RULES = (
    ("communication", r"nccl|gloo|c10d::|all_?reduce|all_?gather|reduce_scatter|[Bb]roadcast"),
    # multi-tensor (foreach) kernels: the optimizer update, gradient norms and the EMA
    ("optimizer", r"multi_tensor_apply|[Aa]dam|_foreach_"),
    # cuDNN SDPA and its cudnn::fusion helpers (dot(dO, O), dQ conversion), flash-attn, xformers fmha
    ("attention", r"sdpa|flash|fmha|[Aa]ttention|_attn|cudnn::fusion"),
    # fastdit's Triton kernels (kernels/*.py; the AdamW kernel counts as optimizer above)
    ("fastdit", r"_modln_|_gated_residual_|_patch_embed_|_gelu_bwd_|_stack_qkv_"),
    # cuBLAS(Lt) (nvjet, sm90_xmma, split-K), CUTLASS, Inductor's GEMM templates; CPU matmul ops
    ("gemm", r"gemm|gemv|nvjet|xmma|cutlass|cublas|wgmma|splitK|\bKernel2\b|triton_tem_"
             r"|^aten::(mm|addmm|bmm|baddbmm|matmul|linear|conv\w*|_convolution\w*|mkldnn_\w+)$"),
    # copies, casts (dtype copies), concatenation, memcpy/memset and fills
    ("copy/cast", r"[Cc]opy|[Mm]emcpy|[Mm]emset|[Ff]ill"
                  r"|^aten::(cat|to|_to_copy|clone|contiguous|zero_|zeros|zeros_like|stack|index|"
                  r"index_select|index_put_|gather|scatter|scatter_add_|repeat|flip|roll|constant_pad_nd|"
                  r"embedding|embedding_dense_backward)$"),
    ("reduce", r"reduce|Reduce|triton_(red|per)_"
               r"|^aten::(sum|mean|norm|linalg_vector_norm|native_layer_norm|native_layer_norm_backward|"
               r"layer_norm|_softmax|softmax|_softmax_backward_data|var|std|var_mean|amax|amin|max|min|all|"
               r"any|argmax|argmin|cumsum|logsumexp)$"),
    ("elementwise", r"elementwise|vectorized|unrolled|triton_poi_"
                    r"|^aten::(add|sub|rsub|mul|div|neg|abs|exp|log|sqrt|rsqrt|pow|reciprocal|square|sin|cos|"
                    r"tanh|sigmoid|silu|gelu|relu|\w+_backward|where|clamp\w*|lerp|addcmul|addcdiv|isfinite|"
                    r"isnan|isinf|ne|eq|lt|le|gt|ge|logical_\w+|bitwise_\w+|maximum|minimum|masked_fill|sign|"
                    r"rand\w*|normal|uniform|random|threshold\w*)_?$"),
)
CATEGORIES = tuple(c for c, _ in CATEGORY_RULES) + ("other",)
_COMPILED = tuple((c, re.compile(p)) for c, p in CATEGORY_RULES)
DEVICE_EVENT_CATS = ("kernel", "gpu_memcpy", "gpu_memset")  # device activity in a Chrome trace
TOP_KERNELS = 40


def kernel_category(name: str) -> str:
    """The category of a CUDA kernel (or, in a CPU profile, an op) name; see CATEGORY_RULES."""
    for category, pattern in _COMPILED:
        if pattern.search(name):
            return category
    return "other"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PhaseTimer:
    """Phase hook for fastdit.training.trainer.Trainer: synchronises the device around each phase and adds its
    wall time (ms) to the current step's record (new_step() opens one)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.steps: List[Dict[str, float]] = []

    def new_step(self) -> None:
        self.steps.append(defaultdict(float))

    @contextlib.contextmanager
    def __call__(self, name: str):
        _sync(self.device)
        t0 = time.perf_counter()
        yield
        _sync(self.device)
        self.steps[-1][name] += (time.perf_counter() - t0) * 1e3

    def medians(self) -> Dict[str, float]:
        """Median over the steps of each phase's time per step (phases in PHASES order)."""
        names = [p for p in PHASES if any(p in s for s in self.steps)]
        names += sorted({p for s in self.steps for p in s} - set(names))
        return {p: statistics.median(s[p] for s in self.steps if p in s) for p in names}


def _span_union_us(spans: Iterable[Sequence[float]]) -> float:
    """Total length of the union of [start, end) intervals."""
    total, cur_start, cur_end = 0.0, None, None
    for start, end in sorted(spans):
        if cur_end is None or start > cur_end:
            if cur_end is not None:
                total += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    if cur_end is not None:
        total += cur_end - cur_start
    return total


def _breakdown(rows: List[tuple], busy_us: float, steps: int, wall_ms: float) -> Dict[str, Any]:
    """Per-step category totals and top names from (name, total_us, calls) rows; idle against the
    traced wall time (set_idle changes the basis)."""
    by_cat = {c: 0.0 for c in CATEGORIES}
    for name, us, _ in rows:
        by_cat[kernel_category(name)] += us / 1e3 / steps
    top = sorted(rows, key=lambda r: -r[1])[:TOP_KERNELS]
    out = dict(steps=steps, wall_ms=wall_ms, busy_ms=busy_us / 1e3 / steps, kernel_ms=sum(by_cat.values()),
               by_category_ms=by_cat,
               top=[dict(name=n[:200], category=kernel_category(n), ms_per_step=us / 1e3 / steps,
                         calls_per_step=calls / steps) for n, us, calls in top])
    set_idle(out, wall_ms, "traced wall time per step (profiler overhead included)")
    return out


def set_idle(trace: Dict[str, Any], step_ms: float, basis: str) -> None:
    """idle = max(0, step_ms - busy time), also as the "idle" category; `basis` says what step_ms is."""
    trace.update(step_ms=step_ms, idle_basis=basis)
    trace["idle_ms"] = trace["by_category_ms"]["idle"] = max(0.0, step_ms - trace["busy_ms"])


_STEP_RANGE = re.compile(r"^step (\d+)$")  # the range StepProfiler puts around each traced step


def step_ranges(trace: Dict[str, Any]) -> List[tuple]:
    """(host start, host end, step) of each traced step, from the "step N" ranges StepProfiler marks."""
    out = []
    for e in trace.get("traceEvents", []):
        m = _STEP_RANGE.match(str(e.get("name", "")))
        if m and e.get("ph") == "X" and e.get("cat") == "user_annotation":
            out.append((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0.0)), int(m.group(1))))
    return sorted(out)


def idle_by_phase(trace: Dict[str, Any], steps: int, since: Optional[float] = None,
                  until: Optional[float] = None) -> Dict[str, float]:
    """Device idle time per step (ms) by phase: every gap on the device timeline before a kernel, memcpy or
    memset, counted in the phase (PHASES, the Trainer's record_function ranges on the host) during which
    the host launched it (found through the launch's correlation id); "between phases" when the launch
    lies in none, "unattributed" when the launch is not in the trace. A phase whose host code is slower
    than its kernels (e.g. the start of a forward after a synchronising optimizer step) shows here.
    `since` / `until` (host timestamps, the trace's microseconds): count only the gaps whose launch (for an
    unattributed one, its kernel) starts in [since, until); `steps` is the number of steps that window holds."""
    events = trace.get("traceEvents", [])
    ranges = sorted((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0.0)), e["name"]) for e in events
                    if e.get("ph") == "X" and e.get("cat") == "user_annotation" and e.get("name") in PHASES)
    launches = {e["args"]["correlation"]: float(e["ts"]) for e in events
                if e.get("ph") == "X" and e.get("cat") in ("cuda_runtime", "cuda_driver")
                and isinstance(e.get("args"), dict) and "correlation" in e["args"]}
    device = sorted((float(e["ts"]), float(e.get("dur", 0.0)), (e.get("args") or {}).get("correlation"))
                    for e in events if e.get("ph") == "X" and e.get("cat") in DEVICE_EVENT_CATS)
    lo = float("-inf") if since is None else since
    hi = float("inf") if until is None else until
    out: Dict[str, float] = {p: 0.0 for p in PHASES}
    end = None
    for start, dur, corr in device:
        if end is not None and start > end:
            t = launches.get(corr)
            if lo <= (start if t is None else t) < hi:
                phase = "unattributed" if t is None else next(
                    (name for r_lo, r_hi, name in ranges if r_lo <= t <= r_hi), "between phases")
                out[phase] = out.get(phase, 0.0) + (start - end) / 1e3 / steps
        end = start + dur if end is None else max(end, start + dur)
    return out


def idle_gaps(trace: Dict[str, Any], steps: int) -> Dict[str, Any]:
    """idle_by_phase over the steady traced steps. The profiler synchronises the device before the first
    traced step, so that step's forward starts on an idle device, where in a run it starts while the
    previous step's last kernels still run: with two or more traced steps (StepProfiler's "step N" ranges
    in the trace) the first is left out of `by_phase_ms` and reported alone as `first_step_ms`; with one,
    `by_phase_ms` is that step's and `basis` says that its forward's gaps are an upper bound."""
    ranges = step_ranges(trace)
    if len(ranges) >= 2:
        return dict(by_phase_ms=idle_by_phase(trace, len(ranges) - 1, since=ranges[1][0]),
                    first_step_ms=idle_by_phase(trace, 1, until=ranges[1][0]),
                    basis=f"traced steps 2-{len(ranges)} (the first, which starts on an idle device after "
                          f"the profiler's synchronisation, left out)")
    return dict(by_phase_ms=idle_by_phase(trace, steps), first_step_ms=None,
                basis="the only traced step, which starts on an idle device after the profiler's "
                      "synchronisation: its forward's gaps are an upper bound (trace two or more steps)")


def analyse_device_trace(trace: Dict[str, Any], steps: int, wall_ms: float) -> Dict[str, Any]:
    """Device time per step by category from a Chrome trace (torch.profiler's export): every kernel,
    memcpy and memset event; busy = the union of their intervals (streams may overlap); the idle gaps
    between them by phase (idle_gaps)."""
    per_name: Dict[str, List[float]] = defaultdict(lambda: [0.0, 0])
    spans = []
    for ev in trace.get("traceEvents", []):
        if ev.get("ph") != "X" or ev.get("cat") not in DEVICE_EVENT_CATS:
            continue
        start, dur = float(ev["ts"]), float(ev.get("dur", 0.0))
        per_name[ev["name"]][0] += dur
        per_name[ev["name"]][1] += 1
        spans.append((start, start + dur))
    rows = [(n, us, calls) for n, (us, calls) in per_name.items()]
    out = _breakdown(rows, _span_union_us(spans), steps, wall_ms)
    gaps = idle_gaps(trace, steps)
    out["idle_gaps_by_phase_ms"] = gaps["by_phase_ms"]
    out["idle_gaps_first_step_ms"] = gaps["first_step_ms"]
    out["idle_gaps_basis"] = gaps["basis"]
    return out


def analyse_cpu_ops(averages, steps: int, wall_ms: float, skip: Iterable[str] = ()) -> Dict[str, Any]:
    """CPU time per step by category from torch.profiler key_averages(): each op's self CPU time
    (user annotations, ProfilerStep and the names in `skip` left out); busy = their sum."""
    skip = set(skip)
    rows = [(e.key, float(e.self_cpu_time_total), int(e.count)) for e in averages
            if not getattr(e, "is_user_annotation", False) and e.key not in skip
            and not e.key.startswith("ProfilerStep") and e.self_cpu_time_total > 0]
    return _breakdown(rows, sum(us for _, us, _ in rows), steps, wall_ms)


class StepProfiler:
    """Profiles chosen optimizer steps of a Trainer (see the module docstring).

    images_per_step: images of one optimizer step (the global batch) for img/s. info: recorded in
    profile.json as "run" (what was profiled). Steps are 1-based optimizer steps; trace_steps must be
    consecutive.
    """

    def __init__(self, device: torch.device, out_dir: str, images_per_step: int,
                 phase_steps: Sequence[int] = (), trace_steps: Sequence[int] = (),
                 plain_steps: Sequence[int] = (), info: Optional[Dict[str, Any]] = None,
                 log: Callable[[str], None] = print):
        if trace_steps and list(trace_steps) != list(range(trace_steps[0], trace_steps[0] + len(trace_steps))):
            raise ValueError(f"trace steps must be consecutive, got {list(trace_steps)}")
        self.role: Dict[int, str] = {}
        for role, steps in (("plain", plain_steps), ("phase", phase_steps), ("trace", trace_steps)):
            for s in steps:
                if s in self.role:
                    raise ValueError(f"step {s} is both a {self.role[s]} and a {role} step")
                self.role[s] = role
        self.device, self.out_dir, self.images_per_step = device, out_dir, images_per_step
        self.phase_steps, self.trace_steps, self.plain_steps = list(phase_steps), list(trace_steps), list(plain_steps)
        self.info, self.log = dict(info or {}), log
        self.timer = PhaseTimer(device)
        self._done: set = set()
        self._plain_marks: List[Any] = []
        self._trace_profile = None
        self._trace_t0 = 0.0
        self.trace_summary: Optional[Dict[str, Any]] = None

    @property
    def complete(self) -> bool:
        """Every chosen step has run."""
        return set(self.role) <= self._done

    @property
    def steps_done(self) -> List[int]:
        return sorted(self._done)

    def _mark(self):
        if self.device.type == "cuda":
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    @contextlib.contextmanager
    def around(self, step: int, trainer):
        """Wrap the trainer's optimizer step `step` (the 1-based index of the step about to run).

        A trace that cannot start at its first step (a run resumed inside the range) is not taken."""
        role = self.role.get(step)
        if role == "trace" and step != self.trace_steps[0] and self._trace_profile is None:
            role = None
        if role is None:
            yield
            return
        saved = trainer.phase
        if role == "plain":
            if not self._plain_marks:
                _sync(self.device)
            start = self._mark()
        elif role == "phase":
            self.timer.new_step()
            trainer.phase = self.timer
        else:
            if step == self.trace_steps[0]:
                from torch.profiler import ProfilerActivity, profile
                acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
                self._trace_profile = profile(activities=acts)
                _sync(self.device)
                self._trace_profile.start()
                self._trace_t0 = time.perf_counter()
            trainer.phase = torch.profiler.record_function
        try:
            if role == "trace":
                with torch.profiler.record_function(f"step {step}"):
                    yield
            else:
                yield
        finally:
            trainer.phase = saved
        if role == "plain":
            self._plain_marks.append((start, self._mark()))
        elif role == "trace" and step == self.trace_steps[-1]:
            _sync(self.device)
            wall_ms = (time.perf_counter() - self._trace_t0) * 1e3 / len(self.trace_steps)
            self._trace_profile.stop()
            self.trace_summary = self._analyse_trace(wall_ms)
            self._trace_profile = None
        self._done.add(step)

    def _analyse_trace(self, wall_ms: float) -> Dict[str, Any]:
        os.makedirs(self.out_dir, exist_ok=True)
        path = os.path.join(self.out_dir, "trace.json")
        self._trace_profile.export_chrome_trace(path)
        n = len(self.trace_steps)
        if self.device.type == "cuda":
            with open(path) as f:
                out = analyse_device_trace(json.load(f), n, wall_ms)
            out["source"] = "CUDA kernels, memcpy and memset (device timeline)"
        else:
            out = analyse_cpu_ops(self._trace_profile.key_averages(), n, wall_ms, skip=PHASES)
            out["source"] = ("CPU ops (no GPU: each op's self CPU time, categories from op names; "
                             "busy = time inside ops)")
        out["trace_steps"] = list(self.trace_steps)
        out["trace_file"] = path
        return out

    def _plain_ms(self) -> List[float]:
        if self.device.type == "cuda":
            _sync(self.device)
            return [a.elapsed_time(b) for a, b in self._plain_marks]
        return [(b - a) * 1e3 for a, b in self._plain_marks]

    def finish(self) -> Dict[str, Any]:
        """Summarise what was collected, write profile.json (and trace.json, written with the trace),
        print the table; returns the summary. Steps that did not run are listed as missing."""
        if self._trace_profile is not None:  # the run ended inside the traced steps: no trace
            self._trace_profile.stop()
            self._trace_profile = None
        plain = self._plain_ms()
        summary: Dict[str, Any] = dict(run=self.info, device=str(self.device),
                                       gpu=torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None,
                                       torch=torch.__version__, images_per_step=self.images_per_step,
                                       missing_steps=sorted(set(self.role) - set(self._done)))
        if plain:
            ms = statistics.median(plain)
            summary["step"] = dict(steps=[s for s in self.plain_steps if s in self._done], ms_per_step=plain,
                                   median_ms=ms,
                                   img_per_s=self.images_per_step * 1e3 / ms,
                                   timer="cuda events" if self.device.type == "cuda" else "time.perf_counter")
        if self.timer.steps:
            med = self.timer.medians()
            summary["phases"] = dict(steps=[s for s in self.phase_steps if s in self._done], median_ms=med,
                                     sum_ms=sum(med.values()),
                                     per_step_ms=[dict(s) for s in self.timer.steps])
        if self.trace_summary and plain:
            set_idle(self.trace_summary, summary["step"]["median_ms"], "median untraced step time (plain steps)")
        summary["trace"] = self.trace_summary
        os.makedirs(self.out_dir, exist_ok=True)
        path = os.path.join(self.out_dir, "profile.json")
        atomic.write_text(path, json.dumps(summary, indent=1, default=str) + "\n")
        summary["profile_file"] = path
        self.log(format_summary(summary))
        return summary


def format_summary(s: Dict[str, Any]) -> str:
    """The short table finish() prints."""
    run = s.get("run") or {}
    lines = [f"profiled: {run.get('model', 'DiT')} | ZeRO-{run.get('zero_stage', '?')} "
             f"{'bf16' if run.get('bf16') else 'fp32'} | {s['images_per_step']} images per step | "
             f"{s['gpu'] or s['device']}"]
    if s.get("step"):
        st = s["step"]
        lines.append(f"step {st['median_ms']:.2f} ms (median of {len(st['ms_per_step'])} steps, "
                     f"{st['timer']}) = {st['img_per_s']:.1f} img/s")
    if s.get("phases"):
        ph = s["phases"]
        lines.append(f"phases, ms per step (median of {len(ph['steps'])} steps, device synchronised at "
                     f"every phase boundary):")
        lines += [f"  {k:<12} {v:10.2f}" for k, v in ph["median_ms"].items()]
        lines.append(f"  {'sum':<12} {ph['sum_ms']:10.2f}")
    tr = s.get("trace")
    if tr:
        lines.append(f"time by category, ms per step ({tr['source']}; {tr['steps']} traced step(s), "
                     f"traced wall {tr['wall_ms']:.2f} ms, busy {tr['busy_ms']:.2f} ms; idle = "
                     f"{tr['step_ms']:.2f} ms ({tr['idle_basis']}) - busy):")
        step = tr["step_ms"] or float("nan")
        for c, ms in sorted(tr["by_category_ms"].items(), key=lambda kv: -kv[1]):
            if ms > 0 or c == "idle":
                lines.append(f"  {c:<14} {ms:10.2f}  {100 * ms / step:5.1f}%")
        gaps = tr.get("idle_gaps_by_phase_ms")
        if gaps:
            lines.append(f"device idle gaps by the phase that launched the next kernel, ms per step "
                         f"({tr.get('idle_gaps_basis', 'traced')}): "
                         + ", ".join(f"{k} {v:.2f}" for k, v in gaps.items() if v > 0 or k in PHASES))
        first = tr.get("idle_gaps_first_step_ms")
        if first:
            lines.append("  the first traced step's: "
                         + ", ".join(f"{k} {v:.2f}" for k, v in first.items() if v > 0 or k in PHASES))
        lines.append("top (ms/step, calls/step, category, name):")
        lines += [f"  {k['ms_per_step']:9.3f} {k['calls_per_step']:7.1f}  {k['category']:<13} {k['name'][:100]}"
                  for k in tr["top"][:15]]
        lines.append(f"trace: {tr['trace_file']}")
    if s.get("missing_steps"):
        lines.append(f"steps not profiled (the run ended or started after them): {s['missing_steps']}")
    if s.get("profile_file"):
        lines.append(f"summary: {s['profile_file']}")
    return "\n".join(lines)
