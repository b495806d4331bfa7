"""The DeepSpeed training engine built from a config, and one training step on it.

    init_distributed(); device = device_for_rank()
    setup = build_engine(cfg, in_channels, input_size, num_classes, device)  # model, DeepSpeed, EMA, diffusion
    trainer = Trainer(setup, batches)          # batches: an iterator of (x, y) micro-batches
    result = trainer.train_step()              # data -> loss -> backward -> optimizer -> EMA

fastdit/train.py trains with this step, benchmarks/throughput.py (row `deepspeed`) times it and
benchmarks/step_profile.py profiles it: the step that is measured is the step that trains.

One optimizer step is `ga` (gradient accumulation) micro-batches of: data (next batch, to the device,
VAE-encoded when `encode` is given), forward (t ~ U{0..T-1}, `training_losses(...)["loss"].mean()`),
backward (`engine.backward`), optimizer (`engine.step`: DeepSpeed applies the update after the last
micro-batch); then, when the update was applied, the EMA. A non-finite loss or gradient makes
DeepSpeed skip the update (no weight, optimizer, lr or EMA change); the step is counted in
`nonfinite_total` and `nonfinite_in_a_row`. A plain torch optimizer (ZeRO-0 in fp32) has no such
check, so build_engine gives it one (`own_grad_check`: one host sync per optimizer step).

Each phase runs inside `phase(name)`, a context factory: nvtx ranges by default; a profiler passes a
timer that synchronises the device at the boundaries (fastdit.training.step_profile.PhaseTimer).
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Dict, Iterable, Iterator, Optional, Tuple

import torch

from fastdit.dist import free_port, nvtx_range, say
from fastdit.generate.vae import DOWNSAMPLE, LATENT_CHANNELS
from fastdit.models.build import build_dit, resolve_impl
from fastdit.training.config import Config, ConfigError, is_registry_architecture, resolved_architecture

PHASES = ("data", "forward", "backward", "optimizer", "ema")

def no_phase(name: str) -> ContextManager:
    """Phase hook that marks nothing."""
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------
# Distributed setup
# ----------------------------------------------------------------------------------------------
def init_distributed(shm_comm: bool = False) -> None:
    """torch.distributed through DeepSpeed: NCCL on GPUs, gloo on CPU ranks.

    Without a launcher (no RANK/WORLD_SIZE in the environment) this is one rank on a free local port.
    A no-op when the process group already exists. On CPU, DeepSpeed's JIT build of a shared-memory
    all-reduce op (minutes on a fresh machine) is skipped unless `shm_comm`.
    """
    for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(k, v)
    os.environ.setdefault("MASTER_PORT", str(free_port()) if os.environ["WORLD_SIZE"] == "1" else "29500")
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    backend = None
    if get_accelerator().device_name() == "cpu":
        backend = "gloo"
        if not shm_comm:
            import importlib
            ds_torch_comm = importlib.import_module("deepspeed.comm.torch")  # not deepspeed.comm's `torch`
            if hasattr(ds_torch_comm, "build_shm_op"):
                ds_torch_comm.build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend=backend)


def device_for_rank() -> torch.device:
    """This rank's device: DeepSpeed's accelerator at LOCAL_RANK (selected), or the CPU."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    if acc.device_name() == "cpu":
        return torch.device("cpu")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    acc.set_device(local)
    return torch.device(acc.device_name(local))


# ----------------------------------------------------------------------------------------------
# The model of a config
# ----------------------------------------------------------------------------------------------
def fast_options(cfg: Config, impl: str) -> Dict[str, Any]:
    """The fast model's constructor options from model.kernels / attention / checkpointing ({} for the
    reference, which says that it ignores model.checkpointing)."""
    if impl == "fast":
        return dict(kernels=cfg.model.kernels, attention=cfg.model.attention,
                    checkpointing=cfg.model.checkpointing, mlp=cfg.model.mlp, bias_fold=cfg.model.bias_fold)
    if cfg.model.checkpointing:
        say("model.checkpointing is a fast-model option; the reference DiT ignores it")
    if cfg.model.mlp != "plain":
        say(f"model.mlp={cfg.model.mlp!r} is a fast-model option; the reference DiT ignores it")
    if cfg.model.bias_fold:
        say("model.bias_fold is a fast-model option; the reference DiT ignores it")
    return {}


