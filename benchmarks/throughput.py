"""Training throughput of DiT, side by side in one run: fastdit vs the eager reference vs torch.compile.

Every row times the same full training step on synthetic latents, the step fastdit/train.py runs:

    t ~ U{0..999}, y ~ U{0..999}; loss = create_diffusion("").training_losses(model, x, t, dict(y=y))
    ["loss"].mean()  (MSE + VB, the official objective, label dropout 0.1 on); loss.backward();
    AdamW step (lr 1e-4, weight decay 0, as the official DiT); zero the gradients.

Rows (each in a fresh model built from the same seed; the previous row is freed first):

    eager              fastdit.models.reference.DiT_models[name]: the eager oracle (math attention, as the
                       official DiT code with timm's non-fused Attention)
    eager/sdpa         the reference with its attention through F.scaled_dot_product_attention (as the
                       official code with timm >= 0.9, whose Attention uses SDPA): the eager baseline a
                       user of the official repository gets today
    compile            the reference under torch.compile(model, mode=--compile-mode)
    fused              fastdit.models.DiT_models[name](kernels=..., attention=<what "auto" resolves to on
                       this device and dtype, passed explicitly>)
    fused+compile      the fast model under torch.compile
    fused/<backend>    the fast model with attention=<backend>, one row per backend of fastdit.models.attention
                       (rows of backends that cannot run here are recorded as "unavailable", with
                       the reason fastdit.models.attention.backend_status() gives)
    fused+<switches>   the fast model, and deepspeed+<switches> the real step, with speed switches on
    (and /triton)      (see row_specs: mlp folds / epilogues, bias_fold, the kernels' environment switches, the fused optimizer
                       step); the two all-switches rows ending in /triton also run attention "triton";
                       fused+direct-dispatch: the fused ops without the torch.library dispatch (less host work
                       per call: what decides a step whose kernels are shorter than their launches, e.g. the
                       configs' micro-batch 32); fused+graphs / deepspeed+graphs: the model's forward and
                       backward replayed from CUDA graphs (fastdit.training.graphed; train.cuda_graph for the
                       deepspeed row), no host work per kernel; on CPU the graphs are emulated (no speed-up);
                       fused+candidates / deepspeed+candidates: every unmeasured switch predicted to win,
                       together (CANDIDATE_ENV: graphs, mlp fold with the column sums once, the LN row sums
                       paired; the engine's row also with ZeRO's overlap_comm off and the deferred check);
                       deepspeed+deferred-check: train.fused_step_deferred_check (the update queued before
                       the host reads the non-finite check)
    deepspeed          the real training step: fastdit.training.trainer's engine built from --config (default
                       configs/xl2_zero2.json) exactly as fastdit/train.py builds it (its DeepSpeed section:
                       ZeRO stage, optimizer, gradient clipping; the model's impl/checkpointing), on one
                       rank, micro-batch = global batch = --batch, no gradient accumulation, and
                       Trainer.train_step() timed: forward, engine.backward, engine.step, the fp32 EMA
                       update (with the config's train.fused_optimizer_step, on in the shipped bf16
                       ZeRO-1/2 configs since 2026-11-27: AdamW, the bf16 copy and the EMA in one pass).
                       The model is --model at --image-size, kernels as the fast rows, attention
                       "auto" resolved as in `fused`. Its ZeRO stage, optimizer and precision are recorded
                       in the row (`deepspeed`). torch.distributed is initialised once for one rank (gloo
                       on CPU, NCCL on CUDA) when no launcher did; the engine is destroyed after the row.
    deepspeed/ds-step  the same with train.fused_optimizer_step off: DeepSpeed's own optimizer step and the
                       separate EMA update (the `deepspeed` row before 2026-11-27)

Precision (the same for every row; --precision):
    bf16      (default) parameters, activations and gradients in bf16, AdamW on fp32 master copies of the
              weights (what DeepSpeed's bf16 mode does); latents enter as fp32 and are cast to bf16 at the
              model input, the output is cast back to fp32 for the loss (as fastdit/train.py does).
    autocast  fp32 parameters and AdamW, forward under torch.autocast(bf16).
    fp32      everything fp32 (TF32 matmuls allowed on CUDA, as the official DiT train.py).
    The deepspeed row maps bf16 to the config's `bf16.enabled: true` (DeepSpeed's bf16 optimizer: fp32
    masters) and fp32 to bf16 and fp16 off; autocast has no DeepSpeed counterpart there, so that row is
    recorded as unavailable. The learning rate of that row is the config's (--lr does not apply).

Timing: --warmup steps first (not timed; they include torch.compile's compilation), one untimed step,
then --repeats intervals of --steps steps each, back to back: CUDA events between them and one
synchronisation after the last (benchmarks.common.MarkTimer; perf_counter on CPU). ms/step = interval/steps;
reported: median, min and max over the repeats. img/s = batch / (s/step). MFU = training FLOPs per
image (fastdit.flops: 2 FLOPs per MAC x 3 x forward MACs) x img/s / peak bf16 FLOP/s of the GPU
(fastdit.flops.PEAK_FLOPS, or --peak-tflops); n/a on CPU. Peak memory:
torch.cuda.max_memory_allocated from the built model on (weights, optimizer state, warm-up and timed
steps), reset for every row. A row that raises (OOM, missing backend,
compile failure, non-finite loss) is recorded with its error and the run goes on.

    python benchmarks/throughput.py --json benchmarks/results/throughput_h200.json     # on a GPU
    python benchmarks/throughput.py --batch 128 --rows eager,fused --precision autocast
    python benchmarks/throughput.py --smoke --json /tmp/tp.json                         # tiny CPU run
    nsys profile -t cuda,nvtx -o tp python benchmarks/throughput.py --rows fused --repeats 1 --nvtx

--smoke: a tiny custom DiT (depth 2, hidden 64, 4 heads, patch 2, 8x8x4 latents), batch 2, 1 warm-up
step, 2 timed steps, fp32, on CPU; fast rows use kernels="triton" when TRITON_INTERPRET=1 (the Triton
interpreter) and kernels="torch" otherwise; compile rows use torch.compile(backend="aot_eager") (Dynamo +
AOTAutograd without Inductor code generation) to stay quick; the deepspeed row runs the config's ZeRO
stage on one CPU rank over gloo. It exercises the harness; its numbers say nothing about GPU speed.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import itertools
import math
import os
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from benchmarks.common import MarkTimer, env_vars, environment, summarize, synchronize, write_json  # noqa: E402
from fastdit.dist import nvtx_range  # noqa: E402
from fastdit.flops import peak_flops  # noqa: E402
from fastdit.generate.vae import DOWNSAMPLE as VAE_DOWNSAMPLE  # noqa: E402
from fastdit.generate.vae import LATENT_CHANNELS  # noqa: E402
from fastdit.models.attention import BACKENDS  # noqa: E402
from fastdit.training import graphed  # noqa: E402

SCRIPT = "benchmarks/throughput.py"  # how the command line is recorded when run() is called in-process
ATTENTION_BACKENDS = tuple(b for b in BACKENDS if b != "auto")
BASE_ROWS = ("eager", "eager/sdpa", "compile", "fused", "fused+compile", "fused+mlp-recompute", "fused+mlp-fold",
             "fused+mlp-recompute-fold", "fused+mlp-epilogue", "fused+mlp-recompute-epilogue", "fused+bias-fold",
             "fused+all-switches", "fused+direct-dispatch", "deepspeed", "deepspeed+compile",
             "deepspeed/ds-step", "deepspeed+fused-step", "deepspeed+all-switches", "fused+all-switches/triton",
             "deepspeed+all-switches/triton", "fused+graphs", "deepspeed+graphs", "fused/triton-swept",
             "fused+mlp-fold/sums-once", "fused+bias-fold/sums-once", "deepspeed+bias-fold/sums-once",
             "deepspeed/no-overlap", "deepspeed+deferred-check", "fused+candidates", "deepspeed+candidates")
# The kernels' own switches (environment variables read at each call, defaults unchanged until measured), set
# for the rows that turn every switch on: the row ops' partial sums in one Triton pass, patch_embed's backward
# from library GEMMs, the fused ops without the torch.library dispatch in eager mode, and (since 2026-11-27
# 23:00) the column-sum kernels reducing once after their loop.
COLUMN_SUMS_ONCE = (("FASTDIT_COLUMN_SUMS", "once"),)
KERNEL_SWITCHES = (("FASTDIT_TILE_SUMS", "triton"), ("FASTDIT_PATCH_EMBED_BWD", "gemm"),
                   ("FASTDIT_KERNEL_DISPATCH", "direct")) + COLUMN_SUMS_ONCE
# The rows `fused+candidates` / `deepspeed+candidates` (since 2026-11-28): every unmeasured switch whose written
# prediction (benchmarks/predictions.json) is a gain at its central value, together, so that one GPU run shows
# where the defaults would land if each of them holds: the model's forward and backward from CUDA graphs,
# mlp="fold" with the column sums reduced once, the LN backward's row sums paired, and (engine only) ZeRO's
# overlap_comm off and the fused step's deferred non-finite check. Left out: bias_fold (central +2 ms), the
# Triton attention (a wrong output on one shape is not yet explained), and the switches measured slower.
CANDIDATE_ENV = COLUMN_SUMS_ONCE + (("FASTDIT_LN_ROW_SUMS", "paired"),)
CANDIDATE_SETS = ("deepspeed.zero_optimization.overlap_comm=false", "train.fused_step_deferred_check=true")
ALL_ROWS = BASE_ROWS + tuple(f"fused/{b}" for b in ATTENTION_BACKENDS)
PRECISIONS = ("bf16", "autocast", "fp32")
NUM_CLASSES = 1000
# --smoke: a tiny custom DiT (constructor kwargs of fastdit.models.reference.DiT)
SMOKE_ARCH = dict(input_size=8, patch_size=2, in_channels=LATENT_CHANNELS, hidden_size=64, depth=2,
                  num_heads=4)
DEFAULTS = dict(batch=256, warmup=3, steps=5, repeats=5, precision="bf16")
SMOKE_DEFAULTS = dict(batch=2, warmup=1, steps=1, repeats=2, precision="fp32")
ERROR_CHARS = 2000
DEFAULT_CONFIG = os.path.join(ROOT, "configs", "xl2_zero2.json")  # the deepspeed row's engine


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="DiT training throughput: eager reference vs torch.compile vs fastdit (one run)")
    ap.add_argument("--model", default="DiT-XL/2",
                    help="registry name (fastdit.models.DiT_models; default DiT-XL/2)")
    ap.add_argument("--image-size", type=int, default=256,
                    help="image resolution (default 256); the model trains on latents of image_size/8, "
                         "4 channels")
    ap.add_argument("--batch", type=int, default=None, help=f"images per step (default {DEFAULTS['batch']}; "
                    f"smoke {SMOKE_DEFAULTS['batch']})")
    ap.add_argument("--warmup", type=int, default=None,
                    help=f"untimed steps per row, incl. compilation (default {DEFAULTS['warmup']})")
    ap.add_argument("--steps", type=int, default=None,
                    help=f"steps per timed repeat (default {DEFAULTS['steps']})")
    ap.add_argument("--repeats", type=int, default=None,
                    help=f"timed repeats per row; median/min/max over them (default {DEFAULTS['repeats']})")
    ap.add_argument("--precision", choices=PRECISIONS, default=None,
                    help="bf16 (bf16 weights + fp32 master AdamW), autocast, or fp32 "
                         "(default bf16; smoke fp32)")
    ap.add_argument("--rows", default=",".join(ALL_ROWS),
                    help=f"comma-separated rows to run, in this order; known: {','.join(ALL_ROWS)}")
    ap.add_argument("--kernels", choices=("auto", "triton", "torch"), default=None,
                    help="kernels= of the fast rows (default: triton on CUDA or under TRITON_INTERPRET=1, "
                         "else torch)")
    ap.add_argument("--compile-mode", default="default",
                    help="torch.compile mode of the compiled rows (inductor only; default 'default'), e.g. "
                         "max-autotune-no-cudagraphs")
    ap.add_argument("--compile-backend", default=None,
                    help="torch.compile backend (default inductor; smoke aot_eager)")
    ap.add_argument("--config", default=DEFAULT_CONFIG, metavar="PATH",
                    help="training config of the deepspeed row: its deepspeed section (ZeRO stage, "
                         "optimizer, ...) and model options; batch, model and image size come from this "
                         "command line (default configs/xl2_zero2.json)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override a value of --config for the deepspeed row (repeatable, as train.py's --set), "
                         "e.g. --set train.fused_grad_checks=true; batch, model and image size stay this "
                         "command line's")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="peak dense bf16 TFLOP/s for MFU (default: looked up from the GPU name)")
    ap.add_argument("--lr", type=float, default=1e-4,
                    help="AdamW learning rate (default 1e-4; weight decay 0)")
    ap.add_argument("--seed", type=int, default=0, help="model init and data seed (default 0)")
    ap.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                    help="auto: CUDA if present (smoke: CPU). A full-size run on CPU needs --device cpu")
    ap.add_argument("--nvtx", action="store_true",
                    help="nvtx ranges for nsys: one per row and per step, and the fast model's "
                         "per-part ranges")
    ap.add_argument("--json", default=None, metavar="PATH",
                    help="write config, environment and all rows here (rewritten after every row)")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny model, batch 2, 2 timed steps, fp32, on CPU: checks the harness only")
    args = ap.parse_args(argv)
    args.argv = None if argv is None else list(argv)

    preset = SMOKE_DEFAULTS if args.smoke else DEFAULTS
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.compile_backend is None:
        args.compile_backend = "aot_eager" if args.smoke else "inductor"

    for key, low in (("batch", 1), ("warmup", 1), ("steps", 1), ("repeats", 1)):
        if getattr(args, key) < low:
            ap.error(f"--{key} must be >= {low}, got {getattr(args, key)}"
                     + (" (the first step compiles; it must not be timed)" if key == "warmup" else ""))
    if args.peak_tflops is not None and not (args.peak_tflops > 0 and math.isfinite(args.peak_tflops)):
        ap.error(f"--peak-tflops must be a positive number, got {args.peak_tflops}")
    if args.lr <= 0:
        ap.error(f"--lr must be positive, got {args.lr}")
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ALL_ROWS]
    if unknown or not rows:
        ap.error(f"unknown row(s) {unknown or rows!r} in --rows; known rows: {', '.join(ALL_ROWS)}")
    if len(set(rows)) != len(rows):
        ap.error(f"--rows lists a row twice: {args.rows}")
    args.rows = rows

    if not args.smoke:
        from fastdit.models.registry import MODEL_NAMES, model_config
        if args.model not in MODEL_NAMES:
            ap.error(f"unknown --model {args.model!r}; choose one of {', '.join(MODEL_NAMES)}")
        if args.image_size <= 0 or args.image_size % VAE_DOWNSAMPLE:
            ap.error(f"--image-size must be a positive multiple of {VAE_DOWNSAMPLE}, got {args.image_size}")
        p = model_config(args.model)["patch_size"]
        if (args.image_size // VAE_DOWNSAMPLE) % p:
            ap.error(f"latent size {args.image_size // VAE_DOWNSAMPLE} is not divisible by the patch "
                     f"size {p} of {args.model}")
    if args.overrides and "deepspeed" not in rows:
        ap.error("--set overrides the deepspeed row's config; add deepspeed to --rows")
    if "deepspeed" in rows:
        from fastdit.training.config import ConfigError
        try:
            deepspeed_row_config(args)
        except ConfigError as e:
            ap.error(f"--config (deepspeed row): {e}")
    return args


def resolve_device(args) -> torch.device:
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is visible")
        return torch.device("cuda")
    if args.device == "cpu" or args.smoke:  # smoke runs on CPU unless --device cuda asks otherwise
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    raise SystemExit("no CUDA device: run `python benchmarks/throughput.py --smoke` for the CPU check of the "
                     "harness, or pass --device cpu to time the full-size model on CPU (very slow)")


def default_kernels(device: torch.device) -> str:
    if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return "triton"
    return "torch"


# ----------------------------------------------------------------------------------------------
# What is run
# ----------------------------------------------------------------------------------------------
@dataclass
class RowSpec:
    """One row: which model, whether compiled, which attention backend; `unavailable` = skip reason."""
    name: str
    impl: str                       # "reference" | "fast" | "deepspeed" (the training engine's step)
    compile: bool
    attention: Optional[str] = None  # "auto" or a backend name; reference: None = its own math attention
    unavailable: Optional[str] = None
    mlp: str = "plain"               # the fast model's mlp= option (fastdit.models.mlp)
    fused_step: Optional[bool] = None  # deepspeed rows: train.fused_optimizer_step (None: --config's)
    bias_fold: bool = False          # the fast model's bias_fold= option (fastdit.models.dit)
    env: Tuple[Tuple[str, str], ...] = ()   # environment variables set while the row runs (KERNEL_SWITCHES)
    graphs: bool = False             # forward + backward replayed from CUDA graphs (fastdit.training.graphed)
    sets: Tuple[str, ...] = ()       # deepspeed rows: config overrides after --set's (SECTION.KEY=VALUE)


def row_specs(names: List[str]) -> List[RowSpec]:
    """RowSpecs for row names (see ALL_ROWS); attention backends that cannot run here are marked
    unavailable, with the probe's reason (not installed, no CUDA, or a failed test call)."""
    from fastdit.models import attention as attn
    status = attn.backend_status()
    specs = []
    for name in names:
        if name == "eager":
            specs.append(RowSpec(name, "reference", False))
        elif name == "eager/sdpa":
            specs.append(RowSpec(name, "reference", False, "sdpa"))
        elif name == "compile":
            specs.append(RowSpec(name, "reference", True))
        elif name == "fused":
            specs.append(RowSpec(name, "fast", False, "auto"))
        elif name == "fused+compile":
            specs.append(RowSpec(name, "fast", True, "auto"))
        elif name == "fused+mlp-recompute":  # GELU recomputed in backward: one 4D-wide activation less
            specs.append(RowSpec(name, "fast", False, "auto", mlp="recompute"))
        elif name == "fused+mlp-fold":  # GELU backward + fc1's bias gradient in one pass (kernels/gelu.py)
            specs.append(RowSpec(name, "fast", False, "auto", mlp="fold"))
        elif name == "fused+mlp-recompute-fold":  # both: GELU recomputed by the same pass
            specs.append(RowSpec(name, "fast", False, "auto", mlp="recompute-fold"))
        elif name == "fused+mlp-epilogue":  # GELU in the GEMMs' epilogues (kernels/gemm_gelu.py, Triton GEMMs)
            specs.append(RowSpec(name, "fast", False, "auto", mlp="epilogue"))
        elif name == "fused+mlp-recompute-epilogue":  # the same, GELU recomputed by the backward GEMM's epilogue
            specs.append(RowSpec(name, "fast", False, "auto", mlp="recompute-epilogue"))
        elif name == "fused+bias-fold":  # every linear's bias gradient from a kernel already reading its grad
            specs.append(RowSpec(name, "fast", False, "auto", mlp="fold", bias_fold=True))
        elif name == "fused+all-switches":  # the harness's step with every model and kernel speed switch on
            specs.append(RowSpec(name, "fast", False, "auto", mlp="fold", bias_fold=True, env=KERNEL_SWITCHES))
        elif name == "fused+direct-dispatch":  # the fused ops as plain autograd.Functions: less host work per call
            specs.append(RowSpec(name, "fast", False, "auto", env=(("FASTDIT_KERNEL_DISPATCH", "direct"),)))
        elif name == "fused+graphs":  # the model's forward and backward replayed from CUDA graphs
            specs.append(RowSpec(name, "fast", False, "auto", graphs=True))
        elif name == "deepspeed+graphs":  # train.cuda_graph: the same inside the engine's step
            specs.append(RowSpec(name, "deepspeed", False, "auto", graphs=True))
        elif name == "deepspeed":
            specs.append(RowSpec(name, "deepspeed", False, "auto"))
        elif name == "deepspeed+compile":  # train.compile: the engine's model under engine.compile()
            specs.append(RowSpec(name, "deepspeed", True, "auto"))
        elif name == "deepspeed/no-overlap":  # ZeRO's overlap_comm off: on one GPU nothing to overlap, and
            # with it DeepSpeed synchronises the device at the end of every backward (its ipg epilogue)
            specs.append(RowSpec(name, "deepspeed", False, "auto",
                                 sets=("deepspeed.zero_optimization.overlap_comm=false",)))
        elif name == "deepspeed+deferred-check":  # the fused step queues its update before the host reads the
            # gradients' non-finite check (the kernel applies it on the device): no idle GPU between the two
            specs.append(RowSpec(name, "deepspeed", False, "auto", sets=("train.fused_step_deferred_check=true",)))
        elif name == "deepspeed/ds-step":  # DeepSpeed's own optimizer step and the separate EMA update
            specs.append(RowSpec(name, "deepspeed", False, "auto", fused_step=False))
        elif name == "deepspeed+fused-step":  # train.fused_optimizer_step: AdamW + bf16 copy + EMA in one pass
            specs.append(RowSpec(name, "deepspeed", False, "auto", fused_step=True))
        elif name == "deepspeed+all-switches":  # the loop with every speed switch on
            specs.append(RowSpec(name, "deepspeed", False, "auto", fused_step=True, mlp="fold", bias_fold=True,
                                 env=KERNEL_SWITCHES))
        elif name in ("fused+all-switches/triton", "deepspeed+all-switches/triton"):
            # the all-switches rows with fastdit's Triton attention (its kernels also give the qkv bias gradient)
            base = row_specs([name.split("/")[0]])[0]
            ok, reason = status["triton"]
            specs.append(dataclasses.replace(base, name=name, attention="triton",
                                             unavailable=None if ok else f"attention backend 'triton' cannot run "
                                                                         f"here: {reason}"))
        elif name in ("fused+mlp-fold/sums-once", "fused+bias-fold/sums-once"):
            # the same rows with the column-sum kernels (the GELU backward; the qkv stack) reducing once
            specs.append(dataclasses.replace(row_specs([name.split("/")[0]])[0], name=name, env=COLUMN_SUMS_ONCE))
        elif name == "deepspeed+bias-fold/sums-once":  # the same folds in the engine's step (the shipped loop)
            specs.append(RowSpec(name, "deepspeed", False, "auto", mlp="fold", bias_fold=True, env=COLUMN_SUMS_ONCE))
        elif name == "fused+candidates":   # every switch predicted to win (CANDIDATE_ENV), together
            specs.append(RowSpec(name, "fast", False, "auto", mlp="fold", env=CANDIDATE_ENV, graphs=True))
        elif name == "deepspeed+candidates":   # the same in the engine's step, with overlap_comm off
            specs.append(RowSpec(name, "deepspeed", False, "auto", mlp="fold", env=CANDIDATE_ENV, graphs=True,
                                 sets=CANDIDATE_SETS))
        elif name == "fused/triton-swept":  # fastdit's attention at the H100 sweep's fastest tilings
            specs.append(dataclasses.replace(row_specs(["fused/triton"])[0], name=name,
                                             env=(("FASTDIT_ATTENTION_TILING", "swept"),)))
        elif name.startswith("fused/"):
            backend = name.split("/", 1)[1]
            ok, reason = status.get(backend, (False, "unknown attention backend"))
            why = None if ok else f"attention backend {backend!r} cannot run here: {reason}"
            specs.append(RowSpec(name, "fast", False, backend, why))
        else:
            raise ValueError(f"unknown row {name!r}; known rows: {', '.join(ALL_ROWS)}")
    return specs


