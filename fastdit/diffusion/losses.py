"""Likelihood terms used by the diffusion variational bound.

All functions act elementwise on tensors (any shape) and return values in nats; callers average
over the non-batch dimensions and divide by log(2) for bits.
"""
from __future__ import annotations

import math
from typing import Union

import torch

Number = Union[float, int, torch.Tensor]

# The 256 pixel levels of 8-bit data live on [-1, 1]; neighbouring levels are 2/255 apart, so each
# level owns the bin [x - 1/255, x + 1/255].
_HALF_BIN = 1.0 / 255.0
_LOG_FLOOR = 1e-12


def normal_kl(mean1: Number, logvar1: Number, mean2: Number, logvar2: Number) -> torch.Tensor:
    """KL( N(mean1, exp(logvar1)) || N(mean2, exp(logvar2)) ), elementwise, in nats.

    KL = 0.5 * (logvar2 - logvar1 + exp(logvar1 - logvar2) + (mean1 - mean2)^2 * exp(-logvar2) - 1).
    Any argument may be a Python number as long as at least one is a tensor; numbers are broadcast
    (e.g. `mean2=0.0, logvar2=0.0` for a standard-normal prior).
    """
    ref = next((a for a in (mean1, logvar1, mean2, logvar2) if isinstance(a, torch.Tensor)), None)
    if ref is None:
        raise TypeError("normal_kl needs at least one tensor argument")
    # Variances given as numbers become tensors on the reference's device/dtype so exp() works.
    logvar1, logvar2 = [
        lv if isinstance(lv, torch.Tensor) else torch.tensor(lv).to(ref) for lv in (logvar1, logvar2)
    ]
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + torch.exp(logvar1 - logvar2)
        + ((mean1 - mean2) ** 2) * torch.exp(-logvar2)
    )


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Standard normal CDF through the tanh approximation
    Phi(x) ~= 0.5 * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3)))  (max abs error ~3e-4)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, *, means: torch.Tensor, log_scales: torch.Tensor
) -> torch.Tensor:
    """log P(x) for data quantised to 256 levels on [-1, 1] under N(means, exp(log_scales)^2).

    P(x) is the Gaussian mass of the bin [x - 1/255, x + 1/255]; the lowest bin extends to -inf and
    the highest to +inf, so the 256 bin masses sum to one. Log terms are floored at 1e-12.
    `x` must be the quantised data (values -1 + 2k/255); returns a tensor of x's shape.
    """
    if not (x.shape == means.shape == log_scales.shape):
        raise ValueError(
            "discretized_gaussian_log_likelihood needs x, means and log_scales of one shape, got "
            f"{tuple(x.shape)}, {tuple(means.shape)}, {tuple(log_scales.shape)}"
        )
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_upper = approx_standard_normal_cdf(inv_std * (centered + _HALF_BIN))  # P(X <= x + 1/255)
    cdf_lower = approx_standard_normal_cdf(inv_std * (centered - _HALF_BIN))  # P(X <= x - 1/255)
    log_cdf_upper = torch.log(cdf_upper.clamp(min=_LOG_FLOOR))            # lowest bin: (-inf, x+)
    log_one_minus_cdf_lower = torch.log((1.0 - cdf_lower).clamp(min=_LOG_FLOOR))  # top: [x-, inf)
    log_bin = torch.log((cdf_upper - cdf_lower).clamp(min=_LOG_FLOOR))    # interior bins
    return torch.where(
        x < -0.999,
        log_cdf_upper,
        torch.where(x > 0.999, log_one_minus_cdf_lower, log_bin),
    )


def continuous_gaussian_log_likelihood(
    x: torch.Tensor, *, means: torch.Tensor, log_scales: torch.Tensor
) -> torch.Tensor:
    """Log density log N(x; means, exp(log_scales)^2), elementwise, in nats.

    Note: this is the true density (it includes the -log_scales Jacobian term). It is not used by
    training or sampling.
    """
    z = (x - means) * torch.exp(-log_scales)
    return -0.5 * z * z - 0.5 * math.log(2.0 * math.pi) - log_scales
