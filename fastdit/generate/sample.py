"""Sample a grid of images from a DiT checkpoint.

    python -m fastdit.sample --ckpt CKPT --model DiT-XL/2 --vae VAE_DIR --class-labels 207 360 \\
        --cfg-scale 4.0 --sampler ddpm --num-steps 250 --seed 0 --out grid.png

CKPT may be an official `.pt` (raw state dict or the training dict with "ema"), a `fastdit.export`
file, or a fastdit training checkpoint directory (output dir, checkpoints dir or tag dir); see
`fastdit.weights.load`. The architecture is read from the weights and `meta.json`; only the head
count needs `--model` when there is no metadata.

Sampling follows the official DiT: classifier-free guidance doubles the batch with the null class
and calls `forward_with_cfg` (guiding the first 3 channels, as the official code, for 4-channel
latents; all eps channels otherwise, see --guide-channels); DDPM with N respaced steps or DDIM with
N steps and eta. Sample j draws its initial noise and every step's noise from its own generator
seeded with seed + j (on the CPU, whatever the device), so a sample does not depend on the batch it
is in, the batch size, the device count or the guidance path; `fastdit.sample_fid` uses the same
rule for FID runs. Latent models are decoded with a diffusers AutoencoderKL from a local path
(latent scale 0.18215); pixel-space models (e.g. the digits default) are mapped [-1, 1] -> uint8.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import sys
from typing import Callable, Optional, Sequence, Tuple

import numpy as np
import torch

from fastdit.diffusion import create_diffusion
from fastdit.diffusion.gaussian_diffusion import _extract_into_tensor
from fastdit.generate.images import decode_images, make_grid, save_class_grid, save_image
from fastdit.generate.vae import LATENT_SCALE, load_vae
from fastdit.models.build import IMPLS
from fastdit.weights.load import WEIGHT_CHOICES, build_model, load_checkpoint
from fastdit.weights.safe_load import CheckpointFileError

OFFICIAL_DEMO_LABELS = [207, 360, 387, 974, 88, 979, 417, 279]  # the official sample.py grid


# ----------------------------------------------------------------------------------------------
# Noise sources
# ----------------------------------------------------------------------------------------------
class PerSampleNoise:
    """Gaussian noise where row j always comes from generator j (seeded `seeds[j]`, on the CPU).

    `draw(shape)` returns (n, *shape) in float32; row j is the next draw of generator j, so a sample's
    noise depends only on its seed and the number of draws so far, never on its batch neighbours.
    """

    def __init__(self, seeds: Sequence[int]):
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]

    def __len__(self) -> int:
        return len(self.generators)

    def draw(self, shape: Sequence[int]) -> torch.Tensor:
        return torch.stack([torch.randn(*shape, generator=g) for g in self.generators])


class SharedStreamNoise:
    """One generator for the whole batch: draws (n, *shape) at once, in the order the official
    `p_sample_loop` consumes the global RNG (x_T first, then one draw per step). On the CPU,
    SharedStreamNoise(s) reproduces `torch.manual_seed(s)` + the official loops exactly."""

    def __init__(self, seed: int, n: int):
        self.generator = torch.Generator().manual_seed(int(seed))
        self.n = n

    def __len__(self) -> int:
        return self.n

    def draw(self, shape: Sequence[int]) -> torch.Tensor:
        return torch.randn(self.n, *shape, generator=self.generator)


# ----------------------------------------------------------------------------------------------
# Model functions
# ----------------------------------------------------------------------------------------------
def default_guide_all_channels(in_channels: int) -> bool:
    """Official CFG guides channels [0, 3) (right for 4-channel latents); other models guide their
    eps channels, since "the first 3" of a 1- or 3-channel model would include variance channels."""
    return in_channels != 4


def make_model_fn(model: torch.nn.Module, cfg_scale: float = 1.0, use_cfg: Optional[bool] = None,
                  guide_all_channels: Optional[bool] = None,
                  autocast_dtype: Optional[torch.dtype] = None) -> Callable:
    """fn(x (n, C, H, W), t (n,), y (n,)) -> model output (n, C_out, H, W) in float32.

    With guidance (`use_cfg`, default: cfg_scale != 1) the batch is doubled as in the official code,
    [x; x] with labels [y; null], passed through `model.forward_with_cfg`, and the first half kept.
    """
    if use_cfg is None:
        use_cfg = cfg_scale != 1.0
    num_classes = model.num_classes
    in_channels = model.in_channels
    if guide_all_channels is None:
        guide_all_channels = default_guide_all_channels(in_channels)
    cfg_kwargs = {"guide_all_channels": True} if guide_all_channels else {}

    def autocast(device: torch.device):
        if autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=autocast_dtype)

    def fn(x, t, y):
        with autocast(x.device):
            if not use_cfg:
                return model(x, t, y).float()
            n = x.shape[0]
            y_null = torch.full_like(y, num_classes)
            out = model.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]),
                                         torch.cat([y, y_null]), cfg_scale, **cfg_kwargs)
            return out[:n].float()

    return fn


# ----------------------------------------------------------------------------------------------
# The sampling loop
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def sample_loop(diffusion, model_fn: Callable, y: torch.Tensor, noise, sample_shape: Sequence[int],
                sampler: str = "ddpm", eta: float = 0.0, device="cpu", progress: bool = False,
                clip_denoised: bool = False) -> torch.Tensor:
    """Run a respaced diffusion from x_T to x_0 with noise from `noise` (PerSampleNoise ...).

    The step arithmetic is the official `p_sample` (DDPM: mean + exp(log_var / 2) z, no noise at
    t = 0) and `ddim_sample` (eq. 12 of Song et al. with eta), using the diffusion's own
    `p_mean_variance`; only where the noise comes from differs. `clip_denoised` clips the predicted
    x_0 to [-1, 1] at every step (for pixel-space models; the official latent sampling does not).
    Returns x_0 (n, *sample_shape).
    """
    if sampler not in ("ddpm", "ddim"):
        raise ValueError(f"sampler must be 'ddpm' or 'ddim', got {sampler!r}")
    device = torch.device(device)
    n = len(noise)
    if y.shape != (n,):
        raise ValueError(f"labels must be ({n},), got {tuple(y.shape)}")
    y = y.to(device)
    x = noise.draw(sample_shape).to(device)  # x_T (n, C, H, W)
    steps = list(range(diffusion.num_timesteps))[::-1]
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc=f"{sampler} sampling", unit="step")
    for i in steps:
        t = torch.tensor([i] * n, device=device)
        out = diffusion.p_mean_variance(model_fn, x, t, clip_denoised=clip_denoised, model_kwargs={"y": y})
        if sampler == "ddpm":
            if i == 0:
                x = out["mean"]  # the official step multiplies its noise by 0 here
            else:
                z = noise.draw(sample_shape).to(device)
                x = out["mean"] + torch.exp(0.5 * out["log_variance"]) * z
        else:
            eps = diffusion._predict_eps_from_xstart(x, t, out["pred_xstart"])
            abar = _extract_into_tensor(diffusion.alphas_cumprod, t, x.shape)
            abar_prev = _extract_into_tensor(diffusion.alphas_cumprod_prev, t, x.shape)
            sigma = (eta * torch.sqrt((1 - abar_prev) / (1 - abar))
                     * torch.sqrt(1 - abar / abar_prev))
            mean_pred = out["pred_xstart"] * torch.sqrt(abar_prev) + torch.sqrt(
                1 - abar_prev - sigma ** 2) * eps
            if i == 0 or eta == 0:
                x = mean_pred
            else:
                z = noise.draw(sample_shape).to(device)
                x = mean_pred + sigma * z
    return x


def respacing(sampler: str, num_steps: int) -> str:
    """The create_diffusion respacing string: "250" for DDPM, "ddim50" for DDIM."""
    if num_steps <= 0:
        raise ValueError(f"num_steps must be positive, got {num_steps}")
    return f"ddim{num_steps}" if sampler == "ddim" else str(num_steps)


def parse_sample_steps(text: str) -> Tuple[str, int]:
    """"ddim50" -> ("ddim", 50); "250" -> ("ddpm", 250): the inverse of respacing(); ValueError otherwise."""
    t = text.strip()
    sampler = "ddim" if t.startswith("ddim") else "ddpm"
    num = t[4:] if sampler == "ddim" else t
    if not num.isdigit() or int(num) <= 0:
        raise ValueError(f"sample steps must look like 'ddim50' or '250', got {text!r}")
    return sampler, int(num)


def sample_latents(model, class_labels: Sequence[int], seeds: Sequence[int], cfg_scale: float = 1.0,
                   sampler: str = "ddpm", num_steps: int = 250, eta: float = 0.0, device="cpu",
                   bf16: bool = False, guide_all_channels: Optional[bool] = None,
                   use_cfg: Optional[bool] = None, progress: bool = False,
                   diffusion=None, clip_denoised: bool = False) -> torch.Tensor:
    """x_0 (n, C, H, W) for labels `class_labels`, sample j seeded by seeds[j] (see PerSampleNoise).

    `diffusion` (default: create_diffusion(respacing(sampler, num_steps))) is the respaced diffusion to
    sample; the training loop passes its config's."""
    if len(class_labels) != len(seeds):
        raise ValueError(f"{len(class_labels)} labels but {len(seeds)} seeds")
    bad = [c for c in class_labels if not 0 <= int(c) < model.num_classes]
    if bad:
        raise ValueError(f"class labels {bad} are outside [0, {model.num_classes})")
    if diffusion is None:
        diffusion = create_diffusion(respacing(sampler, num_steps), learn_sigma=model.learn_sigma)
    model_fn = make_model_fn(model, cfg_scale, use_cfg, guide_all_channels,
                             torch.bfloat16 if bf16 else None)
    shape = (model.in_channels, model.input_size, model.input_size)
    y = torch.tensor([int(c) for c in class_labels], dtype=torch.long)
    return sample_loop(diffusion, model_fn, y, PerSampleNoise(seeds), shape, sampler, eta, device,
                       progress, clip_denoised)


