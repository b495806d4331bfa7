"""`make gpu-check`: what a few minutes on a GPU must measure, in one command, under one deadline.

Run it first whenever a GPU is at hand. Each stage is a subprocess time-boxed inside one overall
deadline (--budget seconds, default 480, setup and the final summary included: the last FINISH_S seconds
are kept for stopping a stage and writing the results), so a slow stage cannot eat the others; a stage
that would not get its minimum time is skipped and says so. Stages, most important first (the measurements that
decide defaults, then the correctness a flip also needs, then the rest):

  env         versions, GPU, the attention backends that can run, measured copy GB/s and bf16 GEMM TFLOP/s
  throughput  benchmarks/throughput.py, every row but the compiled ones and fused/math, fused/sdpa (the
              attention stage times the backends), at a batch that fits the card
  train       deepspeed fastdit/train.py --config configs/xl2_zero2.json on synthetic latents, 16 steps
  throughput_mb32  the same at the shipped configs' micro-batch 32 (MB32_ROWS: fused, the graphed rows,
              deepspeed, the direct dispatch, eager/sdpa; --rows does not change them): is the step the GPU's
              or the host's?
  parity      benchmarks/parity.py: DiT-XL/2 fast vs reference, forward + every gradient, fp32 and bf16
  tests       pytest on the GPU of the files in GPU_TEST_FILES: tests/test_kernels*.py (every kernel,
              compiled), tests/test_models_dit.py (model parity), tests/test_models_attention.py (backends),
              the CUDA-graph replay against eager (tests/test_training_graphed.py), the fused step's deferred
              check against the fused step (tests/test_training_zero_step.py); pytest -v, so a stage cut by
              the deadline still reports every test that finished
  kernels     benchmarks/kernels.py at the DiT-XL/2 shape (D 1152, T 256, bf16; rows written as they are timed)
  column_sums benchmarks/column_sums.py: the folded bias gradients (the qkv stack of bias_fold, the GELU backward
              of mlp="fold") with FASTDIT_COLUMN_SUMS step and once, against the unfused PyTorch ops (written as timed)
  attention   benchmarks/attention.py: SDPA's kernels (cuDNN, flash, efficient), the optional libraries and
              fastdit's Triton attention at the DiT-XL/2 attention shape, in the model's packed qkv layout and
              contiguous
  attn_sweep  benchmarks/attention.py --sweep-triton --no-rows: the Triton attention's kernels at each tiling
              of its sweep (results written after each tiling, so a deadline keeps what was timed)
  bias_profile  two step profiles, mlp="fold" without and with bias_fold, and their difference by kernel
              (bias_profile_diff.json: where bias_fold's measured +19 ms go)
  mlp_gemm    benchmarks/mlp_gemm.py: the MLP's GEMMs with GELU in the epilogue (mlp="epilogue") at each tiling
              of their sweep against cuBLAS + the separate GELU pass, backward first; only with time left
  compile     benchmarks/throughput.py rows deepspeed+compile (train.compile), fused+compile and compile
              (compilation takes minutes)
  profile     benchmarks/step_profile.py on configs/xl2_zero2.json with train.fused_optimizer_step: the
              phases of the engine's step (data, forward, backward, optimizer, EMA) and kernel time by
              category, with a Chrome trace (step_profile/)
  gpu_tests   every other test marked `gpu` (the deepspeed row, the step profiler, a small throughput run);
              last, as the least needed: on an H100 the stages above take ~7 minutes (estimated from
              their measured parts), so the default budget usually leaves this one out and says so

Everything lands in benchmarks/results/<gpu>-<date>-<commit>/ (or --out): each stage's JSON, the
kernel plot, log.txt (all output), summary.json and a README.md with the summary table and the exact
commands. The summary table is printed last.

The machine needs torch and triton; the rest (deepspeed and what it imports: pydantic, pydantic-core,
annotated-types, typing-inspection, typing-extensions, hjson) is imported from the environment
or installed without network from a folder of wheels (--wheels, default ./wheels) into a private
target folder. Build that folder on a machine with network (docs/performance.md, "GPU check"):

    mkdir -p wheels && DS_BUILD_OPS=0 python3 -m pip wheel --no-deps -w wheels deepspeed==0.19.8
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d wheels \\
        pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2 \\
        typing-extensions==4.16.0 hjson==3.1.0

    make gpu-check                                   # = python3 benchmarks/gpu_check.py
    python3 benchmarks/gpu_check.py --budget 300 --skip compile
    python3 benchmarks/gpu_check.py --smoke          # every stage with tiny settings on CPU (rehearsal)

Exit codes: 0 every stage ok; 1 a stage failed, timed out or was skipped; 2 bad input (no CUDA device
without --smoke, a missing wheel folder, a wheel that does not install).
"""
from __future__ import annotations

import argparse
import datetime
import glob
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.common import environment, git_commit, write_json  # noqa: E402

# The measurements that decide defaults first (the rows, train.py against row `deepspeed`, micro-batch 32), then
# the correctness a flip also needs (full-size parity, the CUDA tests): a budget that runs short then cuts the
# tests, which report every test finished before the cut, instead of train.py's run or the last rows.
STAGES = ("env", "throughput", "train", "throughput_mb32", "parity", "tests", "kernels", "column_sums", "attention",
          "attn_sweep", "bias_profile", "mlp_gemm", "compile", "profile", "gpu_tests")
# deepspeed+compile first: the one row not measured before (compile and fused+compile were, at 864d10f); a
# deadline that cuts the stage cuts the last row
COMPILE_ROWS = ("deepspeed+compile", "fused+compile", "compile")
# Never run on a GPU first (the CUDA graphs, the deferred check, the attention's two row paths), then the files that
# passed on CUDA at 570862f: a stage cut by the deadline loses the re-checks, not the first checks.
GPU_TEST_FILES = ("tests/test_training_graphed.py::test_cuda_graphs_match_eager_on_cuda",
                  "tests/test_training_graphed.py::test_graphed_rows_train_as_their_eager_rows_on_cuda",
                  "tests/test_training_zero_step.py::test_deferred_check_on_cuda_equals_the_fused_step",
                  "tests/test_kernels_flash_attention.py",
                  "tests/test_kernels.py", "tests/test_models_dit.py", "tests/test_models_attention.py",
                  "tests/test_kernels_gelu.py", "tests/test_kernels_qkv_grads.py", "tests/test_kernels_adamw.py",
                  "tests/test_kernels_tile_sums.py", "tests/test_kernels_gemm_gelu.py")