def architecture(args) -> Dict[str, Any]:
    """Constructor kwargs of the benchmarked architecture (shared by the reference and the fast model)."""
    if args.smoke:
        return dict(SMOKE_ARCH)
    from fastdit.models.registry import model_config
    return dict(model_config(args.model), input_size=args.image_size // VAE_DOWNSAMPLE,
                in_channels=LATENT_CHANNELS)


def flops_per_image(args) -> float:
    """Training FLOPs of one image (fastdit.flops convention: 2 x MACs x 3)."""
    from fastdit import flops
    if args.smoke:
        return float(flops.training_flops_per_sample(flops.DiTShape(**SMOKE_ARCH)))
    return float(flops.training_flops_per_image(args.model, args.image_size))


def build_model(spec: RowSpec, args, device: torch.device, kernels: str) -> torch.nn.Module:
    """A freshly initialised model of the row's kind (seeded), on `device`, in the run's param dtype."""
    from fastdit.models.build import build_dit
    torch.manual_seed(args.seed)
    options = dict(kernels=kernels, attention=spec.attention, nvtx=args.nvtx, mlp=spec.mlp,
                   bias_fold=spec.bias_fold)  # the reference drops them
    with torch.device(device):
        model = build_dit(spec.impl, **architecture(args), num_classes=NUM_CLASSES, **options)
        if spec.impl == "reference" and spec.attention is not None:
            # The official DiT code with timm >= 0.9, whose Attention calls
            # F.scaled_dot_product_attention: same qkv/proj parameters, attention through a backend.
            from fastdit.models.dit import Attention
            for blk in model.blocks:
                blk.attn = Attention(model.hidden_size, model.num_heads, spec.attention)
            model.initialize_weights()
    if args.precision == "bf16":
        model = model.to(torch.bfloat16)
    return model.train()