# ----------------------------------------------------------------------------------------------
# Model + VAE from a checkpoint
# ----------------------------------------------------------------------------------------------
def load_model(ckpt: str, model_name: Optional[str] = None, weights: str = "ema",
               impl: str = "auto", num_heads: Optional[int] = None, device="cpu",
               impl_kwargs: Optional[dict] = None, verbose: bool = False, trust: bool = False):
    """(model in eval mode on `device`, info dict) from any checkpoint layout fastdit loads (read without
    running code unless `trust`: fastdit.weights.safe_load)."""
    loaded = load_checkpoint(ckpt, weights=weights, trust=trust)
    overrides = {"num_heads": num_heads} if num_heads else None
    model, name, kwargs, used = build_model(
        loaded.state_dict, model_name, loaded.meta, overrides, impl, **(impl_kwargs or {}))
    model = model.to(device).eval()
    info = {"source": loaded.source, "path": loaded.path, "meta": loaded.meta or {},
            "model": name, "model_kwargs": kwargs, "impl": used, "notes": loaded.notes}
    if verbose:
        print(f"loaded {loaded.source} from {loaded.path}: {name or 'custom DiT'} "
              f"({used} model) {kwargs}", file=sys.stderr)
        for note in loaded.notes:
            print(f"note: {note}", file=sys.stderr)
    return model, info


