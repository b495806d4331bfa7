"""Gaussian diffusion for DiT: schedules, training losses, DDPM/DDIM samplers, timestep respacing.

    diffusion = create_diffusion(timestep_respacing="")           # training: all 1000 steps
    loss = diffusion.training_losses(model, x, t, dict(y=y))["loss"].mean()
    sampler = create_diffusion("250")                               # or "ddim50"
    z = sampler.p_sample_loop(model.forward_with_cfg, z.shape, z, clip_denoised=False,
                              model_kwargs=dict(y=y, cfg_scale=4.0), device=device)
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

from . import gaussian_diffusion as gd
from .gaussian_diffusion import (
    GaussianDiffusion,
    LossType,
    ModelMeanType,
    ModelVarType,
    get_named_beta_schedule,
    mean_flat,
)
from .losses import (
    approx_standard_normal_cdf,
    continuous_gaussian_log_likelihood,
    discretized_gaussian_log_likelihood,
    normal_kl,
)
from .respace import SpacedDiffusion, space_timesteps

__all__ = [
    "gd",
    "create_diffusion",
    "GaussianDiffusion",
    "SpacedDiffusion",
    "space_timesteps",
    "get_named_beta_schedule",
    "ModelMeanType",
    "ModelVarType",
    "LossType",
    "mean_flat",
    "normal_kl",
    "approx_standard_normal_cdf",
    "discretized_gaussian_log_likelihood",
    "continuous_gaussian_log_likelihood",
]


def create_diffusion(
    timestep_respacing: Optional[Union[str, int, Sequence[int]]],
    noise_schedule: str = "linear",
    use_kl: bool = False,
    sigma_small: bool = False,
    predict_xstart: bool = False,
    learn_sigma: bool = True,
    rescale_learned_sigmas: bool = False,
    diffusion_steps: int = 1000,
) -> SpacedDiffusion:
    """The diffusion DiT trains and samples with (defaults: the paper's setup).

    :param timestep_respacing: None or "" for all `diffusion_steps` steps; else a respacing spec for
        `space_timesteps` ("250", "10,15,20", "ddim50").
    :param noise_schedule: "linear" (Ho et al., scaled to `diffusion_steps`) or "squaredcos_cap_v2".
    :param use_kl: train on the rescaled variational bound alone (LossType.RESCALED_KL).
    :param sigma_small: with learn_sigma False, use the posterior variance (else beta_t).
    :param predict_xstart: the model predicts x_0 instead of eps.
    :param learn_sigma: the model outputs 2C channels; the second C set the variance in the
        [beta~_t, beta_t] log range and are trained by the VB term.
    :param rescale_learned_sigmas: scale the VB term by num_timesteps / 1000 (LossType.RESCALED_MSE).
    :param diffusion_steps: length of the original process.
    """
    betas = get_named_beta_schedule(noise_schedule, diffusion_steps)
    if use_kl:
        loss_type = LossType.RESCALED_KL
    elif rescale_learned_sigmas:
        loss_type = LossType.RESCALED_MSE
    else:
        loss_type = LossType.MSE
    if timestep_respacing is None or timestep_respacing == "":
        timestep_respacing = [diffusion_steps]
    if learn_sigma:
        var_type = ModelVarType.LEARNED_RANGE
    else:
        var_type = ModelVarType.FIXED_SMALL if sigma_small else ModelVarType.FIXED_LARGE
    return SpacedDiffusion(
        use_timesteps=space_timesteps(diffusion_steps, timestep_respacing),
        betas=betas,
        model_mean_type=ModelMeanType.START_X if predict_xstart else ModelMeanType.EPSILON,
        model_var_type=var_type,
        loss_type=loss_type,
    )
