from setuptools import find_packages, setup

# `kernels/` at the top level is installed as `fastdit.kernels` (never as a top-level `kernels`
# module: PyPI's `kernels` package owns that name and transformers/diffusers probe for it).
packages = find_packages(include=["fastdit", "fastdit.*"]) + ["fastdit.kernels"]

setup(
    name="fastdit",
    version="0.1.0",
    description="Fast training of Diffusion Transformers (DiT): fused Triton kernels, "
                "FlashAttention-class attention, DeepSpeed ZeRO + bf16",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"fastdit.kernels": "kernels"},
    package_data={"fastdit": ["../configs/*.json"]},
    install_requires=[
        "torch>=2.4",
        "triton>=3.0",
        "numpy",
        "tqdm",
        "deepspeed>=0.15",
        "diffusers>=0.30",
        "nvtx",
        "pillow",
        "matplotlib",
        "scikit-learn",   # the embedded default dataset (bundled 8x8 digits)
        "tensorboard",
        "scipy",
    ],
    extras_require={
        "flash": ["flash-attn"],
        "xformers": ["xformers"],
        "test": ["pytest", "pytest-timeout"],
    },
)
