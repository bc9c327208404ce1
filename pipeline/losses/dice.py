"""Soft Dice (Milletari et al., V-Net, 2016), a classic of the TGS kernels: 1 - Dice of the
sigmoid probabilities and the mask, per image. Like the Lovasz hinge it scores overlap rather
than pixels, but on probabilities, so its gradient fades where the model is already sure.

SMOOTH (added above and below) keeps an empty mask defined: predicting no salt there costs ~0,
predicting salt costs up to 1, so unlike the Lovasz hinge it scores an empty image by itself.
"""

from __future__ import annotations

import torch

from pipeline.config import LossConfig

SMOOTH = 1.0


def dice(logits: torch.Tensor, target: torch.Tensor, cfg: LossConfig) -> tuple[torch.Tensor, dict]:
    """The registered loss `dice` (pipeline/registry.py): 1 - soft Dice of each image of [B,1,H,W]."""
    probs, labels = torch.sigmoid(logits).flatten(1), target.flatten(1)
    overlap = (probs * labels).sum(1)
    per_image = 1.0 - (2.0 * overlap + SMOOTH) / (probs.sum(1) + labels.sum(1) + SMOOTH)
    return per_image, {"dice": per_image}
