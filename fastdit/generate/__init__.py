"""Generating images from a trained DiT.

    sample.py      the sampling loop (per-sample noise, CFG, DDPM/DDIM) and `python -m fastdit.sample`
    sample_fid.py  N samples for FID on any number of ranks, resumable, into an ADM .npz
    vae.py         the Stable Diffusion VAE: latent scale, loading (local only), encode, decode
"""