def model_kwargs_for(cfg: Config, input_size: int, in_channels: int, num_classes: int):
    """(meta 'model', meta 'model_kwargs', all constructor kwargs) for this config.

    A registry architecture gives its name and the extra kwargs (`DiT_models[name](**model_kwargs)`);
    a custom one (depth/width/heads/patch overridden) gives None and every constructor kwarg.
    """
    common = dict(input_size=input_size, in_channels=in_channels, num_classes=num_classes,
                  learn_sigma=cfg.model.learn_sigma, class_dropout_prob=cfg.model.class_dropout_prob,
                  mlp_ratio=cfg.model.mlp_ratio, block_type=cfg.model.block_type)
    arch = resolved_architecture(cfg)
    full = dict(common, **arch)
    if is_registry_architecture(cfg):
        return cfg.model.name, common, full
    return None, full, full  # a custom architecture: meta "model" is null, model_kwargs complete


def data_geometry(cfg: Config, dataset, vae=None) -> Tuple[int, int, int]:
    """(in_channels, input_size, num_classes) of the model that trains on `dataset`.

    Digits train in pixel space, latents at the extracted size, images (and synthetic latents) at
    image_size / (the VAE's downsampling, 8 without a VAE). ConfigError when model.num_classes is
    smaller than the data's class count.
    """
    kind = cfg.data.kind
    if kind == "digits":
        in_channels, input_size = 1, cfg.data.image_size
    elif kind == "latents":
        in_channels, input_size = dataset.channels, dataset.latent_size
    elif vae is not None:
        in_channels = int(vae.config.latent_channels)
        input_size = cfg.data.image_size // 2 ** (len(vae.config.block_out_channels) - 1)
    else:
        in_channels, input_size = LATENT_CHANNELS, cfg.data.image_size // DOWNSAMPLE
    num_classes = cfg.model.num_classes or dataset.num_classes
    if num_classes < dataset.num_classes:
        raise ConfigError(f"{cfg.path}: model.num_classes={num_classes} but the data has "
                          f"{dataset.num_classes} classes")
    return in_channels, input_size, num_classes


def run_peak_flops(cfg: Config, bf16: bool) -> Optional[float]:
    """Peak FLOP/s per device for this run's MFU: train.peak_flops, else the GPU's dense bf16/TF32 figure
    (fastdit.flops.peak_flops); None on CPU."""
    if cfg.train.peak_flops:
        return cfg.train.peak_flops
    if not torch.cuda.is_available():
        return None
    from fastdit.flops import peak_flops
    return peak_flops(torch.cuda.get_device_name(), "bf16" if bf16 else "tf32")


def training_flops(cfg: Config, full_kwargs: Dict[str, Any]) -> Optional[float]:
    """Training FLOPs per image (2 x MACs x 3, fastdit.flops) of the model actually trained."""
    try:
        from fastdit.flops import DiTShape, training_flops_per_image, training_flops_per_sample
        if cfg.data.kind != "digits" and is_registry_architecture(cfg):
            kw = {k: full_kwargs[k] for k in ("in_channels", "num_classes", "learn_sigma", "mlp_ratio",
                                              "class_dropout_prob", "block_type")}
            return float(training_flops_per_image(cfg.model.name, cfg.data.image_size, **kw))
        return float(training_flops_per_sample(DiTShape(**full_kwargs)))
    except Exception as e:  # noqa: BLE001 - MFU is optional
        say(f"MFU disabled: fastdit.flops could not count this model ({e})")
        return None


