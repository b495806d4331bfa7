"""FLOP counter against the DiT paper's published figures (forward GMACs per image)."""
import json
import subprocess
import sys

import pytest
import torch

from fastdit.flops import (forward_gflops, forward_macs, peak_flops, shape_of,
                           training_flops_per_image)
from fastdit.models.reference import DiT_models

from decimal import ROUND_HALF_UP, Decimal

# The paper's table gives Gflops to two decimals; the one-decimal figures below are those values rounded
# half-up (e.g. XL/4: 29.05 -> 29.1), so compare the same way.
PAPER_256 = {"DiT-XL/2": 118.6, "DiT-S/4": 1.4, "DiT-B/4": 5.6, "DiT-L/4": 19.7, "DiT-XL/4": 29.1}


def paper_round(x, places):
    q = Decimal(1).scaleb(-places)
    two = Decimal(repr(x)).quantize(Decimal("0.01"), ROUND_HALF_UP)
    return float(two.quantize(q, ROUND_HALF_UP))


@pytest.mark.parametrize("name,gflops", sorted(PAPER_256.items()))
def test_paper_figures_256(name, gflops):
    assert paper_round(forward_gflops(name, 256), 1) == gflops


def test_paper_xl2_two_decimals():
    assert paper_round(forward_gflops("DiT-XL/2", 256), 2) == 118.64


def test_paper_xl2_512():
    assert paper_round(forward_gflops("DiT-XL/2", 512), 1) == 524.6


def test_matmul_macs_match_a_traced_forward():
    """Count matmul MACs of a real forward with a dispatch hook; add LayerNorm elements; compare."""
    from torch.utils.flop_counter import FlopCounterMode
    name = "DiT-S/4"
    model = DiT_models[name](input_size=16, num_classes=10).eval()
    x, t, y = torch.randn(1, 4, 16, 16), torch.tensor([10]), torch.tensor([3])
    with FlopCounterMode(display=False) as fc:
        model(x, t, y)
    traced_macs = fc.get_total_flops() / 2  # torch counts 2 FLOPs per MAC
    s = shape_of(name, 128, num_classes=10)
    ln_elems = (2 * s.depth + 1) * s.num_tokens * s.hidden_size
    assert traced_macs + ln_elems == forward_macs(s)


def test_training_flops_is_six_times_macs():
    assert training_flops_per_image("DiT-XL/2") == pytest.approx(6 * 118.64e9, rel=1e-3)


def test_cli_table_and_json():
    out = subprocess.run([sys.executable, "-m", "fastdit.flops"], capture_output=True, text=True,
                         check=True).stdout
    assert "DiT-XL/2" in out and "118.64" in out and "675,129,632" in out
    rows = json.loads(subprocess.run([sys.executable, "-m", "fastdit.flops", "--image-size", "512",
                                      "--json"], capture_output=True, text=True, check=True).stdout)
    assert len(rows) == 12
    xl2 = next(r for r in rows if r["model"] == "DiT-XL/2")
    assert set(xl2) == {"model", "image_size", "params", "gflops"} and round(xl2["gflops"], 1) == 524.6
    bad = subprocess.run([sys.executable, "-m", "fastdit.flops", "--image-size", "100"],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "multiple of 8" in bad.stderr


@pytest.mark.parametrize("name, precision, peak", [
    ("NVIDIA H200", "bf16", 989e12), ("NVIDIA H200 NVL", "bf16", 835e12),
    ("NVIDIA H100 80GB HBM3", "bf16", 989e12), ("NVIDIA H100 PCIe", "bf16", 756e12),
    ("NVIDIA A100-SXM4-80GB", "bf16", 312e12), ("NVIDIA GeForce RTX 4090", "bf16", None), (None, "bf16", None),
    ("", "bf16", None), ("NVIDIA H100 80GB HBM3", "tf32", 494.5e12), ("NVIDIA H100 PCIe", "tf32", 378e12),
    ("NVIDIA L40S", "tf32", 183e12)])
def test_peak_flops_lookup(name, precision, peak):
    """The one table MFU divides by (training and benchmarks): longest name first, PCIe/NVL apart."""
    assert peak_flops(name, precision) == peak
