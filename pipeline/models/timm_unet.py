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

Weights (`model.pretrained: true`): from `model.weights_path` when set (a local timm weights
file, or a folder holding one), else timm's own ImageNet download (Hugging Face hub, cached).
Either way timm's loader reads them and adapts the first conv to `in_chans` (the TGS images
are one channel: the RGB filters are summed). `model.input_norm: imagenet` maps the [0,1]
input to the statistics the weights were trained with (input_statistics). Offline, the download stops with one line
saying how to give a local file instead; with HF_HUB_OFFLINE set the hub answers from its cache
at once, and `train` resolves the weights once, before any fold (pipeline/train_folds.py).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from pipeline.config import ModelConfig
from pipeline.errors import PipelineError
from pipeline.models.blocks import (SCSE, DoubleConv, GlobalContext, HypercolumnHead, SaltPresentHead, StageHeads,
                                    UNetTricks)


# What timm's hub download leaves in a folder, then what `kaggle weights-dataset` writes.
WEIGHTS_FILES = ("model.safetensors", "pytorch_model.bin")
WEIGHTS_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
# Where the download failing means "no network": the hub's and the HTTP stacks' error types.
NETWORK_MODULES = ("huggingface_hub", "requests", "urllib3", "httpx", "httpcore", "urllib")


def weights_file(weights_path: str, encoder_name: str) -> Path:
    """The weights file `model.weights_path` names: the file itself, or in a folder (a Kaggle
    dataset mount, a hub snapshot) model.safetensors / pytorch_model.bin, else the one file
    named after the encoder, else its only weights file."""
    path = Path(weights_path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise PipelineError(f"{path}: model.weights_path not found (a local timm weights file for {encoder_name}, "
                            f"or a folder holding one)")
    for name in WEIGHTS_FILES:
        if (path / name).is_file():
            return path / name
    candidates = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in WEIGHTS_SUFFIXES)
    named = [p for p in candidates if p.name.split(".")[0] == encoder_name.split(".")[0]]
    if len(named) == 1 or len(candidates) == 1:
        return (named or candidates)[0]
    found = ", ".join(p.name for p in candidates) or "none"
    raise PipelineError(f"{path}: model.weights_path is a folder without one clear {encoder_name} weights file "
                        f"(weights files: {found}); name the file itself")


def is_network_error(exc: BaseException) -> bool:
    """Whether a failed timm download means no network (or no hub): OSError and its kin
    (ConnectionError, timeouts, the hub's LocalEntryNotFoundError) or an HTTP library's error,
    anywhere in the exception chain."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) or type(exc).__module__.split(".")[0] in NETWORK_MODULES:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _first_line(exc: BaseException, limit: int = 160) -> str:
    line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return line if len(line) <= limit else line[:limit - 3] + "..."


def hub_offline() -> bool:
    """HF_HUB_OFFLINE set as huggingface_hub reads it: the hub answers from its cache only, at once."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def offline_hint(encoder_name: str) -> str:
    return (f"offline, set model.weights_path to a local {encoder_name} weights file or a folder holding one "
            f"(fetch it where there is internet: python -m pipeline kaggle weights-dataset --encoder {encoder_name} "
            f"--out DIR --user YOU)")


def create_encoder(encoder_name: str, in_chans: int, weights: str | None = None) -> nn.Module:
    """A timm features_only encoder. weights: None (random init), "" (timm's ImageNet weights,
    downloaded and cached by timm), or a local file/folder (`model.weights_path`)."""
    import timm

    if not timm.is_model(encoder_name):
        raise PipelineError(f"model.name unet_{encoder_name}: '{encoder_name}' is not a timm model "
                            f"(see timm.list_models(), e.g. resnet34, resnet18, efficientnet_b0)")
    kwargs: dict = dict(features_only=True, in_chans=in_chans, pretrained=weights is not None)
    if weights:
        # source=None keeps timm on the 'file' branch even for hub-sourced model configs
        kwargs.update(pretrained_cfg_overlay=dict(file=str(weights_file(weights, encoder_name)), source=None))
    elif weights is not None and not timm.list_models(encoder_name, pretrained=True):
        # timm would quietly fall back to random weights
        raise PipelineError(f"model.pretrained: timm has no pretrained weights for {encoder_name}; "
                            f"set model.weights_path to a local weights file, or model.pretrained: false")
    try:
        return timm.create_model(encoder_name, **kwargs)
    except Exception as exc:  # timm/torch raise many types for a bad file or an unsupported model
        if weights:
            raise PipelineError(f"{weights}: cannot load as {encoder_name} weights ({_first_line(exc)})") from None
        if weights is not None and is_network_error(exc) and hub_offline():
            raise PipelineError(f"model.pretrained: timm's {encoder_name} ImageNet weights are not in the Hugging Face "
                                f"cache and HF_HUB_OFFLINE is set; {offline_hint(encoder_name)}") from None
        if weights is not None and is_network_error(exc):
            raise PipelineError(f"model.pretrained: cannot download timm's {encoder_name} ImageNet weights "
                                f"({type(exc).__name__}: {_first_line(exc)}); {offline_hint(encoder_name)}") from None
        raise PipelineError(f"model.name unet_{encoder_name}: timm cannot build it as a feature "
                            f"encoder ({_first_line(exc)})") from None


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


def input_statistics(encoder: nn.Module, in_chans: int) -> tuple[list[float], list[float]]:
    """(mean, std) per input channel of the encoder's pretrained weights (timm's pretrained_cfg,
    ImageNet's by default). A one-channel input, whose RGB filters timm sums, gets the channel
    averages: the summed filter then sees roughly what each RGB filter saw."""
    cfg = getattr(encoder, "pretrained_cfg", None) or {}
    mean, std = list(cfg.get("mean", IMAGENET_MEAN)), list(cfg.get("std", IMAGENET_STD))
    if in_chans != len(mean):
        mean, std = [sum(mean) / len(mean)] * in_chans, [sum(std) / len(std)] * in_chans
    return mean, std


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class TimmUNet(nn.Module):
    def __init__(self, encoder: nn.Module, encoder_name: str, decoder_channels: list[int],
                 tricks: UNetTricks = UNetTricks(), input_norm: tuple[list[float], list[float]] | None = None):
        super().__init__()
        scse, hypercolumn, deep_supervision = tricks.scse, tricks.hypercolumn, tricks.deep_supervision
        residual, global_context = tricks.residual, tricks.global_context
        self.encoder = encoder
        # model.input_norm: part of the model, so training, validation, predict and every
        # checkpoint see the same inputs; not persistent, so checkpoints keep their keys
        self.normalise = input_norm is not None
        if input_norm is not None:
            mean, std = (torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1) for values in input_norm)
            self.register_buffer("input_mean", mean, persistent=False)
            self.register_buffer("input_std", std, persistent=False)
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
        if self.normalise:
            x = (x - self.input_mean) / self.input_std
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


def build_timm_unet(cfg: ModelConfig, load_pretrained: bool = True) -> TimmUNet:
    """The registry's builder for `unet_<encoder>` (pipeline/registry.py)."""
    encoder_name = cfg.name.removeprefix("unet_")
    # load_pretrained=False: a checkpoint's state dict comes next, so nothing is read or downloaded
    weights = cfg.weights_path if (cfg.pretrained and load_pretrained) else None
    encoder = create_encoder(encoder_name, cfg.in_chans, weights)
    norm = input_statistics(encoder, cfg.in_chans) if cfg.input_norm == "imagenet" else None
    return TimmUNet(encoder, encoder_name, list(cfg.decoder_channels), UNetTricks.of(cfg), input_norm=norm)