class MasterWeightAdamW:
    """AdamW on fp32 master copies of low-precision parameters (the scheme of DeepSpeed's bf16 mode).

    step(): copy the bf16 gradients into fp32 master gradients, AdamW on the masters, copy the masters
    back into the bf16 parameters. State per parameter: fp32 master, grad, exp_avg, exp_avg_sq.
    """

    def __init__(self, params, lr: float, fused: bool):
        self.params = [p for p in params if p.requires_grad]
        self.master = [p.detach().float().clone() for p in self.params]
        for m in self.master:
            m.grad = torch.zeros_like(m)
        self.opt = torch.optim.AdamW(self.master, lr=lr, weight_decay=0.0,
                                     **({"fused": True} if fused else {}))

    @torch.no_grad()
    def step(self) -> None:
        grads = [p.grad for p in self.params]
        if any(g is None for g in grads):
            missing = sum(g is None for g in grads)
            raise RuntimeError(f"{missing} parameter(s) got no gradient in this step")
        torch._foreach_copy_([m.grad for m in self.master], grads)
        self.opt.step()
        torch._foreach_copy_([p.data for p in self.params], self.master)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None


def make_train_step(model: torch.nn.Module, runner: Callable, args, device: torch.device, diffusion):
    """A closure running one full training step on (x, y); returns the loss (a detached tensor)."""
    fused_adam = device.type == "cuda"
    if args.precision == "bf16":
        opt = MasterWeightAdamW(model.parameters(), args.lr, fused_adam)

        def model_fn(x, t, **kw):  # as fastdit/train.py: bf16 into the model, fp32 out for the loss
            return runner(x.to(torch.bfloat16), t, **kw).float()
    else:
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                                weight_decay=0.0, **({"fused": True} if fused_adam else {}))
        model_fn = runner
    use_autocast = args.precision == "autocast"
    num_t = diffusion.num_timesteps

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with nvtx_range("train_step", args.nvtx):
            t = torch.randint(0, num_t, (x.shape[0],), device=x.device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_autocast):
                loss = diffusion.training_losses(model_fn, x, t, model_kwargs=dict(y=y))["loss"].mean()
            with nvtx_range("backward", args.nvtx):
                loss.backward()
            with nvtx_range("optimizer", args.nvtx):
                opt.step()
                opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step, opt