# ----------------------------------------------------------------------------------------------
# The deepspeed section, checked before any work
# ----------------------------------------------------------------------------------------------
class _KeysRead(dict):
    """A dict that records every key looked up in it (get, [], in, in .keys(), pop, setdefault)."""

    def __init__(self, data, read: set):
        super().__init__(data)
        self._read = read

    def _saw(self, key):
        self._read.add(key)
        return key

    def get(self, key, *default):
        return super().get(self._saw(key), *default)

    def __getitem__(self, key):
        return super().__getitem__(self._saw(key))

    def __contains__(self, key):
        return super().__contains__(self._saw(key))

    def pop(self, key, *default):
        return super().pop(self._saw(key), *default)

    def setdefault(self, key, *default):
        return super().setdefault(self._saw(key), *default)

    def keys(self):
        outer = self

        class _Keys:
            def __contains__(self, key):
                return dict.__contains__(outer, outer._saw(key))

            def __iter__(self):
                return iter(list(dict.keys(outer)))

            def __len__(self):
                return dict.__len__(outer)

        return _Keys()

    def __copy__(self):
        return _KeysRead(self, self._read)


def _pydantic_message(e, ds: Dict[str, Any]) -> str:
    """One line from a pydantic ValidationError of one of DeepSpeed's config sections."""
    parts = []
    for err in e.errors():
        loc = [str(x) for x in err.get("loc", ())]
        section = next((k for k, v in ds.items() if isinstance(v, dict) and loc and loc[0] in v), None)
        if section is None and loc and err.get("type") == "extra_forbidden":
            section = next((k for k, v in ds.items() if isinstance(v, dict)), None)
        where = ".".join(["deepspeed"] + ([section] if section else [f"<{e.title}>"]) + loc)
        got = f" (got {json.dumps(err['input'])})" if err.get("type") != "extra_forbidden" and _jsonable(
            err.get("input")) else ""
        msg = "unknown key" if err.get("type") == "extra_forbidden" else err.get("msg", "invalid")
        parts.append(f"{where}: {msg}{got}")
    return "; ".join(parts)


def _jsonable(v) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False


def check_deepspeed_config(cfg: Config, world_size: int) -> None:
    """The deepspeed section against DeepSpeed's own config model, before any work; ConfigError naming
    the key otherwise.

    DeepSpeed silently ignores a top-level key it never reads (a misspelled `zero_optimisation` ran
    ZeRO-0), so the section is parsed by DeepSpeed's DeepSpeedConfig (with `world_size` ranks) through a
    dict that records the keys it reads, and any other key is refused. DeepSpeed's own checks (the batch
    arithmetic, its pydantic sections: ZeRO stage, bf16, ...) are turned into one line each. Learning
    rates of the optimizer and the scheduler must be >= 0, the scheduler's parameters those of its class.
    """
    import deepspeed.runtime.config as ds_config
    from deepspeed.runtime import lr_schedules

    where, ds = cfg.path, cfg.deepspeed
    batch = {k: ds.get(k) for k in ("train_batch_size", "train_micro_batch_size_per_gpu",
                                    "gradient_accumulation_steps") if ds.get(k) is not None}
    for k, v in batch.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ConfigError(f"{where}: deepspeed.{k} must be a positive integer, got {json.dumps(v)}")
    tb, mb, ga = (batch.get(k) for k in ("train_batch_size", "train_micro_batch_size_per_gpu",
                                        "gradient_accumulation_steps"))
    if tb and mb and ga and tb != mb * ga * world_size:
        raise ConfigError(f"{where}: deepspeed.train_batch_size={tb} must equal train_micro_batch_size_per_gpu "
                          f"({mb}) x gradient_accumulation_steps ({ga}) x ranks ({world_size}) = "
                          f"{mb * ga * world_size}; fix one of them or drop gradient_accumulation_steps")
    for per, name, other in ((mb, "train_micro_batch_size_per_gpu", ga), (ga, "gradient_accumulation_steps", mb)):
        if tb and per and not other and tb % (per * world_size):
            raise ConfigError(f"{where}: deepspeed.train_batch_size={tb} is not a multiple of {name} ({per}) x "
                              f"ranks ({world_size}); pick sizes with train_batch_size = micro batch x gradient "
                              f"accumulation x ranks")
    read: set = set()
    saved = ds_config.dist
    ds_config.dist = _FixedWorld(world_size)  # DeepSpeedConfig asks deepspeed.comm for the world size
    try:
        ds_config.DeepSpeedConfig(_KeysRead(copy.deepcopy(ds), read))
    except Exception as e:  # noqa: BLE001 - DeepSpeed raises AssertionError, ValueError, pydantic errors...
        if hasattr(e, "errors") and hasattr(e, "title"):
            raise ConfigError(f"{where}: {_pydantic_message(e, ds)}") from None
        text = " ".join(str(e).split()) or type(e).__name__
        raise ConfigError(f"{where}: the deepspeed section is invalid: {text}") from None
    finally:
        ds_config.dist = saved
    unknown = sorted(set(ds) - read)
    if unknown:
        import difflib
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, sorted(read), n=1)
            hints.append(f"deepspeed.{k}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigError(f"{where}: DeepSpeed does not know {', '.join(hints)}; it would ignore "
                          f"{'it' if len(unknown) == 1 else 'them'} silently")
    _check_learning_rates(where, ds, lr_schedules)