# The throughput stage's rows, most wanted first (a deadline that cuts the stage cuts the last rows): the
# real loop as shipped and the rows it is judged against, the memory-saving rows, then the switches measured
# slower at 570862f (kept for their verdicts), then the baselines measured before.
# fused/sdpa_packed is `fused` where flash-attn is absent (auto); fused/math and fused/sdpa are left out.
THROUGHPUT_ORDER = ("fused", "deepspeed", "deepspeed/ds-step", "deepspeed+graphs", "fused+graphs", "deepspeed/no-overlap",
                    "deepspeed+deferred-check",
                    "fused+mlp-recompute-fold", "fused+mlp-recompute",
                    "fused+bias-fold", "fused+bias-fold/sums-once", "deepspeed+bias-fold/sums-once",
                    "fused+all-switches", "deepspeed+all-switches",
                    "fused/triton", "fused/triton-swept",
                    "fused+mlp-epilogue", "fused+mlp-fold", "fused+mlp-fold/sums-once", "fused+all-switches/triton",
                    "deepspeed+all-switches/triton", "fused+mlp-recompute-epilogue", "deepspeed+fused-step",
                    "eager", "eager/sdpa",
                    "fused/flash_attn", "fused/xformers", "fused/sdpa_packed", "fused+candidates", "deepspeed+candidates")
# Rows at the shipped configs' micro-batch, 32 (stage throughput_mb32): the rows above time batch 128, where the
# GPU's work per kernel hides the host's; at 32 the fused ops' host path (~0.25 ms a call measured on the H100's
# host, 570862f) may set the pace.
MB32_ROWS = ("fused", "fused+graphs", "deepspeed", "deepspeed+graphs", "fused+direct-dispatch", "eager/sdpa",
             "deepspeed+candidates")
# Modules the stages import beyond torch/triton, and the wheel that brings each.
NEEDED = {"deepspeed": "deepspeed", "pydantic": "pydantic", "hjson": "hjson"}
SITE = os.path.join(tempfile.gettempdir(), "fastdit-gpu-check-site")
EXIT_BAD_INPUT = 2
FINISH_S = 15  # kept back from the budget: killing a stage that runs to its limit, summaries, README


def fail(msg: str) -> None:
    print(f"gpu_check: error: {msg}", file=sys.stderr, flush=True)
    sys.exit(EXIT_BAD_INPUT)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds for all stages together, setup included (default 480 = 8 minutes; smoke 300)")
    ap.add_argument("--out", default=None,
                    help="results folder (default benchmarks/results/<gpu>-<date>-<commit>; smoke: a temp dir)")
    ap.add_argument("--wheels", default=None,
                    help="folder of wheels to install offline (default $FASTDIT_WHEELS or ./wheels, used "
                         "only when deepspeed/pydantic/hjson are not importable)")
    ap.add_argument("--batch", type=int, default=None,
                    help="training batch of the throughput and train stages (default: 128 on an 80 GB "
                         "card, scaled down with the card's memory)")
    ap.add_argument("--rows", default=None,
                    help="comma-separated rows of the throughput stage (default: every row of "
                         "benchmarks/throughput.py but the compiled ones, which the compile stage runs, and "
                         "fused/math, fused/sdpa)")
    ap.add_argument("--skip", nargs="+", default=[], choices=STAGES, metavar="STAGE",
                    help=f"stages to leave out ({', '.join(STAGES)})")
    ap.add_argument("--smoke", action="store_true",
                    help="run every stage with tiny settings on CPU: a rehearsal of this script")
    ap.add_argument("--report-env", metavar="PATH", help=argparse.SUPPRESS)  # the env stage's own entry
    a = ap.parse_args(argv)
    if a.budget is None:
        a.budget = 300.0 if a.smoke else 480.0
    if not a.budget > 0:
        ap.error(f"--budget must be positive, got {a.budget}")
    if a.batch is not None and a.batch < 1:
        ap.error(f"--batch must be >= 1, got {a.batch}")
    return a


# ----------------------------------------------------------------------------------------------
# The env stage (runs in its own process: it initialises CUDA)
# ----------------------------------------------------------------------------------------------
def report_env(path: str, smoke: bool) -> int:
    import torch

    from benchmarks import ceilings
    device = torch.device("cuda" if torch.cuda.is_available() and not smoke else "cpu")
    env = environment(device)
    versions = {}
    for mod in ("deepspeed", "pydantic", "hjson", "diffusers", "xformers", "flash_attn",
                "flash_attn_interface", "numpy"):
        try:
            m = __import__(mod)
            versions[mod] = getattr(m, "__version__", "?")
        except Exception as e:  # noqa: BLE001 - recorded, not fatal
            versions[mod] = f"not importable ({type(e).__name__})"
    from fastdit.models import attention as attn
    if hasattr(attn, "backend_status"):
        backends = {k: dict(ok=ok, reason=why) for k, (ok, why) in attn.backend_status().items()}
    else:
        backends = {k: dict(ok=ok, reason="" if ok else "not available")
                    for k, ok in attn.available_backends().items()}
    if smoke:
        ceil = ceilings.measure(device, copy_mib=8, gemm_n=256)
    else:
        ceil = ceilings.measure(device, copy_mib=1024, gemm_n=8192)
    nvsmi = None
    if device.type == "cuda":
        try:
            nvsmi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm",
                                    "--format=csv,noheader"], capture_output=True, text=True,
                                   timeout=30).stdout.strip()
        except Exception as e:  # noqa: BLE001
            nvsmi = f"nvidia-smi failed: {e}"
    rec = dict(environment=env, versions=versions, attention_backends=backends, ceilings=ceil,
               nvidia_smi=nvsmi, interpreter=os.environ.get("TRITON_INTERPRET") == "1")
    write_json(path, rec)
    print(f"{env['gpu'] or 'CPU'} | torch {env['torch']} triton {env['triton']} cuda {env['cuda']} | "
          f"deepspeed {versions['deepspeed']} | copy {ceil['copy_gbps']:.0f} GB/s | bf16 GEMM "
          f"{ceil['gemm_tflops']:.1f} TFLOP/s", flush=True)
    print("attention backends: " + ", ".join(f"{k}={'ok' if v['ok'] else 'no (' + v['reason'] + ')'}"
                                              for k, v in backends.items()), flush=True)
    return 0


# ----------------------------------------------------------------------------------------------
# Running stages under a deadline
# ----------------------------------------------------------------------------------------------
@dataclass
class Stage:
    name: str
    commands: List[List[str]]
    cap: float                        # most seconds this stage may take
    floor: float                      # fewest seconds worth starting it with
    summarize: Callable[["Stage"], str] = lambda s: ""
    ok_codes: tuple = (0,)
    protected: bool = True            # earlier stages leave it its floor (False: runs only if time is left)
    status: str = "not run"
    wall: float = 0.0
    returncodes: List[int] = field(default_factory=list)
    result: str = ""
    detail: Dict[str, Any] = field(default_factory=dict)
    output: List[str] = field(default_factory=list)  # what its commands printed, for summaries of a cut run


