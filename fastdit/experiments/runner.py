"""Studies of many training runs: plan the members, run each through fastdit/train.py, collect, plot.

A study folder holds one sub-folder per member (an ordinary train.py output folder plus `spec.json`,
`member.json` and `log.txt`), `results.json` and the figure. See fastdit/experiments/__init__.py.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import re
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

BLOCK_TYPES = ("adaln_zero", "adaln", "cross_attention", "in_context")
BLOCK_LABELS = {"adaln_zero": "adaLN-Zero", "adaln": "adaLN", "cross_attention": "Cross-Attention",
                "in_context": "In-Context"}

# The miniature model family for digits (16x16 pixels, 1 channel): the paper's S < B < L < XL grow
# depth and width together; so do these. digits-B is the model of configs/digits.json.
DIGITS_FAMILY = {
    "S": dict(depth=2, hidden_size=64, num_heads=2),
    "B": dict(depth=4, hidden_size=128, num_heads=4),
    "L": dict(depth=6, hidden_size=192, num_heads=6),
}
# --budget smoke shrinks everything (8x8 digits) so that a whole study takes seconds.
SMOKE_FAMILY = {"S": dict(depth=1, hidden_size=16, num_heads=2), "B": dict(depth=1, hidden_size=32, num_heads=2),
                "L": dict(depth=2, hidden_size=32, num_heads=2)}
PATCH_SIZES = (2, 4, 8)

TRAIN_PY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train.py")
EXIT_BAD_INPUT = 2
EXIT_SOME_FAILED = 1


@dataclasses.dataclass(frozen=True)
class Budget:
    """How long each member trains and how its quality is measured."""
    steps: int
    eval_every: int
    samples_per_class: int            # digits: samples per class of each evaluation
    eval_sample_steps: str            # sampler of the evaluations (DDIM steps)
    eval_num_samples: int             # latent configs: FID-N
    scaling_sizes: tuple = ("S", "B")
    scaling_patches: tuple = (2, 4, 8)
    digits_sets: tuple = ()           # extra overrides on digits configs
    note: str = ""
    ranks: Optional[int] = None       # ranks per member when --num-gpus is not given (None: the default)


_DIGITS_COMMON = ("train.final_sample=false", "train.plots=false", "train.keep_last=1")
BUDGETS: Dict[str, Budget] = {
    "smoke": Budget(steps=2, eval_every=1, samples_per_class=2, eval_sample_steps="ddim3", eval_num_samples=16,
                    scaling_sizes=("S", "B"), scaling_patches=(2, 4),
                    digits_sets=_DIGITS_COMMON + (
                        "data.image_size=8", "deepspeed.train_batch_size=16",
                        "deepspeed.train_micro_batch_size_per_gpu=16", "train.tensorboard=false",
                        "train.cpu_threads=1", "train.ema_decay=0.5", "model.depth=1", "model.hidden_size=32",
                        "model.num_heads=2"),
                    note="seconds; checks the machinery, measures nothing", ranks=1),
    "small": Budget(steps=300, eval_every=75, samples_per_class=20, eval_sample_steps="ddim25",
                    eval_num_samples=5000, scaling_sizes=("S", "B"), scaling_patches=(2, 4, 8),
                    digits_sets=_DIGITS_COMMON, note="<= 15 minutes per study on 2 CPU cores"),
    "medium": Budget(steps=1000, eval_every=200, samples_per_class=30, eval_sample_steps="ddim25",
                     eval_num_samples=10000, scaling_sizes=("S", "B", "L"), scaling_patches=(2, 4, 8),
                     digits_sets=_DIGITS_COMMON, note="about an hour on 2 CPU cores; minutes on a GPU"),
}


@dataclasses.dataclass
class Member:
    name: str                         # folder name
    label: str                        # legend text
    sets: List[str]                   # the member's own overrides
    info: Dict[str, Any]


class StudyError(ValueError):
    """Bad input to a study: the message says what is valid."""


# ----------------------------------------------------------------------------------------------
# Planning
# ----------------------------------------------------------------------------------------------
def _norm_block(text: str) -> str:
    t = text.strip().lower().replace("-", "_").replace(" ", "_")
    aliases = {"adalnzero": "adaln_zero", "crossattention": "cross_attention", "crossattn": "cross_attention",
               "incontext": "in_context"}
    return aliases.get(t.replace("_", ""), t)


def plan_blocks(blocks: Optional[Sequence[str]] = None) -> List[Member]:
    """One member per conditioning block (default: all four), everything else equal."""
    blocks = list(blocks or BLOCK_TYPES)
    out, seen = [], set()
    for b in blocks:
        bt = _norm_block(b)
        if bt not in BLOCK_TYPES:
            raise StudyError(f"unknown block type {b!r}; valid block types: {', '.join(BLOCK_TYPES)}")
        if bt in seen:
            continue
        seen.add(bt)
        out.append(Member(bt, BLOCK_LABELS[bt], [f"model.block_type={bt}"], {"block_type": bt}))
    return out


def valid_model_names(digits: bool) -> List[str]:
    from fastdit.models.registry import MODEL_NAMES

    names = list(MODEL_NAMES)
    if digits:
        names = [f"digits-{s}/{p}" for s in DIGITS_FAMILY for p in PATCH_SIZES] + names
    return names


def plan_scaling(models: Sequence[str], digits: bool, smoke: bool = False) -> List[Member]:
    """One member per model name: registry names (DiT-S/2 ... DiT-XL/8) or, on digits configs, the
    miniature family digits-{S,B,L}/{2,4,8}."""
    from fastdit.models.registry import MODEL_NAMES, model_config

    out, seen = [], set()
    for name in models:
        name = name.strip()
        m = re.fullmatch(r"digits-([A-Za-z]+)/(\d+)", name)
        if m and digits and m.group(1) in DIGITS_FAMILY and int(m.group(2)) in PATCH_SIZES:
            size, patch = m.group(1), int(m.group(2))
            arch = (SMOKE_FAMILY if smoke else DIGITS_FAMILY)[size]
            sets = [f"model.{k}={v}" for k, v in arch.items()] + [f"model.patch_size={patch}"]
            info = dict(arch, size=size, patch_size=patch, model=name)
        elif name in MODEL_NAMES:
            size, patch = name.split("-")[1].split("/")
            sets = [f"model.name={name}"] + [f"model.{k}=null" for k in ("depth", "hidden_size", "num_heads",
                                                                         "patch_size")]
            info = dict(model_config(name), size=size, patch_size=int(patch), model=name)
        else:
            raise StudyError(f"unknown model {name!r}; valid models: {', '.join(valid_model_names(digits))}")
        if name in seen:
            continue
        seen.add(name)
        out.append(Member(name.replace("/", "-"), name, sets, info))
    return out


def default_scaling_models(budget: Budget, digits: bool) -> List[str]:
    prefix = "digits-" if digits else "DiT-"
    return [f"{prefix}{s}/{p}" for s in budget.scaling_sizes for p in budget.scaling_patches]


def budget_sets(budget: Budget, digits: bool, steps: int, eval_every: int) -> List[str]:
    sets = [f"train.max_steps={steps}", f"train.eval_every={eval_every}", "train.final_eval=true",
            "train.eval_cfg=unguided", f"train.eval_sample_steps={budget.eval_sample_steps}",
            f"train.log_every={max(1, min(eval_every, steps // 10 or 1))}",
            f"train.ckpt_every={eval_every}", "train.progress=false"]
    if digits:
        sets += [f"train.eval_samples_per_class={budget.samples_per_class}",
                 f"train.eval_batch_size={max(1, budget.samples_per_class * 10 // 2)}"]
        sets += list(budget.digits_sets)
    else:
        sets += [f"train.eval_num_samples={budget.eval_num_samples}"]
    return sets


# ----------------------------------------------------------------------------------------------
# Accounting: Gflops and compute
# ----------------------------------------------------------------------------------------------
def model_shape_of(cfg):
    """fastdit.flops.DiTShape of the model a config trains (digits exactly; latents from the config)."""
    from fastdit.flops import DiTShape
    from fastdit.generate.vae import DOWNSAMPLE, LATENT_CHANNELS
    from fastdit.training.trainer import model_kwargs_for

    if cfg.data.kind == "digits":
        in_ch, size, nc = 1, cfg.data.image_size, cfg.model.num_classes or 10
    else:
        in_ch, size = LATENT_CHANNELS, cfg.data.image_size // DOWNSAMPLE
        nc = cfg.model.num_classes or cfg.data.num_classes
        meta = os.path.join(cfg.data.path or "", "meta.json")
        if cfg.data.kind == "latents" and os.path.isfile(meta):
            with open(meta) as f:
                m = json.load(f)
            nc = cfg.model.num_classes or int(m.get("num_classes", nc))
            size = int(m.get("image_size", cfg.data.image_size)) // DOWNSAMPLE
    _, _, full = model_kwargs_for(cfg, size, in_ch, nc)
    return DiTShape(**full)


def global_batch_of(cfg, world: int) -> int:
    ds = cfg.deepspeed
    if "train_batch_size" in ds:
        return int(ds["train_batch_size"])
    return int(ds["train_micro_batch_size_per_gpu"]) * int(ds.get("gradient_accumulation_steps", 1)) * world


# ----------------------------------------------------------------------------------------------
# Running one member
# ----------------------------------------------------------------------------------------------
def launch_command(config: str, sets: Sequence[str], num_gpus: int) -> List[str]:
    """train.py on one rank (no launcher), or through DeepSpeed's launcher on `num_gpus` ranks."""
    tail = [TRAIN_PY, "--config", config, "--resume", "auto"]
    for s in sets:
        tail += ["--set", s]
    if num_gpus <= 1:
        return [sys.executable] + tail
    from fastdit.dist import free_port

    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(num_gpus),
            "--master_port", str(free_port())] + tail