class _FixedWorld:
    """Stands in for deepspeed.comm while DeepSpeedConfig is parsed before the process group exists."""

    def __init__(self, world_size: int):
        self.world_size = world_size

    def get_rank(self, *args, **kwargs) -> int:
        return 0

    def get_world_size(self, *args, **kwargs) -> int:
        return self.world_size


def _check_learning_rates(where: str, ds: Dict[str, Any], lr_schedules) -> None:
    import inspect

    opt = ds.get("optimizer") or {}
    lr = (opt.get("params") or {}).get("lr")
    if isinstance(lr, (int, float)) and not isinstance(lr, bool) and lr < 0:
        raise ConfigError(f"{where}: deepspeed.optimizer.params.lr must be >= 0, got {lr}")
    sched = ds.get("scheduler") or {}
    name, params = sched.get("type"), sched.get("params") or {}
    if not name:
        return
    cls = getattr(lr_schedules, name, None) or getattr(torch.optim.lr_scheduler, name, None)
    if cls is None or not inspect.isclass(cls):
        raise ConfigError(f"{where}: deepspeed.scheduler.type {name!r} is not a DeepSpeed scheduler "
                          f"({', '.join(lr_schedules.VALID_LR_SCHEDULES)}) nor one of torch.optim.lr_scheduler")
    sig = inspect.signature(cls.__init__).parameters
    if not any(p.kind == p.VAR_KEYWORD for p in sig.values()):
        unknown = sorted(set(params) - set(sig) - {"self", "optimizer"})
        if unknown:
            raise ConfigError(f"{where}: deepspeed.scheduler.params of {name} has no {', '.join(unknown)}; "
                              f"its parameters: {', '.join(k for k in sig if k not in ('self', 'optimizer'))}")
    for k, v in params.items():
        if (k.endswith("lr") or k.endswith("_lr_rate") or "num_steps" in k) and isinstance(v, (int, float)) \
                and not isinstance(v, bool) and v < 0:
            raise ConfigError(f"{where}: deepspeed.scheduler.params.{k} must be >= 0, got {v}")


