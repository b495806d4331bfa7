"""Parameters and forward Gflops of DiT models, in the paper's convention.

The DiT paper's "Gflops" are multiply-accumulates (MACs) of one forward pass of one image. Counted here:
  * every matmul: linear layers (incl. the adaLN and timestep MLPs), the patch-embedding conv, and the two
    attention matmuls (Q K^T and A V: 2 * T^2 * D per block);
  * one op per element of each LayerNorm (2 per block + the final one).
Not counted: biases, activations, softmax, modulation, residual adds, embeddings lookups.
This convention reproduces the paper's figures (XL/2: 118.6 at 256 and 524.6 at 512; p=4 column
S/B/L/XL = 1.4 / 5.6 / 19.7 / 29.1); tests/test_flops.py checks them. Real FLOPs = 2 x MACs, and a training
step costs about 3 x forward (forward + backward of activations and weights). MFU divides by the
device's dense peak, `peak_flops(gpu_name, precision)` (the one table, PEAK_FLOPS).

    python -m fastdit.flops                      # the 12-row table at 256x256
    python -m fastdit.flops --image-size 512 --json
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from typing import Optional

from fastdit.generate.vae import DOWNSAMPLE as VAE_DOWNSAMPLE
from fastdit.models.registry import MODEL_SIZES, PATCH_SIZES, model_config

LATENT_CHANNELS = 4

# Dense (no sparsity) peak FLOP/s per device for MFU, by precision, from NVIDIA's datasheets (which quote
# "with sparsity" figures; these are half of those). Matched as substrings of torch.cuda.get_device_name(),
# longest key first: "NVIDIA H100 80GB HBM3" is the SXM part, "H100 PCIe" and "H100 NVL" are not.
PEAK_FLOPS = {
    "bf16": {"H200 NVL": 835e12, "H200": 989e12, "H100 NVL": 835e12, "H100 PCIe": 756e12, "H100": 989e12,
             "H800": 989e12, "GH200": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12, "L40": 181e12,
             "A10G": 70e12},
    "tf32": {"H200 NVL": 417.5e12, "H200": 494.5e12, "H100 NVL": 417.5e12, "H100 PCIe": 378e12,
             "H100": 494.5e12, "H800": 494.5e12, "GH200": 494.5e12, "A100": 156e12, "A800": 156e12,
             "L40S": 183e12, "L40": 90.5e12, "A10G": 35e12},
}


@dataclass(frozen=True)
class DiTShape:
    depth: int
    hidden_size: int
    patch_size: int
    num_heads: int
    input_size: int = 32
    in_channels: int = 4
    num_classes: int = 1000
    learn_sigma: bool = True
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1
    block_type: str = "adaln_zero"
    frequency_embedding_size: int = 256

    @property
    def num_tokens(self) -> int:
        return (self.input_size // self.patch_size) ** 2

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)


def shape_of(model_name: str, image_size: int = 256, latent: bool = True, **overrides) -> DiTShape:
    """DiTShape of a registry model at an image size (latent=True: 8x VAE downsampling, 4 channels)."""
    input_size = image_size // VAE_DOWNSAMPLE if latent else image_size
    kw = dict(model_config(model_name), input_size=input_size)
    kw.update(overrides)
    return DiTShape(**kw)


def _linear(n_in: int, n_out: int, bias: bool = True) -> int:
    return n_in * n_out + (n_out if bias else 0)


def count_params(s: DiTShape) -> int:
    """All parameters, the fixed pos_embed included (as `sum(p.numel() for p in model.parameters())`)."""
    d, p = s.hidden_size, s.patch_size
    n = s.in_channels * p * p * d + d  # x_embedder.proj
    n += _linear(s.frequency_embedding_size, d) + _linear(d, d)  # t_embedder
    n += (s.num_classes + int(s.class_dropout_prob > 0)) * d  # y_embedder (+ null class)
    n += s.num_tokens * d  # pos_embed
    block = _linear(d, 3 * d) + _linear(d, d) + _linear(d, s.mlp_hidden) + _linear(s.mlp_hidden, d)
    if s.block_type == "adaln_zero":
        block += _linear(d, 6 * d)
    elif s.block_type == "adaln":
        block += _linear(d, 4 * d)
    elif s.block_type == "cross_attention":
        block += _linear(d, d) + _linear(d, 2 * d) + _linear(d, d)
    n += s.depth * block
    n += _linear(d, p * p * s.out_channels)  # final_layer.linear
    if s.block_type in ("adaln_zero", "adaln"):
        n += _linear(d, 2 * d)  # final_layer.adaLN_modulation
    return n


def forward_macs(s: DiTShape) -> int:
    """Multiply-accumulates of one forward pass of one sample (the paper's 'flops')."""
    d, p, t = s.hidden_size, s.patch_size, s.num_tokens
    seq = t + 2 if s.block_type == "in_context" else t  # in-context adds the t and y tokens
    macs = t * d * s.in_channels * p * p  # patch embedding conv
    macs += s.frequency_embedding_size * d + d * d  # timestep MLP (per sample)
    block = seq * d * 3 * d  # qkv
    block += 2 * seq * seq * d  # Q K^T and A V
    block += seq * d * d  # attention output projection
    block += 2 * seq * d * s.mlp_hidden  # fc1 + fc2
    block += 2 * seq * d  # two LayerNorms, one op per element
    if s.block_type == "adaln_zero":
        block += d * 6 * d
    elif s.block_type == "adaln":
        block += d * 4 * d
    elif s.block_type == "cross_attention":
        block += seq * d * d + 2 * 2 * d * d + 2 * seq * 2 * d + seq * d * d + seq * d
    macs += s.depth * block
    macs += t * d  # final LayerNorm
    if s.block_type in ("adaln_zero", "adaln"):
        macs += d * 2 * d
    macs += t * d * p * p * s.out_channels  # final linear
    return macs


def forward_gflops(model_name: str, image_size: int = 256, **overrides) -> float:
    """The paper's Gflops (GMACs of one forward pass) of a registry model at an image size."""
    return forward_macs(shape_of(model_name, image_size, **overrides)) / 1e9


def training_flops_per_image(model_name: str, image_size: int = 256, **overrides) -> float:
    """Real FLOPs of one training step per image: 2 FLOPs per MAC x (forward + 2x backward)."""
    return 2.0 * 3.0 * forward_macs(shape_of(model_name, image_size, **overrides))


def training_flops_per_sample(shape: DiTShape) -> float:
    """Like training_flops_per_image, for an explicit shape (pixel-space or custom models)."""
    return 2.0 * 3.0 * forward_macs(shape)


def peak_flops(gpu_name: Optional[str], precision: str = "bf16") -> Optional[float]:
    """Dense peak FLOP/s of the GPU named `gpu_name` in `precision` ("bf16" or "tf32"; the table
    above), None for an unknown GPU or none."""
    table = PEAK_FLOPS[precision]
    for key in sorted(table, key=len, reverse=True):
        if gpu_name and key in gpu_name:
            return table[key]
    return None


def table(image_size: int = 256):
    rows = []
    for size in MODEL_SIZES:
        for p in PATCH_SIZES:
            name = f"DiT-{size}/{p}"
            s = shape_of(name, image_size)
            rows.append({"model": name, "image_size": image_size, "params": count_params(s),
                         "gflops": round(forward_macs(s) / 1e9, 2)})
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description="DiT parameters and forward Gflops (paper convention)")
    ap.add_argument("--image-size", type=int, default=256,
                    help="image resolution; the model sees latents at image_size/8 (default 256)")
    ap.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    args = ap.parse_args(argv)
    if args.image_size <= 0 or args.image_size % VAE_DOWNSAMPLE:
        ap.error(f"--image-size must be a positive multiple of {VAE_DOWNSAMPLE}, got {args.image_size}")
    for size in MODEL_SIZES:
        for p in PATCH_SIZES:
            if (args.image_size // VAE_DOWNSAMPLE) % p:
                ap.error(f"latent size {args.image_size // VAE_DOWNSAMPLE} is not divisible by patch {p}")
    rows = table(args.image_size)
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"DiT models at {args.image_size}x{args.image_size} "
          f"(latent {args.image_size // VAE_DOWNSAMPLE}x{args.image_size // VAE_DOWNSAMPLE}x4)")
    print(f"{'model':<10} {'params':>15} {'Gflops':>9}")
    for r in rows:
        print(f"{r['model']:<10} {r['params']:>15,} {r['gflops']:>9.2f}")


if __name__ == "__main__":
    main()
