"""Models by name: a config names a model (`model.name`) and nothing else changes.

    create_model(ModelConfig(name="seed_unet"))       # the Keras tutorial UNet, ported
    create_model(ModelConfig(name="unet_resnet34"))   # UNet over any timm encoder

Every model's forward(x [B, in_chans, S, S]) returns a dict {"mask": logits [B,1,S,S]};
with `deep_supervision` and in training mode also "salt_logit" (logits [B], positive =
the image contains salt) and "stages" (list of [B,1,s,s] mask logits).

The names, their builders and what each model accepts are pipeline/registry.py's MODELS (torch-
free, so config.py checks them on load); a new family is its module plus one line there.
"""

from __future__ import annotations

from torch import nn

from pipeline.config import ModelConfig
from pipeline.errors import PipelineError
from pipeline.registry import MODELS

# timm encoders the tests build; any other timm name works too
EXAMPLE_ENCODERS = ("resnet18", "resnet34", "efficientnet_b0")


def list_models() -> list[str]:
    """Registered names, with `unet_<encoder>` shown for the encoders the tests cover."""
    entries = MODELS.entries()
    return sorted(e.name for e in entries if not e.prefix) + \
        [e.name + encoder for e in entries if e.prefix for encoder in EXAMPLE_ENCODERS]


def create_model(model_cfg: ModelConfig, *, load_pretrained: bool = True) -> nn.Module:
    """Build `model_cfg.name`. load_pretrained=False skips reading `weights_path` (use it when a
    checkpoint's state dict is loaded next, e.g. at predict time on a machine without the file)."""
    if model_cfg.in_chans < 1:
        raise PipelineError(f"model.in_chans must be at least 1, got {model_cfg.in_chans}")
    entry = MODELS.find(model_cfg.name)
    if entry is None:
        raise PipelineError(f"model.name {model_cfg.name!r}: unknown model; known: {', '.join(MODELS)} "
                            f"(e.g. {', '.join(list_models())})")
    refusal = entry.refusal(model_cfg)
    if refusal:
        raise PipelineError(refusal)
    return entry.load()(model_cfg, load_pretrained)
