#!/usr/bin/env python3
"""Train a DiT with DeepSpeed (ZeRO 1/2/3, bf16): the official DiT recipe, fast.

    deepspeed fastdit/train.py --config configs/xl2_zero2.json
    deepspeed --num_gpus 2 fastdit/train.py --config configs/digits.json      # CPU: 2 ranks over gloo
    deepspeed --hostfile hosts fastdit/train.py --config configs/xl2_zero3.json --resume auto

On a machine without a GPU, DeepSpeed picks its CPU accelerator and `--num_gpus N` starts N CPU ranks;
without oneCCL installed the CPU accelerator's backend is gloo, which this script requests explicitly
(and it skips DeepSpeed's JIT build of a shared-memory all-reduce op, minutes on a fresh machine; set
train.shm_comm=true to keep it). Add `--master_port P` to run two jobs side by side.

`--set section.key=value` (repeatable) overrides any config value; `--resume auto` continues from the
newest complete checkpoint of train.output_dir (a fresh start when there is none). Writes to
train.output_dir: checkpoints/, metrics.jsonl, tb/ (TensorBoard), samples/*.png, loss_curve.png, and
profile/ (trace.json, profile.json) when train.profile_steps=A-B asks for a profile of those steps.

One optimizer step is fastdit.training.trainer.Trainer.train_step(), the step benchmarks/throughput.py (row
`deepspeed`) times and benchmarks/step_profile.py profiles; this script adds resume, data order,
logging, checkpoints, sample grids and the non-finite stop around it.

Exit codes: 0 done, 2 bad config or missing input, 3 stopped after too many non-finite steps in a row.
Test hooks (environment): FASTDIT_TEST_NAN_STEPS="3,6,7" turns the loss of those optimizer steps
(1-based) into NaN on rank FASTDIT_TEST_NAN_RANK (default: the last rank);
FASTDIT_TEST_KILL_DURING_SAVE=N SIGKILLs rank 0 in the middle of saving the checkpoint of step N.
"""
import os
import sys

# This file runs as a script, so its folder (fastdit/) is sys.path[0], where data.py, config.py, ...
# would shadow installed packages. Drop it and import the package by its full name.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]


def _import_own_package() -> None:
    """Import the `fastdit` package this script belongs to (installed or straight from the tree).

    The repository root is not put on sys.path: it holds a top-level `kernels/` folder that libraries
    probing for PyPI's `kernels` package would find.
    """
    import importlib.util

    mod = sys.modules.get("fastdit")
    if mod is not None and os.path.dirname(os.path.abspath(mod.__file__)) == _HERE:
        return
    spec = importlib.util.spec_from_file_location(
        "fastdit", os.path.join(_HERE, "__init__.py"), submodule_search_locations=[_HERE])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["fastdit"] = mod
    spec.loader.exec_module(mod)


_import_own_package()

import argparse  # noqa: E402
import contextlib  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
import resource  # noqa: E402
import time  # noqa: E402
from typing import Any, Dict, Optional  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

import fastdit  # noqa: E402
from fastdit.training import checkpoint as ckpt  # noqa: E402
from fastdit.training.config import ConfigError, load_config, parse_step_range, resolved_architecture  # noqa: E402
from fastdit.training.data import LATENTS_FILE, RankBatchSampler, build_dataset, rank_batches  # noqa: E402
from fastdit.training.trainer import (Trainer, build_engine, data_geometry, device_for_rank, env_rank,  # noqa: E402
                             init_distributed, nvtx_range, say)

EXIT_CONFIG = 2
EXIT_NONFINITE = 3


# ----------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------
def fail(msg: str, code: int = EXIT_CONFIG) -> None:
    if env_rank() == 0:
        print(f"fastdit.train: error: {msg}", file=sys.stderr, flush=True)
    sys.exit(code)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="JSON config (configs/*.json)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (repeatable), e.g. --set train.max_steps=1000")
    p.add_argument("--resume", default=None,
                   help="'auto' (newest complete checkpoint of output_dir, else a fresh start) or a "
                        "checkpoint folder; overrides train.resume")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _vae_for(cfg, dataset) -> Optional[str]:
    """The VAE of a latent-space run: data.vae, else the one the latents were extracted with."""
    if cfg.data.kind == "digits":
        return None
    if cfg.data.vae:
        return cfg.data.vae
    if cfg.data.kind == "latents":
        return dataset.meta.get("vae")
    return None


