"""The Inception-v3 network of FID (TF graph `inception-2015-12-05`) in plain PyTorch.

FID, IS and precision/recall are defined by one particular network: the 2015-12-05 TensorFlow
Inception-v3 graph (1008 output classes) used by the original FID code and by the ADM evaluator that
DiT's numbers come from. Its weights exist as a PyTorch state dict converted from that graph,
`pt_inception-2015-12-05-6726825d.pth` (the pytorch-fid release file). This module defines a network
whose parameter names and shapes are that file's layout, so the file loads strictly, and whose
forward pass has that graph's quirks:

* average pools inside the mixed blocks ignore the zero padding (TF semantics),
* the last mixed block (`Mixed_7c`) pools its fourth branch with a max pool, not an average,
* BatchNorm eps 1e-3, no conv biases, 1008 logits,
* input: RGB in [0, 1], resized bilinearly (half-pixel centres) to 299x299, scaled to [-1, 1].

No torchvision, no download: the weights come from a local path given by the user
(`load_fid_inception(path)`, or the environment variable FASTDIT_INCEPTION_WEIGHTS).
"""
from __future__ import annotations

import hashlib
import os
import re
import warnings
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastdit.state_dict import check_state_dict_keys
from fastdit.weights.safe_load import load_file

WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_ENV = "FASTDIT_INCEPTION_WEIGHTS"
NUM_LOGITS = 1008
POOL_DIM = 2048
INPUT_SIZE = 299


class BasicConv2d(nn.Module):
    """Conv (no bias) -> BatchNorm(eps 1e-3) -> ReLU. Keys: `conv.weight`, `bn.*`."""

    def __init__(self, in_channels: int, out_channels: int, **conv_kwargs):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **conv_kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _tf_avg_pool(x: torch.Tensor) -> torch.Tensor:
    """3x3 stride-1 average pool that, like TF's 'SAME' pool, averages only the real pixels."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class MixedA(nn.Module):
    """35x35 block: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1 -> 224 + pool_features channels."""

    def __init__(self, in_channels: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_tf_avg_pool(x))
        return torch.cat([b1, b5, b3, bp], dim=1)


class ReductionA(nn.Module):
    """35x35 -> 17x17: 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2 -> 384 + 96 + in channels."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, bd, bp], dim=1)


