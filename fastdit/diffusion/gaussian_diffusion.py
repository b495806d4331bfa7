"""Gaussian diffusion (DDPM, Ho et al. 2020) with the improvements of Nichol & Dhariwal (2021).

Forward process q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I), so
q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) with abar_t = prod_{s<=t} (1 - beta_s), and the
posterior q(x_{t-1} | x_t, x_0) = N(c1_t x_0 + c2_t x_t, beta~_t I) with
c1_t = beta_t sqrt(abar_{t-1}) / (1 - abar_t), c2_t = sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t),
beta~_t = beta_t (1 - abar_{t-1}) / (1 - abar_t).

The reverse model predicts eps (or x_0) and, with a learned range, interpolates the log variance
between log beta~_t and log beta_t. Training loss = MSE on eps + the variational-bound term for the
variance (mean gradient stopped). Sampling: ancestral DDPM and DDIM (Song et al. 2021).

Timestep indices are 0-based: t = 0 is the first noising step. Schedules are float64 numpy arrays;
values taken at timesteps become float32 tensors (`_extract_into_tensor`). The semantics (names,
signatures, numerics, RNG use) follow the official DiT `diffusion` package.
"""
from __future__ import annotations

import enum
import math
from typing import Any, Callable, Dict, Iterator, Optional

import numpy as np
import torch

from .losses import discretized_gaussian_log_likelihood, normal_kl

__all__ = [
    "ModelMeanType",
    "ModelVarType",
    "LossType",
    "GaussianDiffusion",
    "get_named_beta_schedule",
    "get_beta_schedule",
    "betas_for_alpha_bar",
    "mean_flat",
]

NOISE_SCHEDULES = ("linear", "squaredcos_cap_v2")


def mean_flat(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension except the first (batch): (N, ...) -> (N,)."""
    return tensor.mean(dim=list(range(1, tensor.dim())))


class ModelMeanType(enum.Enum):
    """What the model's (first C) output channels predict."""

    PREVIOUS_X = enum.auto()  # x_{t-1}
    START_X = enum.auto()     # x_0
    EPSILON = enum.auto()     # the noise eps


class ModelVarType(enum.Enum):
    """Where the reverse-process variance comes from."""

    LEARNED = enum.auto()        # second C channels are log variance
    FIXED_SMALL = enum.auto()    # posterior variance beta~_t
    FIXED_LARGE = enum.auto()    # beta_t (beta~_1 at t = 0)
    LEARNED_RANGE = enum.auto()  # second C channels v in [-1, 1] interpolate log beta~_t .. log beta_t


class LossType(enum.Enum):
    MSE = enum.auto()           # MSE on the mean prediction (+ VB term when the variance is learned)
    RESCALED_MSE = enum.auto()  # as MSE, VB term scaled by num_timesteps / 1000
    KL = enum.auto()            # the variational bound alone
    RESCALED_KL = enum.auto()   # the variational bound times num_timesteps (estimates the full VLB)

    def is_vb(self) -> bool:
        return self in (LossType.KL, LossType.RESCALED_KL)


# ----------------------------------------------------------------------------------------------
# Beta schedules (float64 numpy)
# ----------------------------------------------------------------------------------------------
def get_beta_schedule(beta_schedule: str, *, beta_start: float, beta_end: float,
                      num_diffusion_timesteps: int) -> np.ndarray:
    """Raw schedules by name: "linear", "quad", "const", "jsd", "warmup10", "warmup50"."""
    T = num_diffusion_timesteps
    if beta_schedule == "linear":
        betas = np.linspace(beta_start, beta_end, T, dtype=np.float64)
    elif beta_schedule == "quad":
        betas = np.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=np.float64) ** 2
    elif beta_schedule == "const":
        betas = np.full(T, beta_end, dtype=np.float64)
    elif beta_schedule == "jsd":  # 1/T, 1/(T-1), ..., 1
        betas = 1.0 / np.linspace(T, 1, T, dtype=np.float64)
    elif beta_schedule in ("warmup10", "warmup50"):
        frac = 0.1 if beta_schedule == "warmup10" else 0.5
        betas = np.full(T, beta_end, dtype=np.float64)
        n_warm = int(T * frac)
        betas[:n_warm] = np.linspace(beta_start, beta_end, n_warm, dtype=np.float64)
    else:
        raise ValueError(f"unknown beta schedule {beta_schedule!r}")
    return betas


