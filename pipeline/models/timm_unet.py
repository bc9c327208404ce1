"""`unet_<encoder>`: a UNet decoder over any timm `features_only` encoder.

The decoder reads the encoder's `feature_info` (channels, reductions) and climbs from the
deepest feature back to full resolution one x2 step at a time: upsample (nearest), concat
the encoder feature at that reduction if there is one, DoubleConv(BN, ReLU) to
`decoder_channels[i]`, optionally scSE. ResNets and EfficientNets give features at
/2../32 (five steps, the last one without a skip); encoders starting at /4 get two
skip-less steps. Options from the top TGS solutions (1st and 4th place):

- `scse`: concurrent spatial & channel squeeze-excitation after every decoder block.
- `hypercolumn`: every decoder output, upsampled to full resolution, feeds the head.
- `residual`: the decoder blocks' second conv is a residual branch (blocks.DoubleConv).
- `global_context`: the deepest feature's image-level mean, transformed, is added back to each
  of its pixels before decoding (blocks.GlobalContext).
- `deep_supervision`: in training mode the output dict also holds
  "salt_logit" [B]: logit that the image contains ANY salt (positive = salt present,
  i.e. NOT empty), from the deepest encoder feature, and
  "stages": 1x1 mask logits of every decoder output but the last, at their own size.
  In eval mode only "mask" is returned.

Weights: never downloaded. `pretrained=True` needs `weights_path`, a local timm weights
file (.safetensors / .pth) loaded through timm's own loader, which also adapts the first
conv to `in_chans` (the TGS images are one channel).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from pipeline.config import ModelConfig
from pipeline.errors import PipelineError
from pipeline.models.blocks import SCSE, DoubleConv, GlobalContext, HypercolumnHead, SaltPresentHead, StageHeads


def create_encoder(encoder_name: str, in_chans: int, weights_path: str = "") -> nn.Module:
    """A timm features_only encoder; weights only from the local `weights_path` when given."""
    import timm

    kwargs: dict = dict(features_only=True, in_chans=in_chans, pretrained=False)
    if weights_path:
        path = Path(weights_path)
        if not path.is_file():
            raise PipelineError(f"{path}: model.weights_path not found (a local timm weights file for {encoder_name})")
        # source=None keeps timm on the 'file' branch even for hub-sourced model configs
        kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=str(path), source=None))
    if not timm.is_model(encoder_name):
        raise PipelineError(f"model.name unet_{encoder_name}: '{encoder_name}' is not a timm model "
                            f"(see timm.list_models(), e.g. resnet34, resnet18, efficientnet_b0)")
    try:
        return timm.create_model(encoder_name, **kwargs)
    except Exception as exc:  # timm/torch raise many types for a bad file or an unsupported model
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if weights_path:
            raise PipelineError(f"{weights_path}: cannot load as {encoder_name} weights ({first_line})") from None
        raise PipelineError(f"model.name unet_{encoder_name}: timm cannot build it as a feature "
                            f"encoder ({first_line})") from None


def decoder_plan(reductions: list[int], encoder_name: str) -> int:
    """How many x2 decoder steps lead from the deepest feature to full resolution."""
    steps = math.log2(reductions[-1]) if reductions[-1] > 0 else -1
    increasing = all(a < b for a, b in zip(reductions, reductions[1:]))
    if steps < 1 or steps != int(steps) or not increasing or any(r & (r - 1) for r in reductions):
        raise PipelineError(f"model.name unet_{encoder_name}: encoder feature reductions {reductions} are not "
                            f"increasing powers of two; a UNet decoder cannot use them")
    return int(steps)


class DecoderBlock(nn.Module):
    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, scse: bool, residual: bool = False):
        super().__init__()
        self.conv = DoubleConv(in_channels + skip_channels, out_channels, residual=residual)
        self.attention = SCSE(out_channels) if scse else nn.Identity()

    def forward(self, x: torch.Tensor, size: tuple[int, int], skip: torch.Tensor | None) -> torch.Tensor:
        x = F.interpolate(x, size=size, mode="nearest")
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.attention(self.conv(x))


class TimmUNet(nn.Module):
    def __init__(self, encoder: nn.Module, encoder_name: str, decoder_channels: list[int], *, scse: bool = False,
                 hypercolumn: bool = False, deep_supervision: bool = False, residual: bool = False,
                 global_context: bool = False):
        super().__init__()
        self.encoder = encoder
        channels = list(encoder.feature_info.channels())
        reductions = list(encoder.feature_info.reduction())
        n_steps = decoder_plan(reductions, encoder_name)
        if len(decoder_channels) < n_steps or any(c < 1 for c in decoder_channels):
            raise PipelineError(f"model.decoder_channels {decoder_channels}: unet_{encoder_name} needs {n_steps} "
                                f"positive entries (one per x2 step from /{reductions[-1]})")
        # the skip feature index for each decoder step, or None where the encoder has none
        index_by_reduction = {r: i for i, r in enumerate(reductions)}
        self.skip_indices: list[int | None] = []
        self.blocks = nn.ModuleList()
        in_channels, reduction = channels[-1], reductions[-1]
        for out_channels in decoder_channels[:n_steps]:  # extra entries (shallow encoders) go unused
            reduction //= 2
            skip_index = index_by_reduction.get(reduction)
            self.skip_indices.append(skip_index)
            skip_channels = channels[skip_index] if skip_index is not None else 0
            self.blocks.append(DecoderBlock(in_channels, skip_channels, out_channels, scse, residual))
            in_channels = out_channels
        used_channels = list(decoder_channels[:n_steps])
        self.context = GlobalContext(channels[-1]) if global_context else nn.Identity()
        self.hypercolumn = HypercolumnHead(used_channels) if hypercolumn else None
        self.head = nn.Conv2d(used_channels[-1], 1, 1) if not hypercolumn else None
        self.deep_supervision = deep_supervision
        if deep_supervision:
            self.salt_head = SaltPresentHead(channels[-1])
            self.stage_heads = StageHeads(used_channels[:-1])

    def forward(self, x: torch.Tensor) -> dict:
        input_size = tuple(x.shape[-2:])
        features = self.encoder(x)
        decoded: list[torch.Tensor] = []
        y = self.context(features[-1])
        for step, (block, skip_index) in enumerate(zip(self.blocks, self.skip_indices)):
            skip = features[skip_index] if skip_index is not None else None
            if skip is not None:
                size = tuple(skip.shape[-2:])
            elif step == len(self.blocks) - 1:
                size = input_size
            else:
                size = (y.shape[-2] * 2, y.shape[-1] * 2)
            y = block(y, size, skip)
            decoded.append(y)
        if self.hypercolumn is not None:
            mask = self.hypercolumn(decoded, input_size)
        else:
            mask = self.head(y)
        outputs = {"mask": mask}
        if self.deep_supervision and self.training:
            outputs["salt_logit"] = self.salt_head(features[-1])
            outputs["stages"] = self.stage_heads(decoded[:-1])
        return outputs


def build_timm_unet(cfg: ModelConfig, encoder_name: str, load_pretrained: bool = True) -> TimmUNet:
    if cfg.pretrained and not cfg.weights_path and load_pretrained:
        raise PipelineError(f"model.pretrained: set model.weights_path to a local {encoder_name} weights file "
                            f"(.safetensors/.pth); weights are never downloaded")
    weights_path = cfg.weights_path if (cfg.pretrained and load_pretrained) else ""
    encoder = create_encoder(encoder_name, cfg.in_chans, weights_path)
    return TimmUNet(encoder, encoder_name, list(cfg.decoder_channels), scse=cfg.scse,
                    hypercolumn=cfg.hypercolumn, deep_supervision=cfg.deep_supervision, residual=cfg.residual,
                    global_context=cfg.global_context)
