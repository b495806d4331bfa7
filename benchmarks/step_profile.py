"""Where one training step of fastdit/train.py goes: phase times and device time by kernel category.

    python benchmarks/step_profile.py --config configs/xl2_zero2.json \
        --set deepspeed.train_micro_batch_size_per_gpu=128 --set deepspeed.train_batch_size=128
    python benchmarks/step_profile.py --config configs/digits.json --data config --out /tmp/prof
    python benchmarks/step_profile.py --smoke --out /tmp/prof          # CPU, tiny model: checks the tool

Builds the engine on one rank through fastdit.training.trainer, the code fastdit/train.py runs (the config's model,
deepspeed.initialize with its `deepspeed` section, the fp32 EMA, the diffusion), and runs
Trainer.train_step() on
  --data synthetic  two fixed batches of N(0, 1) latents (random labels) on the device, cycled (the
                    default for latent, image and synthetic configs: no files needed), or
  --data config     the config's dataset through train.py's data loader (the default for digits).
After --warmup steps, fastdit.training.step_profile times --steps steps whole (CUDA events at the step
boundaries: ms/step, img/s), then --steps steps with the device synchronised at every phase boundary
(data, forward, backward, optimizer, EMA: medians), then traces --trace-steps steps with torch.profiler
(device time by category, top kernels, idle = wall - kernel busy time). Writes <out>/trace.json (open in
https://ui.perfetto.dev) and <out>/profile.json, and prints a table. Without a GPU the categories are
those of the CPU ops (said in the output).

On one rank the config's global batch is reached by gradient accumulation (train_batch_size /
micro-batch); set both batch sizes (as above) to profile steps of one micro-batch.

--smoke: configs/digits.json (unless --config) shrunk to a 2-block width-64 DiT on 8x8 images, micro-batch
4 with 2-step accumulation, 1 warm-up, 2 + 2 steps, 1 traced step, on one CPU rank over gloo.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
from typing import List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

DEFAULTS = dict(warmup=3, steps=5, trace_steps=2)
SMOKE_DEFAULTS = dict(warmup=1, steps=2, trace_steps=1)
SMOKE_CONFIG = os.path.join(ROOT, "configs", "digits.json")
SMOKE_SETS = ["model.depth=2", "model.hidden_size=64", "model.num_heads=2", "model.patch_size=2",
              "model.kernels=torch", "data.image_size=8", "data.num_workers=0",
              "deepspeed.train_micro_batch_size_per_gpu=4", "deepspeed.train_batch_size=8"]
LATENT_KINDS = ("latents", "imagefolder", "synthetic")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Profile one training step of fastdit/train.py's engine "
                                             "(one rank): phase times, kernel time by category, a trace")
    ap.add_argument("--config", default=None, help="training config (configs/*.json); required unless --smoke")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override a config value (repeatable), as fastdit/train.py")
    ap.add_argument("--data", choices=("auto", "synthetic", "config"), default="auto",
                    help="synthetic latents on the device, or the config's data through train.py's loader "
                         "(auto: config for digits, synthetic otherwise)")
    ap.add_argument("--warmup", type=int, default=None, help=f"untimed steps first (default {DEFAULTS['warmup']})")
    ap.add_argument("--steps", type=int, default=None,
                    help=f"steps timed whole, then as many timed by phase (default {DEFAULTS['steps']})")
    ap.add_argument("--trace-steps", type=int, default=None,
                    help=f"steps traced with torch.profiler (default {DEFAULTS['trace_steps']})")
    ap.add_argument("--out", default=os.path.join("runs", "step_profile"),
                    help="output folder for trace.json and profile.json (default runs/step_profile)")
    ap.add_argument("--smoke", action="store_true", help="tiny digits model on one CPU rank: checks the tool")
    args = ap.parse_args(argv)
    preset = SMOKE_DEFAULTS if args.smoke else DEFAULTS
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in ("warmup", "steps", "trace_steps"):
        if getattr(args, key) < 1:
            ap.error(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if args.config is None:
        if not args.smoke:
            ap.error("--config is required (e.g. --config configs/xl2_zero2.json), or pass --smoke")
        args.config = SMOKE_CONFIG
    if args.smoke:
        args.overrides = SMOKE_SETS + ["train.cpu_threads=1"] + args.overrides
    if os.environ.get("WORLD_SIZE", "1") != "1":
        ap.error(f"the step profiler runs on one rank (WORLD_SIZE={os.environ['WORLD_SIZE']}); for a "
                 f"multi-rank run use fastdit/train.py with --set train.profile_steps=A-B")
    from fastdit.training.config import ConfigError, load_config
    try:
        args.cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        ap.error(str(e))
    kind = args.cfg.data.kind
    if args.data == "auto":
        args.data = "synthetic" if kind in LATENT_KINDS else "config"
    if args.data == "config" and kind == "imagefolder":
        ap.error("--data config with data.kind=imagefolder is not supported (the VAE encoding would be "
                 "profiled with the step); use --data synthetic, or profile latents")
    if args.data == "synthetic" and kind == "digits":
        ap.error("--data synthetic makes latents; the digits config trains on pixels: use --data config")
    return args


def synthetic_source(micro: int, in_channels: int, input_size: int, num_classes: int,
                     device: torch.device, seed: int):
    """Two fixed micro-batches (x ~ N(0, 1), y uniform) on the device, cycled."""
    g = torch.Generator().manual_seed(seed + 1)
    batches = [(torch.randn(micro, in_channels, input_size, input_size, generator=g).to(device),
                torch.randint(0, num_classes, (micro,), generator=g).to(device)) for _ in range(2)]
    return itertools.cycle(batches)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    cfg = args.cfg
    if args.smoke:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read when deepspeed is first imported
        torch.set_num_threads(1)
    from fastdit.training.config import ConfigError
    from fastdit.training.data import build_dataset, rank_batches
    from fastdit.training.step_profile import StepProfiler
    from fastdit.training.trainer import Trainer, build_engine, data_geometry, device_for_rank, init_distributed

    init_distributed(cfg.train.shm_comm)
    device = device_for_rank()
    if device.type == "cpu" and not args.smoke and cfg.train.cpu_threads:
        torch.set_num_threads(cfg.train.cpu_threads)
    try:
        if args.data == "config":
            dataset = build_dataset(cfg.data)
            geometry = data_geometry(cfg, dataset)
        else:
            dataset = None
            geometry = (4, cfg.data.image_size // 8, cfg.model.num_classes or cfg.data.num_classes)
        setup = build_engine(cfg, *geometry, device)
    except (ConfigError, FileNotFoundError, RuntimeError, ValueError) as e:
        raise SystemExit(f"step_profile: error: {e}")
    micro, ga = setup.micro_batch, setup.grad_accum
    if dataset is None:
        batches = synthetic_source(micro, *geometry, device, cfg.train.seed)
    else:
        batches = rank_batches(dataset, micro, ga, 0, 1, cfg.train.seed, 0, cfg.data.random_flip,
                               cfg.data.num_workers, pin_memory=device.type == "cuda")
    trainer = Trainer(setup, batches)
    torch.manual_seed(cfg.train.seed)

    first = args.warmup + 1
    plain = list(range(first, first + args.steps))
    phases = list(range(plain[-1] + 1, plain[-1] + 1 + args.steps))
    trace = list(range(phases[-1] + 1, phases[-1] + 1 + args.trace_steps))
    info = dict(setup.describe(), data=("synthetic latents on the device" if dataset is None else cfg.data.kind),
                overrides=args.overrides, warmup_steps=args.warmup, smoke=args.smoke)
    profiler = StepProfiler(device, args.out, setup.global_batch, phase_steps=phases, trace_steps=trace,
                            plain_steps=plain, info=info)
    d = info
    print(f"step profile | {d['model']} ({d['params'] / 1e6:.2f}M params, {d['impl']}, kernels {d['kernels']}, "
          f"attention {d['attention']}) | {d['data']} | 1 rank on "
          f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'} | ZeRO-{d['zero_stage']} "
          f"{'bf16' if d['bf16'] else 'fp32'} {d['optimizer']['type']} | batch {setup.global_batch} = "
          f"{micro} x {ga} | warm-up {args.warmup}, {args.steps} + {args.steps} timed, "
          f"{args.trace_steps} traced", flush=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    while trainer.step < trace[-1]:
        with profiler.around(trainer.step + 1, trainer):
            trainer.train_step()
    profiler.info.update(nonfinite_steps=trainer.nonfinite_total,
                         peak_mem_gib=(torch.cuda.max_memory_allocated(device) / 2**30
                                       if device.type == "cuda" else None))
    profiler.finish()
    setup.destroy()
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