def preflight(cfg):
    """Every check that can fail on user input, before distributed init or any heavy work.

    Returns (dataset, vae_spec). Exits with a message saying what to pass when something is missing.
    """
    from fastdit.generate.vae import VAENotFoundError, resolve_vae

    try:
        dataset = build_dataset(cfg.data)
    except (FileNotFoundError, RuntimeError, ValueError) as e:
        fail(f"{cfg.path}: data: {e}")
    if cfg.data.kind == "latents":
        size = int(dataset.meta["image_size"])
        if size != cfg.data.image_size:
            fail(f"{cfg.path}: data.image_size is {cfg.data.image_size} but the latents in "
                 f"{os.path.join(cfg.data.path, LATENTS_FILE)} were extracted at {size} "
                 f"({dataset.latent_size}x{dataset.latent_size}); pass --set data.image_size={size}")
    ckpt_root = os.path.join(cfg.train.output_dir, "checkpoints")
    existing = ckpt.latest_tag(ckpt_root)
    if existing and not cfg.train.resume:
        fail(f"{cfg.train.output_dir} already holds a run (checkpoint {existing}); pass --resume auto to "
             f"continue it, or another --set train.output_dir=... to start a new one")
    vae = _vae_for(cfg, dataset)
    wants_grid = cfg.train.final_sample or cfg.train.sample_every > 0
    if cfg.data.kind == "imagefolder" or (vae and wants_grid) or (cfg.data.kind == "latents" and wants_grid):
        try:
            resolve_vae(vae)
        except VAENotFoundError as e:
            extra = ("" if cfg.data.kind == "imagefolder" else
                     " (the VAE decodes the sample grids; or turn them off with --set train.final_sample=false "
                     "--set train.sample_every=0)")
            fail(f"{cfg.path}: {e}{extra}")
    return dataset, vae


