#!/usr/bin/env python3
"""Train a DiT with DeepSpeed (ZeRO 1/2/3, bf16): the official DiT recipe, fast.

    deepspeed fastdit/train.py --config configs/xl2_zero2.json
    deepspeed --num_gpus 2 fastdit/train.py --config configs/digits.json      # CPU: 2 ranks over gloo
    deepspeed --hostfile hosts fastdit/train.py --config configs/xl2_zero3.json --resume auto
    torchrun --standalone --nproc_per_node 8 -m fastdit.train --config xl2_zero2    # or fastdit-train
    python -m fastdit.training.launch --num_gpus 2 --config digits    # local ranks on a free port

On a machine without a GPU, DeepSpeed picks its CPU accelerator and `--num_gpus N` starts N CPU ranks;
without oneCCL installed the CPU accelerator's backend is gloo, which this script requests explicitly
(and it skips DeepSpeed's JIT build of a shared-memory all-reduce op, minutes on a fresh machine; set
train.shm_comm=true to keep it). Add `--master_port P` to run two jobs side by side.

`--set section.key=value` (repeatable) overrides any config value; `--resume auto` continues from the
newest intact checkpoint of train.output_dir (a fresh start when there is none; a damaged one is set
aside as <tag>.damaged, with a warning). `--resume PATH` continues another checkpoint; into an output_dir
that holds another run only with `--replace-run` (which moves that run to <output_dir>/replaced-N/).
Checkpoint files are read without running code from them (fastdit/weights/safe_load.py);
`--trust-checkpoint` unpickles them fully, for files you wrote yourself. Writes to
train.output_dir: checkpoints/, metrics.jsonl, tb/ (TensorBoard), samples/*.png, loss_curve.png, and
profile/ (trace.json, profile.json) when train.profile_steps=A-B asks for a profile of those steps.
After a resume, metrics.jsonl and tb/ keep only the steps up to the checkpoint resumed from. DeepSpeed's
INFO/WARNING log lines are hidden unless FASTDIT_DEEPSPEED_LOG=info (fastdit/training/ds_logging.py).

Sample quality (fastdit/training/quality.py): every train.eval_every steps and at the end (train.final_eval,
default: with the final grid) the EMA is sampled and scored: digits runs by a classifier trained on digits
the DiT never sees (accuracy, digits FD, real-vs-real FD; fastdit/evaluate/digits_quality.py), latent runs
by FID when train.eval_fid_ref and train.eval_inception_weights are given. The records go to metrics.jsonl
and TensorBoard; the final one is printed (the quality line) and saved as samples/<tag>_quality.json. A
failed evaluation is logged and training goes on.

One optimizer step is fastdit.training.trainer.Trainer.train_step(), the step benchmarks/throughput.py (row
`deepspeed`) times and benchmarks/step_profile.py profiles; this script adds resume, data order,
logging, checkpoints, sample grids and the non-finite stop around it.

Exit codes:
  0  done (a sample grid that fails is reported as a warning; the run and its checkpoints go on)
  2  bad input, said in one line before the first training step: the config or an override (keys, types,
     ranges, the respacings of the grids, the sample classes, the quality evaluation's settings and
     files), the deepspeed section (checked against DeepSpeed's own config model: unknown keys, batch
     arithmetic, ZeRO stage, learning rates), the model's geometry (patch size, heads), missing or invalid
     data (latent folders file by file, empty class folders, data.num_classes), a missing VAE, an
     unwritable train.output_dir, another run in train.output_dir, and a checkpoint that cannot be resumed
     (a damaged file, named with the newest intact older checkpoint; pickled objects outside the allowlist;
     another global batch; weights that do not fit the model)
  3  stopped after too many non-finite steps in a row (train.max_nonfinite_in_a_row; checkpoint saved)
SIGTERM (to the ranks, or to the deepspeed/torchrun launcher, which passes it on) stops the run after the
current step with a checkpoint; the ranks exit 0 and `--resume auto` continues exactly (DeepSpeed's launcher
itself reports 1 when it was the one signalled, and kills ranks still running 30 s later).
Anything else (1 with a traceback) is a bug or the environment (out of memory, a killed rank).
Test hooks (environment): FASTDIT_TEST_NAN_STEPS="3,6,7" turns the loss of those optimizer steps
(1-based) into NaN on rank FASTDIT_TEST_NAN_RANK (default: the last rank);
FASTDIT_TEST_KILL_DURING_SAVE=N SIGKILLs rank 0 in the middle of saving the checkpoint of step N;
FASTDIT_TEST_SIGTERM_AFTER_STEP=N sends SIGTERM to one rank after step N (fastdit/training/preemption.py).
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
import resource  # noqa: E402
import time  # noqa: E402
from typing import Any, Dict, Optional  # noqa: E402

import torch  # noqa: E402

import fastdit  # noqa: E402
from fastdit.training.ds_logging import quiet_deepspeed  # noqa: E402
with contextlib.suppress(ValueError):  # before anything imports deepspeed; a bad value is said in main()
    quiet_deepspeed()
from fastdit import dist  # noqa: E402
from fastdit.dist import nvtx_range, say  # noqa: E402
from fastdit.training import checkpoint as ckpt  # noqa: E402
from fastdit.training import metrics  # noqa: E402
from fastdit.training.preemption import StopOnSignal  # noqa: E402
from fastdit.training.completion import completed_message  # noqa: E402
from fastdit.training.config import ConfigError, load_config, parse_step_range, resolved_architecture  # noqa: E402
from fastdit.training.data import LATENTS_FILE, RankBatchSampler, build_dataset, rank_batches  # noqa: E402
from fastdit.weights.safe_load import CheckpointFileError  # noqa: E402
from fastdit.training.graphed import GraphCaptureError  # noqa: E402
from fastdit.training.trainer import (StepResult, Trainer, TrainingSetup, build_engine,  # noqa: E402
                                      data_geometry, device_for_rank, init_distributed)
from fastdit.weights import layout  # noqa: E402

EXIT_CONFIG = 2
EXIT_NONFINITE = 3
EXIT_PREEMPTED = 0  # SIGTERM: checkpoint saved at the next step boundary (fastdit.training.preemption)


# ----------------------------------------------------------------------------------------------
# Before any work: arguments, config, data, VAE
# ----------------------------------------------------------------------------------------------
def fail(msg: str, code: int = EXIT_CONFIG) -> None:
    if dist.env_rank() == 0:
        print(f"fastdit.train: error: {msg}", file=sys.stderr, flush=True)
    sys.exit(code)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True,
                   help="JSON config: a path, or the name of a shipped one (digits, xl2_zero2, ...: fastdit/configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (repeatable), e.g. --set train.max_steps=1000")
    p.add_argument("--resume", default=None,
                   help="'auto' (newest complete checkpoint of output_dir, else a fresh start) or a "
                        "checkpoint folder; overrides train.resume")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="unpickle the resumed checkpoint's files fully, also objects outside fastdit's allowlist: "
                        "this runs any code they contain, so only for checkpoints you wrote yourself (e.g. with "
                        "another DeepSpeed version); see fastdit/weights/safe_load.py")
    p.add_argument("--replace-run", action="store_true",
                   help="with --resume PATH: when train.output_dir already holds another run (or newer "
                        "checkpoints of this one), move its checkpoints, metrics and images to "
                        "<output_dir>/replaced-N/ (nothing is deleted) and continue from PATH there")
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


RUN_PRODUCTS = ("checkpoints", "metrics.jsonl", "tb", "samples", "loss_curve.png", "profile")  # --replace-run


def preflight(cfg, replace_run: bool = False):
    """Every check that can fail on user input, before distributed init or any heavy work: the data, the
    deepspeed section, the model's geometry, the settings used later (sample grids), another run in
    train.output_dir, and that train.output_dir is writable.

    Returns (dataset, vae_spec, folder to move the existing run to (--replace-run) or None). Exits with
    EXIT_CONFIG and a message saying what to pass when something is wrong.
    """
    from fastdit.generate.vae import VAENotFoundError, resolve_vae
    from fastdit.models.build import build_dit
    from fastdit.training.trainer import check_deepspeed_config, model_kwargs_for

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
    try:
        check_deepspeed_config(cfg, int(os.environ.get("WORLD_SIZE", "1")))
        in_channels, input_size, num_classes = data_geometry(cfg, dataset)
        _, _, full_kwargs = model_kwargs_for(cfg, input_size, in_channels, num_classes)
    except ConfigError as e:
        fail(str(e))
    try:
        with torch.device("meta"):
            build_dit("reference", **full_kwargs)  # the model's own checks (patch size, heads ...)
    except (ValueError, TypeError, AssertionError) as e:
        fail(f"{cfg.path}: model: {e} (the model's input is {input_size}x{input_size}x{in_channels})")
    from fastdit.training.quality import check_files as check_quality_files
    problem = check_quality_files(cfg)
    if problem:
        fail(problem)
    replace_to = _check_existing_run(cfg, replace_run)
    vae = _vae_for(cfg, dataset)
    wants_grid = cfg.train.final_sample or cfg.train.sample_every > 0
    if wants_grid:  # settings first used when a grid is drawn, maybe hours in: checked now
        classes = cfg.train.sample_classes or list(range(min(num_classes, 10)))
        bad = [c for c in classes if not 0 <= c < num_classes]
        if bad:
            fail(f"{cfg.path}: train.sample_classes {bad} are outside [0, {num_classes}) (the model has "
                 f"{num_classes} classes); pass class indices below {num_classes}")
        if not classes:
            fail(f"{cfg.path}: train.sample_classes is empty; list classes or pass --set train.sample_classes=null")
    if cfg.data.kind == "imagefolder" or (vae and wants_grid) or (cfg.data.kind == "latents" and wants_grid):
        try:
            resolve_vae(vae)
        except VAENotFoundError as e:
            extra = ("" if cfg.data.kind == "imagefolder" else
                     " (the VAE decodes the sample grids; or turn them off with --set train.final_sample=false "
                     "--set train.sample_every=0)")
            fail(f"{cfg.path}: {e}{extra}")
    if cfg.data.kind == "imagefolder" and dataset.num_classes != cfg.data.num_classes:
        fail(f"{cfg.path}: {cfg.data.path} has {dataset.num_classes} class folders but data.num_classes is "
             f"{cfg.data.num_classes}; pass --set data.num_classes={dataset.num_classes} if that is right, or "
             f"check the folder")
    _check_writable(cfg.train.output_dir)
    return dataset, vae, replace_to


def _describe_run(ckpt_root: str, tag: str) -> str:
    """'checkpoint step_0000020 (config configs/digits.json)': which run is there."""
    try:
        config = layout.read_meta(os.path.join(ckpt_root, tag)).get("config_path")
    except (OSError, ValueError):
        config = None
    return f"checkpoint {tag}" + (f" of config {config}" if config else "")


def _check_existing_run(cfg, replace_run: bool) -> Optional[str]:
    """A run already in train.output_dir is never overwritten by accident: without --resume it is refused;
    --resume PATH from another run (or from an older checkpoint of this one) is refused unless
    --replace-run, which moves the run's files to <output_dir>/replaced-N/. Returns that folder or None.
    Rewrites cfg.train.resume when PATH lies inside what is moved."""
    out = cfg.train.output_dir
    own_root = os.path.abspath(os.path.join(out, "checkpoints"))
    existing = layout.latest_tag(own_root)
    resume = cfg.train.resume
    if existing and not resume:
        fail(f"{out} already holds a run ({_describe_run(own_root, existing)}); pass --resume auto to "
             f"continue it, or another --set train.output_dir=... to start a new one")
    if not resume or resume == "auto":
        return None
    try:
        root, tag = layout.resolve_checkpoint(resume)
    except FileNotFoundError as e:
        fail(f"--resume {resume}: {e}")
    if not existing or (root == own_root and layout.step_of(tag) >= layout.step_of(existing)):
        return None
    what = (f"another run ({_describe_run(own_root, existing)})" if root != own_root else
            f"newer checkpoints of this run (up to {_describe_run(own_root, existing)})")
    if not replace_run:
        fail(f"{out} already holds {what}; continuing from {os.path.join(root, tag)} there would overwrite "
             f"its checkpoints and metrics. Pass --resume auto to continue the run in {out}, set another "
             f"train.output_dir for the run from {os.path.join(root, tag)}, or pass --replace-run to move the "
             f"run in {out} to {out}/replaced-N/ first")
    n = 1
    while os.path.exists(os.path.join(out, f"replaced-{n}")):
        n += 1
    aside = os.path.join(out, f"replaced-{n}")
    if root == own_root:  # the checkpoint resumed from moves along with the run
        cfg.train.resume = os.path.join(aside, "checkpoints", tag)
    return aside


def _check_writable(out_dir: str) -> None:
    """train.output_dir can be created and written (checked with a probe file, removed at once)."""
    probe = os.path.join(out_dir, f".write-test-{os.getpid()}")
    try:
        os.makedirs(out_dir, exist_ok=True)
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        fail(f"train.output_dir {out_dir} is not writable ({e.strerror or e}); pass --set "
             f"train.output_dir=<a folder you can write>")


def _replace_run(out_dir: str, aside: str) -> None:
    """--replace-run (rank 0): move the run products of out_dir into `aside` (nothing is deleted)."""
    os.makedirs(aside)
    for name in RUN_PRODUCTS:
        src = os.path.join(out_dir, name)
        if os.path.exists(src):
            os.rename(src, os.path.join(aside, name))
    say(f"--replace-run: the run that was in {out_dir} is now in {aside}")


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
def sampling_options(setup: TrainingSetup) -> Dict[str, Any]:
    """Fast-model options for the sample grids: no activation checkpointing; torch kernels on CPU."""
    options = dict(setup.fast_options)
    if setup.impl == "fast":
        options["checkpointing"] = False
        if setup.device.type == "cpu":
            options["kernels"] = "torch"
    return options


@torch.no_grad()
def sample_grid(cfg, setup: TrainingSetup, meta: Dict[str, Any], vae_spec: Optional[str], out_path: str,
                writer=None, step: int = 0) -> Optional[str]:
    """EMA samples, one row per class (train.sample_classes), written as a PNG by rank 0.

    fastdit.generate.sample's loop with the config's respacing, guidance and seed (sample j seeded
    train.seed + 12345 + j); pixel-space runs clip x_0 to [-1, 1] at every step. All ranks call this
    (the EMA gather is a collective); the training RNG is not touched. A failure while drawing raises
    SamplingError on rank 0 once every rank has left the collectives (Run.grid reports it and the run
    goes on).
    """
    sd = setup.ema.full_state_dict(dst=0)
    raise_after = None
    path = None
    if dist.rank() == 0:
        cuda = [setup.device] if setup.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=cuda):  # building the model draws from the global RNG
                path = _draw_grid(cfg, setup, sd, meta, vae_spec, out_path, writer, step)
        except Exception as e:  # noqa: BLE001 - a grid must never cost the run (the caller says what failed)
            raise_after = SamplingError(f"{type(e).__name__}: {' '.join(str(e).split())[:300]}")
    dist.barrier()
    if dist.rank() == 0 and raise_after is not None:
        raise raise_after
    return path


class SamplingError(RuntimeError):
    """A sample grid failed (rank 0, after every rank left sample_grid's collectives)."""


def _draw_grid(cfg, setup: TrainingSetup, sd, meta: Dict[str, Any], vae_spec: Optional[str], out_path: str,
               writer, step: int) -> str:
    """Rank 0's part of sample_grid."""
    from fastdit.diffusion import create_diffusion
    from fastdit.generate.images import decode_images, save_class_grid, to_rgb
    from fastdit.generate.sample import sample_latents
    from fastdit.generate.vae import load_vae
    from fastdit.models.build import build_dit

    kwargs, device = setup.full_kwargs, setup.device
    model = build_dit(setup.impl, **kwargs, **sampling_options(setup))
    model.load_state_dict(sd)
    model.to(device).eval()
    nc = kwargs["num_classes"]
    classes = cfg.train.sample_classes or list(range(min(nc, 10)))
    bad = [c for c in classes if not 0 <= c < nc]
    if bad:
        raise ValueError(f"train.sample_classes {bad} are outside [0, {nc})")
    labels = [c for c in classes for _ in range(cfg.train.samples_per_class)]
    respacing = cfg.diffusion.sample_steps
    diffusion = create_diffusion(timestep_respacing=respacing, noise_schedule=cfg.diffusion.noise_schedule,
                                 learn_sigma=kwargs["learn_sigma"],
                                 diffusion_steps=cfg.diffusion.diffusion_steps)
    x0 = sample_latents(model, labels, [cfg.train.seed + 12345 + j for j in range(len(labels))],
                        cfg_scale=cfg.diffusion.cfg_scale,
                        sampler="ddim" if respacing.startswith("ddim") else "ddpm",
                        eta=cfg.diffusion.ddim_eta, device=device,
                        guide_all_channels=cfg.diffusion.guide_all_channels,
                        use_cfg=cfg.diffusion.cfg_scale != 1.0 and kwargs["class_dropout_prob"] > 0,
                        diffusion=diffusion, clip_denoised=vae_spec is None)
    del model
    vae = load_vae(vae_spec, device) if vae_spec else None
    images = decode_images(x0, vae, meta["latent_scale"], batch_size=16)
    path = save_class_grid(images, len(classes), out_path, row_labels=[str(c) for c in classes])
    if writer is not None:
        writer.add_images("samples/ema", to_rgb(images), step, dataformats="NHWC")
    return path


# ----------------------------------------------------------------------------------------------
# One run: the loop's state around Trainer.train_step
# ----------------------------------------------------------------------------------------------
class Run:
    """What main's loop does around each optimizer step: the non-finite stop, the metrics window
    (metrics.jsonl, TensorBoard, the progress bar), checkpoints with their meta.json, sample grids, the
    quality evaluations (fastdit.training.quality)."""

    def __init__(self, cfg, setup: TrainingSetup, trainer: Trainer, vae_spec: Optional[str],
                 steps_per_epoch: int):
        self.cfg, self.setup, self.trainer, self.vae_spec = cfg, setup, trainer, vae_spec
        self.kind, self.steps_per_epoch = cfg.data.kind, steps_per_epoch
        self.rank, self.world = dist.rank(), dist.world_size()
        self.out_dir = cfg.train.output_dir
        self.ckpt_root = os.path.join(self.out_dir, "checkpoints")
        self.metrics_path = os.path.join(self.out_dir, "metrics.jsonl")
        self.writer = self._tensorboard() if self.rank == 0 else None
        self.loss_sum = torch.zeros((), device=setup.device, dtype=torch.float64)
        self.loss_n = 0
        self.window_t0, self.window_steps, self.excluded = time.time(), 0, 0.0
        self.final_loss = None
        self.sampling_failures = 0
        self.quality = self._quality_evaluator()

    def _quality_evaluator(self):
        """Sample quality along the way and at the end (fastdit.training.quality): digits or FID."""
        from fastdit.models.build import build_dit
        from fastdit.training.quality import QualityEvaluator

        setup = self.setup
        return QualityEvaluator(self.cfg, setup,
                                lambda: build_dit(setup.impl, **setup.full_kwargs, **sampling_options(setup)),
                                out_dir=self.out_dir, vae_spec=self.vae_spec if self.kind != "digits" else None,
                                metrics_path=self.metrics_path, writer=self.writer, log=say)

    def evaluate(self, step: int, bar) -> None:
        """A quality evaluation along the way (all ranks); rank 0 prints its line."""
        with nvtx_range("quality"):
            recs = self.quality.evaluate(step)
        if recs:
            bar.write(f"step {step}: " + self.quality.summary(recs))

    def _tensorboard(self):
        if not self.cfg.train.tensorboard:
            return None
        try:
            return metrics.tensorboard_writer(os.path.join(self.out_dir, "tb"), self.trainer.step)
        except Exception as e:  # noqa: BLE001
            say(f"TensorBoard disabled ({e})")
            return None

    def meta(self, step: int, stopped: Optional[str] = None) -> Dict[str, Any]:
        """meta.json of the checkpoint of `step` (fastdit.weights.layout)."""
        import deepspeed

        cfg, setup = self.cfg, self.setup
        latent = self.kind != "digits"
        return {
            "model": setup.meta_name, "model_kwargs": setup.meta_kwargs, "arch": resolved_architecture(cfg),
            "impl": setup.impl, "kernels": cfg.model.kernels, "attention": cfg.model.attention,
            "step": step, "samples_seen": step * setup.global_batch,
            "vae": self.vae_spec if latent else None,
            "latent_scale": cfg.data.latent_scale if latent else None,
            "image_size": cfg.data.image_size, "data_kind": self.kind, "ema_decay": cfg.train.ema_decay,
            "world_size": self.world, "zero_stage": setup.zero_stage, "bf16": setup.bf16,
            "global_batch": setup.global_batch, "stopped": stopped, "config": cfg.to_dict(),
            "config_path": cfg.path,
            "versions": {"fastdit": fastdit.__version__, "deepspeed": deepspeed.__version__,
                         "torch": torch.__version__},
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }

    def trainer_state(self, s: int) -> Dict[str, Any]:
        t = self.trainer
        return {"step": s, "rng": ckpt.rng_state(), "world_size": self.world,
                "data": {"epoch": s // self.steps_per_epoch, "step_in_epoch": s % self.steps_per_epoch,
                         "samples_seen": s * self.setup.global_batch},
                "nonfinite_total": t.nonfinite_total, "nonfinite_in_a_row": t.nonfinite_in_a_row}

    def save(self, s: int, stopped: Optional[str] = None) -> str:
        with nvtx_range("checkpoint"):
            path = ckpt.save_checkpoint(self.setup.engine, self.ckpt_root, s, self.setup.ema,
                                        self.meta(s, stopped), self.trainer_state(s), self.cfg.train.keep_last)
        if self.rank == 0:
            from tqdm import tqdm
            tqdm.write(f"checkpoint saved: {path} (step {s})", file=sys.stdout)
        return path

    def grid(self, s: int) -> Optional[str]:
        """The sample grid of step `s`; a failure is reported (rank 0) and training goes on."""
        path = os.path.join(self.out_dir, "samples", f"{layout.tag_for(s)}.png")
        try:
            return sample_grid(self.cfg, self.setup, self.meta(s),
                               self.vae_spec if self.kind != "digits" else None, path, self.writer, s)
        except SamplingError as e:
            self.sampling_failures += 1
            saved = layout.latest_tag(self.ckpt_root)
            say(f"warning: the sample grid of step {s} failed ({e}); training is not affected"
                + (f" (newest checkpoint: {os.path.join(self.ckpt_root, saved)}; draw a grid from it with "
                   f"python -m fastdit.sample --ckpt {os.path.join(self.ckpt_root, saved)})" if saved else ""))
            return None

    def account(self, result: StepResult, bar) -> Optional[str]:
        """Count the step's loss, or report its skip; returns the reason to stop, or None."""
        if result.applied:
            self.loss_sum += result.loss
            self.loss_n += 1
            return None
        step, t = result.step, self.trainer
        run, total = t.nonfinite_in_a_row, t.nonfinite_total
        if self.rank == 0:
            bar.write(f"step {step}: non-finite loss or gradient, step skipped ({run} in a row, {total} in total)")
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps({"step": step, "skipped": True, "nonfinite_total": total}) + "\n")
        limit = self.cfg.train.max_nonfinite_in_a_row
        if run >= limit:
            return (f"{run} non-finite steps in a row (steps {step - run + 1}-{step}, "
                    f"train.max_nonfinite_in_a_row={limit})")
        return None

    def log(self, step: int, bar) -> None:
        """The window since the last log: mean loss over the ranks, grad norm, lr, img/s, MFU, memory."""
        setup, engine = self.setup, self.setup.engine
        stats = torch.tensor([float(self.loss_sum), float(self.loss_n)], dtype=torch.float64,
                             device=setup.device)
        torch.distributed.all_reduce(stats)
        elapsed = max(time.time() - self.window_t0 - self.excluded, 1e-9)
        mean_loss = float(stats[0] / stats[1]) if stats[1] > 0 else None  # None: every step skipped
        gn = engine.get_global_grad_norm()
        gn = float(gn) if gn is not None else float("nan")
        lr = float(engine.get_lr()[0]) if engine.get_lr() else float("nan")
        img_s = self.window_steps * setup.global_batch / elapsed
        fpi, peak = setup.flops_per_image, setup.peak_flops
        mfu = (img_s * fpi / (peak * self.world)) if (fpi and peak) else None
        rec = {"step": step, "loss": mean_loss, "grad_norm": gn, "lr": lr, "img_per_s": img_s,
               "mfu": mfu, "mem_gb": memory_gb(setup.device), "nonfinite_total": self.trainer.nonfinite_total,
               "epoch": step / self.steps_per_epoch, "time": time.time()}
        rec = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in rec.items()}
        self.final_loss = mean_loss if mean_loss is not None else self.final_loss
        if self.rank == 0:
            self._write_record(rec, bar)
        self.loss_sum.zero_()
        self.loss_n = 0
        self.window_t0, self.window_steps, self.excluded = time.time(), 0, 0.0

    def _write_record(self, rec: Dict[str, Any], bar) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        post = {"loss": "skipped" if rec["loss"] is None else f"{rec['loss']:.4f}",
                "gn": f"{rec['grad_norm'] if rec['grad_norm'] is not None else float('nan'):.3f}",
                "lr": f"{rec['lr'] if rec['lr'] is not None else float('nan'):.2e}",
                "img/s": f"{rec['img_per_s']:.1f}", "mem": f"{rec['mem_gb']:.2f}G"}
        if rec["mfu"] is not None:
            post["mfu"] = f"{100 * rec['mfu']:.1f}%"
        bar.set_postfix(post, refresh=False)
        if not self.cfg.train.progress:
            say(f"step {rec['step']}: " + " ".join(f"{k}={v}" for k, v in post.items()))
        if self.writer is not None:
            for k in ("loss", "grad_norm", "lr", "img_per_s", "mem_gb", "nonfinite_total"):
                if rec[k] is not None:
                    self.writer.add_scalar(f"train/{k}", rec[k], rec["step"])
            if rec["mfu"] is not None:
                self.writer.add_scalar("train/mfu", rec["mfu"], rec["step"])

    def stop(self, step: int, reason: str, bar) -> int:
        """Save, say why the run stops after non-finite steps, and return EXIT_NONFINITE."""
        path = self.save(step, stopped=reason)
        bar.close()
        say(f"fastdit.train: stopped: {reason}. The weights are those of the last good step "
            f"(skipped steps change nothing); checkpoint: {path}. Lower the learning rate, check the "
            f"data for NaN/inf, or resume with --resume auto.")
        if self.writer is not None:
            self.writer.close()
        dist.barrier()
        return EXIT_NONFINITE

    def preempted(self, step: int, save: bool, bar) -> int:
        """SIGTERM: save the checkpoint of `step` (unless just saved), say so, return EXIT_PREEMPTED."""
        path = self.save(step) if save else os.path.join(self.ckpt_root, layout.tag_for(step))
        bar.close()
        say(f"fastdit.train: stopped by SIGTERM after step {step}; checkpoint: {path}. "
            f"Continue with --resume auto.")
        if self.writer is not None:
            self.writer.close()
        dist.barrier()
        return EXIT_PREEMPTED

    def finish(self, step: int) -> None:
        """The final grid and loss curve, and where everything is."""
        grid_path = curve_path = None
        if self.cfg.train.final_sample:
            grid_path = self.grid(step)
        final_quality = self.quality.evaluate(step) if self.quality.final else None
        if self.rank == 0:
            if self.cfg.train.plots:
                curve_path = metrics.plot_loss_curve(
                    self.metrics_path, os.path.join(self.out_dir, "loss_curve.png"),
                    title=f"{self.setup.meta_name or 'DiT'} on {self.kind}")
            if self.writer is not None:
                self.writer.close()
            fl = self.final_loss
            say(f"done: step {step}, final loss {fl:.4f}" if fl is not None else f"done: step {step}")
            if self.trainer.nonfinite_total:
                say(f"non-finite steps skipped: {self.trainer.nonfinite_total}")
            if self.sampling_failures:
                say(f"sample grids that failed: {self.sampling_failures} (see the warnings above)")
            say(f"checkpoint: {os.path.join(self.ckpt_root, layout.latest_tag(self.ckpt_root) or '')}")
            if grid_path:
                say(f"samples (one row per class): {grid_path}")
            if curve_path:
                say(f"loss curve: {curve_path}")
            if final_quality:
                path = os.path.join(self.out_dir, "samples", f"{layout.tag_for(step)}_quality.json")
                say(self.quality.summary(final_quality))
                say(f"quality: {self.quality.write_json(final_quality, path)}")
        dist.barrier()


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
def setup_run(cfg, dataset, vae_spec, trust: bool = False, replace_to: Optional[str] = None):
    """Distributed init, the engine (fastdit.training.trainer.build_engine), the resumed state and the
    data loader positioned at it. Returns (Run, step, tag or None).

    trust: --trust-checkpoint (full unpickling of the resumed files); replace_to: --replace-run's folder."""
    init_distributed(cfg.train.shm_comm)
    set_cpu_threads(cfg)
    rank, world = dist.rank(), dist.world_size()
    device = device_for_rank()
    ckpt_root = os.path.join(cfg.train.output_dir, "checkpoints")
    if rank == 0:
        if replace_to:
            _replace_run(cfg.train.output_dir, replace_to)
        os.makedirs(ckpt_root, exist_ok=True)
        ckpt.clean_tmp(ckpt_root)
    dist.barrier()
    vae = encode = None
    if cfg.data.kind == "imagefolder":
        from fastdit.generate.vae import load_vae
        vae = load_vae(vae_spec, device)

        def encode(x):
            return vae.encode(x).latent_dist.sample().mul_(cfg.data.latent_scale)
    try:
        setup = build_engine(cfg, *data_geometry(cfg, dataset, vae), device)
    except ConfigError as e:
        fail(str(e))
    try:
        step, tag, state = ckpt.resume(cfg.train.resume, ckpt_root, setup.engine, setup.ema, cfg.train.seed,
                                       global_batch=setup.global_batch, trust=trust)
    except (FileNotFoundError, ValueError, ckpt.ResumeError, CheckpointFileError) as e:
        fail(str(e))
    if rank == 0:
        metrics.trim(os.path.join(cfg.train.output_dir, "metrics.jsonl"), step)
    micro, ga = setup.micro_batch, setup.grad_accum
    try:
        steps_per_epoch = RankBatchSampler(len(dataset), micro, ga, rank, world, cfg.train.seed, 0,
                                           random_flip=cfg.data.random_flip).steps_per_epoch
    except ValueError as e:
        fail(f"{cfg.path}: {e}")
    batches = rank_batches(dataset, micro, ga, rank, world, cfg.train.seed, step, cfg.data.random_flip,
                           cfg.data.num_workers, pin_memory=device.type == "cuda")
    nan_steps, nan_rank = test_nan_steps(), int(os.environ.get("FASTDIT_TEST_NAN_RANK", world - 1))
    trainer = Trainer(setup, batches, step=step, nonfinite_total=state["nonfinite_total"],
                      nonfinite_in_a_row=state["nonfinite_in_a_row"], encode=encode,
                      poison_steps=nan_steps if rank == nan_rank else ())
    return Run(cfg, setup, trainer, vae_spec, steps_per_epoch), step, tag


