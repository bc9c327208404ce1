"""Building blocks shared by the UNets (as timm/layers is shared by timm's models).

- `ConvBnRelu`: conv3x3 ('same' padding) + BatchNorm + ReLU.
- `DoubleConv`: two ConvBnRelu, the UNet block (optionally residual); `keras_bug=True` is the public Keras
  tutorial's block whose second conv reads the block *input*, which leaves the first
  conv dead. Keras drops layers that do not reach the output, so the faithful port of
  that model is one conv per block; we build exactly that (nothing unused, so DDP and
  the parameter count agree with Keras).
- `SCSE`: concurrent spatial and channel squeeze & excitation (Roy et al. 2018), used
  by the 1st and 4th place TGS solutions after every decoder block.
- `HypercolumnHead`: the mask logit from every decoder output at full resolution.
- `GlobalContext`: adds an image-level summary of the UNet centre back onto every pixel of it
  (the global branch of the 1st place's FPA centre), so the decoder sees the whole image.
- `SaltPresentHead`: image-level "is there any salt" logit from a feature map, and
  `StageHeads`: 1x1 mask heads on intermediate decoder outputs (deep supervision).
- `Dropout`: element-wise dropout, as nn.Dropout, with a faster random mask on CPU.
- `UNetTricks`: which of the above a UNet carries, one object both UNets take.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


HYPERCOLUMN_CHANNELS = 32  # default width of the hypercolumn head
DROPOUT_LEVELS = 32768  # the CPU mask compares 15-bit uniform integers: p is kept to 1/32768


@dataclass(frozen=True)
class UNetTricks:
    """The TGS winners' additions a UNet carries (model.scse, .hypercolumn, ...): one argument
    for both UNets instead of five flags each."""

    scse: bool = False
    hypercolumn: bool = False
    deep_supervision: bool = False
    residual: bool = False
    global_context: bool = False

    @classmethod
    def of(cls, cfg) -> "UNetTricks":
        """The tricks a ModelConfig asks for."""
        return cls(cfg.scse, cfg.hypercolumn, cfg.deep_supervision, cfg.residual, cfg.global_context)


def keep_mask(like: torch.Tensor, p: float) -> torch.Tensor:
    """A bool tensor shaped (and laid out, e.g. channels_last) like `like`: True with
    probability 1 - p, independently per element.

    Why not torch.bernoulli: on CPU it draws one Mersenne-twister number per element in a
    single thread, and in the seed UNet at n_filters 16 that was 18% of a bf16 training
    step (more than all batch norms). One 32-bit draw here serves two elements (two 15-bit
    uniforms), ~4x less generator work for the same distribution.
    """
    n = like.numel()
    words = torch.empty((n + 1) // 2, dtype=torch.int32, device=like.device).random_()  # 31 random bits
    halves = words.view(torch.int16)[:n].bitwise_and_(DROPOUT_LEVELS - 1)  # low and high 15 bits
    keep = halves >= round(p * DROPOUT_LEVELS)
    # i.i.d. elements: any layout is valid, so build the mask in `like`'s physical order
    order = sorted(range(like.dim()), key=lambda d: -like.stride(d))
    return keep.view([like.shape[d] for d in order]).permute([order.index(d) for d in range(like.dim())])


class Dropout(nn.Module):
    """nn.Dropout (element-wise, scaled by 1 / (1 - p) in training) with keep_mask on CPU."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        dense = x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))
        if x.device.type != "cpu" or not dense:
            return F.dropout(x, self.p, training=True)  # CUDA's Philox generator is already fast
        # x * scaled float mask, not torch.where(mask, x * scale, 0): one elementwise op each way
        # instead of two, 27% less time in dropout forward + backward (16x16x112x112, 1 thread)
        return x * keep_mask(x, self.p).to(x.dtype).mul_(1.0 / (1.0 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}"


class ConvBnRelu(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, bias: bool = False):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class DoubleConv(nn.Sequential):
    """conv3x3+BN+ReLU twice; with keras_bug only the second (input-reading) conv exists.

    `residual=True` adds the first conv's output to the second's (h + f(h)): the second
    conv becomes a residual branch, as in the ResNet-block UNets of the TGS public kernels,
    for an easier optimisation at the cost of one addition (same parameters and state-dict
    keys)."""

    def __init__(self, in_channels: int, out_channels: int, *, keras_bug: bool = False, bias: bool = False,
                 residual: bool = False):
        if keras_bug and residual:
            raise ValueError("keras_bug blocks have one conv: nothing to make residual")
        if keras_bug:
            super().__init__(ConvBnRelu(in_channels, out_channels, bias=bias))
        else:
            super().__init__(
                ConvBnRelu(in_channels, out_channels, bias=bias),
                ConvBnRelu(out_channels, out_channels, bias=bias),
            )
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.residual:
            return super().forward(x)
        h = self[0](x)
        return h + self[1](h)


def image_mlp(channels: int, reduction: int) -> list[nn.Module]:
    """Mean over pixels -> 1x1 conv to channels // reduction -> ReLU -> 1x1 conv back: one
    [B,C,1,1] vector per image, the squeeze of SCSE's channel gate and of GlobalContext.
    Returned as layers, so each caller's nn.Sequential keeps its state-dict keys (.1, .3)."""
    hidden = max(channels // reduction, 1)
    return [nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, hidden, 1), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1)]