def set_cpu_threads(cfg) -> None:
    """CPU ranks: train.cpu_threads intra-op threads each, else the cores shared among the local ranks."""
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":
        return
    local = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"])))
    torch.set_num_threads(cfg.train.cpu_threads or max(1, (os.cpu_count() or 1) // max(1, local)))


def memory_gb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (peak RSS)


def test_nan_steps():
    text = os.environ.get("FASTDIT_TEST_NAN_STEPS", "")
    return {int(s) for s in text.split(",") if s.strip()}


# ----------------------------------------------------------------------------------------------
# Sampling a grid from the EMA weights
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def sample_grid(cfg, meta, ema, device, vae_spec, out_path, impl_cls, impl_kwargs, rank, writer=None,
                step=0) -> Optional[str]:
    """EMA samples, one row per class (train.sample_classes), written as a PNG by rank 0.

    All ranks call this (the EMA gather is a collective). The training RNG is left untouched.
    """
    import torch.distributed as dist

    sd = ema.full_state_dict(dst=0)
    path = None
    if rank == 0:
        from fastdit.diffusion import create_diffusion
        from fastdit.training.metrics import save_class_grid

        kwargs = ckpt.full_model_kwargs(meta)
        model = impl_cls(**kwargs, **impl_kwargs)
        model.load_state_dict(sd)
        model.to(device).eval()
        nc = kwargs["num_classes"]
        classes = cfg.train.sample_classes or list(range(min(nc, 10)))
        bad = [c for c in classes if not 0 <= c < nc]
        if bad:
            raise ValueError(f"train.sample_classes {bad} are outside [0, {nc})")
        per = cfg.train.samples_per_class
        y = torch.tensor([c for c in classes for _ in range(per)], device=device)
        n = len(y)
        size, ch = kwargs["input_size"], kwargs["in_channels"]
        diffusion = create_diffusion(timestep_respacing=cfg.diffusion.sample_steps,
                                     noise_schedule=cfg.diffusion.noise_schedule,
                                     learn_sigma=kwargs["learn_sigma"],
                                     diffusion_steps=cfg.diffusion.diffusion_steps)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(cfg.train.seed + 12345)
            z = torch.randn(n, ch, size, size, device=device)
            scale = cfg.diffusion.cfg_scale
            use_cfg = scale != 1.0 and kwargs["class_dropout_prob"] > 0
            if use_cfg:
                z = torch.cat([z, z], 0)
                y = torch.cat([y, torch.full_like(y, nc)], 0)
                if cfg.diffusion.guide_all_channels:
                    def fn(x, t, y, cfg_scale):
                        return model.forward_with_cfg(x, t, y, cfg_scale, guide_all_channels=True)
                else:
                    fn = model.forward_with_cfg
                model_kwargs = dict(y=y, cfg_scale=scale)
            else:
                fn, model_kwargs = model.forward, dict(y=y)
            clip = vae_spec is None  # pixel space: x0 lies in [-1, 1]; latents are not clipped (official)
            if cfg.diffusion.sample_steps.startswith("ddim"):
                out = diffusion.ddim_sample_loop(fn, z.shape, z, clip_denoised=clip, model_kwargs=model_kwargs,
                                                 progress=False, device=device, eta=cfg.diffusion.ddim_eta)
            else:
                out = diffusion.p_sample_loop(fn, z.shape, z, clip_denoised=clip, model_kwargs=model_kwargs,
                                              progress=False, device=device)
        out = out[:n]
        if vae_spec:
            from fastdit.generate.vae import decode, load_vae
            vae = load_vae(vae_spec, device)
            out = torch.cat([decode(vae, out[i: i + 16], meta["latent_scale"]) for i in range(0, n, 16)])
            del vae
        path = save_class_grid(out.cpu(), len(classes), out_path, row_labels=[str(c) for c in classes])
        if writer is not None:
            from fastdit.training.metrics import to_uint8
            grid = to_uint8(out.cpu())
            writer.add_images("samples/ema", grid, step, dataformats="NHWC")
        del model
    if dist.is_initialized():
        dist.barrier()
    return path


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        fail(str(e))
    if args.resume is not None:
        cfg.train["resume"] = args.resume
    dataset, vae_spec = preflight(cfg)

    init_distributed(cfg.train.shm_comm)
    set_cpu_threads(cfg)
    import deepspeed
    import torch.distributed as dist
    from tqdm import tqdm

    rank, world = dist.get_rank(), dist.get_world_size()
    device = device_for_rank()
    out_dir = cfg.train.output_dir
    ckpt_root = os.path.join(out_dir, "checkpoints")
    if rank == 0:
        os.makedirs(ckpt_root, exist_ok=True)
        ckpt.clean_tmp(ckpt_root)
    dist.barrier()

    # ---- the engine: model, DeepSpeed, EMA, diffusion -----------------------------------------
    kind = cfg.data.kind
    vae = None
    if kind == "imagefolder":
        from fastdit.generate.vae import load_vae
        vae = load_vae(vae_spec, device)
    try:
        setup = build_engine(cfg, *data_geometry(cfg, dataset, vae), device)
    except ConfigError as e:
        fail(str(e))
    engine, ema = setup.engine, setup.ema
    micro, ga, global_batch = setup.micro_batch, setup.grad_accum, setup.global_batch
    bf16, zero_stage, impl = setup.bf16, setup.zero_stage, setup.impl
    flops_per_image, peak = setup.flops_per_image, setup.peak_flops

    def make_meta(step: int, stopped: Optional[str] = None) -> Dict[str, Any]:
        latent = kind != "digits"
        return {
            "model": setup.meta_name, "model_kwargs": setup.meta_kwargs, "arch": resolved_architecture(cfg),
            "impl": impl, "kernels": cfg.model.kernels, "attention": cfg.model.attention,
            "step": step, "samples_seen": step * global_batch,
            "vae": vae_spec if latent else None, "latent_scale": cfg.data.latent_scale if latent else None,
            "image_size": cfg.data.image_size, "data_kind": kind, "ema_decay": cfg.train.ema_decay,
            "world_size": world, "zero_stage": zero_stage, "bf16": bf16, "global_batch": global_batch,
            "stopped": stopped, "config": cfg.to_dict(), "config_path": cfg.path,
            "versions": {"fastdit": fastdit.__version__, "deepspeed": deepspeed.__version__,
                         "torch": torch.__version__},
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }

    # ---- resume ----------------------------------------------------------------------------
    step, tag, nonfinite_total, nonfinite_run = _resume(cfg, setup, ckpt_root, rank, world)

    # ---- the step, fed by the data loader positioned at `step` ------------------------------
    try:
        steps_per_epoch = RankBatchSampler(len(dataset), micro, ga, rank, world, cfg.train.seed, 0,
                                           random_flip=cfg.data.random_flip).steps_per_epoch
    except ValueError as e:
        fail(f"{cfg.path}: {e}")
    batches = rank_batches(dataset, micro, ga, rank, world, cfg.train.seed, step, cfg.data.random_flip,
                           cfg.data.num_workers, pin_memory=device.type == "cuda")
    encode = None
    if vae is not None:
        def encode(x):
            return vae.encode(x).latent_dist.sample().mul_(cfg.data.latent_scale)
    nan_steps, nan_rank = test_nan_steps(), int(os.environ.get("FASTDIT_TEST_NAN_RANK", world - 1))
    trainer = Trainer(setup, batches, step=step, nonfinite_total=nonfinite_total,
                      nonfinite_in_a_row=nonfinite_run, encode=encode,
                      poison_steps=nan_steps if rank == nan_rank else ())
    profiler = _step_profiler(cfg, setup, world) if cfg.train.profile_steps and rank == 0 else None

    def trainer_state(s: int) -> Dict[str, Any]:
        return {"step": s, "rng": ckpt.rng_state(), "world_size": world,
                "data": {"epoch": s // steps_per_epoch, "step_in_epoch": s % steps_per_epoch,
                         "samples_seen": s * global_batch},
                "nonfinite_total": trainer.nonfinite_total, "nonfinite_in_a_row": trainer.nonfinite_in_a_row}

    def save(s: int, stopped: Optional[str] = None) -> str:
        with nvtx_range("checkpoint"):
            return ckpt.save_checkpoint(engine, ckpt_root, s, ema, make_meta(s, stopped), trainer_state(s),
                                        cfg.train.keep_last)

    def grid(s: int) -> Optional[str]:
        return sample_grid(cfg, make_meta(s), ema, device, vae_spec if kind != "digits" else None,
                           os.path.join(out_dir, "samples", f"{ckpt.tag_for(s)}.png"), setup.impl_cls,
                           _sampling_impl_kwargs(impl, setup.impl_kwargs, device), rank, writer, s)

    # ---- logging ---------------------------------------------------------------------------
    writer = None
    metrics_path = os.path.join(out_dir, "metrics.jsonl")
    if rank == 0:
        input_size, in_channels = setup.full_kwargs["input_size"], setup.full_kwargs["in_channels"]
        say(f"fastdit: {setup.meta_name or 'custom DiT'} ({setup.n_params / 1e6:.2f}M params, "
            f"impl={impl}) | data={kind} ({len(dataset)} items, {input_size}x{input_size}x{in_channels}) | "
            f"{world} rank(s) on {device.type}, ZeRO-{zero_stage}, {'bf16' if bf16 else 'fp32'}, global batch "
            f"{global_batch} = {micro} x {ga} x {world} | steps {step} -> {cfg.train.max_steps} | "
            f"output {out_dir}")
        if cfg.train.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                writer = SummaryWriter(os.path.join(out_dir, "tb"))
            except Exception as e:  # noqa: BLE001
                say(f"TensorBoard disabled ({e})")
    bar = tqdm(total=cfg.train.max_steps, initial=step, disable=(rank != 0 or not cfg.train.progress),
               dynamic_ncols=True, desc="train", file=sys.stdout, mininterval=1.0)

    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    loss_n = 0
    window_t0, window_steps, excluded = time.time(), 0, 0.0
    last_saved = step if tag is not None else None
    final_loss = None

    while trainer.step < cfg.train.max_steps:
        with profiler.around(trainer.step + 1, trainer) if profiler else contextlib.nullcontext():
            result = trainer.train_step()
        step = result.step
        if result.applied:
            loss_sum += result.loss
            loss_n += 1
        else:
            nonfinite_run, nonfinite_total = trainer.nonfinite_in_a_row, trainer.nonfinite_total
            msg = (f"step {step}: non-finite loss or gradient, step skipped ({nonfinite_run} in a row, "
                   f"{nonfinite_total} in total)")
            if rank == 0:
                bar.write(msg)
                with open(metrics_path, "a") as f:
                    f.write(json.dumps({"step": step, "skipped": True, "nonfinite_total": nonfinite_total}) + "\n")
            if nonfinite_run >= cfg.train.max_nonfinite_in_a_row:
                reason = (f"{nonfinite_run} non-finite steps in a row (steps {step - nonfinite_run + 1}-{step}, "
                          f"train.max_nonfinite_in_a_row={cfg.train.max_nonfinite_in_a_row})")
                path = save(step, stopped=reason)
                bar.close()
                say(f"fastdit.train: stopped: {reason}. The weights are those of the last good step "
                    f"(skipped steps change nothing); checkpoint: {path}. Lower the learning rate, check the "
                    f"data for NaN/inf, or resume with --resume auto.")
                if writer is not None:
                    writer.close()
                dist.barrier()
                return EXIT_NONFINITE
        window_steps += 1
        bar.update(1)

        if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
            stats = torch.tensor([float(loss_sum), float(loss_n)], dtype=torch.float64, device=device)
            dist.all_reduce(stats)
            elapsed = max(time.time() - window_t0 - excluded, 1e-9)
            mean_loss = float(stats[0] / stats[1]) if stats[1] > 0 else None  # None: every step skipped
            gn = engine.get_global_grad_norm()
            gn = float(gn) if gn is not None else float("nan")
            lr = float(engine.get_lr()[0]) if engine.get_lr() else float("nan")
            img_s = window_steps * global_batch / elapsed
            mfu = (img_s * flops_per_image / (peak * world)) if (flops_per_image and peak) else None
            rec = {"step": step, "loss": mean_loss, "grad_norm": gn, "lr": lr, "img_per_s": img_s,
                   "mfu": mfu, "mem_gb": memory_gb(device), "nonfinite_total": trainer.nonfinite_total,
                   "epoch": step / steps_per_epoch, "time": time.time()}
            rec = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in rec.items()}
            final_loss = mean_loss if mean_loss is not None else final_loss
            if rank == 0:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                post = {"loss": "skipped" if mean_loss is None else f"{mean_loss:.4f}", "gn": f"{gn:.3f}",
                        "lr": f"{lr:.2e}",
                        "img/s": f"{img_s:.1f}", "mem": f"{rec['mem_gb']:.2f}G"}
                if mfu is not None:
                    post["mfu"] = f"{100 * mfu:.1f}%"
                bar.set_postfix(post, refresh=False)
                if not cfg.train.progress:
                    say(f"step {step}: " + " ".join(f"{k}={v}" for k, v in post.items()))
                if writer is not None:
                    for k in ("loss", "grad_norm", "lr", "img_per_s", "mem_gb", "nonfinite_total"):
                        if rec[k] is not None:
                            writer.add_scalar(f"train/{k}", rec[k], step)
                    if mfu is not None:
                        writer.add_scalar("train/mfu", mfu, step)
            loss_sum.zero_()
            loss_n = 0
            window_t0, window_steps, excluded = time.time(), 0, 0.0

        t_aux = time.time()
        if profiler is not None and profiler.complete:
            profiler.finish()
            profiler = None
        if step % cfg.train.ckpt_every == 0 or step == cfg.train.max_steps:
            save(step)
            last_saved = step
        if cfg.train.sample_every and step % cfg.train.sample_every == 0 and step != cfg.train.max_steps:
            with nvtx_range("sample"):
                grid(step)
        excluded += time.time() - t_aux

    bar.close()
    if profiler is not None and profiler.steps_done:
        profiler.finish()  # a run resumed inside the profiled range: what was profiled
    if last_saved != step:
        save(step)
    grid_path = curve_path = None
    if cfg.train.final_sample:
        grid_path = grid(step)
    if rank == 0:
        if cfg.train.plots:
            from fastdit.training.metrics import plot_loss_curve
            curve_path = plot_loss_curve(metrics_path, os.path.join(out_dir, "loss_curve.png"),
                                         title=f"{setup.meta_name or 'DiT'} on {kind}")
        if writer is not None:
            writer.close()
        say(f"done: step {step}, final loss {final_loss:.4f}" if final_loss is not None else f"done: step {step}")
        if trainer.nonfinite_total:
            say(f"non-finite steps skipped: {trainer.nonfinite_total}")
        say(f"checkpoint: {os.path.join(ckpt_root, ckpt.latest_tag(ckpt_root) or '')}")
        if grid_path:
            say(f"samples (one row per class): {grid_path}")
        if curve_path:
            say(f"loss curve: {curve_path}")
    dist.barrier()
    return 0


def _resume(cfg, setup, ckpt_root: str, rank: int, world: int):
    """Load train.resume's checkpoint into the engine and EMA, restore (or reseed) every RNG and trim
    metrics.jsonl to the resume point. Returns (step, tag or None, nonfinite_total, nonfinite_in_a_row)."""
    step, nonfinite_total, nonfinite_run = 0, 0, 0
    resume = cfg.train.resume
    tag = None
    if resume == "auto":
        tag = ckpt.latest_tag(ckpt_root)
        load_root = ckpt_root
        if tag is None:
            say(f"--resume auto: no checkpoint in {ckpt_root}; starting from scratch")
    elif resume:
        try:
            load_root, tag = ckpt.resolve_checkpoint(resume)
        except FileNotFoundError as e:
            fail(str(e))
    state = None
    if tag is not None:
        state = ckpt.load_checkpoint(setup.engine, load_root, tag, setup.ema)
        step = ckpt.read_meta(os.path.join(load_root, tag))["step"]
        say(f"resumed from {os.path.join(load_root, tag)} at step {step}")
    if rank == 0:
        _trim_metrics(os.path.join(cfg.train.output_dir, "metrics.jsonl"), step)
    if state is not None:
        ckpt.set_rng_state(state["rng"])
        nonfinite_total = state["nonfinite_total"]
        nonfinite_run = state["nonfinite_in_a_row"]
    else:
        seed = cfg.train.seed * world + rank + step * 7919
        if tag is not None:
            say("the checkpoint was written with another world size: data order is kept, RNG streams "
                "are reseeded (the run continues, not bit-exact)")
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)
    return step, tag, nonfinite_total, nonfinite_run


