"""PNG outputs of a training run: a sample grid with one row per class, and the loss curve."""
from __future__ import annotations

import json
import math
import os
from typing import List, Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, 3) uint8 (grey images repeated to RGB)."""
    x = ((images.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    elif x.shape[1] != 3:
        raise ValueError(f"cannot show images with {x.shape[1]} channels")
    return x.permute(0, 2, 3, 1).cpu().numpy()


def save_class_grid(images: torch.Tensor, rows: int, path: str,
                    row_labels: Optional[Sequence[str]] = None, min_cell: int = 64, pad: int = 2) -> str:
    """Save images (rows * cols, C, H, W) in [-1, 1] as a grid, row r = class r, with labels on the left.

    Small images are enlarged with nearest-neighbour so a cell is at least `min_cell` pixels.
    """
    arr = to_uint8(images)
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


def read_metrics(path: str) -> List[dict]:
    """Records of a metrics.jsonl file (one JSON object per line; a torn last line is ignored)."""
    records = []
    if not os.path.isfile(path):
        return records
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def plot_loss_curve(metrics_path: str, out_path: str, title: str = "training loss") -> Optional[str]:
    """Loss per logged step (and its running mean) from metrics.jsonl -> PNG; None if nothing logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [r for r in read_metrics(metrics_path) if "loss" in r and r["loss"] is not None
            and math.isfinite(r["loss"])]
    if not recs:
        return None
    steps = np.array([r["step"] for r in recs])
    loss = np.array([r["loss"] for r in recs])
    k = max(1, len(loss) // 20)
    smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(steps, loss, lw=0.8, alpha=0.5, label="loss (mean over each log interval)")
    if k > 1:
        ax.plot(steps[k - 1:], smooth, lw=1.8, label=f"running mean of {k}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (MSE + VB)")
    if loss.min() > 0 and loss.max() / loss.min() > 10:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    fig.savefig(out_path)
    plt.close(fig)
    return out_path