class Log:
    """Writes everything to log.txt and to stdout."""

    def __init__(self, path: str):
        self.f = open(path, "a", buffering=1)
        self.lock = threading.Lock()

    def __call__(self, line: str) -> None:
        with self.lock:
            print(line, flush=True)
            self.f.write(line + "\n")


def run_command(cmd: List[str], env: Dict[str, str], timeout: float, log: Log,
                sink: Optional[List[str]] = None) -> int:
    """Run cmd in its own process group, streaming its output (into log, and sink if given); kill the group at
    the timeout (rc 124)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace", start_new_session=True)

    def pump():
        for line in proc.stdout:
            log("    " + line.rstrip("\n"))
            if sink is not None:
                sink.append(line.rstrip("\n"))

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=max(timeout, 1.0))
    except subprocess.TimeoutExpired:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=5)
                break
            except subprocess.TimeoutExpired:
                continue
        rc = 124
    reader.join(timeout=5)
    return rc


def run_stages(stages: List[Stage], deadline: float, env: Dict[str, str], log: Log) -> None:
    for i, st in enumerate(stages):
        reserve = sum(s.floor + 2 for s in stages[i + 1:] if s.protected)  # +2 s: process start and kill
        left = deadline - FINISH_S - time.time()
        allowed = min(st.cap, left - reserve)
        if allowed < st.floor:
            allowed = min(st.cap, left)  # the later stages' reserve goes first, then this stage's turn
            if allowed < st.floor:
                st.status, st.result = "skipped", f"only {max(left, 0):.0f} s left of the budget"
                log(f"=== {st.name}: SKIPPED ({st.result})")
                continue
        log(f"=== {st.name} (at most {allowed:.0f} s) {datetime.datetime.now():%H:%M:%S}")
        t0 = time.time()
        for cmd in st.commands:
            log("$ " + " ".join(shlex.quote(c) for c in cmd))
            rc = run_command(cmd, env, t0 + allowed - time.time(), log, st.output)
            st.returncodes.append(rc)
            if rc == 124:
                break
        st.wall = time.time() - t0
        rcs = st.returncodes
        st.status = ("timeout" if 124 in rcs else "ok" if all(rc in st.ok_codes for rc in rcs) else "failed")
        try:
            st.result = st.summarize(st)
        except Exception as e:  # noqa: BLE001 - a missing or partial output file is reported, not fatal
            st.result = f"(no result: {type(e).__name__}: {e})"
            if st.status == "ok":
                st.status = "failed"  # it exited 0 but did not deliver its output
        log(f"=== {st.name}: {st.status.upper()} rc={rcs} in {st.wall:.0f} s | {st.result}")


# ----------------------------------------------------------------------------------------------
# Summaries of each stage's output files
# ----------------------------------------------------------------------------------------------
def _load(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


def junit_counts(paths: List[str]) -> Dict[str, int]:
    c = dict(tests=0, failures=0, errors=0, skipped=0)
    failed: List[str] = []
    for p in paths:
        if not os.path.isfile(p):
            continue
        root = ET.parse(p).getroot()
        for suite in ([root] if root.tag == "testsuite" else root.iter("testsuite")):
            for k in c:
                c[k] += int(suite.get(k, 0))
            for case in suite.iter("testcase"):
                if case.find("failure") is not None or case.find("error") is not None:
                    failed.append(f"{case.get('classname')}::{case.get('name')}")
    c["passed"] = c["tests"] - c["failures"] - c["errors"] - c["skipped"]
    c["failed_tests"] = failed
    return c


def summarize_env(out: str, st: Stage) -> str:
    d = _load(os.path.join(out, "env.json"))
    e, c = d["environment"], d["ceilings"]
    st.detail = dict(gpu=e["gpu"], torch=e["torch"], triton=e["triton"], cuda=e["cuda"],
                     copy_gbps=c["copy_gbps"], gemm_tflops=c["gemm_tflops"],
                     deepspeed=d["versions"].get("deepspeed"))
    return (f"{e['gpu'] or 'CPU'} | torch {e['torch']} triton {e['triton']} | copy {c['copy_gbps']:.0f} GB/s | "
            f"GEMM {c['gemm_tflops']:.0f} TFLOP/s")


# pytest -v's line per test: "tests/f.py::t PASSED [ 3%]", or under xdist "[gw0] [ 3%] PASSED tests/f.py::t"
# (the path as pytest prints it, relative to the working directory)
_VERBOSE_RESULT = re.compile(r"(?:^|\s)(?:(?P<id1>\S+::\S+)\s+(?P<o1>PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b"
                             r"|(?P<o2>PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\s+(?P<id2>\S+::\S+))")


def verbose_counts(lines: List[str]) -> Dict[str, Any]:
    """junit_counts' figures from pytest -v output (a run killed before it wrote its XML); each test id once,
    its last outcome."""
    outcome: Dict[str, str] = {}
    for line in lines:
        m = _VERBOSE_RESULT.search(line)
        if m:
            outcome[m.group("id1") or m.group("id2")] = m.group("o1") or m.group("o2")
    vals = list(outcome.values())
    c = dict(tests=len(vals), failures=vals.count("FAILED") + vals.count("XPASS"), errors=vals.count("ERROR"),
             skipped=vals.count("SKIPPED") + vals.count("XFAIL"))
    c["passed"] = c["tests"] - c["failures"] - c["errors"] - c["skipped"]
    c["failed_tests"] = [t for t, o in outcome.items() if o in ("FAILED", "ERROR", "XPASS")]
    return c


def summarize_tests(xmls: List[str], st: Stage) -> str:
    c = junit_counts(xmls)
    cut = ""
    if not any(os.path.isfile(x) for x in xmls) and st.output:  # killed before pytest wrote its XML
        c, cut = verbose_counts(st.output), " (no XML: the tests that finished before the cut, from the log)"
        c["from_log"] = True
    st.detail = c
    s = f"{c['passed']} passed, {c['failures'] + c['errors']} failed, {c['skipped']} skipped"
    return s + (f" ({', '.join(c['failed_tests'][:5])})" if c["failed_tests"] else "") + cut


def summarize_parity(out: str, st: Stage) -> str:
    d = _load(os.path.join(out, "parity.json"))
    fast = [r for r in d["results"] if r["case"].startswith("fast")]
    st.detail = {r["case"]: {k: r.get(k) for k in ("out_rel", "grad_rel", "pass", "error")} for r in d["results"]}
    worst32 = max((r.get("grad_rel") or 0) for r in fast if " fp32 " in r["case"]) if fast else None
    return (f"{d['model']}: {sum(r['pass'] is True for r in fast)}/{len(fast)} fast cases pass"
            + (f", fp32 grads rel {worst32:.1e}" if worst32 is not None else ""))


def _row_figures(rows: List[Dict]) -> Dict[str, Dict]:
    fig = {}
    for r in rows:
        if r.get("status") == "ok":
            fig[r["name"]] = dict(img_per_s=r["img_per_s"]["median"], ms_per_step=r["ms_per_step"]["median"],
                                  mfu=r.get("mfu"), peak_mem_gib=r.get("peak_mem_gib"))
        else:
            fig[r["name"]] = dict(status=r.get("status"), error=(r.get("error") or "")[:200])
    return fig


def summarize_throughput(path: str, st: Stage) -> str:
    d = _load(path)
    st.detail = _row_figures(d["rows"])
    parts = [f"{k} {v['img_per_s']:.0f}" if "img_per_s" in v else f"{k} {v['status']}"
             for k, v in st.detail.items()]
    return "img/s: " + ", ".join(parts) + ("" if d.get("complete") else " (incomplete)")


# Predictions written before measuring (benchmarks/predictions.json) against what the throughput stages measured.
PREDICTIONS = os.path.join(ROOT, "benchmarks", "predictions.json")
# A delta within this many ms of the predicted range counts as held: the same row's median differed by 1.2 ms
# between two calls on one H100 (fused/sdpa_packed, 5843182: 216.8 and 218.0 ms per step).
NOISE_MS = 1.2


def prediction_verdicts(figures: Dict[str, Dict], predictions: List[Dict]) -> List[Dict]:
    """For each prediction (row, baseline, delta_ms = [lo, hi]): the measured change of the row's median ms per
    step against its baseline's in the same run, and a verdict: held (within [lo, hi] +- NOISE_MS), faster or
    slower than predicted, or not measured (either row missing or not ok)."""
    out = []
    for p in predictions:
        row, base = figures.get(p["row"], {}), figures.get(p["baseline"], {})
        lo, hi = p["delta_ms"]
        v = dict(row=p["row"], baseline=p["baseline"], predicted_ms=[lo, hi], measured_ms=None)
        if "ms_per_step" not in row or "ms_per_step" not in base:
            v["verdict"] = "not measured"
        else:
            d = row["ms_per_step"] - base["ms_per_step"]
            v["measured_ms"] = round(d, 2)
            v["verdict"] = ("held" if lo - NOISE_MS <= d <= hi + NOISE_MS
                            else "faster than predicted" if d < lo else "slower than predicted")
        out.append(v)
    return out


def stage_verdicts(stages: List["Stage"], path: str = PREDICTIONS) -> List[Dict]:
    """prediction_verdicts of the predictions in `path` for the rows the throughput stages measured: a prediction
    with a `stage` (e.g. throughput_mb32, the rows at micro-batch 32) is judged on that stage's rows, one without
    on the rows of the throughput and compile stages (batch 128)."""
    by_stage: Dict[str, Dict[str, Dict]] = {}
    for st in stages:
        if st.name in ("throughput", "compile", "throughput_mb32"):
            by_stage.setdefault("throughput_mb32" if st.name == "throughput_mb32" else "",
                                {}).update({k: v for k, v in st.detail.items() if isinstance(v, dict)})
    with open(path) as f:
        predictions = json.load(f)["rows"]
    out = []
    for p in predictions:
        v = prediction_verdicts(by_stage.get(p.get("stage", ""), {}), [p])[0]
        if p.get("stage"):
            v["stage"] = p["stage"]
        out.append(v)
    return out


def format_verdicts(verdicts: List[Dict]) -> List[str]:
    lines = [f"{'row':<32} {'baseline':<24} {'predicted ms':>15} {'measured ms':>12}  verdict"]
    for v in verdicts:
        lo, hi = v["predicted_ms"]
        measured = "-" if v["measured_ms"] is None else f"{v['measured_ms']:+.1f}"
        row = f"{v['row']} @{v['stage'].replace('throughput_', '')}" if v.get("stage") else v["row"]
        lines.append(f"{row:<32} {v['baseline']:<24} {f'{lo:+.1f}..{hi:+.1f}':>15} {measured:>12}  {v['verdict']}")
    return lines


# The issues' whole-step targets, for one H100 at batch 128 (issue 10: the loop users run; issue 11: the fused
# model): row, (comparison row or None), the target, what it reads. Judged on the throughput and compile stages.
ISSUE_TARGETS = (
    ("issue 10", "deepspeed", None, 600.0, "img/s"),
    ("issue 10", "deepspeed", "fused", 0.95, "x"),
    ("issue 11", "fused", None, 700.0, "img/s"),
    ("issue 11", "fused", "compile", 1.3, "x"),
    ("issue 11", "fused+compile", "fused", 1.0, "x"),
)
# Rows that show where the targets would stand with every switch predicted to win on (throughput.CANDIDATE_ENV):
# each target is read again with a row's `+candidates` twin in its place, where both were measured.
CANDIDATE_TWINS = {"deepspeed": "deepspeed+candidates", "fused": "fused+candidates"}


def issue_target_lines(stages: List["Stage"]) -> List[str]:
    """One line per target of ISSUE_TARGETS that the batch-128 rows of this run can judge (img/s of the row, or
    its img/s over the comparison row's): measured, target, met or not; then the same with the candidate rows."""
    fig: Dict[str, float] = {}
    for st in stages:
        if st.name in ("throughput", "compile"):
            fig.update({k: v["img_per_s"] for k, v in st.detail.items() if isinstance(v, dict) and "img_per_s" in v})
    lines = []
    for twins in (False, True):
        for issue, row, other, target, unit in ISSUE_TARGETS:
            if twins and row not in CANDIDATE_TWINS:
                continue                        # no candidate twin of the row judged: read once
            r = CANDIDATE_TWINS[row] if twins else row
            o = CANDIDATE_TWINS.get(other, other) if twins and other else other
            if r not in fig or (o is not None and o not in fig):
                continue
            value = fig[r] / fig[o] if o else fig[r]
            what = f"{r} / {o}" if o else r
            shown = f"{value:.3f}x" if o else f"{value:.1f} img/s"
            lines.append(f"{issue}: {what:<38} {shown:>12}  target >= {target:g}{'x' if o else ' img/s'}  "
                         f"{'met' if value >= target else 'not met'}" + ("  (candidate rows)" if twins else ""))
    return lines


def summarize_kernels(out: str, st: Stage) -> str:
    d = _load(os.path.join(out, "kernels.json"))
    share = {}
    for r in d["rows"]:
        if r["impl"] == "fused":
            share.setdefault(r["op"], {})[r["pass"]] = r["copy_share"]
    st.detail = dict(copy_gbps=d["meta"].get("copy_gbps"), fused_copy_share=share)
    return "fused fwd/bwd % of copy: " + ", ".join(
        f"{op} {100 * v.get('fwd', 0):.0f}/{100 * v.get('bwd', 0):.0f}" for op, v in share.items()) + _cut(d["meta"])


def _cut(meta: Dict[str, Any]) -> str:
    """' (cut: ...)' where a benchmark's JSON says its run was cut short (it writes its rows as it goes)."""
    return "" if meta.get("complete", True) else " (cut: the rows timed before the deadline)"


def summarize_column_sums(out: str, st: Stage) -> str:
    """Per case: unfused / step / once median ms, from column_sums.json."""
    d = _load(os.path.join(out, "column_sums.json"))
    st.detail = dict(summary=d["summary"])
    return "ms unfused/step/once: " + ", ".join(
        f"{k} " + "/".join(f"{v['ms'][i]:.3f}" if i in v["ms"] else "-" for i in ("unfused", "step", "once"))
        for k, v in d["summary"].items()) + _cut(d["meta"])


def summarize_attention(out: str, st: Stage) -> str:
    d = _load(os.path.join(out, "attention.json"))
    ok = {(r["name"], r["layout"]): r["fwd+bwd"]["ms"]["median"] for r in d["rows"] if r["status"] == "ok"}
    st.detail = dict(fwd_bwd_ms={f"{n} {lay}": ms for (n, lay), ms in ok.items()}, fastest_packed=d["fastest_packed"])
    packed = sorted((ms, n) for (n, lay), ms in ok.items() if lay == "packed")
    return "fwd+bwd ms (packed): " + ", ".join(f"{n} {ms:.2f}" for ms, n in packed[:4])


def summarize_attn_sweep(out: str, st: Stage) -> str:
    """The Triton attention's fastest tiling per kernel, and its median ms, from attention_sweep.json (partial
    when a deadline cut the sweep)."""
    d = _load(os.path.join(out, "attention_sweep.json"))
    sweep = d.get("triton_sweep") or {}
    if "unavailable" in sweep:
        return f"unavailable: {sweep['unavailable']}"
    best = {}
    for kernel, v in sweep.items():
        ms = {tuple(r["config"]): r["ms"]["median"] for r in v["rows"] if "ms" in r}
        if v.get("fastest"):
            best[kernel] = dict(config=v["fastest"], ms=ms[tuple(v["fastest"])], tried=len(v["rows"]))
    st.detail = dict(fastest=best, complete=d.get("complete", False))
    return ("" if d.get("complete") else "(cut short) ") + "fastest: " + ", ".join(
        f"{k} {tuple(b['config'])} {b['ms']:.3f} ms of {b['tried']}" for k, b in best.items())


def summarize_mlp_gemm(out: str, st: Stage) -> str:
    """Per pass: the GELU-epilogue GEMM's fastest tiling against cuBLAS + the separate pass, from mlp_gemm.json
    (partial when its deadline cut the sweep)."""
    d = _load(os.path.join(out, "mlp_gemm.json"))
    summ = d.get("summary") or {}
    st.detail = dict(summary=summ, stopped_early=d.get("meta", {}).get("stopped_early"))
    parts = [f"{p} best {s['best'].split()[-1]} {s['best_ms']:.3f} ms vs {s['baseline']} {s['baseline_ms']:.3f} "
             f"(x{s['best_vs_baseline']:.2f})" for p, s in summ.items() if isinstance(s, dict)]
    if "derived_step_change_ms" in summ:
        parts.append(f"derived step change {summ['derived_step_change_ms']:+.1f} ms")
    if "derived_recompute_step_change_ms" in summ:
        parts.append(f"with recompute {summ['derived_recompute_step_change_ms']:+.1f} ms")
    return ("(cut short) " if d.get("meta", {}).get("stopped_early") else "") + ("; ".join(parts) or "no rows")


def summarize_profile(folder: str, st: Stage) -> str:
    """The step profiler's phase medians (ms) and step time from its profile.json."""
    d = _load(os.path.join(folder, "profile.json"))
    phases = d["phases"]["median_ms"]
    tr = d.get("trace") or {}
    gaps = tr.get("idle_gaps_by_phase_ms")
    st.detail = dict(phases_ms=phases, step=d.get("step"), idle_gaps_by_phase_ms=gaps,
                     idle_gaps_first_step_ms=tr.get("idle_gaps_first_step_ms"),
                     idle_gaps_basis=tr.get("idle_gaps_basis"))
    line = "ms/step by phase: " + ", ".join(f"{k} {v:.1f}" for k, v in phases.items())
    if gaps:
        which = "steady traced steps" if tr.get("idle_gaps_first_step_ms") else "one traced step, starts idle"
        line += f"; idle gaps ({which}): " + ", ".join(f"{k} {v:.1f}" for k, v in gaps.items() if v > 0)
    return line


def profile_diff(base: Dict[str, Any], other: Dict[str, Any], top: int = 8) -> Dict[str, Any]:
    """What changed from one step profile (profile.json) to another: the step's median ms, the ms per step of
    each kernel category and phase, and the `top` kernels by the size of their change (a kernel outside one
    profile's list of its largest, 40 as written, counts 0 there, so a change below that list's floor is
    missed)."""
    def kernels(d):
        return {k["name"]: k["ms_per_step"] for k in (d.get("trace") or {}).get("top", [])}

    def cats(d):
        return (d.get("trace") or {}).get("by_category_ms", {})
    ka, kb = kernels(base), kernels(other)
    changes = sorted(((kb.get(n, 0.0) - ka.get(n, 0.0), n) for n in set(ka) | set(kb)), key=lambda c: -abs(c[0]))
    pa, pb = base["phases"]["median_ms"], other["phases"]["median_ms"]
    ca, cb = cats(base), cats(other)
    return dict(step_ms=[base["step"]["median_ms"], other["step"]["median_ms"]],
                step_change_ms=other["step"]["median_ms"] - base["step"]["median_ms"],
                phase_change_ms={k: pb[k] - pa[k] for k in pa if k in pb},
                category_change_ms={k: cb.get(k, 0.0) - ca.get(k, 0.0) for k in sorted(set(ca) | set(cb))},
                kernel_change_ms=[dict(name=n, change_ms=c, base_ms=ka.get(n, 0.0), other_ms=kb.get(n, 0.0))
                                  for c, n in changes[:top]])


def summarize_bias_profile(out: str, st: Stage) -> str:
    """The step profiles with mlp="fold" without and with bias_fold (the switch measured 19 ms slower per step on
    an H100 at 570862f): their difference, also written to bias_profile_diff.json."""
    diff = profile_diff(_load(os.path.join(out, "step_profile_fold", "profile.json")),
                        _load(os.path.join(out, "step_profile_bias_fold", "profile.json")))
    write_json(os.path.join(out, "bias_profile_diff.json"), diff)
    st.detail = diff
    cats = ", ".join(f"{k} {v:+.1f}" for k, v in diff["category_change_ms"].items() if abs(v) >= 0.5)
    kern = ", ".join(f"{k['name'][:48]} {k['change_ms']:+.2f}" for k in diff["kernel_change_ms"][:3])
    return (f"step {diff['step_ms'][0]:.1f} -> {diff['step_ms'][1]:.1f} ms ({diff['step_change_ms']:+.1f}) with "
            f"bias_fold; categories: {cats or 'none moved 0.5 ms'}; kernels: {kern}")


def summarize_train(run_dir: str, out: str, skip_windows: int, st: Stage) -> str:
    """img/s of the run's metrics.jsonl (copied into `out`), then the run folder (checkpoint) is deleted."""
    src = os.path.join(run_dir, "metrics.jsonl")
    try:
        recs = [json.loads(line) for line in open(src) if line.strip()]
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    with open(os.path.join(out, "train_metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in recs)
    win = [r for r in recs if r.get("img_per_s")][skip_windows:]
    if not win:
        raise ValueError(f"no timed windows after the first {skip_windows} in {src}")
    ips = sorted(r["img_per_s"] for r in win)
    med = ips[len(ips) // 2]
    mfu = sorted(r["mfu"] for r in win if r.get("mfu") is not None)
    st.detail = dict(img_per_s_median=med, img_per_s=[r["img_per_s"] for r in win],
                     mfu_median=mfu[len(mfu) // 2] if mfu else None, mem_gb=win[-1].get("mem_gb"),
                     loss_last=win[-1].get("loss"), windows_skipped=skip_windows)
    return (f"{med:.0f} img/s" + (f", MFU {100 * st.detail['mfu_median']:.1f}%" if mfu else "")
            + f", {st.detail['mem_gb']:.1f} GB, loss {st.detail['loss_last']:.4f}")


# ----------------------------------------------------------------------------------------------
# Setup: wheels, output folder, stages
# ----------------------------------------------------------------------------------------------
def importable(mod: str, env: Dict[str, str]) -> bool:
    code = f"import importlib.util, sys; sys.exit(0 if importlib.util.find_spec({mod!r}) else 1)"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True).returncode == 0


def install_wheels(folder: Optional[str], env: Dict[str, str], log: Log) -> List[str]:
    """Make NEEDED importable for the stages (offline). Returns notes; exits 2 on a bad folder or wheel."""
    missing = [m for m in NEEDED if not importable(m, env)]
    notes = []
    if not missing:
        notes.append("deepspeed, pydantic, hjson: already importable (no wheels installed)")
        return notes
    explicit = folder is not None or "FASTDIT_WHEELS" in os.environ
    folder = folder or os.environ.get("FASTDIT_WHEELS") or os.path.join(ROOT, "wheels")
    if not os.path.isdir(folder):
        fail(f"{', '.join(missing)} not importable and the wheel folder {folder} does not exist"
             + ("" if explicit else " (pass --wheels DIR)") + "; build it with the commands in "
             "benchmarks/gpu_check.py's docstring (docs/performance.md, 'GPU check')")
    wheels = sorted(glob.glob(os.path.join(folder, "*.whl")))
    if not wheels:
        fail(f"{', '.join(missing)} not importable and {folder} holds no .whl files")
    os.makedirs(SITE, exist_ok=True)
    base = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
            "--no-cache-dir", "--upgrade", "--target", SITE]
    log(f"installing {len(wheels)} wheel(s) from {folder} into {SITE}")
    proc = subprocess.run(base + wheels, capture_output=True, text=True)
    if proc.returncode != 0:
        for w in wheels:  # find which one does not install
            one = subprocess.run(base + [w], capture_output=True, text=True)
            if one.returncode != 0:
                err = (one.stderr.strip().splitlines() or ["?"])[-1]
                fail(f"wheel {os.path.basename(w)} does not install: {err}")
        fail(f"the wheels in {folder} do not install together: {proc.stderr.strip()[-500:]}")
    env["PYTHONPATH"] = os.pathsep.join([SITE] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["PATH"] = os.path.join(SITE, "bin") + os.pathsep + env.get("PATH", "")
    still = [m for m in NEEDED if not importable(m, env)]
    if still:
        fail(f"after installing {folder}: {', '.join(still)} still not importable; add the wheel(s) "
             f"{', '.join(NEEDED[m] for m in still)}")
    notes.append(f"installed {len(wheels)} wheel(s) from {folder}: " + ", ".join(os.path.basename(w) for w in wheels))
    return notes


def gpu_info(env: Dict[str, str]) -> Dict[str, Any]:
    code = ("import json, torch; ok = torch.cuda.is_available(); p = torch.cuda.get_device_properties(0) if ok "
            "else None; print(json.dumps(dict(cuda=ok, name=p.name if p else None, "
            "mem_gib=p.total_memory / 2**30 if p else None)))")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        fail(f"cannot query the device with torch: {proc.stderr.strip()[-300:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def gpu_slug(name: Optional[str]) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100'; the first model-like word of the device name, lowercased."""
    words = [w for w in re.split(r"[\s_]+", name or "") if w and w.upper() not in ("NVIDIA", "TESLA", "GEFORCE",
                                                                                    "RTX", "AMD", "INSTINCT")]
    return re.sub(r"[^a-z0-9]+", "", words[0].lower()) if words else "gpu"


def default_batch(mem_gib: Optional[float]) -> int:
    """128 on an 80 GB card (79.2 GiB usable; the eager math-attention row peaked at 58 GiB there at 128),
    scaled down with the card's memory in steps of 16."""
    if not mem_gib:
        return 128
    return int(max(16, min(128, (mem_gib / 75.0 * 128) // 16 * 16)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_stages(a, out: str, batch: int, py: str, env: Dict[str, str]) -> List[Stage]:
    from benchmarks.throughput import ALL_ROWS
    smoke = a.smoke
    xdist = (not smoke) and importlib.util.find_spec("xdist") is not None
    run_dir = os.path.join(tempfile.gettempdir(), f"fastdit-gpu-check-train-{os.getpid()}")
    kp_xml, gm_xml = os.path.join(out, "tests_kernels_parity.xml"), os.path.join(out, "tests_gpu_marked.xml")
    if smoke:
        test_sel = ["tests/test_kernels.py::test_poison_catches_unwritten_rows",
                    "tests/test_models_dit.py::test_state_dicts_load_both_ways_strictly"]
        tp = ["--smoke"]
        fast_rows = [r for r in ("eager", "fused", "deepspeed") if r in ALL_ROWS]
        mb32 = ["--smoke", "--rows", "fused,fused+direct-dispatch"]
        compile_rows = ["compile"]
        par = ["--smoke"]
        kern = ["--smoke"]
        att = ["--smoke"]
        cs = ["--smoke"]
        mg = ["--smoke"]
        train_cfg = ["--config", "configs/digits.json", "--set", "train.max_steps=4", "--set", "train.log_every=1"]
        prof = ["--smoke"]
        skip_windows = 1
        pair = ["--smoke"]
    else:
        test_sel = list(GPU_TEST_FILES) + (["-n", "4"] if xdist else [])  # H100: 65 s with 4 workers, 93 with 8
        tp = ["--batch", str(batch), "--warmup", "2", "--steps", "4", "--repeats", "3"]
        # fused/sdpa is `fused` where auto picks sdpa, and the attention stage times the backends
        # (math included) on their own: both rows left out to keep the budget; most wanted rows first
        fast_rows = [r for r in THROUGHPUT_ORDER if r in ALL_ROWS]
        fast_rows += [r for r in ALL_ROWS if r not in fast_rows + list(COMPILE_ROWS) + ["fused/math", "fused/sdpa"]]
        compile_rows = list(COMPILE_ROWS)
        # the shipped configs' micro-batch (32 per GPU): is the step still the GPU's, or the host's?
        mb32 = ["--batch", "32", "--warmup", "3", "--steps", "8", "--repeats", "3",
                "--rows", ",".join(MB32_ROWS)]
        par = ["--model", "DiT-XL/2", "--batch", "4"]
        kern = ["--dims", "1152", "--tokens-per-sample", "256", "--impls", "fused", "fused-direct", "fused-gemm-bwd",
                "fused-tile-sums", "fused-paired-sums", "eager", "compile", "--rep", "60", "--warmup", "15"]
        att = ["--batch", str(batch)]
        cs = ["--batch", str(batch), "--layouts", "bshd", "contiguous", "--sweep"]
        # the backward first: its predicted saving is the larger (a deadline cuts the forward's last tilings)
        mg = ["--batch", str(batch), "--passes", "bwd", "fwd", "--deadline-s", "60", "--rep", "50", "--warmup", "10"]
        train_cfg = ["--config", "configs/xl2_zero2.json", "--set", "data.kind=synthetic",
                     "--set", "data.synthetic_size=4096", "--set", "data.num_workers=4",
                     "--set", "train.max_steps=16", "--set", "train.log_every=2",
                     "--set", f"deepspeed.train_micro_batch_size_per_gpu={batch}",
                     "--set", f"deepspeed.train_batch_size={batch}"]
        prof = ["--config", "configs/xl2_zero2.json", "--set", f"deepspeed.train_micro_batch_size_per_gpu={batch}",
                "--set", f"deepspeed.train_batch_size={batch}", "--set", "train.fused_optimizer_step=true",
                "--trace-steps", "2"]  # two: the idle gaps by phase come from the second (the first starts idle)
        skip_windows = 2  # the first two windows hold the warm-up (allocator, cuDNN/Triton autotuning)
        # the bias_fold pair: one traced step each (the kernel table needs no second), fewer timed steps
        pair = ["--config", "configs/xl2_zero2.json", "--set", f"deepspeed.train_micro_batch_size_per_gpu={batch}",
                "--set", f"deepspeed.train_batch_size={batch}", "--warmup", "2", "--steps", "3", "--trace-steps", "1"]
    if a.rows:
        fast_rows = [r.strip() for r in a.rows.split(",") if r.strip()]
    # -v: a line per test as it finishes, so a stage cut by its time limit still says what passed (verbose_counts)
    pytest = [py, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-o", "addopts="]
    train_cmd = [py, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port", str(free_port()),
                 "fastdit/train.py"] + train_cfg + [
                 "--set", "train.ckpt_every=1000000", "--set", "train.final_sample=false",
                 "--set", "train.sample_every=0", "--set", "train.plots=false", "--set", "train.progress=false",
                 "--set", f"train.output_dir={run_dir}"]
    j = lambda name: os.path.join(out, name)  # noqa: E731
    # caps/floors in seconds, sized from an H100 run (2026-11-26): tests 93 s, parity 57 s, kernels 41 s,
    # eager+fused rows 29 s, train.py 55 s, compile rows 123 s.
    return [
        Stage("env", [[py, os.path.join("benchmarks", "gpu_check.py"), "--report-env", j("env.json")]
                      + (["--smoke"] if smoke else [])], 60, 10, lambda s: summarize_env(out, s)),
        Stage("throughput", [[py, "benchmarks/throughput.py", *tp, "--rows", ",".join(fast_rows),
                              "--json", j("throughput.json")]], 200, 20,
              lambda s: summarize_throughput(j("throughput.json"), s)),
        Stage("train", [train_cmd], 120, 30,
              lambda s: summarize_train(run_dir, out, skip_windows, s)),
        Stage("throughput_mb32", [[py, "benchmarks/throughput.py", *mb32, "--json", j("throughput_mb32.json")]],
              100, 20, lambda s: summarize_throughput(j("throughput_mb32.json"), s)),
        Stage("parity", [[py, "benchmarks/parity.py", *par, "--json", j("parity.json")]], 120, 20,
              lambda s: summarize_parity(out, s)),
        Stage("tests", [pytest + test_sel + ["--junitxml", kp_xml]], 200, 30,
              lambda s: summarize_tests([kp_xml], s)),
        Stage("kernels", [[py, "benchmarks/kernels.py", *kern, "--json", j("kernels.json"),
                           "--plot", j("kernels.png")]], 100, 15, lambda s: summarize_kernels(out, s)),
        Stage("column_sums", [[py, "benchmarks/column_sums.py", *cs, "--json", j("column_sums.json")]], 45, 10,
              lambda s: summarize_column_sums(out, s)),
        Stage("attention", [[py, "benchmarks/attention.py", *att, "--json", j("attention.json")]], 60, 10,
              lambda s: summarize_attention(out, s)),
        # its own stage: a deadline that cuts the sweep keeps the rows above and the tilings timed so far
        Stage("attn_sweep", [[py, "benchmarks/attention.py", *att, "--no-rows", "--sweep-triton",
                              "--json", j("attention_sweep.json")]], 75, 20,
              lambda s: summarize_attn_sweep(out, s)),
        # why bias_fold cost 19 ms per step (570862f): the step profile with mlp="fold" without and with it
        Stage("bias_profile", [[py, "benchmarks/step_profile.py", *pair, "--set", "model.mlp=fold",
                                "--out", j("step_profile_fold")],
                               [py, "benchmarks/step_profile.py", *pair, "--set", "model.mlp=fold",
                                "--set", "model.bias_fold=true", "--out", j("step_profile_bias_fold")]], 110, 50,
              lambda s: summarize_bias_profile(out, s)),
        # only with time left after train (earlier stages keep no reserve for it); the GEMM sweep stops itself
        # 10 s before the stage's cap, and its JSON keeps the tilings timed so far when the stage is cut sooner
        Stage("mlp_gemm", [[py, "benchmarks/mlp_gemm.py", *mg, "--json", j("mlp_gemm.json")]], 70, 25,
              lambda s: summarize_mlp_gemm(out, s), protected=False),
        Stage("compile", [[py, "benchmarks/throughput.py", *tp, "--rows", ",".join(compile_rows),
                           "--json", j("throughput_compile.json")]], 240, 60,
              lambda s: summarize_throughput(j("throughput_compile.json"), s)),
        Stage("profile", [[py, "benchmarks/step_profile.py", *prof, "--out", j("step_profile")]], 100, 30,
              lambda s: summarize_profile(j("step_profile"), s), protected=False),
        Stage("gpu_tests", [pytest + ["tests", "-m", "gpu", *[f"--ignore={f.split('::')[0]}" for f in GPU_TEST_FILES],
                                      "--junitxml", gm_xml]],
              150, 20, lambda s: summarize_tests([gm_xml], s), ok_codes=(0, 5),  # 5: no test selected
              protected=False),
    ]


def summary_table(stages: List[Stage]) -> str:
    lines = [f"{'stage':<11} {'status':<8} {'wall':>6}  result", "-" * 100]
    for s in stages:
        lines.append(f"{s.name:<11} {s.status:<8} {s.wall:5.0f}s  {s.result}")
    return "\n".join(lines)


def write_readme(out: str, info: Dict[str, Any], stages: List[Stage], table: str,
                 verdicts: Optional[List[Dict]] = None, targets: Optional[List[str]] = None) -> None:
    cmds = "\n".join("$ " + " ".join(shlex.quote(c) for c in cmd) for s in stages for cmd in s.commands)
    predictions = ""
    if targets:
        predictions += ("\nThe issues' targets (issues 10 and 11: one H100 at batch 128; this run: batch "
                        f"{info['batch']}):\n```\n" + "\n".join(targets) + "\n```\n")
    if verdicts is not None:
        predictions += ("\nPredictions written before this run (benchmarks/predictions.json) against it: the change of "
                       "each row's median ms per step against its baseline row (held: within the range +- "
                       f"{NOISE_MS} ms):\n```\n" + "\n".join(format_verdicts(verdicts)) + "\n```\n")
    text = f"""# GPU check: {info['gpu'] or 'CPU (smoke)'}, {info['date']}, commit {info['commit']}

Written by `{info['command']}` ({'smoke rehearsal on CPU: the numbers say nothing about a GPU' if info['smoke']
else 'make gpu-check'}); budget {info['budget_s']:.0f} s, {info['wall_s']:.0f} s used. Training batch {info['batch']}.
Files: env.json (versions, measured ceilings), tests_*.xml (pytest), parity.json, throughput.json,
throughput_compile.json, kernels.json / kernels.png, column_sums.json, attention.json, attention_sweep.json, train_metrics.jsonl, summary.json, log.txt (everything printed).

```
{table}
```
{predictions}
Setup: {'; '.join(info['setup'])}

Commands, in order (run from the repository root; PYTHONPATH={info['pythonpath']}):
```
{cmds}
```
"""
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(text)


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.report_env:
        return report_env(a.report_env, a.smoke)
    if a.rows:
        from benchmarks.throughput import ALL_ROWS
        bad = [r for r in a.rows.split(",") if r.strip() and r.strip() not in ALL_ROWS]
        if bad or not a.rows.strip(","):
            fail(f"unknown --rows {bad or a.rows!r}; rows of benchmarks/throughput.py: {', '.join(ALL_ROWS)}")
    t_start = time.time()
    deadline = t_start + a.budget
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    # the Triton attention is off on CUDA by default (a wrong output on an H100: fastdit.models.attention);
    # the check keeps testing and timing it, so its failing test reads as such until the kernels are fixed
    env["FASTDIT_ATTENTION_TRITON"] = "1"
    if a.smoke:
        env["TRITON_INTERPRET"] = "1"  # Triton kernels on CPU tensors, through the interpreter
        env.setdefault("CUDA_VISIBLE_DEVICES", "")
        info_gpu: Dict[str, Any] = dict(cuda=False, name=None, mem_gib=None)
    else:
        env.pop("TRITON_INTERPRET", None)
        info_gpu = gpu_info(env)
        if not info_gpu["cuda"]:
            fail("no CUDA device is visible (torch.cuda.is_available() is False); "
                 "`python3 benchmarks/gpu_check.py --smoke` rehearses every stage on CPU")
    commit = git_commit()
    date = datetime.date.today().isoformat()
    short = commit[:7] + ("-dirty" if commit.endswith("-dirty") else "") if commit != "unknown" else "unknown"
    out = a.out or (tempfile.mkdtemp(prefix="fastdit-gpu-check-smoke-") if a.smoke else
                    os.path.join(ROOT, "benchmarks", "results", f"{gpu_slug(info_gpu['name'])}-{date}-{short}"))
    out = os.path.abspath(out)
    os.makedirs(out, exist_ok=True)
    log = Log(os.path.join(out, "log.txt"))
    log(f"fastdit gpu-check | {info_gpu['name'] or 'CPU smoke'} | commit {commit} | budget {a.budget:.0f} s | "
        f"results in {out}")
    setup = install_wheels(a.wheels, env, log)
    for note in setup:
        log(note)
    batch = a.batch or (2 if a.smoke else default_batch(info_gpu["mem_gib"]))
    stages = [s for s in build_stages(a, out, batch, sys.executable, env) if s.name not in a.skip]
    run_stages(stages, deadline, env, log)

    table = summary_table(stages)
    verdicts = None if a.smoke else stage_verdicts(stages)   # CPU smoke figures say nothing about them
    info = dict(gpu=info_gpu["name"], gpu_mem_gib=info_gpu["mem_gib"], commit=commit, date=date,
                smoke=a.smoke, budget_s=a.budget, wall_s=time.time() - t_start, batch=batch, setup=setup,
                pythonpath=env["PYTHONPATH"], skipped_by_request=a.skip,
                command="python3 benchmarks/gpu_check.py" + ("" if argv is None and len(sys.argv) < 2 else
                                                              " " + " ".join(shlex.quote(x) for x in
                                                                             (sys.argv[1:] if argv is None else argv))))
    write_json(os.path.join(out, "summary.json"), dict(
        benchmark="gpu_check", **info, predictions=verdicts,
        stages=[dict(name=s.name, status=s.status, wall_s=s.wall, returncodes=s.returncodes, result=s.result,
                     detail=s.detail, commands=[" ".join(shlex.quote(c) for c in cmd) for cmd in s.commands])
                for s in stages]))
    targets = [] if a.smoke else issue_target_lines(stages)   # the targets are an H100's at batch 128
    write_readme(out, info, stages, table, verdicts, targets)
    if verdicts is not None:
        log("")
        log("predictions (benchmarks/predictions.json; change of ms per step against the baseline row, same run):")
        for line in format_verdicts(verdicts):
            log(line)
    if targets:
        log("")
        log(f"the issues' targets (one H100 at batch 128; this run: batch {batch} on {info_gpu['name']}):")
        for line in targets:
            log(line)
    log("")
    log(f"gpu-check summary ({time.time() - t_start:.0f} s of {a.budget:.0f}; results in {out})")
    log(table)
    return 0 if all(s.status == "ok" for s in stages) else 1


if __name__ == "__main__":
    sys.exit(main())