def _step_profiler(cfg, setup: TrainingSetup):
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
                        info=dict(setup.describe(dist.world_size()), data=cfg.data.kind,
                                  profile_steps=f"{first}-{last}"),
                        log=say)


def announce(run: Run, dataset, step: int) -> None:
    cfg, setup = run.cfg, run.setup
    input_size, in_channels = setup.full_kwargs["input_size"], setup.full_kwargs["in_channels"]
    say(f"fastdit: {setup.meta_name or 'custom DiT'} ({setup.n_params / 1e6:.2f}M params, "
        f"impl={setup.impl}) | data={run.kind} ({len(dataset)} items, {input_size}x{input_size}x{in_channels}) | "
        f"{run.world} rank(s) on {setup.device.type}, ZeRO-{setup.zero_stage}, "
        f"{'bf16' if setup.bf16 else 'fp32'}, global batch {setup.global_batch} = {setup.micro_batch} x "
        f"{setup.grad_accum} x {run.world} | steps {step} -> {cfg.train.max_steps} | output {run.out_dir}")


def main(argv=None) -> int:
    from tqdm import tqdm

    args = parse_args(argv)
    try:
        quiet_deepspeed()  # DeepSpeed's INFO/WARNING lines: FASTDIT_DEEPSPEED_LOG=info shows them
        cfg = load_config(args.config, args.overrides)
    except ValueError as e:  # ConfigError, or a bad FASTDIT_DEEPSPEED_LOG
        fail(str(e))
    if args.resume is not None:
        cfg.train.resume = args.resume
    if args.replace_run and cfg.train.resume in (None, "auto"):
        fail("--replace-run goes with --resume PATH (the checkpoint to continue from)")
    done = completed_message(cfg.train.output_dir, cfg.train.max_steps, cfg.train.resume)
    if done:
        if dist.env_rank() == 0:
            print(f"fastdit.train: {done}", flush=True)
        return 0
    dataset, vae_spec, replace_to = preflight(cfg, args.replace_run)
    run, step, tag = setup_run(cfg, dataset, vae_spec, trust=args.trust_checkpoint, replace_to=replace_to)
    trainer, max_steps = run.trainer, cfg.train.max_steps
    profiler = _step_profiler(cfg, run.setup) if cfg.train.profile_steps and run.rank == 0 else None
    if run.rank == 0:
        announce(run, dataset, step)
    bar = tqdm(total=max_steps, initial=step, disable=(run.rank != 0 or not cfg.train.progress),
               dynamic_ncols=True, desc="train", file=sys.stdout, mininterval=1.0)
    last_saved = step if tag is not None else None
    stop_signal = StopOnSignal()  # SIGTERM: checkpoint at the next step boundary, exit 0
    while trainer.step < max_steps:
        try:
            with profiler.around(trainer.step + 1, trainer) if profiler else contextlib.nullcontext():
                result = trainer.train_step()
        except GraphCaptureError as e:  # train.cuda_graph at its first step: nothing trained with graphs yet
            fail(f"{cfg.path}: train.cuda_graph: {e}")
        step = result.step
        reason = run.account(result, bar)
        if reason is not None:
            return run.stop(step, reason, bar)
        run.window_steps += 1
        bar.update(1)
        if step % cfg.train.log_every == 0 or step == max_steps:
            run.log(step, bar)
        t_aux = time.time()
        if profiler is not None and profiler.complete:
            profiler.finish()
            profiler = None
        if run.quality.due(step) and step != max_steps:  # before the save: a resume redoes a lost one
            run.evaluate(step, bar)
        if step % cfg.train.ckpt_every == 0 or step == max_steps:
            run.save(step)
            last_saved = step
        if cfg.train.sample_every and step % cfg.train.sample_every == 0 and step != max_steps:
            with nvtx_range("sample"):
                run.grid(step)
        run.excluded += time.time() - t_aux
        if stop_signal.requested(run.setup.device, step) and step < max_steps:
            return run.preempted(step, last_saved != step, bar)
    bar.close()
    if profiler is not None and profiler.steps_done:
        profiler.finish()  # a run resumed inside the profiled range: what was profiled
    if last_saved != step:
        run.save(step)
    run.finish(step)
    return 0


def run_cli(argv=None) -> int:
    """main(), then the process group torn down in order: every return of main() comes after the run's last
    barrier, so no rank still talks to the group when another leaves it. Left to interpreter exit, the gloo
    group's threads and store connections die in whatever order the process ends them (a 2-rank CPU run once
    aborted there, after its work was done: "terminate called without an active exception"). A run that raises
    skips this (the launcher stops the other ranks). In-process callers of main() (the tests) keep the group."""
    code = main(argv)
    dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(run_cli())