class MixedC(nn.Module):
    """17x17 block with factorised 7x7 convolutions -> 768 channels."""

    def __init__(self, in_channels: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                      self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = layer(bd)
        bp = self.branch_pool(_tf_avg_pool(x))
        return torch.cat([b1, b7, bd, bp], dim=1)


class ReductionB(nn.Module):
    """17x17 -> 8x8: 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2 -> 320 + 192 + in channels."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b7, bp], dim=1)


class MixedE(nn.Module):
    """8x8 block with split 1x3/3x1 convolutions -> 2048 channels.

    `max_pool_branch`: the graph's last block (Mixed_7c) pools its fourth branch with a 3x3 max pool;
    the one before (Mixed_7b) uses the padding-excluding average pool.
    """

    def __init__(self, in_channels: int, max_pool_branch: bool):
        super().__init__()
        self.max_pool_branch = max_pool_branch
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        s = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(s), self.branch3x3_2b(s)], dim=1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], dim=1)
        if self.max_pool_branch:
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        else:
            pooled = _tf_avg_pool(x)
        bp = self.branch_pool(pooled)
        return torch.cat([b1, b3, bd, bp], dim=1)


class FIDInceptionV3(nn.Module):
    """forward(images (N, 3, H, W) in [0, 1]) -> (pool (N, 2048), logits (N, 1008)).

    `pool` is the 2048-d global average pool ("pool_3") used by FID and precision/recall; `logits`
    feed the softmax of the Inception Score. Module names follow the weights file's layout.
    """

    def __init__(self, resize_input: bool = True):
        super().__init__()
        self.resize_input = resize_input
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = MixedA(192, pool_features=32)
        self.Mixed_5c = MixedA(256, pool_features=64)
        self.Mixed_5d = MixedA(288, pool_features=64)
        self.Mixed_6a = ReductionA(288)
        self.Mixed_6b = MixedC(768, channels_7x7=128)
        self.Mixed_6c = MixedC(768, channels_7x7=160)
        self.Mixed_6d = MixedC(768, channels_7x7=160)
        self.Mixed_6e = MixedC(768, channels_7x7=192)
        self.Mixed_7a = ReductionB(768)
        self.Mixed_7b = MixedE(1280, max_pool_branch=False)
        self.Mixed_7c = MixedE(2048, max_pool_branch=True)
        self.fc = nn.Linear(POOL_DIM, NUM_LOGITS)
        self.eval()

    def forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected RGB images (N, 3, H, W) in [0, 1], got {tuple(images.shape)}")
        x = images.float()
        if self.resize_input and tuple(x.shape[-2:]) != (INPUT_SIZE, INPUT_SIZE):
            x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        x = 2 * x - 1  # [0, 1] -> [-1, 1]
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (N, 64, 147, 147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (N, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # (N, 192, 71, 71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (N, 192, 35, 35)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                      self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b,
                      self.Mixed_7c):
            x = block(x)  # ... -> (N, 2048, 8, 8)
        pool = x.mean(dim=(2, 3))  # (N, 2048)
        logits = self.fc(pool)  # (N, 1008)
        return pool, logits


# ----------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------
def resolve_weights_path(path: Optional[str]) -> str:
    """The weights file to use: `path`, else $FASTDIT_INCEPTION_WEIGHTS; a clear error if absent."""
    chosen = path or os.environ.get(WEIGHTS_ENV)
    if not chosen:
        raise FileNotFoundError(
            "FID needs the Inception weights file "
            f"'{WEIGHTS_FILENAME}' (pytorch-fid's conversion of the TF inception-2015-12-05 "
            "graph). fastdit never downloads it: pass its local path with --inception-weights "
            f"PATH (or inception_weights=PATH), or set {WEIGHTS_ENV}=PATH.")
    chosen = os.path.expanduser(chosen)
    if not os.path.isfile(chosen):
        raise FileNotFoundError(
            f"Inception weights not found at {chosen!r}. Pass the local path of "
            f"'{WEIGHTS_FILENAME}' with --inception-weights PATH (or set {WEIGHTS_ENV}); "
            "fastdit does not download it.")
    return chosen


def _check_hash_prefix(path: str) -> None:
    """torch.hub file names end in '-<first hex digits of sha256>'; warn when the digest differs."""
    match = re.search(r"-([a-f0-9]{6,})\.[A-Za-z0-9]+$", os.path.basename(path))
    if not match:
        return
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    if not digest.hexdigest().startswith(match.group(1)):
        warnings.warn(
            f"{path}: sha256 {digest.hexdigest()[:12]}... does not start with the {match.group(1)!r} "
            "in its name; this is not the original file, so FID/IS values may not be comparable")


def load_inception_state_dict(model: FIDInceptionV3, state_dict: Dict[str, torch.Tensor]) -> None:
    """Strict load; only BatchNorm's `num_batches_tracked` counters may be absent (set to 0).

    Raises KeyError naming missing/unexpected keys and ValueError naming shape mismatches.
    """
    check_state_dict_keys(model, state_dict, what="Inception weights (FID Inception-v3 layout)",
                          may_be_missing=lambda k: k.endswith("num_batches_tracked"))
    own = model.state_dict()
    full = dict(own)
    full.update(state_dict)
    model.load_state_dict(full, strict=True)


def load_fid_inception(path: Optional[str] = None, device="cpu", check_hash: bool = True
                       ) -> FIDInceptionV3:
    """The FID Inception-v3 with the local weights file `path` (or $FASTDIT_INCEPTION_WEIGHTS)."""
    path = resolve_weights_path(path)
    if check_hash:
        _check_hash_prefix(path)
    state_dict = load_file(path)  # weights_only=True; errors name the file
    if not isinstance(state_dict, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(state_dict).__name__}")
    model = FIDInceptionV3()
    load_inception_state_dict(model, state_dict)
    return model.to(device).eval().requires_grad_(False)


def expected_state_dict_keys(include_num_batches_tracked: bool = False) -> List[str]:
    """The parameter/buffer names of the weights file, in module order."""
    keys = list(FIDInceptionV3().state_dict())
    if not include_num_batches_tracked:
        keys = [k for k in keys if not k.endswith("num_batches_tracked")]
    return keys
