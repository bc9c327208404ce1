"""`seed_unet`: a PyTorch port of the public Keras TGS tutorial UNet ("UNet with depth" kernels).

The Keras model (n_filters = start_neurons = 16):
    encoder   4 x [conv2d_block(n*2^i) -> MaxPool2x2 -> Dropout]      n*2^i = 16, 32, 64, 128
    middle    conv2d_block(16n = 256)
    decoder   4 x [Conv2DTranspose(3x3, stride 2, 'same') halving channels -> concat skip
                   -> Dropout -> conv2d_block]
    head      Conv2D(1, 1x1)   (a logit here; Keras applied the sigmoid in the layer)
where conv2d_block = (Conv2D 3x3 'same' -> BatchNorm -> ReLU) x 2. Keras convs carry a
bias even before BatchNorm, so ours do too: the trainable parameter count is the Keras
one (tests/test_models.py recomputes it from the layer shapes).

`keras_bug=True` reproduces the kernel whose conv2d_block feeds `input_tensor` to its second
conv: Keras drops the dead first conv from the graph, so each block is a single conv.
The tutorial's dropout was 0.25/0.5; here every dropout is `cfg.dropout` (default 0.1).

Options beyond the tutorial, from the TGS solutions, each off by default (the faithful port):
`residual` (every block h + conv(h)), `scse` (squeeze-excitation after every decoder block),
`hypercolumn` (all decoder outputs feed the head through n_filters channels, which keeps the
full-size part cheap), `global_context` (the middle block's image-level mean, transformed,
added back to each of its pixels) and `deep_supervision` (salt-present logit from the middle
block, 1x1 heads on decoder stages).
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.config import ModelConfig
from pipeline.errors import PipelineError
from pipeline.models.blocks import (SCSE, DoubleConv, Dropout, GlobalContext, HypercolumnHead, SaltPresentHead,
                                    StageHeads, UNetTricks)

DEPTH = 4  # pooling steps: inputs must be a multiple of 2**DEPTH = 16


class SeedUNet(nn.Module):
    def __init__(self, in_chans: int = 1, n_filters: int = 16, dropout: float = 0.1, keras_bug: bool = False,
                 tricks: UNetTricks = UNetTricks()):
        super().__init__()
        scse, hypercolumn, deep_supervision = tricks.scse, tricks.hypercolumn, tricks.deep_supervision
        residual, global_context = tricks.residual, tricks.global_context
        widths = [n_filters * 2**i for i in range(DEPTH + 1)]  # 16, 32, 64, 128, 256
        block = dict(keras_bug=keras_bug, bias=True, residual=residual)
        self.encoder = nn.ModuleList()
        in_channels = in_chans
        for width in widths[:-1]:
            self.encoder.append(DoubleConv(in_channels, width, **block))
            in_channels = width
        self.pool = nn.MaxPool2d(2)
        self.dropout = Dropout(dropout)  # nn.Dropout's distribution, a faster CPU mask
        self.middle = DoubleConv(widths[-2], widths[-1], **block)
        self.context = GlobalContext(widths[-1]) if global_context else nn.Identity()
        self.upsamplers = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for width in reversed(widths[:-1]):  # 128, 64, 32, 16
            # stride 2, padding 1, output_padding 1 = Keras 'same' transposed conv: exactly x2
            self.upsamplers.append(nn.ConvTranspose2d(width * 2, width, 3, stride=2, padding=1, output_padding=1))
            decoder_block = DoubleConv(width * 2, width, **block)
            self.decoder.append(nn.Sequential(decoder_block, SCSE(width)) if scse else decoder_block)
        if hypercolumn:
            self.head = HypercolumnHead(list(reversed(widths[:-1])), hidden=n_filters)
        else:
            self.head = nn.Conv2d(n_filters, 1, 1)
        self.hypercolumn = hypercolumn
        self.deep_supervision = deep_supervision
        if deep_supervision:
            self.salt_head = SaltPresentHead(widths[-1])
            self.stage_heads = StageHeads(list(reversed(widths[1:-1])))  # decoder outputs before the last

    def forward(self, x: torch.Tensor) -> dict:
        if x.shape[-1] % 2**DEPTH or x.shape[-2] % 2**DEPTH:
            raise PipelineError(f"seed_unet: input size {tuple(x.shape[-2:])} is not a multiple of {2**DEPTH}")
        skips = []
        for block in self.encoder:
            x = block(x)
            skips.append(x)
            x = self.dropout(self.pool(x))
        middle = self.context(self.middle(x))
        x = middle
        decoded = []
        for upsample, block, skip in zip(self.upsamplers, self.decoder, reversed(skips)):
            x = block(self.dropout(torch.cat([upsample(x), skip], dim=1)))
            decoded.append(x)
        outputs = {"mask": self.head(decoded, tuple(x.shape[-2:])) if self.hypercolumn else self.head(x)}
        if self.deep_supervision and self.training:
            outputs["salt_logit"] = self.salt_head(middle)
            outputs["stages"] = self.stage_heads(decoded[:-1])
        return outputs


def build_seed_unet(cfg: ModelConfig, load_pretrained: bool = False) -> SeedUNet:
    """The registry's builder (pipeline/registry.py, which also refuses model.pretrained here)."""
    if cfg.keras_bug and cfg.residual:
        raise PipelineError("model.residual: the keras_bug blocks have a single conv, nothing to make residual")
    if cfg.n_filters < 1 or not 0.0 <= cfg.dropout < 1.0:
        raise PipelineError(f"model: seed_unet needs n_filters >= 1 and 0 <= dropout < 1, "
                            f"got n_filters={cfg.n_filters}, dropout={cfg.dropout}")
    return SeedUNet(cfg.in_chans, cfg.n_filters, cfg.dropout, cfg.keras_bug, UNetTricks.of(cfg))