def resolve_vae(vae_path: Optional[str], info: dict, in_channels: int) -> Optional[str]:
    """The VAE folder to decode with, or None for a pixel-space model."""
    if vae_path:
        return vae_path
    meta = info.get("meta") or {}
    if meta.get("vae"):
        return meta["vae"]  # a folder or cached hub id; load_vae says what to pass when absent
    if "vae" in meta or in_channels != 4:
        return None  # pixel space
    raise ValueError("this is a 4-channel (latent) model: pass --vae PATH, a local diffusers "
                     "AutoencoderKL folder (e.g. sd-vae-ft-ema)")


def _latent_scale(arg: Optional[float], info: dict) -> float:
    if arg is not None:
        return arg
    meta_scale = (info.get("meta") or {}).get("latent_scale")
    return float(meta_scale) if meta_scale else LATENT_SCALE


def add_model_args(p: argparse.ArgumentParser, cfg_default: Optional[float] = None) -> None:
    """Checkpoint/model/sampler flags shared by sample and sample_fid."""
    p.add_argument("--ckpt", required=True, help="official .pt, fastdit export, or training "
                   "checkpoint directory (output dir / checkpoints dir / tag dir)")
    p.add_argument("--model", default=None, help="registry name, e.g. DiT-XL/2 (default: from "
                   "meta.json; needed for the head count otherwise)")
    p.add_argument("--num-heads", type=int, default=None, help="for non-registry architectures")
    p.add_argument("--weights", choices=WEIGHT_CHOICES, default="ema",
                   help="EMA (default) or raw model weights of training checkpoints")
    p.add_argument("--impl", choices=IMPLS, default="auto",
                   help="auto (default): the fast model for adaLN-Zero blocks, the reference for the others; "
                        "fast; reference (the eager oracle)")
    p.add_argument("--kernels", default=None, help="fast model kernels (torch|triton)")
    p.add_argument("--attention", default=None, help="fast model attention backend")
    p.add_argument("--cfg-scale", type=float, default=cfg_default,
                   help=f"guidance scale (default: {cfg_default})" if cfg_default is not None else
                   "guidance scale (default: the training config's diffusion.cfg_scale when the "
                   "checkpoint has one, else 4.0 as the official sample.py)")
    p.add_argument("--guide-channels", choices=("auto", "first3", "all"), default="auto",
                   help="CFG channels: first3 = official; all = every eps channel; auto = first3 "
                        "for 4-channel latents, all otherwise")
    p.add_argument("--sampler", choices=("ddpm", "ddim"), default="ddpm")
    p.add_argument("--num-steps", type=positive_int, default=None, help="default 250 (ddpm) / 50 (ddim)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae", default=None, help="local diffusers AutoencoderKL folder "
                   "(default: meta.json's; none for pixel-space models)")
    p.add_argument("--latent-scale", type=float, default=None, help="default meta.json's or 0.18215")
    p.add_argument("--bf16", action="store_true", help="run the DiT under bf16 autocast")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="unpickle the checkpoint fully, also objects outside fastdit's allowlist: this runs any "
                        "code the file contains, so only for files you wrote yourself")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def num_steps_for(args) -> int:
    """--num-steps, or the sampler's default (250 DDPM steps, 50 DDIM steps)."""
    if args.num_steps is not None:
        return args.num_steps
    return 50 if args.sampler == "ddim" else 250


