"""Model registry: a config names a model (`model.name`) and nothing else changes.

    create_model(ModelConfig(name="seed_unet"))       # the Keras tutorial UNet, ported
    create_model(ModelConfig(name="unet_resnet34"))   # UNet over any timm encoder

Every model's forward(x [B, in_chans, S, S]) returns a dict {"mask": logits [B,1,S,S]};
with `deep_supervision` and in training mode also "salt_logit" (logits [B], positive =
the image contains salt) and "stages" (list of [B,1,s,s] mask logits).

New families register with `@register("name")`, or `@register_prefix("prefix_")` to
receive the rest of the name (as `unet_<encoder>` does).
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from pipeline.config import ModelConfig
from pipeline.errors import PipelineError

# builder(cfg, load_pretrained) -> nn.Module
Builder = Callable[[ModelConfig, bool], nn.Module]
_BY_NAME: dict[str, Builder] = {}
# builder(cfg, rest_of_name, load_pretrained) -> nn.Module
_BY_PREFIX: dict[str, Callable[[ModelConfig, str, bool], nn.Module]] = {}
# timm encoders the tests build; any other timm name works too
EXAMPLE_ENCODERS = ("resnet18", "resnet34", "efficientnet_b0")


def register(name: str):
    def decorate(builder: Builder) -> Builder:
        _BY_NAME[name] = builder
        return builder
    return decorate


def register_prefix(prefix: str):
    def decorate(builder):
        _BY_PREFIX[prefix] = builder
        return builder
    return decorate


@register("seed_unet")
def _seed_unet(cfg: ModelConfig, load_pretrained: bool) -> nn.Module:
    from pipeline.models.seed_unet import build_seed_unet

    return build_seed_unet(cfg)


@register_prefix("unet_")
def _timm_unet(cfg: ModelConfig, encoder_name: str, load_pretrained: bool) -> nn.Module:
    from pipeline.models.timm_unet import build_timm_unet

    return build_timm_unet(cfg, encoder_name, load_pretrained)


def list_models() -> list[str]:
    """Registered names, with `unet_<encoder>` shown for the encoders the tests cover."""
    examples = [prefix + encoder for prefix in _BY_PREFIX for encoder in EXAMPLE_ENCODERS]
    return sorted(_BY_NAME) + examples


def create_model(model_cfg: ModelConfig, *, load_pretrained: bool = True) -> nn.Module:
    """Build `model_cfg.name`. load_pretrained=False skips reading `weights_path` (use it when a
    checkpoint's state dict is loaded next, e.g. at predict time on a machine without the file)."""
    if model_cfg.in_chans < 1:
        raise PipelineError(f"model.in_chans must be at least 1, got {model_cfg.in_chans}")
    name = model_cfg.name
    if name in _BY_NAME:
        return _BY_NAME[name](model_cfg, load_pretrained)
    for prefix, builder in _BY_PREFIX.items():
        if name.startswith(prefix) and len(name) > len(prefix):
            return builder(model_cfg, name[len(prefix):], load_pretrained)
    known = ", ".join(sorted(_BY_NAME) + [f"{prefix}<timm encoder>" for prefix in _BY_PREFIX])
    raise PipelineError(f"model.name {name!r}: unknown model; known: {known} (e.g. {', '.join(list_models())})")