def betas_for_alpha_bar(num_diffusion_timesteps: int, alpha_bar: Callable[[float], float],
                        max_beta: float = 0.999) -> np.ndarray:
    """Betas that discretise a continuous abar(s), s in [0, 1]:
    beta_i = min(1 - abar((i+1)/T) / abar(i/T), max_beta)."""
    T = num_diffusion_timesteps
    return np.array(
        [min(1.0 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta) for i in range(T)]
    )


def get_named_beta_schedule(schedule_name: str, num_diffusion_timesteps: int) -> np.ndarray:
    """The schedules DiT uses, defined for any number of steps.

    "linear": Ho et al.'s 1e-4 .. 0.02 over 1000 steps, both ends scaled by 1000 / T.
    "squaredcos_cap_v2": Nichol & Dhariwal's cosine abar(s) = cos((s + 0.008) / 1.008 * pi / 2)^2,
    betas capped at 0.999.
    """
    if not isinstance(num_diffusion_timesteps, int) or isinstance(num_diffusion_timesteps, bool) \
            or num_diffusion_timesteps < 1:
        raise ValueError(f"diffusion_steps must be a positive int, got {num_diffusion_timesteps!r}")
    if schedule_name == "linear":
        if num_diffusion_timesteps <= 20:
            # beta_end = 0.02 * 1000 / T reaches 1 at T = 20: abar_T = 0 and every eps <-> x_0
            # conversion at the last step is inf/NaN.
            raise ValueError(f"the linear schedule needs more than 20 diffusion steps (its last beta "
                             f"is 20 / T), got {num_diffusion_timesteps}")
        scale = 1000 / num_diffusion_timesteps
        return get_beta_schedule("linear", beta_start=scale * 0.0001, beta_end=scale * 0.02,
                                 num_diffusion_timesteps=num_diffusion_timesteps)
    if schedule_name == "squaredcos_cap_v2":
        return betas_for_alpha_bar(
            num_diffusion_timesteps, lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
        )
    raise ValueError(f"unknown noise schedule {schedule_name!r}; valid: {', '.join(NOISE_SCHEDULES)}")


# ----------------------------------------------------------------------------------------------
# Schedule lookup
# ----------------------------------------------------------------------------------------------
def _extract_into_tensor(arr: np.ndarray, timesteps: torch.Tensor, broadcast_shape) -> torch.Tensor:
    """arr[timesteps] as float32 on timesteps' device, broadcast to broadcast_shape.

    arr (T,) float64; timesteps (N,) int; result (N, 1, ..., 1) expanded to broadcast_shape.
    The lookup is done in float64 and cast once, like the official code.
    """
    res = torch.from_numpy(arr).to(device=timesteps.device)[timesteps].float()  # (N,)
    return _broadcast(res, broadcast_shape)


def _broadcast(res: torch.Tensor, broadcast_shape) -> torch.Tensor:
    while res.dim() < len(broadcast_shape):
        res = res[..., None]
    return res.expand(broadcast_shape).contiguous()


def _infer_device(model: Any, noise: Optional[torch.Tensor], device) -> torch.device:
    """Device for a sampling loop: `device` if given, else the model's parameters' device (also for
    a bound method such as `model.forward_with_cfg`), else the noise's device, else CPU."""
    if device is not None:
        return torch.device(device)
    for owner in (model, getattr(model, "__self__", None)):
        params = getattr(owner, "parameters", None)
        if callable(params):
            try:
                return next(params()).device
            except StopIteration:
                pass
    if noise is not None:
        return noise.device
    return torch.device("cpu")