# ----------------------------------------------------------------------------------------------
# The engine
# ----------------------------------------------------------------------------------------------
@dataclass
class TrainingSetup:
    """What build_engine built: the DeepSpeed engine, the EMA, the diffusion, and the model's description."""
    cfg: Config
    engine: Any                      # deepspeed.DeepSpeedEngine
    ema: Any                         # fastdit.training.ema.ShardedEMA
    diffusion: Any
    device: torch.device
    model_dtype: torch.dtype         # what the model's inputs are cast to (bf16 / fp16 / fp32)
    own_grad_check: bool             # a plain torch optimizer: fastdit checks the gradients itself
    impl: str                        # "fast" | "reference" (fastdit.models.build.resolve_impl)
    fast_options: Dict[str, Any]     # the fast model's kernels / attention / checkpointing ({} for the reference)
    meta_name: Optional[str]         # registry name, None for a custom architecture
    meta_kwargs: Dict[str, Any]
    full_kwargs: Dict[str, Any]      # every DiT constructor kwarg
    n_params: int
    flops_per_image: Optional[float]
    peak_flops: Optional[float]

    @property
    def bf16(self) -> bool:
        return self.engine.bfloat16_enabled()

    @property
    def micro_batch(self) -> int:
        return self.engine.train_micro_batch_size_per_gpu()

    @property
    def grad_accum(self) -> int:
        return self.engine.gradient_accumulation_steps()

    @property
    def global_batch(self) -> int:
        return self.engine.train_batch_size()

    @property
    def zero_stage(self) -> int:
        return self.engine.zero_optimization_stage()

    def describe(self, world_size: int = 1) -> Dict[str, Any]:
        """What this setup runs: model, kernels, ZeRO stage, precision, optimizer, batch geometry."""
        cfg, engine = self.cfg, self.engine
        opt = cfg.deepspeed.get("optimizer") or {}
        return dict(config=cfg.path, model=self.meta_name or "custom DiT",
                    arch={k: self.full_kwargs[k] for k in ("depth", "hidden_size", "num_heads", "patch_size",
                                                            "input_size", "in_channels")},
                    params=self.n_params, impl=self.impl, kernels=self.fast_options.get("kernels"),
                    attention=self.fast_options.get("attention"), zero_stage=self.zero_stage, bf16=self.bf16,
                    optimizer=dict(type=opt.get("type"), params=opt.get("params"),
                                   engine_optimizer=type(engine.optimizer).__name__,
                                   base_optimizer=_base_optimizer(engine.optimizer)),
                    gradient_clipping=engine.gradient_clipping(),
                    overlap_comm=getattr(engine.optimizer, "overlap_comm", None),   # ZeRO's; None without ZeRO
                    micro_batch=self.micro_batch,
                    grad_accum=self.grad_accum, world_size=world_size, global_batch=self.global_batch,
                    ema_decay=cfg.train.ema_decay, compile=cfg.train.compile, cuda_graph=cfg.train.cuda_graph,
                    fused_grad_checks=cfg.train.fused_grad_checks, ema_one_pass=cfg.train.ema_one_pass,
                    fused_optimizer_step=cfg.train.fused_optimizer_step,
                    fused_step_deferred_check=cfg.train.fused_step_deferred_check)

    def destroy(self) -> None:
        """Release the engine (DeepSpeed's own teardown) and drop every reference this setup holds."""
        if hasattr(self.engine, "destroy"):
            self.engine.destroy()
        self.engine = self.ema = self.diffusion = None


