"""Timestep respacing: run a diffusion on a subset of the original steps.

Keeping steps S = {s_0 < s_1 < ...} of a T-step process and setting
beta'_k = 1 - abar_{s_k} / abar_{s_{k-1}} (abar_{s_{-1}} = 1) gives a shorter process whose
cumulative alphas equal the original ones at the kept steps, so a model trained on the full
process can sample with fewer steps. The model always sees the ORIGINAL step indices.
"""
from __future__ import annotations

from typing import Iterable, List, Sequence, Set, Union

import numpy as np
import torch

from .gaussian_diffusion import GaussianDiffusion

__all__ = ["space_timesteps", "SpacedDiffusion"]


def _parse_count(text: str, spec: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(
            f"malformed timestep respacing {spec!r}: {text.strip()!r} is not an integer step count "
            "(use e.g. \"250\", \"10,15,20\" or \"ddim50\")"
        ) from None


def space_timesteps(num_timesteps: int, section_counts: Union[str, int, Sequence[int]]) -> Set[int]:
    """The set of original steps to keep.

    :param num_timesteps: number of steps of the original process.
    :param section_counts: either "ddimN" (keep range(0, T, stride) for the integer stride that
        gives exactly N steps), or counts per section: the T steps are cut into len(counts) equal
        sections (the first T % len(counts) sections one step longer) and count c takes c steps
        evenly spaced over its section, both ends included (one step: the section's first).
        Given as a comma-separated string ("250", "10,15,20"), a list of ints, or an int.
    :raises ValueError: for a malformed string, a non-positive count, a count larger than its
        section, or a "ddimN" no integer stride can produce.
    """
    if isinstance(section_counts, bool):
        raise TypeError("timestep respacing must be a string, an int or a list of ints, got a bool")
    spec = section_counts
    if isinstance(section_counts, str):
        text = section_counts.strip()
        if text.startswith("ddim"):
            desired = _parse_count(text[len("ddim"):], spec)
            if desired < 1:
                raise ValueError(f"timestep respacing {spec!r} asks for {desired} steps; need >= 1")
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(
                f"timestep respacing {spec!r}: no integer stride gives exactly {desired} steps out "
                f"of {num_timesteps}"
            )
        section_counts = [_parse_count(part, spec) for part in text.split(",")]
    elif isinstance(section_counts, int):
        section_counts = [section_counts]
    else:
        section_counts = list(section_counts)
        if not all(isinstance(c, (int, np.integer)) and not isinstance(c, bool) for c in section_counts):
            raise TypeError(f"timestep respacing counts must be ints, got {spec!r}")
    if not section_counts:
        raise ValueError("timestep respacing needs at least one section count")
    for c in section_counts:
        if c < 1:
            raise ValueError(f"timestep respacing {spec!r}: every section needs at least 1 step, "
                             f"got {c}")

    size_per = num_timesteps // len(section_counts)
    extra = num_timesteps % len(section_counts)
    start = 0
    steps: List[int] = []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(
                f"timestep respacing {spec!r}: cannot take {count} steps from a section of {size} "
                f"steps (section {i} of {len(section_counts)}, {num_timesteps} steps in all)"
            )
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        pos = 0.0
        for _ in range(count):
            steps.append(start + round(pos))  # Python's round (half to even), as the official code
            pos += stride
        start += size
    return set(steps)


class _WrappedModel:
    """Calls `model` with respaced step indices mapped back to the original ones."""

    def __init__(self, model, timestep_map: List[int], original_num_steps: int,
                 rescale_timesteps: bool = False, map_cache=None):
        self.model = model
        self.timestep_map = timestep_map
        self.original_num_steps = original_num_steps
        self.rescale_timesteps = rescale_timesteps
        # (device, dtype) -> timestep_map as a tensor; shared with the owning SpacedDiffusion so
        # the host-to-device copy happens once, not at every call.
        self._maps = {} if map_cache is None else map_cache

    def __call__(self, x, ts, **kwargs):
        key = (ts.device, ts.dtype)
        map_tensor = self._maps.get(key)
        if map_tensor is None:
            map_tensor = torch.tensor(self.timestep_map, device=ts.device, dtype=ts.dtype)
            self._maps[key] = map_tensor
        new_ts = map_tensor[ts]  # (N,) original step indices
        if self.rescale_timesteps:
            new_ts = new_ts.float() * (1000.0 / self.original_num_steps)
        return self.model(x, new_ts, **kwargs)


class SpacedDiffusion(GaussianDiffusion):
    """A GaussianDiffusion over the kept steps `use_timesteps` of the process `kwargs` describes.

    :param use_timesteps: original step indices to keep (any iterable; duplicates ignored).
    :param kwargs: GaussianDiffusion arguments of the ORIGINAL process (betas, model_mean_type, ...).

    Attributes: `timestep_map` (sorted kept original indices; respaced step k is original step
    timestep_map[k]), `original_num_steps`, and `num_timesteps` = len(timestep_map). Every model
    (and cond_fn) passed to its methods is called with original indices.
    """

    def __init__(self, use_timesteps: Iterable[int], **kwargs):
        self.use_timesteps = set(int(s) for s in use_timesteps)
        self.original_num_steps = len(kwargs["betas"])
        if not self.use_timesteps:
            raise ValueError("SpacedDiffusion needs at least one timestep to keep")
        bad = sorted(s for s in self.use_timesteps if not 0 <= s < self.original_num_steps)
        if bad:
            raise ValueError(f"timesteps {bad[:5]} are outside 0..{self.original_num_steps - 1}")

        base = GaussianDiffusion(**kwargs)
        self.timestep_map: List[int] = []
        new_betas = []
        last_alpha_cumprod = 1.0
        for i, alpha_cumprod in enumerate(base.alphas_cumprod):
            if i in self.use_timesteps:
                new_betas.append(1 - alpha_cumprod / last_alpha_cumprod)
                last_alpha_cumprod = alpha_cumprod
                self.timestep_map.append(i)
        kwargs["betas"] = np.array(new_betas)
        super().__init__(**kwargs)
        self._timestep_map_tensors = {}

    def p_mean_variance(self, model, *args, **kwargs):
        return super().p_mean_variance(self._wrap_model(model), *args, **kwargs)

    def training_losses(self, model, *args, **kwargs):
        return super().training_losses(self._wrap_model(model), *args, **kwargs)

    def condition_mean(self, cond_fn, *args, **kwargs):
        return super().condition_mean(self._wrap_model(cond_fn), *args, **kwargs)

    def condition_score(self, cond_fn, *args, **kwargs):
        return super().condition_score(self._wrap_model(cond_fn), *args, **kwargs)

    def _wrap_model(self, model):
        if isinstance(model, _WrappedModel):
            return model
        return _WrappedModel(model, self.timestep_map, self.original_num_steps,
                             self.rescale_timesteps, self._timestep_map_tensors)

    def _scale_timesteps(self, t):
        return t  # the wrapper maps (and, if asked, rescales) the timesteps