class GaussianDiffusion:
    """Training and sampling utilities for a Gaussian diffusion with the given betas.

    :param betas: 1-D array of per-step betas in (0, 1], step 0 first.
    :param model_mean_type: a ModelMeanType.
    :param model_var_type: a ModelVarType.
    :param loss_type: a LossType.
    :param rescale_timesteps: if True the model sees t * 1000 / num_timesteps (float); DiT uses False.

    A `model` is any callable model(x_t, t, **model_kwargs) -> (N, C or 2C, ...) (optionally a tuple
    (output, extra)); t is an int64 (N,) tensor of step indices.
    """

    def __init__(self, *, betas, model_mean_type: ModelMeanType, model_var_type: ModelVarType,
                 loss_type: LossType, rescale_timesteps: bool = False):
        if not isinstance(model_mean_type, ModelMeanType):
            raise TypeError(f"model_mean_type must be a ModelMeanType, got {model_mean_type!r}")
        if not isinstance(model_var_type, ModelVarType):
            raise TypeError(f"model_var_type must be a ModelVarType, got {model_var_type!r}")
        if not isinstance(loss_type, LossType):
            raise TypeError(f"loss_type must be a LossType, got {loss_type!r}")
        self.model_mean_type = model_mean_type
        self.model_var_type = model_var_type
        self.loss_type = loss_type
        self.rescale_timesteps = rescale_timesteps

        betas = np.array(betas, dtype=np.float64)  # float64 throughout for accuracy
        if betas.ndim != 1 or betas.shape[0] == 0:
            raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
        if not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("every beta must lie in (0, 1]")
        self.betas = betas
        self.num_timesteps = int(betas.shape[0])

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas, axis=0)                       # abar_t
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])    # abar_{t-1}
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)     # abar_{t+1}

        # q(x_t | x_0)
        self.one_minus_alphas_cumprod = 1.0 - self.alphas_cumprod
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)

        # q(x_{t-1} | x_t, x_0)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # beta~_0 = 0, so its log is clipped to log beta~_1.
        if self.num_timesteps > 1:
            self.posterior_log_variance_clipped = np.log(
                np.append(self.posterior_variance[1], self.posterior_variance[1:])
            )
        else:
            self.posterior_log_variance_clipped = np.array([])
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (
            (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        )

        # Reverse-process variances of the fixed types and the learned range's upper end.
        self.log_betas = np.log(betas)
        if self.num_timesteps > 1:
            self.fixed_large_variance = np.append(self.posterior_variance[1], betas[1:])
            self.fixed_large_log_variance = np.log(self.fixed_large_variance)
        else:
            self.fixed_large_variance = np.array([])
            self.fixed_large_log_variance = np.array([])

        self._device_tables: Dict[tuple, torch.Tensor] = {}

    # ------------------------------------------------------------------------------------------
    # helpers
    # ------------------------------------------------------------------------------------------
    def _extract(self, name: str, t: torch.Tensor, shape) -> torch.Tensor:
        """Schedule array `name` at timesteps t as float32, broadcast to `shape`.

        Same values as `_extract_into_tensor(getattr(self, name), t, shape)`; the float64 table is
        copied to t's device once and cached (schedules are treated as immutable after __init__).
        """
        key = (name, t.device)
        table = self._device_tables.get(key)
        if table is None:
            table = torch.from_numpy(getattr(self, name)).to(device=t.device)
            self._device_tables[key] = table
        return _broadcast(table[t].float(), shape)

    def _scale_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """Timesteps as the model sees them: unchanged, or scaled to [0, 1000) as floats."""
        if self.rescale_timesteps:
            return t.float() * (1000.0 / self.num_timesteps)
        return t

    @staticmethod
    def _check_t(x: torch.Tensor, t: torch.Tensor) -> None:
        if not isinstance(t, torch.Tensor) or t.shape != (x.shape[0],):
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"t must be a 1-D tensor of {x.shape[0]} timesteps (one per sample), "
                             f"got {got}")

    # ------------------------------------------------------------------------------------------
    # forward process
    # ------------------------------------------------------------------------------------------
    def q_mean_variance(self, x_start: torch.Tensor, t: torch.Tensor):
        """q(x_t | x_0): (mean, variance, log_variance), each of x_start's shape."""
        mean = self._extract("sqrt_alphas_cumprod", t, x_start.shape) * x_start
        variance = self._extract("one_minus_alphas_cumprod", t, x_start.shape)
        log_variance = self._extract("log_one_minus_alphas_cumprod", t, x_start.shape)
        return mean, variance, log_variance

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor,
                 noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Sample x_t ~ q(x_t | x_0) = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise."""
        if noise is None:
            noise = torch.randn_like(x_start)
        if noise.shape != x_start.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != x_start shape {tuple(x_start.shape)}")
        return (self._extract("sqrt_alphas_cumprod", t, x_start.shape) * x_start
                + self._extract("sqrt_one_minus_alphas_cumprod", t, x_start.shape) * noise)

    def q_posterior_mean_variance(self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """q(x_{t-1} | x_t, x_0): (mean, variance, log_variance_clipped), each of x_t's shape."""
        if x_start.shape != x_t.shape:
            raise ValueError(f"x_start shape {tuple(x_start.shape)} != x_t shape {tuple(x_t.shape)}")
        mean = (self._extract("posterior_mean_coef1", t, x_t.shape) * x_start
                + self._extract("posterior_mean_coef2", t, x_t.shape) * x_t)
        variance = self._extract("posterior_variance", t, x_t.shape)
        log_variance_clipped = self._extract("posterior_log_variance_clipped", t, x_t.shape)
        return mean, variance, log_variance_clipped

    # ------------------------------------------------------------------------------------------
    # reverse process
    # ------------------------------------------------------------------------------------------
    def p_mean_variance(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None):
        """Apply the model to get p(x_{t-1} | x_t) and a prediction of x_0.

        :param x: (N, C, ...) samples at step t; t: (N,) int step indices.
        :param clip_denoised: clamp the x_0 prediction to [-1, 1].
        :param denoised_fn: applied to the x_0 prediction before clipping.
        :return: dict with "mean", "variance", "log_variance", "pred_xstart" (all x's shape) and
                 "extra" (second element of a tuple model output, else None).
        """
        if model_kwargs is None:
            model_kwargs = {}
        B, C = x.shape[:2]
        self._check_t(x, t)
        model_output = model(x, self._scale_timesteps(t), **model_kwargs)
        extra = None
        if isinstance(model_output, tuple):
            model_output, extra = model_output

        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            expected = (B, C * 2, *x.shape[2:])
            if tuple(model_output.shape) != expected:
                raise ValueError(f"with a learned variance the model must return {expected} "
                                 f"(mean and variance channels), got {tuple(model_output.shape)}")
            model_output, model_var_values = torch.split(model_output, C, dim=1)
            if self.model_var_type == ModelVarType.LEARNED:
                model_log_variance = model_var_values
            else:
                min_log = self._extract("posterior_log_variance_clipped", t, x.shape)
                max_log = self._extract("log_betas", t, x.shape)
                frac = (model_var_values + 1) / 2  # v in [-1, 1] -> [0, 1]
                model_log_variance = frac * max_log + (1 - frac) * min_log
            model_variance = torch.exp(model_log_variance)
        else:
            if tuple(model_output.shape) != tuple(x.shape):
                raise ValueError(f"with a fixed variance the model must return x's shape "
                                 f"{tuple(x.shape)}, got {tuple(model_output.shape)}")
            if self.model_var_type == ModelVarType.FIXED_LARGE:
                names = ("fixed_large_variance", "fixed_large_log_variance")
            else:
                names = ("posterior_variance", "posterior_log_variance_clipped")
            model_variance = self._extract(names[0], t, x.shape)
            model_log_variance = self._extract(names[1], t, x.shape)

        def process_xstart(x0):
            if denoised_fn is not None:
                x0 = denoised_fn(x0)
            return x0.clamp(-1, 1) if clip_denoised else x0

        if self.model_mean_type == ModelMeanType.PREVIOUS_X:
            pred_xstart = process_xstart(self._predict_xstart_from_xprev(x_t=x, t=t, xprev=model_output))
            model_mean = model_output
        else:
            if self.model_mean_type == ModelMeanType.START_X:
                pred_xstart = process_xstart(model_output)
            else:
                pred_xstart = process_xstart(self._predict_xstart_from_eps(x_t=x, t=t, eps=model_output))
            model_mean, _, _ = self.q_posterior_mean_variance(x_start=pred_xstart, x_t=x, t=t)

        return {
            "mean": model_mean,
            "variance": model_variance,
            "log_variance": model_log_variance,
            "pred_xstart": pred_xstart,
            "extra": extra,
        }

    def _predict_xstart_from_eps(self, x_t, t, eps):
        """x_0 = x_t / sqrt(abar_t) - sqrt(1/abar_t - 1) eps."""
        if x_t.shape != eps.shape:
            raise ValueError(f"eps shape {tuple(eps.shape)} != x_t shape {tuple(x_t.shape)}")
        return (self._extract("sqrt_recip_alphas_cumprod", t, x_t.shape) * x_t
                - self._extract("sqrt_recipm1_alphas_cumprod", t, x_t.shape) * eps)

    def _predict_eps_from_xstart(self, x_t, t, pred_xstart):
        """eps = (x_t / sqrt(abar_t) - x_0) / sqrt(1/abar_t - 1)."""
        return ((self._extract("sqrt_recip_alphas_cumprod", t, x_t.shape) * x_t - pred_xstart)
                / self._extract("sqrt_recipm1_alphas_cumprod", t, x_t.shape))

    def _predict_xstart_from_xprev(self, x_t, t, xprev):
        """Invert the posterior mean: x_0 = (x_{t-1} - c2_t x_t) / c1_t."""
        return ((xprev - self._extract("posterior_mean_coef2", t, x_t.shape) * x_t)
                / self._extract("posterior_mean_coef1", t, x_t.shape))

    def condition_mean(self, cond_fn, p_mean_var, x, t, model_kwargs=None):
        """Mean shifted by variance * grad log p(y | x_t) (Sohl-Dickstein et al. 2015)."""
        if model_kwargs is None:
            model_kwargs = {}
        gradient = cond_fn(x, self._scale_timesteps(t), **model_kwargs)
        return p_mean_var["mean"].float() + p_mean_var["variance"] * gradient.float()

    def condition_score(self, cond_fn, p_mean_var, x, t, model_kwargs=None):
        """p_mean_var with the score conditioned by cond_fn (Song et al. 2020):
        eps <- eps - sqrt(1 - abar_t) * grad log p(y | x_t)."""
        if model_kwargs is None:
            model_kwargs = {}
        alpha_bar = self._extract("alphas_cumprod", t, x.shape)
        eps = self._predict_eps_from_xstart(x, t, p_mean_var["pred_xstart"])
        eps = eps - (1 - alpha_bar).sqrt() * cond_fn(x, self._scale_timesteps(t), **model_kwargs)
        out = p_mean_var.copy()
        out["pred_xstart"] = self._predict_xstart_from_eps(x, t, eps)
        out["mean"], _, _ = self.q_posterior_mean_variance(x_start=out["pred_xstart"], x_t=x, t=t)
        return out

    # ------------------------------------------------------------------------------------------
    # DDPM sampling
    # ------------------------------------------------------------------------------------------
    def p_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, cond_fn=None,
                 model_kwargs=None):
        """One ancestral step x_t -> x_{t-1} ~ p(x_{t-1} | x_t) (no noise at t == 0).

        :return: dict with "sample" and "pred_xstart".
        """
        out = self.p_mean_variance(model, x, t, clip_denoised=clip_denoised,
                                   denoised_fn=denoised_fn, model_kwargs=model_kwargs)
        noise = torch.randn_like(x)
        nonzero_mask = (t != 0).float().view(-1, *([1] * (x.dim() - 1)))  # (N, 1, ...)
        if cond_fn is not None:
            out["mean"] = self.condition_mean(cond_fn, out, x, t, model_kwargs=model_kwargs)
        sample = out["mean"] + nonzero_mask * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def p_sample_loop(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None,
                      cond_fn=None, model_kwargs=None, device=None, progress=False):
        """Ancestral sampling from pure noise through all num_timesteps steps.

        :param shape: (N, C, ...) as a tuple or list; noise: optional x_T of that shape.
        :param device: where samples live; default the model's parameters' device (see
                       `_infer_device`: also a bound method's owner, else the noise's device, else CPU).
        :param progress: show a tqdm bar.
        :return: the final (N, C, ...) samples (no autograd graph).
        """
        final = None
        for final in self.p_sample_loop_progressive(
            model, shape, noise=noise, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
            cond_fn=cond_fn, model_kwargs=model_kwargs, device=device, progress=progress,
        ):
            pass
        return final["sample"]

    def _start_loop(self, model, shape, noise, device, progress):
        if not isinstance(shape, (tuple, list)):
            raise TypeError(f"shape must be a tuple or list, got {type(shape).__name__}")
        device = _infer_device(model, noise, device)
        if noise is not None:
            if tuple(noise.shape) != tuple(shape):
                raise ValueError(f"noise shape {tuple(noise.shape)} != requested shape {tuple(shape)}")
            img = noise
        else:
            img = torch.randn(*shape, device=device)
        indices = list(range(self.num_timesteps))[::-1]
        if progress:
            from tqdm.auto import tqdm

            indices = tqdm(indices)
        return device, img, indices

    def p_sample_loop_progressive(self, model, shape, noise=None, clip_denoised=True,
                                  denoised_fn=None, cond_fn=None, model_kwargs=None, device=None,
                                  progress=False) -> Iterator[Dict[str, torch.Tensor]]:
        """As p_sample_loop, yielding p_sample's dict at every step (from t = T-1 down to 0)."""
        device, img, indices = self._start_loop(model, shape, noise, device, progress)
        for i in indices:
            t = torch.tensor([i] * shape[0], device=device)
            with torch.no_grad():
                out = self.p_sample(model, img, t, clip_denoised=clip_denoised,
                                    denoised_fn=denoised_fn, cond_fn=cond_fn,
                                    model_kwargs=model_kwargs)
                yield out
                img = out["sample"]

    # ------------------------------------------------------------------------------------------
    # DDIM sampling
    # ------------------------------------------------------------------------------------------
    def ddim_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, cond_fn=None,
                    model_kwargs=None, eta=0.0):
        """One DDIM step (Song et al. 2021, eq. 12):
        x_{t-1} = sqrt(abar_{t-1}) x0 + sqrt(1 - abar_{t-1} - sigma^2) eps + sigma z,
        sigma = eta sqrt((1 - abar_{t-1}) / (1 - abar_t)) sqrt(1 - abar_t / abar_{t-1}).
        eps is re-derived from the (clipped) x_0 prediction.
        """
        out = self.p_mean_variance(model, x, t, clip_denoised=clip_denoised,
                                   denoised_fn=denoised_fn, model_kwargs=model_kwargs)
        if cond_fn is not None:
            out = self.condition_score(cond_fn, out, x, t, model_kwargs=model_kwargs)
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar = self._extract("alphas_cumprod", t, x.shape)
        alpha_bar_prev = self._extract("alphas_cumprod_prev", t, x.shape)
        sigma = (eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar))
                 * torch.sqrt(1 - alpha_bar / alpha_bar_prev))
        noise = torch.randn_like(x)  # drawn even when eta == 0 (keeps the RNG stream of DDPM code)
        mean_pred = (out["pred_xstart"] * torch.sqrt(alpha_bar_prev)
                     + torch.sqrt(1 - alpha_bar_prev - sigma ** 2) * eps)
        nonzero_mask = (t != 0).float().view(-1, *([1] * (x.dim() - 1)))
        sample = mean_pred + nonzero_mask * sigma * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_reverse_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, cond_fn=None,
                            model_kwargs=None, eta=0.0):
        """Deterministic DDIM inversion step x_t -> x_{t+1} (eta must be 0)."""
        if eta != 0.0:
            raise ValueError("ddim_reverse_sample is the deterministic ODE: eta must be 0")
        out = self.p_mean_variance(model, x, t, clip_denoised=clip_denoised,
                                   denoised_fn=denoised_fn, model_kwargs=model_kwargs)
        if cond_fn is not None:
            out = self.condition_score(cond_fn, out, x, t, model_kwargs=model_kwargs)
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar_next = self._extract("alphas_cumprod_next", t, x.shape)
        mean_pred = out["pred_xstart"] * torch.sqrt(alpha_bar_next) + torch.sqrt(1 - alpha_bar_next) * eps
        return {"sample": mean_pred, "pred_xstart": out["pred_xstart"]}

    def ddim_sample_loop(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None,
                         cond_fn=None, model_kwargs=None, device=None, progress=False, eta=0.0):
        """DDIM sampling through all num_timesteps steps; arguments as p_sample_loop plus eta."""
        final = None
        for final in self.ddim_sample_loop_progressive(
            model, shape, noise=noise, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
            cond_fn=cond_fn, model_kwargs=model_kwargs, device=device, progress=progress, eta=eta,
        ):
            pass
        return final["sample"]

    def ddim_sample_loop_progressive(self, model, shape, noise=None, clip_denoised=True,
                                     denoised_fn=None, cond_fn=None, model_kwargs=None, device=None,
                                     progress=False, eta=0.0) -> Iterator[Dict[str, torch.Tensor]]:
        """As ddim_sample_loop, yielding ddim_sample's dict at every step."""
        device, img, indices = self._start_loop(model, shape, noise, device, progress)
        for i in indices:
            t = torch.tensor([i] * shape[0], device=device)
            with torch.no_grad():
                out = self.ddim_sample(model, img, t, clip_denoised=clip_denoised,
                                       denoised_fn=denoised_fn, cond_fn=cond_fn,
                                       model_kwargs=model_kwargs, eta=eta)
                yield out
                img = out["sample"]

    # ------------------------------------------------------------------------------------------
    # losses
    # ------------------------------------------------------------------------------------------
    def _vb_terms_bpd(self, model, x_start, x_t, t, clip_denoised=True, model_kwargs=None):
        """One term of the variational bound, in bits per dimension.

        t > 0: KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)); t == 0: the discretised-Gaussian
        decoder NLL -log p(x_0 | x_1).
        :return: dict with "output" (N,) and "pred_xstart".
        """
        true_mean, _, true_log_variance_clipped = self.q_posterior_mean_variance(
            x_start=x_start, x_t=x_t, t=t)
        out = self.p_mean_variance(model, x_t, t, clip_denoised=clip_denoised,
                                   model_kwargs=model_kwargs)
        kl = normal_kl(true_mean, true_log_variance_clipped, out["mean"], out["log_variance"])
        kl = mean_flat(kl) / np.log(2.0)
        decoder_nll = -discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"])
        decoder_nll = mean_flat(decoder_nll) / np.log(2.0)
        output = torch.where(t == 0, decoder_nll, kl)
        return {"output": output, "pred_xstart": out["pred_xstart"]}

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None):
        """Per-sample training losses at timesteps t.

        :param x_start: (N, C, ...) clean data; t: (N,) int steps; noise: optional eps.
        :return: dict of (N,) tensors. MSE loss types: "mse" (mean over non-batch dims of
                 (target - prediction)^2, target = eps / x_0 / posterior mean by mean type) and
                 "loss" = mse + "vb", where "vb" (only with a learned variance) is the bound term
                 computed with the mean prediction detached. KL loss types: "loss" only.
        """
        if model_kwargs is None:
            model_kwargs = {}
        self._check_t(x_start, t)
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)

        terms = {}
        if self.loss_type.is_vb():
            terms["loss"] = self._vb_terms_bpd(model=model, x_start=x_start, x_t=x_t, t=t,
                                               clip_denoised=False, model_kwargs=model_kwargs)["output"]
            if self.loss_type == LossType.RESCALED_KL:
                terms["loss"] = terms["loss"] * self.num_timesteps
            return terms

        model_output = model(x_t, self._scale_timesteps(t), **model_kwargs)
        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            B, C = x_t.shape[:2]
            expected = (B, C * 2, *x_t.shape[2:])
            if tuple(model_output.shape) != expected:
                raise ValueError(f"with a learned variance the model must return {expected} "
                                 f"(mean and variance channels), got {tuple(model_output.shape)}")
            model_output, model_var_values = torch.split(model_output, C, dim=1)
            # The bound trains only the variance: the mean prediction enters it detached.
            frozen_out = torch.cat([model_output.detach(), model_var_values], dim=1)
            terms["vb"] = self._vb_terms_bpd(model=lambda *args, r=frozen_out: r, x_start=x_start,
                                             x_t=x_t, t=t, clip_denoised=False)["output"]
            if self.loss_type == LossType.RESCALED_MSE:
                terms["vb"] = terms["vb"] * (self.num_timesteps / 1000.0)

        if self.model_mean_type == ModelMeanType.EPSILON:
            target = noise
        elif self.model_mean_type == ModelMeanType.START_X:
            target = x_start
        else:
            target = self.q_posterior_mean_variance(x_start=x_start, x_t=x_t, t=t)[0]
        if model_output.shape != target.shape:
            raise ValueError(f"model prediction shape {tuple(model_output.shape)} != target shape "
                             f"{tuple(target.shape)}")
        terms["mse"] = mean_flat((target - model_output) ** 2)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms

    def _prior_bpd(self, x_start):
        """KL(q(x_T | x_0) || N(0, I)) in bits per dimension, (N,). Not trainable."""
        t = torch.full((x_start.shape[0],), self.num_timesteps - 1, dtype=torch.long,
                       device=x_start.device)
        qt_mean, _, qt_log_variance = self.q_mean_variance(x_start, t)
        kl_prior = normal_kl(mean1=qt_mean, logvar1=qt_log_variance, mean2=0.0, logvar2=0.0)
        return mean_flat(kl_prior) / np.log(2.0)

    def calc_bpd_loop(self, model, x_start, clip_denoised=True, model_kwargs=None):
        """The full variational bound in bits per dimension, one forward pass per step.

        :return: dict with "total_bpd" (N,), "prior_bpd" (N,), "vb" (N, T), "xstart_mse" (N, T),
                 "mse" (N, T) (eps error); column k holds step T-1-k (loop order, as the official code).
        """
        vb, xstart_mse, mse = [], [], []
        for step in list(range(self.num_timesteps))[::-1]:
            t_batch = torch.full((x_start.shape[0],), step, dtype=torch.long, device=x_start.device)
            noise = torch.randn_like(x_start)
            x_t = self.q_sample(x_start=x_start, t=t_batch, noise=noise)
            with torch.no_grad():
                out = self._vb_terms_bpd(model, x_start=x_start, x_t=x_t, t=t_batch,
                                         clip_denoised=clip_denoised, model_kwargs=model_kwargs)
            vb.append(out["output"])
            xstart_mse.append(mean_flat((out["pred_xstart"] - x_start) ** 2))
            eps = self._predict_eps_from_xstart(x_t, t_batch, out["pred_xstart"])
            mse.append(mean_flat((eps - noise) ** 2))
        # Columns in loop order, t = T-1 first (as the official code).
        vb = torch.stack(vb, dim=1)
        xstart_mse = torch.stack(xstart_mse, dim=1)
        mse = torch.stack(mse, dim=1)
        prior_bpd = self._prior_bpd(x_start)
        total_bpd = vb.sum(dim=1) + prior_bpd
        return {"total_bpd": total_bpd, "prior_bpd": prior_bpd, "vb": vb,
                "xstart_mse": xstart_mse, "mse": mse}
