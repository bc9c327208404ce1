"""Binary cross-entropy on the mask logits, alone and mixed with the Lovasz hinge (the
registered losses `bce` and `bce_lovasz`, pipeline/registry.py)."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from pipeline.config import LossConfig
from pipeline.losses.lovasz import lovasz


def bce(logits: torch.Tensor, target: torch.Tensor, cfg: LossConfig) -> tuple[torch.Tensor, dict]:
    """Per-image mean BCE of [B,1,H,W] logits (their mean is the batch's pixel mean: same size)."""
    per_image = F.binary_cross_entropy_with_logits(logits, target, reduction="none").flatten(1).mean(1)
    return per_image, {"bce": per_image}


def bce_lovasz(logits: torch.Tensor, target: torch.Tensor, cfg: LossConfig) -> tuple[torch.Tensor, dict]:
    """bce_weight * BCE + lovasz_weight * Lovasz, per image."""
    (bce_term, _), (lovasz_term, _) = bce(logits, target, cfg), lovasz(logits, target, cfg)
    return cfg.bce_weight * bce_term + cfg.lovasz_weight * lovasz_term, {"bce": bce_term, "lovasz": lovasz_term}