def build_engine(cfg: Config, in_channels: int, input_size: int, num_classes: int,
                 device: torch.device, compile_kwargs: Optional[Dict[str, Any]] = None) -> TrainingSetup:
    """The config's model (seeded by train.seed: identical on every rank) inside
    `deepspeed.initialize(config=cfg.deepspeed)`, compiled when train.compile (`engine.compile()`, with
    `compile_kwargs` for it when given, e.g. a benchmark's backend), with its fp32 EMA (train.ema_decay)
    and the training diffusion. torch.distributed must be initialised."""
    import deepspeed

    from fastdit.diffusion import create_diffusion
    from fastdit.training.ema import ShardedEMA

    impl = resolve_impl(cfg.model.impl, cfg.model.block_type)
    options = fast_options(cfg, impl)
    meta_name, meta_kwargs, full_kwargs = model_kwargs_for(cfg, input_size, in_channels, num_classes)
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    try:
        model = build_dit(impl, **full_kwargs, **options)
    except ImportError as e:
        raise ConfigError(f"{cfg.path}: model.impl={cfg.model.impl!r} runs the fast model, which cannot be "
                          f"imported ({e}); repair the install or set model.impl=reference") from None
    except ValueError as e:  # the model's own checks (patch size, heads ...)
        raise ConfigError(f"{cfg.path}: model: {e}") from None
    n_params = sum(p.numel() for p in model.parameters())
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=cfg.deepspeed)
    del model
    if cfg.train.compile:
        engine.compile(**(compile_kwargs or {}))
    bf16 = engine.bfloat16_enabled()
    model_dtype = torch.bfloat16 if bf16 else (torch.float16 if engine.fp16_enabled() else torch.float32)
    own_grad_check = not hasattr(engine.optimizer, "overflow")  # plain torch optimizer (ZeRO-0, fp32)
    if own_grad_check:
        _install_skip_guard(engine.optimizer)
    if cfg.train.fused_grad_checks:
        from fastdit.training import zero_checks
        why = zero_checks.install(engine.optimizer)
        if why:
            say(f"train.fused_grad_checks: DeepSpeed's own gradient checks kept: {why}")
    ema = None
    if cfg.train.fused_optimizer_step:
        from fastdit.training import zero_step
        # the fused step updates the EMA through flat buffers over DeepSpeed's fp32 partition
        ema = ShardedEMA(engine.module, cfg.train.ema_decay, one_pass=cfg.train.ema_one_pass, flat=True)
        why = zero_step.install(engine.optimizer, ema, deferred_check=cfg.train.fused_step_deferred_check)
        say(f"train.fused_optimizer_step: DeepSpeed's own optimizer step kept: {why}" if why else
            "train.fused_optimizer_step: AdamW, the bf16 parameter copy and the EMA in one pass from step 2"
            + ("; the update queued before the host reads the non-finite check (train.fused_step_deferred_check)"
               if cfg.train.fused_step_deferred_check else ""))
        if why:
            ema = None                      # DeepSpeed's step: the per-piece EMA, as without the switch
    if ema is None:
        ema = ShardedEMA(engine.module, cfg.train.ema_decay, one_pass=cfg.train.ema_one_pass)
    if cfg.train.cuda_graph:
        from fastdit.training import graphed
        g = graphed.install_for(engine.module, device)   # after the EMA: it copies nothing of the forward
        say("train.cuda_graph: no CUDA device, so the graphs are emulated (the same buffers and checks, no "
            "speed-up)" if g.emulate else
            "train.cuda_graph: the model's training forward and backward replay from CUDA graphs captured "
            "at the first step")
    diffusion = create_diffusion(timestep_respacing=cfg.diffusion.timestep_respacing,
                                 noise_schedule=cfg.diffusion.noise_schedule,
                                 learn_sigma=cfg.model.learn_sigma,
                                 diffusion_steps=cfg.diffusion.diffusion_steps)
    return TrainingSetup(cfg=cfg, engine=engine, ema=ema, diffusion=diffusion, device=device,
                         model_dtype=model_dtype, own_grad_check=own_grad_check, impl=impl,
                         fast_options=options, meta_name=meta_name, meta_kwargs=meta_kwargs,
                         full_kwargs=full_kwargs, n_params=n_params,
                         flops_per_image=training_flops(cfg, full_kwargs), peak_flops=run_peak_flops(cfg, bf16))


def _base_optimizer(optimizer) -> Optional[Dict[str, Any]]:
    """The torch optimizer that DeepSpeed's wrapper steps: its class and fused/foreach settings."""
    base = getattr(optimizer, "optimizer", optimizer)
    defaults = getattr(base, "defaults", None)
    if not isinstance(defaults, dict):
        return None
    return dict(type=type(base).__name__, fused=defaults.get("fused"), foreach=defaults.get("foreach"))