_STEP = re.compile(r"^step (\d+): loss=(\S+)")
_QUALITY = re.compile(r"^(step \d+: )?quality")
_SHOW = re.compile(r"(fastdit\.train: error|Error|quality evaluation failed|stopped:)")


def run_member(cmd: List[str], member_dir: str, prefix: str, total_steps: int,
               log: Callable[[str], None]) -> int:
    """Run one member's training process; its output goes to member_dir/log.txt, progress to `log`."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_SIZE", "LOCAL_WORLD_SIZE"):
        env.pop(k, None)
    t0 = time.time()
    first_step = None
    with open(os.path.join(member_dir, "log.txt"), "a") as logf:
        logf.write(f"# {datetime.datetime.now().isoformat(timespec='seconds')}: {' '.join(cmd)}\n")
        logf.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                bufsize=1)
        for line in proc.stdout:
            logf.write(line)
            text = line.strip()
            m = _STEP.match(text)
            if m:
                step = int(m.group(1))
                now = time.time() - t0
                if first_step is None:
                    first_step = (step, now)
                rate = ""
                if step > first_step[0]:
                    per = (now - first_step[1]) / (step - first_step[0])
                    rate = f", {1 / per:.1f} steps/s, ~{max(0, total_steps - step) * per:.0f}s left"
                log(f"{prefix} step {step}/{total_steps}: loss {m.group(2)}{rate}")
            elif _QUALITY.match(text):
                log(f"{prefix} {text}")
            elif _SHOW.search(text) and "Warning" not in text:
                log(f"{prefix} {text}")
        return proc.wait()


def collect_member(member_dir: str) -> Dict[str, Any]:
    """Quality records, failures and run facts of a member folder (whatever state it is in)."""
    from fastdit.training.metrics import read_metrics
    from fastdit.weights import layout

    recs = read_metrics(os.path.join(member_dir, "metrics.jsonl"))
    evals = [r for r in recs if r.get("quality")]
    errors = [r for r in recs if r.get("quality_error")]
    losses = [r for r in recs if r.get("loss") is not None]
    out = {"evals": evals, "eval_errors": errors, "final_loss": losses[-1]["loss"] if losses else None,
           "last_step": max((r.get("step", 0) for r in recs), default=0)}
    ckroot = os.path.join(member_dir, "checkpoints")
    tag = layout.latest_tag(ckroot) if os.path.isdir(ckroot) else None
    if tag:
        try:
            meta = layout.read_meta(os.path.join(ckroot, tag))
        except (OSError, ValueError):
            meta = None
        if meta:
            out.update(step=meta["step"], global_batch=meta["global_batch"], world_size=meta["world_size"],
                       model_kwargs=meta["model_kwargs"], model=meta["model"], impl=meta["impl"])
    return out


def _read_json(path: str) -> Optional[Dict[str, Any]]:
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _write_json(path: str, obj: Any) -> None:
    from fastdit.atomic import write_json

    write_json(path, obj)


# ----------------------------------------------------------------------------------------------
# A study
# ----------------------------------------------------------------------------------------------
def run_study(study: str, config: str, members: List[Member], budget: Budget, budget_name: str, out_dir: str,
              num_gpus: int = 1, user_sets: Sequence[str] = (), steps: Optional[int] = None,
              eval_every: Optional[int] = None, only: Optional[Sequence[str]] = None, plot: bool = True,
              log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Run (or resume) every member of a study and write results.json + the figure. Raises StudyError
    on bad input before anything is trained."""
    from fastdit.flops import count_params, forward_macs
    from fastdit.training.config import ConfigError, load_config
    from fastdit.training.quality import check_files, quality_mode

    steps = steps or budget.steps
    eval_every = eval_every or budget.eval_every
    if steps < 1:
        raise StudyError(f"--steps must be >= 1, got {steps}")
    if eval_every > steps:
        raise StudyError(f"a budget of {steps} steps is too small to evaluate along the way every {eval_every} "
                         f"steps: raise --steps or lower --eval-every (at most {steps})")
    if only:
        names = {m.name for m in members} | {m.label for m in members}
        bad = [o for o in only if o not in names]
        if bad:
            raise StudyError(f"--member {bad[0]!r} is not in this study; its members: "
                             f"{', '.join(m.label for m in members)}")
    try:
        base = load_config(config, list(user_sets))
    except ConfigError as e:
        raise StudyError(str(e)) from None
    digits = base.data.kind == "digits"
    common = budget_sets(budget, digits, steps, eval_every)
    os.makedirs(out_dir, exist_ok=True)

    # ---- check every member before training any ------------------------------------------------
    plans = []
    for m in members:
        mdir = os.path.join(out_dir, m.name)
        sets = common + m.sets + list(user_sets) + [f"train.output_dir={mdir}"]
        try:
            cfg = load_config(config, sets)
        except ConfigError as e:
            raise StudyError(f"member {m.label}: {e}") from None
        problem = check_files(cfg)
        if problem:
            raise StudyError(f"member {m.label}: {problem}")
        if quality_mode(cfg) is None:
            raise StudyError(f"{config} is a latent config: the study needs FID along the way; pass --set "
                             f"train.eval_fid_ref=REF.npz --set train.eval_inception_weights=pt_inception.pth")
        try:
            shape = model_shape_of(cfg)
        except Exception as e:  # noqa: BLE001 - e.g. a patch size that does not divide the input
            raise StudyError(f"member {m.label}: {e}") from None
        spec = {"study": study, "config": os.path.abspath(config), "sets": sets, "num_gpus": num_gpus}
        old = _read_json(os.path.join(mdir, "spec.json"))
        if old is not None and {k: old.get(k) for k in spec} != spec:
            raise StudyError(f"{mdir} holds a member trained with other settings ({_spec_diff(old, spec)}); "
                             f"use another --out, or the same settings to resume")
        plans.append(dict(member=m, dir=mdir, sets=sets, spec=spec, gflops=forward_macs(shape) / 1e9,
                          params=count_params(shape), global_batch=global_batch_of(cfg, num_gpus),
                          cfg=cfg))

    results = _read_json(os.path.join(out_dir, "results.json")) or {}
    results.update(study=study, config=config, budget=dict(dataclasses.asdict(budget), name=budget_name,
                                                          steps=steps, eval_every=eval_every),
                   metric="fd" if digits else "fid", num_gpus=num_gpus, command=sys.argv,
                   quality_cfg_scale=1.0)
    by_name = {r["name"]: r for r in results.get("members", [])}
    n = len(plans)
    log(f"[{study}] {n} member(s): {', '.join(p['member'].label for p in plans)} | {config} | budget "
        f"'{budget_name}': {steps} steps (global batch {plans[0]['global_batch']}), quality every {eval_every} "
        f"steps, {num_gpus} rank(s) per member | {out_dir}")
    t_study = time.time()
    failed = 0
    for i, p in enumerate(plans, 1):
        m, mdir = p["member"], p["dir"]
        prefix = f"[{study} {i}/{n} {m.label}]"
        os.makedirs(mdir, exist_ok=True)
        prev = _read_json(os.path.join(mdir, "member.json"))
        selected = not only or m.name in only or m.label in only
        if prev and prev.get("status") == "done":
            log(f"{prefix} finished before ({prev.get('wall_s', 0):.0f}s): not retrained")
            by_name[m.name] = prev
            continue
        if not selected:
            if prev:
                by_name[m.name] = prev
            continue
        _write_json(os.path.join(mdir, "spec.json"), p["spec"])
        sets = list(p["sets"])
        fail_hook = os.environ.get("FASTDIT_TEST_FAIL_MEMBER")
        if fail_hook and fail_hook in (m.name, m.label):
            sets.append("train.max_steps=-1")  # test hook: this member's train.py exits with an error
        log(f"{prefix} training {steps} steps ({p['params'] / 1e6:.2f}M params, {p['gflops']:.3g} Gflops, "
            f"quality every {eval_every} steps) -> {mdir}")
        t0 = time.time()
        try:
            rc = run_member(launch_command(config, sets, num_gpus), mdir, prefix, steps, log)
            err = None
        except Exception as e:  # noqa: BLE001 - a member that cannot even start is a failed member
            rc, err = -1, f"{type(e).__name__}: {e}"
        wall = time.time() - t0 + (prev or {}).get("wall_s", 0.0)
        facts = collect_member(mdir)
        rec = dict(name=m.name, label=m.label, info=m.info, status="done" if rc == 0 else "failed", returncode=rc,
                   wall_s=wall, params=p["params"], gflops=p["gflops"], **facts)
        rec.setdefault("global_batch", p["global_batch"])
        if rc != 0:
            failed += 1
            rec["error"] = err or _tail(os.path.join(mdir, "log.txt"))
            log(f"{prefix} FAILED (exit {rc}); the study goes on. End of its log:\n{_indent(rec['error'])}")
        else:
            last = [e for e in rec["evals"] if e.get("cfg_scale") == 1.0]
            q = _describe_eval(last[-1]) if last else "no quality record"
            log(f"{prefix} done in {time.time() - t0:.0f}s: {q}")
        _add_compute(rec)
        _write_json(os.path.join(mdir, "member.json"), rec)
        by_name[m.name] = rec
        results["members"] = [by_name[q["member"].name] for q in plans if q["member"].name in by_name]
        _write_json(os.path.join(out_dir, "results.json"), results)
    results["members"] = [by_name[q["member"].name] for q in plans if q["member"].name in by_name]
    for rec in results["members"]:
        _add_compute(rec)
    results["wall_s_this_call"] = time.time() - t_study
    _write_json(os.path.join(out_dir, "results.json"), results)
    if plot:
        from fastdit.experiments.figures import plot_study
        try:
            path = plot_study(results, os.path.join(out_dir, f"{study}.png"))
            results["figure"] = path
            log(f"[{study}] figure: {path}")
        except Exception as e:  # noqa: BLE001
            log(f"[{study}] no figure: {type(e).__name__}: {e}")
    log(f"[{study}] results: {os.path.join(out_dir, 'results.json')}")
    results["failed"] = failed
    return results