def deepspeed_row_config(args, row_sets=()):
    """The deepspeed row's training config: --config with the model set to --model at --image-size
    (registry architecture, as the other rows; smoke: SMOKE_ARCH), synthetic latents, seed --seed, and
    its DeepSpeed section set to one rank: micro-batch = global batch = --batch, no accumulation,
    precision from --precision; `row_sets`: the row's own overrides, after --set's. Raises
    fastdit.training.config.ConfigError for a bad config."""
    from fastdit.training.config import load_config
    arch = architecture(args)
    sets = ["data.kind=synthetic", f"data.image_size={arch['input_size'] * VAE_DOWNSAMPLE}",
            f"model.num_classes={NUM_CLASSES}", "model.learn_sigma=true", "model.class_dropout_prob=0.1",
            "model.mlp_ratio=4.0", "model.block_type=adaln_zero", f"train.seed={args.seed}"]
    for key in ("depth", "hidden_size", "num_heads", "patch_size"):
        sets.append(f"model.{key}={arch[key] if args.smoke else 'null'}")
    if not args.smoke:
        sets.append(f"model.name={args.model}")
    cfg = load_config(args.config, sets + list(args.overrides) + list(row_sets))
    ds = cfg.deepspeed
    ds["train_micro_batch_size_per_gpu"] = ds["train_batch_size"] = args.batch
    ds.pop("gradient_accumulation_steps", None)
    ds["bf16"] = dict(ds.get("bf16") or {}, enabled=args.precision == "bf16")
    if "fp16" in ds:
        ds["fp16"] = dict(ds["fp16"], enabled=False)
    return cfg


