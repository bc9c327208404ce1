"""Building blocks shared by the UNets (as timm/layers is shared by timm's models).

- `ConvBnRelu`: conv3x3 ('same' padding) + BatchNorm + ReLU.
- `DoubleConv`: two ConvBnRelu, the UNet block; `keras_bug=True` is the public Keras
  tutorial's block whose second conv reads the block *input*, which leaves the first
  conv dead. Keras drops layers that do not reach the output, so the faithful port of
  that model is one conv per block; we build exactly that (nothing unused, so DDP and
  the parameter count agree with Keras).
- `SCSE`: concurrent spatial and channel squeeze & excitation (Roy et al. 2018), used
  by the 1st and 4th place TGS solutions after every decoder block.
- `SaltPresentHead`: image-level "is there any salt" logit from a feature map, and
  `StageHeads`: 1x1 mask heads on intermediate decoder outputs (deep supervision).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class ConvBnRelu(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, bias: bool = False):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class DoubleConv(nn.Sequential):
    """conv3x3+BN+ReLU twice; with keras_bug only the second (input-reading) conv exists."""

    def __init__(self, in_channels: int, out_channels: int, *, keras_bug: bool = False, bias: bool = False):
        if keras_bug:
            super().__init__(ConvBnRelu(in_channels, out_channels, bias=bias))
        else:
            super().__init__(
                ConvBnRelu(in_channels, out_channels, bias=bias),
                ConvBnRelu(out_channels, out_channels, bias=bias),
            )


class SCSE(nn.Module):
    """x * channel_gate(x) + x * spatial_gate(x): recalibrates channels and pixels."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.channel_gate = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(channels, hidden, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1),
            nn.Sigmoid(),
        )
        self.spatial_gate = nn.Sequential(nn.Conv2d(channels, 1, 1), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.channel_gate(x) + x * self.spatial_gate(x)


class SaltPresentHead(nn.Module):
    """Global average pool -> linear -> one logit per image; positive means salt is PRESENT."""

    def __init__(self, channels: int):
        super().__init__()
        self.fc = nn.Linear(channels, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(features, 1), 1))[:, 0]


class StageHeads(nn.Module):
    """One 1x1 conv -> mask logit per intermediate decoder output (deep supervision)."""

    def __init__(self, channels: list[int]):
        super().__init__()
        self.heads = nn.ModuleList(nn.Conv2d(c, 1, 1) for c in channels)

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        return [head(f) for head, f in zip(self.heads, features)]
