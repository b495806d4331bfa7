"""The metrics log of a training run (metrics.jsonl, one JSON record per logged step) and its loss curve."""
from __future__ import annotations

import json
import math
import os
from typing import List, Optional

import numpy as np

from fastdit import atomic


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


def trim(path: str, step: int) -> None:
    """Keep the records of steps <= `step` (a resume point; 0 = a fresh run drops them all)."""
    if not os.path.isfile(path):
        return
    keep = [r for r in read_metrics(path) if r.get("step", 0) <= step]
    atomic.write_text(path, "".join(json.dumps(r) + "\n" for r in keep))


def tensorboard_writer(log_dir: str, resume_step: int):
    """A SummaryWriter for a run that continues from `resume_step` (0: a fresh start). Events of later
    steps, written before the run was stopped and resumed, are purged (purge_step), so TensorBoard shows
    every step once and in order, as metrics.jsonl does after `trim`."""
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir, purge_step=resume_step + 1)


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
