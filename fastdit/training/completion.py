"""A run that already reached train.max_steps: re-running its command (`make digits` again) says so
and stops, instead of building the engine, "resuming" at the last step and drawing the final grid again.
"""
from __future__ import annotations

import os
from typing import Optional

from fastdit.weights import layout


def completed_message(output_dir: str, max_steps: int, resume: Optional[str]) -> Optional[str]:
    """With `--resume auto`: the line to print when output_dir's newest intact checkpoint is at or past
    max_steps (None otherwise: there is training left, or another resume was asked for)."""
    if resume != "auto":
        return None
    root = os.path.join(output_dir, "checkpoints")
    tag = layout.latest_tag(root)
    if tag is None:
        return None
    step = layout.step_of(tag)
    if step < max_steps:
        return None
    where = os.path.join(root, tag)
    return (f"{output_dir} is already complete at step {step} (train.max_steps={max_steps}; checkpoint {where}); "
            f"nothing to do. To train further pass --set train.max_steps=<more than {step}>; to draw new "
            f"samples: python -m fastdit.sample --ckpt {where} --out <file>.png")
