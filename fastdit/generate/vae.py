"""The Stable Diffusion VAE (diffusers `AutoencoderKL`) that maps 256x256 images to 32x32x4 latents.

Loaded from a local folder or from the Hugging Face cache only: no network access at any point. A
missing VAE raises `VAENotFoundError` saying what to pass. Latents are scaled by 0.18215, as in the
official DiT (`vae.encode(x).latent_dist.sample().mul_(0.18215)`).
"""
from __future__ import annotations

import os
from typing import Optional

import torch

LATENT_SCALE = 0.18215   # the official DiT's scale of the latents
DOWNSAMPLE = 8           # image side / latent side
LATENT_CHANNELS = 4
DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"


class VAENotFoundError(FileNotFoundError):
    """The VAE is neither a local folder nor in the Hugging Face cache."""


def _missing_message(spec: str) -> str:
    return (f"VAE {spec!r} not found: it is not a local folder with config.json and it is not in the "
            f"Hugging Face cache (HF_HOME={os.environ.get('HF_HOME', '~/.cache/huggingface')}); fastdit "
            f"never downloads. Pass a local AutoencoderKL folder, e.g. --vae /models/sd-vae-ft-ema "
            f"(train.py: --set data.vae=/models/sd-vae-ft-ema), or fetch it once with "
            f"`huggingface-cli download {spec if '/' in spec else DEFAULT_VAE}`.")


def resolve_vae(spec: Optional[str]) -> str:
    """Check cheaply (no weights read) that `spec` names an available VAE; return the spec.

    `spec` is a local folder holding an AutoencoderKL (config.json + weights), or a hub id already
    in the local cache. Raises VAENotFoundError with what to pass otherwise.
    """
    if not spec:
        raise VAENotFoundError("no VAE given: pass a local AutoencoderKL folder or a cached hub id "
                               f"(e.g. {DEFAULT_VAE}) with --vae / --set data.vae=...")
    if os.path.isdir(spec):
        if not os.path.isfile(os.path.join(spec, "config.json")):
            raise VAENotFoundError(f"VAE folder {spec!r} has no config.json; pass the folder written by "
                                   f"AutoencoderKL.save_pretrained (or a hub snapshot folder)")
        return spec
    if os.path.exists(spec) or spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise VAENotFoundError(_missing_message(spec))
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(spec, "config.json")
    if not isinstance(found, str):
        raise VAENotFoundError(_missing_message(spec))
    return spec


def load_vae(spec: Optional[str], device="cpu", dtype: torch.dtype = torch.float32):
    """Load an AutoencoderKL from a local folder or the hub cache (local files only), in eval mode."""
    spec = resolve_vae(spec)
    from diffusers import AutoencoderKL

    try:
        vae = AutoencoderKL.from_pretrained(spec, local_files_only=True, torch_dtype=dtype)
    except (OSError, EnvironmentError) as e:
        raise VAENotFoundError(_missing_message(spec) + f" (diffusers said: {e})") from e
    vae.requires_grad_(False)
    return vae.to(device).eval()


@torch.no_grad()
def encode_distribution(vae, x: torch.Tensor):
    """Posterior of images x (N, 3, H, W) in [-1, 1]: (mean, std), each (N, 4, H/8, W/8), unscaled."""
    dist = vae.encode(x.to(vae.dtype)).latent_dist
    return dist.mean.float(), dist.std.float()


@torch.no_grad()
def encode(vae, x: torch.Tensor, scale: float = LATENT_SCALE, sample: bool = True,
           noise: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Scaled latents of images x (N, 3, H, W) in [-1, 1] -> (N, 4, H/8, W/8).

    sample=True draws from the posterior (the official training input) with `noise` if given, else
    from `generator`; sample=False returns the posterior mean.
    """
    mean, std = encode_distribution(vae, x)
    if not sample:
        return mean * scale
    if noise is None:
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return (mean + std * noise.to(mean)) * scale


@torch.no_grad()
def decode(vae, z: torch.Tensor, scale: float = LATENT_SCALE) -> torch.Tensor:
    """Images in [-1, 1] (N, 3, 8h, 8w) from scaled latents z (N, 4, h, w)."""
    return vae.decode((z / scale).to(vae.dtype)).sample.float()