LOAD_ERRORS = (FileNotFoundError, KeyError, ValueError, CheckpointFileError)  # what the commands report


def error_line(prog: str, e: BaseException) -> int:
    """Print `prog: error: <message>` (one line) to stderr; returns exit code 2."""
    text = e.args[0] if isinstance(e, KeyError) and e.args else e
    print(f"{prog}: error: {' '.join(str(text).split())}", file=sys.stderr)
    return 2


def default_cfg_scale(info: dict, fallback: float = 4.0) -> float:
    """diffusion.cfg_scale of the training config stored in meta.json, else `fallback`."""
    config = (info.get("meta") or {}).get("config") or {}
    value = (config.get("diffusion") or {}).get("cfg_scale") if isinstance(config, dict) else None
    return float(value) if value is not None else fallback


def guide_flag(choice: str) -> Optional[bool]:
    return {"auto": None, "first3": False, "all": True}[choice]


def impl_kwargs_from(args) -> dict:
    return {k: v for k, v in (("kernels", args.kernels), ("attention", args.attention)) if v}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastdit.sample", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--class-labels", type=int, nargs="+", default=None,
                   help="default: the official demo labels for 1000 classes, else every class")
    p.add_argument("--samples-per-class", type=positive_int, default=1,
                   help="samples per label; the grid then has one row per label, its class on the left")
    p.add_argument("--out", default="sample.png", help="output grid image")
    p.add_argument("--nrow", type=int, default=None, help="images per grid row")
    p.add_argument("--upscale", type=int, default=None,
                   help="nearest-neighbour zoom of each image (default: up to >= 64 px)")
    p.add_argument("--save-npz", default=None, help="also save the uint8 NHWC samples (arr_0) here")
    args = p.parse_args(argv)

    num_steps = num_steps_for(args)
    try:  # a step count the 1000-step schedule cannot be respaced to (e.g. DDIM 1): said before any work
        create_diffusion(respacing(args.sampler, num_steps))
    except ValueError as e:
        p.error(f"--num-steps {num_steps}: {e}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        model, info = load_model(args.ckpt, args.model, args.weights, args.impl, args.num_heads, device,
                                 impl_kwargs_from(args), verbose=True, trust=args.trust_checkpoint)
        vae_path = resolve_vae(args.vae, info, model.in_channels)
    except LOAD_ERRORS as e:
        return error_line(p.prog, e)
    labels = args.class_labels
    if labels is None:
        labels = OFFICIAL_DEMO_LABELS if model.num_classes == 1000 else list(range(model.num_classes))
    bad = [c for c in labels if not 0 <= c < model.num_classes]
    if bad:
        p.error(f"--class-labels {bad} are outside [0, {model.num_classes}) (the model has "
                f"{model.num_classes} classes)")
    k = args.samples_per_class
    labels = [c for c in labels for _ in range(k)]  # label-major: one grid row per label
    cfg_scale = args.cfg_scale if args.cfg_scale is not None else default_cfg_scale(info)

    x0 = sample_latents(model, labels, [args.seed + j for j in range(len(labels))],
                        cfg_scale=cfg_scale, sampler=args.sampler, num_steps=num_steps,
                        eta=args.eta, device=device, bf16=args.bf16,
                        guide_all_channels=guide_flag(args.guide_channels),
                        progress=not args.no_progress)
    vae = load_vae(vae_path, device) if vae_path else None
    images = decode_images(x0, vae, _latent_scale(args.latent_scale, info))
    upscale = args.upscale or max(1, 64 // images.shape[1])
    if k > 1 and args.nrow is None:  # one row per label, labelled on the left like train.py's grids
        save_class_grid(images, len(labels) // k, args.out, row_labels=[str(c) for c in labels[::k]],
                        min_cell=images.shape[1] * upscale)
    else:
        nrow = args.nrow or math.ceil(math.sqrt(len(labels)))
        save_image(make_grid(images, nrow, upscale=upscale), args.out)
    if args.save_npz:
        np.savez(args.save_npz, arr_0=images, arr_1=np.array(labels))
    print(f"wrote {len(labels)} samples ({args.sampler}, {num_steps} steps, cfg {cfg_scale}) "
          f"to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