def build_deepspeed_step(args, device: torch.device, kernels: str, batches, row: Dict[str, Any],
                         compile: bool = False, fused_step: Optional[bool] = None, mlp: str = "plain",
                         bias_fold: bool = False, attention: str = "auto", graphs: bool = False,
                         sets: Tuple[str, ...] = ()):
    """The deepspeed row: fastdit.training.trainer's engine (build_engine, as fastdit/train.py) on one rank and a
    Trainer cycling the harness's batches. Records what it runs in `row`; returns (step, setup), where
    step() runs Trainer.train_step() and returns its loss (raises if DeepSpeed skipped the update).
    `compile` (row deepspeed+compile) sets train.compile, so build_engine calls engine.compile() as
    fastdit/train.py does, with the harness's --compile-backend / --compile-mode. `fused_step` (rows
    deepspeed+fused-step, deepspeed/ds-step) sets train.fused_optimizer_step (None keeps --config's); `mlp` / `bias_fold` (row deepspeed+all-switches)
    set model.mlp / model.bias_fold; `attention` other than "auto" (row deepspeed+all-switches/triton) sets
    model.attention. `graphs` (row deepspeed+graphs) sets train.cuda_graph. `sets`: the row's config overrides
    (row deepspeed/no-overlap)."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read when deepspeed is first imported
    if os.environ.get("WORLD_SIZE", "1") != "1":
        raise RuntimeError(f"the deepspeed row runs on one rank; WORLD_SIZE={os.environ['WORLD_SIZE']}")
    from fastdit.models.attention import resolve_backend
    from fastdit.training.trainer import build_engine, device_for_rank, init_distributed
    init_distributed()
    ds_device = device_for_rank()
    if ds_device.type != device.type:
        raise RuntimeError(f"DeepSpeed's accelerator is {ds_device.type!r} but this run is on {device.type!r}")
    cfg = deepspeed_row_config(args, sets)
    cfg.model.kernels = kernels
    if compile:
        cfg.train.compile = True
    if fused_step is not None:
        cfg.train.fused_optimizer_step = fused_step
    if mlp != "plain":
        cfg.model.mlp = mlp
    if bias_fold:
        cfg.model.bias_fold = True
    if attention != "auto":
        cfg.model.attention = attention
    if graphs:
        cfg.train.cuda_graph = True
    attention = cfg.model.attention
    if attention == "auto":  # resolved once, as for the fused row
        cfg.model.attention = resolve_backend(
            "auto", device, torch.bfloat16 if args.precision == "bf16" else torch.float32)
    arch = architecture(args)
    compile_kwargs = dict(backend=args.compile_backend,
                          compile_kwargs=({"mode": args.compile_mode} if args.compile_backend == "inductor" else {}))
    setup = build_engine(cfg, arch["in_channels"], arch["input_size"], NUM_CLASSES, ds_device,
                         compile_kwargs=compile_kwargs)
    try:
        return _deepspeed_row_step(setup, cfg, attention, args, row, batches)
    except BaseException:
        setup.destroy()   # the caller never got it: free the engine here, before the next row builds its own
        raise


def _deepspeed_row_step(setup, cfg, attention: str, args, row: Dict[str, Any], batches):
    """build_deepspeed_step's (step, setup) from the engine it built."""
    from fastdit.training.trainer import Trainer, no_phase
    info = setup.describe()
    row.update(model_class=("fastdit.models.DiT" if setup.impl == "fast" else "fastdit.models.reference.DiT"),
               kernels=info["kernels"],
               attention=(f"{cfg.model.attention} (auto)" if attention == "auto" else info["attention"]),
               compile=(dict(compile_info(args), via="engine.compile()") if cfg.train.compile else None),
               mlp=cfg.model.mlp if setup.impl == "fast" else None,
               bias_fold=cfg.model.bias_fold if setup.impl == "fast" else None,
               cuda_graph=graphed.mode(graphed.installed(setup.engine.module)),
               fused_optimizer_step=("on" if getattr(setup.engine.optimizer, "fastdit_fused_step", None) else
                                     "refused (the reason is in the log)" if cfg.train.fused_optimizer_step else "off"),
               deepspeed=info)
    trainer = Trainer(setup, itertools.cycle(batches), phase=nvtx_range if args.nvtx else no_phase)

    def step() -> torch.Tensor:
        result = trainer.train_step()
        if not result.applied:
            raise FloatingPointError(f"DeepSpeed skipped step {result.step}: non-finite loss or gradient")
        return result.loss

    return step, setup