class SCSE(nn.Module):
    """x * channel_gate(x) + x * spatial_gate(x): recalibrates channels and pixels."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.channel_gate = nn.Sequential(*image_mlp(channels, reduction), nn.Sigmoid())
        self.spatial_gate = nn.Sequential(nn.Conv2d(channels, 1, 1), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.channel_gate(x) + x * self.spatial_gate(x)


class GlobalContext(nn.Module):
    """x + g(mean over pixels of x), g = 1x1 conv -> ReLU -> 1x1 conv, added to every pixel.

    Why: in the TGS OOF the worst misses are masks covering most of the image whose texture
    only reads as salt against the whole picture; a 3x3 conv at the centre sees a few cells
    of it. This is the image-pooling branch of FPA (1st place) and ASPP, fused by addition
    as in GCNet. The last conv starts at zero, so a new model is exactly the plain UNet and
    learns how much context to use; the cost is two matrix-vector products per image.
    """

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        self.transform = nn.Sequential(*image_mlp(channels, reduction))
        nn.init.zeros_(self.transform[-1].weight)
        nn.init.zeros_(self.transform[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.transform(x)  # [B,C,1,1] broadcast over H, W


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


def bilinear_weights(source: int, target: int) -> torch.Tensor:
    """[target, source] rows of bilinear interpolation weights, align_corners=False (as
    F.interpolate: source coordinate (i + 0.5) * source / target - 0.5, clamped at 0)."""
    position = ((torch.arange(target, dtype=torch.float64) + 0.5) * (source / target) - 0.5).clamp(min=0)
    low = position.floor().long().clamp(max=source - 1)
    high = (low + 1).clamp(max=source - 1)
    frac = position - low
    weights = torch.zeros(target, source, dtype=torch.float64)
    weights.index_put_((torch.arange(target), low), 1 - frac, accumulate=True)
    weights.index_put_((torch.arange(target), high), frac, accumulate=True)
    return weights


def bilinear_resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """F.interpolate(bilinear, align_corners=False), except under torch's deterministic mode on
    CUDA, where that backward has no deterministic kernel (it accumulates with atomics and
    raises): there the same map as two matmuls (rows, then columns), equal to float rounding."""
    if not (x.is_cuda and torch.are_deterministic_algorithms_enabled()):
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    rows = _device_weights(x.shape[-2], size[0], x.device, x.dtype)
    cols = _device_weights(x.shape[-1], size[1], x.device, x.dtype)
    return torch.matmul(torch.matmul(rows, x), cols.T)


@functools.lru_cache(maxsize=64)
def _device_weights(source: int, target: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return bilinear_weights(source, target).to(device, dtype)  # once per shape: no copy per step


class HypercolumnHead(nn.Module):
    """1x1 conv over the concat of all decoder outputs upsampled to full size, then BN-ReLU-1x1.

    Computed as the sum of per-stage 1x1 projections upsampled afterwards: a 1x1 conv
    commutes with bilinear upsampling, so this is the same function as concat-then-conv
    without materialising ~500 channels at full resolution.
    """

    def __init__(self, channels: list[int], hidden: int = HYPERCOLUMN_CHANNELS):
        super().__init__()
        self.projections = nn.ModuleList(nn.Conv2d(c, hidden, 1, bias=False) for c in channels)
        self.fuse = nn.Sequential(nn.BatchNorm2d(hidden), nn.ReLU(inplace=True), nn.Conv2d(hidden, 1, 1))

    def forward(self, stage_outputs: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        fused = 0
        for projection, features in zip(self.projections, stage_outputs):
            projected = projection(features)
            if projected.shape[-2:] != size:
                projected = bilinear_resize(projected, size)
            fused = fused + projected
        return self.fuse(fused)