def _install_skip_guard(optimizer) -> None:
    """Give a plain torch optimizer DeepSpeed's overflow protocol: while `optimizer.overflow` is True
    its step() does nothing, and the engine then counts a skipped step (no update, no lr step)."""
    optimizer.overflow = False
    step = optimizer.step

    def guarded_step(*args, **kwargs):
        if optimizer.overflow:
            return None
        return step(*args, **kwargs)

    optimizer.step = guarded_step


# ----------------------------------------------------------------------------------------------
# One training step
# ----------------------------------------------------------------------------------------------
@dataclass
class StepResult:
    step: int              # the optimizer step just run (1-based)
    applied: bool          # False: non-finite loss or gradient, the update was skipped
    loss: torch.Tensor     # mean loss over the step's micro-batches: a float64 scalar on the device


class Trainer:
    """Runs optimizer steps of `setup` on micro-batches drawn from `batches`; see the module docstring.

    step: optimizer steps done so far (the resume point at start). encode: x -> latents inside the
    data phase (no grad), e.g. a VAE for raw images. poison_steps: optimizer steps (1-based) whose loss
    is turned into NaN (the FASTDIT_TEST_NAN_STEPS test hook). phase: the phase context factory; it
    may be replaced between steps.
    """

    def __init__(self, setup: TrainingSetup, batches: Iterator, *, step: int = 0,
                 nonfinite_total: int = 0, nonfinite_in_a_row: int = 0,
                 encode: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                 poison_steps: Iterable[int] = (),
                 phase: Callable[[str], ContextManager] = nvtx_range):
        self.setup = setup
        self.engine = setup.engine
        self.batches = batches
        self.step = step
        self.nonfinite_total = nonfinite_total
        self.nonfinite_in_a_row = nonfinite_in_a_row
        self.encode = encode
        self.poison_steps = frozenset(poison_steps)
        self.phase = phase
        self._grad_params = ([p for p in self.engine.module.parameters() if p.requires_grad]
                             if setup.own_grad_check else [])

    def _model_fn(self, x, t, **kw):
        return self.engine(x.to(self.setup.model_dtype), t, **kw).float()

    def _grads_finite(self) -> bool:
        """All gradients finite (one host sync); gradients are all-reduced, so every rank agrees."""
        flags = [torch.isfinite(p.grad).all() for p in self._grad_params if p.grad is not None]
        return bool(torch.stack(flags).all()) if flags else True

    def train_step(self) -> StepResult:
        """One optimizer step: `grad_accum` micro-batches, the update (or its skip), the EMA."""
        setup, engine, phase = self.setup, self.engine, self.phase
        device, ga = setup.device, setup.grad_accum
        target = self.step + 1
        total = torch.zeros((), device=device, dtype=torch.float64)
        for m in range(ga):
            with phase("data"):
                x, y = next(self.batches)
                x = x.to(device, non_blocking=True)
                y = y.to(device, non_blocking=True)
                if self.encode is not None:
                    with torch.no_grad():
                        x = self.encode(x)
            with phase("forward"):
                t = torch.randint(0, setup.diffusion.num_timesteps, (x.shape[0],), device=device)
                loss = setup.diffusion.training_losses(self._model_fn, x, t, model_kwargs=dict(y=y))["loss"].mean()
                if target in self.poison_steps:
                    loss = loss * float("nan")
            with phase("backward"):
                engine.backward(loss)
            with phase("optimizer"):
                if setup.own_grad_check and m == ga - 1:
                    engine.optimizer.overflow = not self._grads_finite()
                engine.step()
                if setup.own_grad_check:
                    engine.optimizer.overflow = False
            total += loss.detach().double()
        applied = engine.was_step_applied()
        self.step = target
        if applied:
            fused = getattr(engine.optimizer, "fastdit_fused_step", None)
            if fused is None or not fused.ema_updated:   # the fused optimizer step updates it itself
                with phase("ema"):
                    setup.ema.update()
            self.nonfinite_in_a_row = 0
        else:
            self.nonfinite_total += 1
            self.nonfinite_in_a_row += 1
        return StepResult(target, applied, total / ga)