def synthetic_batches(args, arch: Dict[str, Any], device: torch.device, count: int = 2):
    """`count` fixed batches (latents (B, 4, S, S) fp32 ~ N(0, 1), labels (B,)), cycled by the steps."""
    g = torch.Generator(device="cpu").manual_seed(args.seed + 1)
    s, c = arch["input_size"], arch["in_channels"]
    return [(torch.randn(args.batch, c, s, s, generator=g).to(device),
             torch.randint(0, NUM_CLASSES, (args.batch,), generator=g).to(device)) for _ in range(count)]


# ----------------------------------------------------------------------------------------------
# Running rows
# ----------------------------------------------------------------------------------------------
def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def compile_info(args) -> Dict[str, Any]:
    return dict(backend=args.compile_backend,
                mode=args.compile_mode if args.compile_backend == "inductor" else None)


def throughput_metrics(repeat_ms: List[float], steps: int, batch: int, flops_per_image: float,
                       peak: Optional[float]) -> Dict[str, Any]:
    """ms/step and img/s (median/min/max over repeats), model TFLOP/s and MFU at the median img/s.

    repeat_ms: wall milliseconds of each timed repeat of `steps` steps of `batch` images.
    MFU = flops_per_image x img/s / peak (None without a peak).
    """
    ms_step = [ms / steps for ms in repeat_ms]
    img_s = summarize([batch * 1e3 / ms for ms in ms_step])
    achieved = flops_per_image * img_s["median"]
    return dict(ms_per_step=summarize(ms_step), img_per_s=img_s, model_tflops_per_s=achieved / 1e12,
                mfu=(achieved / peak if peak else None))


def _compile_counters():
    """Dynamo's global counters (an internal API; None where it is missing)."""
    try:
        from torch._dynamo.utils import counters
        return counters
    except Exception:  # noqa: BLE001
        return None


def run_row(spec: RowSpec, args, ctx: Dict[str, Any]) -> Dict[str, Any]:
    """Build, warm up and time one row (with its environment variables set); never raises for a failure of the
    row itself."""
    with env_vars(spec.env):
        row = _run_row(spec, args, ctx)
    if spec.env:
        row["env"] = dict(spec.env)
    if spec.sets:
        row["config_sets"] = list(spec.sets)
    return row