def _step_profiler(cfg, setup, world: int):
    """train.profile_steps=A-B: steps A..B of rank 0 are profiled into output_dir/profile/: the last two
    (one when the range has fewer than six steps) under torch.profiler; of the others, the first half
    timed whole and the second half by phase."""
    from fastdit.training.step_profile import StepProfiler

    first, last = parse_step_range(cfg.train.profile_steps)
    steps = list(range(first, last + 1))
    n_trace = 2 if len(steps) >= 6 else 1
    n_plain = (len(steps) - n_trace) // 2
    return StepProfiler(setup.device, os.path.join(cfg.train.output_dir, "profile"), setup.global_batch,
                        plain_steps=steps[:n_plain], phase_steps=steps[n_plain:-n_trace],
                        trace_steps=steps[-n_trace:],
                        info=dict(setup.describe(world), data=cfg.data.kind, profile_steps=f"{first}-{last}"),
                        log=say)


def _trim_metrics(path: str, step: int) -> None:
    """Keep the metrics of steps <= `step` (the resume point; 0 = a fresh run drops them all)."""
    if not os.path.isfile(path):
        return
    from fastdit.training.metrics import read_metrics

    keep = [r for r in read_metrics(path) if r.get("step", 0) <= step]
    ckpt.write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in keep))


def _sampling_impl_kwargs(impl: str, impl_kwargs: Dict[str, Any], device) -> Dict[str, Any]:
    """Fast-model options for sampling: no activation checkpointing; torch kernels on CPU."""
    if impl != "fast":
        return {}
    kw = dict(impl_kwargs, checkpointing=False)
    if device.type == "cpu":
        kw["kernels"] = "torch"
    return kw


if __name__ == "__main__":
    sys.exit(main())