def _spec_diff(old: Dict, new: Dict) -> str:
    parts = []
    for k in new:
        if old.get(k) != new[k]:
            if k == "sets":
                a, b = set(old.get(k) or []), set(new[k])
                parts.append(f"sets: folder has {sorted(a - b)}, now {sorted(b - a)}")
            else:
                parts.append(f"{k}: folder {old.get(k)!r} vs now {new[k]!r}")
    return "; ".join(parts)


def _add_compute(rec: Dict[str, Any]) -> None:
    """images seen and training compute (the issue's convention: Gflops x 3 x images) per evaluation."""
    gb, gf = rec.get("global_batch"), rec.get("gflops")
    for e in rec.get("evals", []):
        e["images_seen"] = e["step"] * gb
        e["train_gflops"] = gf * 3 * e["images_seen"]


def _describe_eval(e: Dict[str, Any]) -> str:
    if e.get("quality") == "digits":
        return (f"step {e['step']}: accuracy {100 * e['accuracy']:.1f}%, digits FD {e['fd']:.2f} "
                f"(real-vs-real {e['fd_real']:.2f}), CFG {e['cfg_scale']:g}")
    return f"step {e['step']}: FID-{e['num_samples']} {e['fid']:.2f}, CFG {e['cfg_scale']:g}"