def _run_row(spec: RowSpec, args, ctx: Dict[str, Any]) -> Dict[str, Any]:
    device: torch.device = ctx["device"]
    row: Dict[str, Any] = dict(
        name=spec.name, status=None, error=None, impl=spec.impl,
        model_class=("fastdit.models.reference.DiT" if spec.impl == "reference" else "fastdit.models.DiT"),
        step=("fastdit.training.trainer.Trainer.train_step (DeepSpeed engine + EMA)" if spec.impl == "deepspeed"
              else "harness: training_losses, backward, AdamW"),
        kernels=ctx["kernels"] if spec.impl != "reference" else None,
        mlp=spec.mlp if spec.impl == "fast" else None,
        bias_fold=spec.bias_fold if spec.impl == "fast" else None,
        attention=(spec.attention or "math (reference Attention)"),
        compile=compile_info(args) if spec.compile else None, batch=args.batch, precision=args.precision)
    if spec.compile and args.compile_backend != "inductor":
        row["note"] = (f"torch.compile backend={args.compile_backend!r} (no Inductor code generation)"
                       + ("; smoke mode" if args.smoke else ""))
    if spec.impl == "deepspeed" and args.precision == "autocast":
        spec = dataclasses.replace(spec, unavailable=(
            "--precision autocast: DeepSpeed's precision is its config's (bf16 or fp32); run this row "
            "with --precision bf16 or fp32"))
    if spec.unavailable:
        row.update(status="unavailable", error=spec.unavailable)
        return row

    free_memory(device)
    model = runner = step = opt = setup = None
    counters = _compile_counters()
    if spec.compile and counters is not None:
        counters.clear()
    try:
        if spec.impl == "fast" and spec.attention == "auto":
            # Resolved here and passed explicitly: the same backend attention="auto" picks for this
            # device and dtype, decided once instead of on every call inside the (compiled) forward.
            from fastdit.models.attention import resolve_backend
            dtype = torch.float32 if args.precision == "fp32" else torch.bfloat16  # autocast: bf16 qkv
            spec = dataclasses.replace(spec, attention=resolve_backend("auto", device, dtype))
            row["attention"] = f"{spec.attention} (auto)"
        t0 = time.perf_counter()
        if spec.impl == "deepspeed":
            step, setup = build_deepspeed_step(args, device, ctx["kernels"], ctx["batches"], row, spec.compile,
                                               spec.fused_step, spec.mlp, spec.bias_fold, spec.attention,
                                               spec.graphs, spec.sets)
            if device.type == "cuda":  # the peak counts the engine's resident state, not its construction
                free_memory(device)
                torch.cuda.reset_peak_memory_stats(device)
        else:
            model = build_model(spec, args, device, ctx["kernels"])
            if device.type == "cuda":  # the peak counts the weights, not the fp32 copy they were built in
                free_memory(device)
                torch.cuda.reset_peak_memory_stats(device)
            runner = model
            row["cuda_graph"] = graphed.mode(graphed.install_for(model, device) if spec.graphs else None)
            if spec.compile:
                kw = dict(backend=args.compile_backend)
                if args.compile_backend == "inductor":
                    kw["mode"] = args.compile_mode
                runner = torch.compile(model, **kw)
            train_step, opt = make_train_step(model, runner, args, device, ctx["diffusion"])
            batches = itertools.cycle(ctx["batches"])

            def step():
                return train_step(*next(batches))
        synchronize(device)
        row["build_s"] = time.perf_counter() - t0

        torch.manual_seed(args.seed + 2)  # same t / noise / label-dropout draws in every row
        losses = []
        t0 = time.perf_counter()
        for k in range(args.warmup):
            losses.append(step())
            if k == 0:
                synchronize(device)
                row["first_step_s"] = time.perf_counter() - t0
        synchronize(device)
        row["warmup_s"] = time.perf_counter() - t0
        if spec.compile and counters is not None:  # a graph break splits the compiled model
            row["compile_graphs"] = int(counters["stats"].get("unique_graphs", 0))
            row["compile_graph_breaks"] = int(sum(counters["graph_break"].values()))

        # steady state: one untimed step queues work, then the repeats are back-to-back intervals with one
        # synchronisation at the end (no interval starts on an idle device, as no step of a run does)
        timer = MarkTimer(device)
        losses.append(step())
        timer.mark()
        for _ in range(args.repeats):
            for _ in range(args.steps):
                losses.append(step())
            timer.mark()
        repeat_ms = timer.intervals()
        loss_values = [float(v) for v in losses]
        if not all(math.isfinite(v) for v in loss_values):
            raise FloatingPointError(f"non-finite training loss: {loss_values}")

        row.update(status="ok", repeat_ms=repeat_ms, steps_per_repeat=args.steps,
                   **throughput_metrics(repeat_ms, args.steps, args.batch, ctx["flops_per_image"],
                                        ctx["peak_flops"]),
                   loss_first=loss_values[0], loss_last=loss_values[-1])
        if spec.graphs:  # what the graphs did: one capture, every timed step replayed (no call fell back to eager)
            g = graphed.installed(model if model is not None else setup.engine.module)
            row["graphs"] = dict(captures=g.captures, replays=g.replays, eager_calls=g.eager_calls) if g else None
    except Exception as e:  # noqa: BLE001 - a failing row is recorded, the run goes on
        row.update(status="error", error=f"{type(e).__name__}: {e}"[:ERROR_CHARS],
                   oom=isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower())
        tb = traceback.format_exc().strip().splitlines()
        print("    " + "\n    ".join(tb[-6:]), file=sys.stderr, flush=True)
    if device.type == "cuda":
        row["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        row["peak_mem_gib"] = None
    if setup is not None:
        setup.destroy()  # DeepSpeed's teardown: optimizer buffers, hooks
    del model, runner, step, opt, setup
    if spec.compile:
        torch._dynamo.reset()  # drop compiled graphs (and their memory) before the next row
    free_memory(device)
    return row


SPEEDUP_BASELINES = {"eager": "speedup_vs_eager", "eager/sdpa": "speedup_vs_eager_sdpa",
                     "compile": "speedup_vs_compile", "fused": "speedup_vs_fused"}


def add_speedups(rows: List[Dict[str, Any]]) -> None:
    """speedup_vs_<baseline> = median img/s of the row / that of the baseline row (None if either failed)."""
    ok = {r["name"]: r for r in rows if r["status"] == "ok"}
    for r in rows:
        for base, key in SPEEDUP_BASELINES.items():
            r[key] = (r["img_per_s"]["median"] / ok[base]["img_per_s"]["median"]
                      if r["status"] == "ok" and base in ok else None)


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------
def _fmt(v, spec: str, na: str = "n/a") -> str:
    return na if v is None else format(v, spec)


def row_line(r: Dict[str, Any]) -> str:
    if r["status"] != "ok":
        return f"{r['name']:<18} {r['status'].upper()}: {r['error']}"
    ms, ips = r["ms_per_step"], r["img_per_s"]
    mem = _fmt(r.get("peak_mem_gib"), "8.2f")
    return (f"{r['name']:<18} {ms['median']:9.2f} ms/step [{ms['min']:.2f}-{ms['max']:.2f}]  "
            f"{ips['median']:9.2f} img/s  {r['model_tflops_per_s']:8.2f} TFLOP/s  "
            f"MFU {'n/a' if r['mfu'] is None else format(100 * r['mfu'], '.1f') + '%'}  peak {mem} GiB"
            f"{engine_summary(r)}")


def engine_summary(r: Dict[str, Any]) -> str:
    """' / ZeRO-2 bf16 AdamW (DeepSpeedZeroOptimizer)' for the deepspeed row, '' for the others."""
    ds = r.get("deepspeed")
    if not ds:
        return ""
    return (f" / ZeRO-{ds['zero_stage']} {'bf16' if ds['bf16'] else 'fp32'} {ds['optimizer']['type']} "
            f"({ds['optimizer']['engine_optimizer']})")


def print_table(rows: List[Dict[str, Any]]) -> None:
    head = (f"{'row':<18} {'status':<11} {'ms/step':>9} {'min':>9} {'max':>9} {'img/s':>9} {'TFLOP/s':>8} "
            f"{'MFU':>6} {'peakGiB':>8} {'vs eager':>8} {'vs e+sdpa':>9} {'vs comp':>8} {'vs fused':>8}  "
            f"attention / kernels / compile [/ engine]")
    print(head)
    print("-" * len(head))
    for r in rows:
        if r["status"] != "ok":
            print(f"{r['name']:<18} {r['status']:<11} {r['error']}")
            continue
        ms, ips = r["ms_per_step"], r["img_per_s"]
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        comp = r["compile"] and f"{r['compile']['backend']}/{r['compile']['mode']}"
        print(f"{r['name']:<18} {r['status']:<11} {ms['median']:9.2f} {ms['min']:9.2f} {ms['max']:9.2f} "
              f"{ips['median']:9.2f} {r['model_tflops_per_s']:8.2f} {mfu:>6} "
              f"{_fmt(r['peak_mem_gib'], '8.2f'):>8} {_fmt(r['speedup_vs_eager'], '8.2f'):>8} "
              f"{_fmt(r['speedup_vs_eager_sdpa'], '9.2f'):>9} "
              f"{_fmt(r['speedup_vs_compile'], '8.2f'):>8} {_fmt(r['speedup_vs_fused'], '8.2f'):>8}  "
              f"{r['attention']} / {r['kernels'] or '-'} / {comp or '-'}{engine_summary(r)}")


def run(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """Run the benchmark; returns {"benchmark", "complete", "config", "environment", "rows"}."""
    args = parse_args(argv)
    device = resolve_device(args)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # only matters for --precision fp32/autocast
        torch.backends.cudnn.allow_tf32 = True
    threads = torch.get_num_threads()
    if args.smoke:
        torch.set_num_threads(1)  # a tiny model: intra-op threads only add synchronisation (and noise)
    had_group = torch.distributed.is_available() and torch.distributed.is_initialized()
    try:
        return _run(args, device)
    finally:
        torch.set_num_threads(threads)
        if not had_group and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()  # the deepspeed row's single-rank group


def _run(args, device: torch.device) -> Dict[str, Any]:
    from fastdit.diffusion import create_diffusion

    arch = architecture(args)
    kernels = args.kernels or default_kernels(device)
    env = environment(device, argv=None if args.argv is None else [SCRIPT] + list(args.argv))
    fpi = flops_per_image(args)
    if device.type != "cuda":
        peak, peak_src = None, "n/a on CPU"
    elif args.peak_tflops is not None:
        peak, peak_src = args.peak_tflops * 1e12, "--peak-tflops"
    else:
        peak = peak_flops(env["gpu"])
        peak_src = ("dense bf16 datasheet table, fastdit.flops.PEAK_FLOPS" if peak
                    else f"unknown GPU {env['gpu']!r}: pass --peak-tflops")
    config = dict(
        model=("custom smoke DiT" if args.smoke else args.model), architecture=arch,
        image_size=(None if args.smoke else args.image_size),
        latent_shape=[arch["in_channels"], arch["input_size"], arch["input_size"]],
        batch=args.batch, precision=args.precision, warmup=args.warmup, steps=args.steps,
        repeats=args.repeats, rows=args.rows, kernels=kernels, compile=compile_info(args),
        lr=args.lr, seed=args.seed, smoke=args.smoke, nvtx=args.nvtx,
        deepspeed_config=(args.config if "deepspeed" in args.rows else None),
        deepspeed_overrides=(list(args.overrides) if "deepspeed" in args.rows else None),
        optimizer=("AdamW on fp32 master weights, bf16 params/grads" if args.precision == "bf16"
                   else "AdamW") + (" (fused)" if device.type == "cuda" else "") + ", weight decay 0",
        loss='create_diffusion("").training_losses(...)["loss"].mean(), t uniform, labels uniform',
        flops_per_image=fpi, flops_convention="fastdit.flops: 2 FLOPs/MAC x 3 (fwd + bwd) x forward MACs",
        peak_flops=peak, peak_flops_source=peak_src,
        timer=MarkTimer(device).method + ", after one untimed step",
        torch_threads=torch.get_num_threads(),
        tf32=(device.type == "cuda"))
    result = dict(benchmark="throughput", complete=False, config=config, environment=env, rows=[])

    print(f"fastdit throughput | {config['model']} latents {config['latent_shape']} batch {args.batch} "
          f"{args.precision} | {env['gpu'] or 'CPU: ' + str(env['cpu'])} | torch {env['torch']} "
          f"triton {env['triton']} cuda {env['cuda']} | commit {env['git_commit']}", flush=True)
    print(f"training FLOPs/image {fpi:.4g} | peak {_fmt(peak and peak / 1e12, '.0f')} TFLOP/s ({peak_src}) | "
          f"warm-up {args.warmup}, {args.repeats} x {args.steps} timed steps per row", flush=True)

    ctx = dict(device=device, kernels=kernels, diffusion=create_diffusion(""),
               batches=synthetic_batches(args, arch, device), flops_per_image=fpi, peak_flops=peak)
    specs = row_specs(args.rows)
    for i, spec in enumerate(specs, 1):
        print(f"[{i}/{len(specs)}] {spec.name}: "
              + ("skipped (unavailable)" if spec.unavailable else
                 "build, " + ("compile + " if spec.compile else "") + f"warm-up {args.warmup}, "
                 f"time {args.repeats} x {args.steps} steps"), flush=True)
        t0 = time.perf_counter()
        with nvtx_range(f"row {spec.name}", args.nvtx):
            row = run_row(spec, args, ctx)
        row["row_wall_s"] = time.perf_counter() - t0
        if device.type == "cuda":  # what the row left allocated once it is gone (the next row starts clean)
            free_memory(device)
            row["mem_left_gib"] = torch.cuda.memory_allocated(device) / 2**30
        result["rows"].append(row)
        print(f"    {row_line(row)}  ({row['row_wall_s']:.1f} s)", flush=True)
        add_speedups(result["rows"])
        if args.json:
            write_json(args.json, result)
    result["complete"] = True
    add_speedups(result["rows"])
    if args.json:
        print(f"wrote {write_json(args.json, result)}")
    print()
    print_table(result["rows"])
    failed = [r["name"] for r in result["rows"] if r["status"] == "error"]
    if failed:
        print(f"{len(failed)} row(s) failed: {', '.join(failed)} (errors recorded above and in the JSON)")
    return result


def main(argv: Optional[List[str]] = None) -> int:
    if not any(a == "--smoke" for a in (sys.argv[1:] if argv is None else argv)):
        # Less fragmentation when rows of very different memory use follow each other; same for all rows.
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    result = run(argv)
    ok = [r for r in result["rows"] if r["status"] == "ok"]
    return 0 if ok or not result["rows"] else 1


if __name__ == "__main__":
    sys.exit(main())
