"""Images out of the samplers: x_0 -> uint8, grids and PNG files.

One rounding rule for every image fastdit writes (sample grids, FID sample files, training grids,
TensorBoard): the official sample_ddp.py's `clamp(127.5 x + 128, 0, 255)` truncated to uint8.
"""
from __future__ import annotations

import math
import os
from typing import Optional, Sequence

import numpy as np
import torch

from fastdit.generate import vae as vae_lib


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Images in [-1, 1] (N, C, H, W) -> uint8 (N, H, W, C), as the official sample_ddp.py."""
    x = torch.clamp(127.5 * x.float() + 128.0, 0, 255)
    return x.permute(0, 2, 3, 1).to("cpu", dtype=torch.uint8).numpy()


def to_rgb(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, 1|3) -> (N, H, W, 3): grey images repeated over the three channels."""
    if images.shape[-1] == 1:
        return np.repeat(images, 3, axis=-1)
    if images.shape[-1] != 3:
        raise ValueError(f"cannot show images with {images.shape[-1]} channels")
    return images


@torch.no_grad()
def decode_images(x0: torch.Tensor, vae=None, latent_scale: float = vae_lib.LATENT_SCALE,
                  batch_size: int = 32) -> np.ndarray:
    """x_0 -> uint8 NHWC images: through the VAE (fastdit.generate.vae.decode, latents / scale) in
    batches, or directly for pixel-space models (vae=None)."""
    if vae is None:
        return to_uint8(x0)
    return np.concatenate([to_uint8(vae_lib.decode(vae, chunk, latent_scale))
                           for chunk in x0.split(batch_size)])


def make_grid(images: np.ndarray, nrow: int, padding: int = 2, upscale: int = 1,
              pad_value: int = 0) -> np.ndarray:
    """uint8 (N, H, W, C) -> one (rows*(H+p)+p, nrow*(W+p)+p, C) image, row-major."""
    if images.ndim != 4:
        raise ValueError(f"expected (N, H, W, C) images, got {images.shape}")
    if upscale > 1:
        images = images.repeat(upscale, axis=1).repeat(upscale, axis=2)
    n, h, w, c = images.shape
    nrow = max(1, min(nrow, n))
    rows = math.ceil(n / nrow)
    grid = np.full((rows * (h + padding) + padding, nrow * (w + padding) + padding, c), pad_value,
                   dtype=np.uint8)
    for k in range(n):
        r, col = divmod(k, nrow)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[top:top + h, left:left + w] = images[k]
    return grid


def save_image(image: np.ndarray, path: str) -> None:
    """Write a uint8 (H, W, 1|3) array as PNG (or any PIL format, by extension)."""
    from PIL import Image

    if image.shape[-1] == 1:
        image = image[..., 0]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(image).save(path)


def save_class_grid(images: np.ndarray, rows: int, path: str, row_labels: Optional[Sequence[str]] = None,
                    min_cell: int = 64, pad: int = 2) -> str:
    """Save uint8 images (rows * cols, H, W, C) as a white grid, row r = class r, labels on the left.

    Small images are enlarged with nearest-neighbour so a cell is at least `min_cell` pixels.
    """
    from PIL import Image, ImageDraw

    arr = to_rgb(images)
    n, h, w, _ = arr.shape
    if n % rows:
        raise ValueError(f"{n} images do not fill {rows} rows")
    cols = n // rows
    zoom = max(1, math.ceil(min_cell / max(h, w)))
    ch, cw = h * zoom, w * zoom
    label_w = 40 if row_labels else 0
    grid = Image.new("RGB", (label_w + cols * (cw + pad) + pad, rows * (ch + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i in range(n):
        r, c = divmod(i, cols)
        cell = Image.fromarray(arr[i]).resize((cw, ch), Image.NEAREST)
        grid.paste(cell, (label_w + pad + c * (cw + pad), pad + r * (ch + pad)))
    if row_labels:
        for r, text in enumerate(row_labels):
            draw.text((4, pad + r * (ch + pad) + ch // 2 - 5), str(text), fill=(0, 0, 0))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    grid.save(path)
    return path