def _tail(path: str, n: int = 15) -> str:
    try:
        with open(path) as f:
            lines = [ln.rstrip() for ln in f if "Warning" not in ln and ln.strip()]
        return "\n".join(lines[-n:])
    except OSError as e:
        return str(e)


def _indent(text: str) -> str:
    return "\n".join("    " + ln for ln in text.splitlines())


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
def _split_list(values: Optional[Sequence[str]]) -> Optional[List[str]]:
    if not values:
        return None
    return [v for text in values for v in text.split(",") if v.strip()]


def _default_gpus() -> int:
    """Every CUDA device; on CPU two ranks (as `make digits`: on 2 cores, two 1-thread ranks over gloo
    trained the digits DiT 3 steps/s, one 2-thread rank 0.5 steps/s, measured under load)."""
    try:
        import torch
        if torch.cuda.is_available():
            return torch.cuda.device_count()
    except Exception:  # noqa: BLE001
        pass
    return 2 if (os.cpu_count() or 1) >= 2 else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastdit.experiments",
                                description=(__import__("fastdit.experiments").experiments.__doc__),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="study", required=True)

    def common(sp):
        sp.add_argument("--config", default="configs/digits.json", help="base config (default: the digits default)")
        sp.add_argument("--budget", choices=list(BUDGETS), default="small",
                        help="; ".join(f"{k}: {b.steps} steps, quality every {b.eval_every} ({b.note})"
                                       for k, b in BUDGETS.items()))
        sp.add_argument("--smoke", action="store_true", help="same as --budget smoke")
        sp.add_argument("--steps", type=int, default=None, help="override the budget's steps per member")
        sp.add_argument("--eval-every", type=int, default=None, help="override the budget's evaluation interval")
        sp.add_argument("--out", default=None, help="study folder (default runs/experiments/<study>-<budget>)")
        sp.add_argument("--num-gpus", type=int, default=None,
                        help="ranks per member (default: the CUDA device count, else 2 CPU ranks); >1 runs "
                             "train.py through DeepSpeed's launcher, 1 runs it directly")
        sp.add_argument("--member", action="append", default=None,
                        help="run only this member (repeatable; finished ones are always kept)")
        sp.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config value of every member (repeatable)")
        sp.add_argument("--no-plot", action="store_true")

    sb = sub.add_parser("blocks", help="the four conditioning blocks at the same budget and seed")
    common(sb)
    sb.add_argument("--blocks", action="append", default=None,
                    help=f"comma-separated subset of {', '.join(BLOCK_TYPES)} (default: all four)")
    ss = sub.add_parser("scaling", help="model size x patch size at the same budget in steps")
    common(ss)
    ss.add_argument("--models", action="append", default=None,
                    help="comma-separated model names: digits-{S,B,L}/{2,4,8} on digits configs, registry names "
                         "(DiT-S/2 ... DiT-XL/8) on any config (default: the budget's grid)")
    ss.add_argument("--sizes", default=None, help="comma-separated sizes (S,B,L / S,B,L,XL); with --patch-sizes")
    ss.add_argument("--patch-sizes", default=None, help="comma-separated patch sizes (2,4,8)")
    sp = sub.add_parser("plot", help="redraw the figure of a study folder from its results.json")
    sp.add_argument("folder")
    args = p.parse_args(argv)

    if args.study == "plot":
        from fastdit.experiments.figures import plot_study
        res = _read_json(os.path.join(args.folder, "results.json"))
        if res is None:
            p.error(f"{args.folder} has no results.json")
        print(plot_study(res, os.path.join(args.folder, f"{res['study']}.png")))
        return 0

    if not os.path.isfile(args.config):  # e.g. configs/digits.json from outside the repository root
        beside = os.path.join(os.path.dirname(os.path.dirname(TRAIN_PY)), args.config)
        if os.path.isfile(beside):
            args.config = beside
    budget_name = "smoke" if args.smoke else args.budget
    budget = BUDGETS[budget_name]
    out = args.out or os.path.join("runs", "experiments", f"{args.study}-{budget_name}")
    num_gpus = args.num_gpus or budget.ranks or _default_gpus()
    try:
        from fastdit.training.config import ConfigError, load_config
        try:
            digits = load_config(args.config, args.sets).data.kind == "digits"
        except ConfigError as e:
            raise StudyError(str(e)) from None
        if args.study == "blocks":
            members = plan_blocks(_split_list(args.blocks))
        else:
            models = _split_list(args.models)
            if models and (args.sizes or args.patch_sizes):
                raise StudyError("give --models, or --sizes with --patch-sizes, not both")
            if args.sizes or args.patch_sizes:
                sizes = _split_list([args.sizes]) if args.sizes else list(budget.scaling_sizes)
                patches = _split_list([args.patch_sizes]) if args.patch_sizes else list(budget.scaling_patches)
                prefix = "digits-" if digits else "DiT-"
                models = [f"{prefix}{s}/{q}" for s in sizes for q in patches]
            members = plan_scaling(models or default_scaling_models(budget, digits), digits,
                                   smoke=budget_name == "smoke")
        res = run_study(args.study, args.config, members, budget, budget_name, out, num_gpus, args.sets,
                        args.steps, args.eval_every, _split_list(args.member), plot=not args.no_plot)
    except StudyError as e:
        print(f"fastdit.experiments: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    bad = [m["label"] for m in res["members"] if m.get("status") != "done"]
    if bad:
        print(f"fastdit.experiments: {len(bad)} member(s) failed: {', '.join(bad)} (see their log.txt; rerun the "
              f"same command to retry them, finished members are kept)", file=sys.stderr)
        return EXIT_SOME_FAILED
    return 0
