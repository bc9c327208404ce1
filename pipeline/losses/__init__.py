"""The training loss: the registered loss chosen by name, its schedule and deep-supervision terms.

The losses themselves are one file each beside this one (bce.py: BCE and BCE + Lovasz, lovasz.py:
the Lovasz hinge, dice.py: soft Dice), named in pipeline/registry.py's LOSSES, which config.py
checks `loss.name` against. Each takes (mask logits [B,1,H,W], target [B,1,H,W] 0/1, LossConfig)
and returns (loss per image [B], {part name: per image [B]}); SegLoss below averages them over
the batch, switches losses at `stage2_from_epoch`, crops to the image (`image_only`) and adds the
deep-supervision heads' terms, the same for every loss.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Callable

import torch
from torch.nn import functional as F

from pipeline.config import LossConfig
from pipeline.errors import PipelineError
from pipeline.geometry import restore
from pipeline.registry import LOSSES


# ---------------------------------------------------------------- the training loss


class LossParts(Mapping):
    """The loss's parts as floats for logging, read from the device only when first looked at
    (one transfer for all of them): the training step never reads them, and on a GPU every
    read is a host sync that stalls the queue of kernels."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self._tensors = {name: value.detach() for name, value in tensors.items()}
        self._floats: dict[str, float] | None = None

    def _values(self) -> dict[str, float]:
        if self._floats is None:
            names = list(self._tensors)
            values = torch.stack([self._tensors[k].float() for k in names]).tolist() if names else []
            self._floats = dict(zip(names, values))
        return self._floats

    def __getitem__(self, name: str) -> float:
        return self._values()[name]

    def __iter__(self):
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


class SegLoss:
    """`(outputs, target [B,1,S,S] 0/1 float, epoch) -> (loss, {"bce": .., "lovasz": .., ...})`.

    Main loss by name (a registered loss, see above); from epoch `stage2_from_epoch` (if >= 0)
    on, `stage2_name` replaces it.
    With deep supervision and the heads present in `outputs` (training mode only), adds
      empty_head_weight * BCE(salt_logit, any salt in the image)
      stage_heads_weight * mean over stages of the main loss on the non-empty images,
        each against the target max-pooled to the stage size.
    The returned mapping holds floats for logging (read lazily, see LossParts); "total" is the
    returned loss. No step of it reads a value back to the host: on a GPU it never syncs.
    """

    def __init__(self, loss_cfg: LossConfig, deep_supervision: bool = False):
        self._losses: dict[str, Callable] = {}
        for key in ("name", "stage2_name"):
            name = getattr(loss_cfg, key)
            if name not in LOSSES:
                raise PipelineError(f"loss.{key} {name!r}: choose one of {sorted(LOSSES)}")
            self._losses[name] = LOSSES[name].load()
        self.cfg = loss_cfg
        self.deep_supervision = deep_supervision

    def loss_name(self, epoch: int) -> str:
        stage2 = self.cfg.stage2_from_epoch
        return self.cfg.stage2_name if 0 <= stage2 <= epoch else self.cfg.name

    def mask_loss(self, logits: torch.Tensor, target: torch.Tensor, name: str) -> tuple[torch.Tensor, dict]:
        """The main loss `name` of mask logits [B,1,H,W]; also its parts (tensors)."""
        per_image, parts = self._losses[name](logits, target, self.cfg)
        return per_image.mean(), {part: value.mean() for part, value in parts.items()}

    def per_image_mask_loss(self, logits: torch.Tensor, target: torch.Tensor, name: str) -> torch.Tensor:
        """[B]: the main loss `name` of each image on its own (its mean is mask_loss's value)."""
        return self._losses[name](logits, target, self.cfg)[0]

    def __call__(self, outputs: dict, target: torch.Tensor, epoch: int) -> tuple[torch.Tensor, LossParts]:
        name = self.loss_name(epoch)
        logits, image_target = outputs["mask"], target
        if self.cfg.image_only:
            logits, image_target = restore(logits, "pad"), restore(target, "pad")
        total, parts = self.mask_loss(logits, image_target, name)
        if self.deep_supervision and "salt_logit" in outputs:
            # salt in the image itself (the padding only mirrors it); stage heads below keep the
            # padded target, whose grid their logits share
            salt_present = image_target.flatten(1).amax(dim=1)
            parts["salt"] = F.binary_cross_entropy_with_logits(outputs["salt_logit"], salt_present)
            total = total + self.cfg.empty_head_weight * parts["salt"]
        if self.deep_supervision and outputs.get("stages"):
            parts["stages"] = self.stage_loss(outputs["stages"], target, name)
            total = total + self.cfg.stage_heads_weight * parts["stages"]
        parts["total"] = total
        return total, LossParts(parts)

    def stage_loss(self, stages: list[torch.Tensor], target: torch.Tensor, name: str) -> torch.Tensor:
        """Mean over stages of the main loss averaged over the images with salt.

        Computed on every image and weighted (1/count for those with salt, 0 for the rest)
        rather than by selecting the salt images: equal to the selection's mean to float
        rounding, with no host sync (a boolean index or "any salt at all?" test needs the
        GPU's answer before the next kernel can be queued). On a batch without salt the
        weights are all zero: a zero loss that still reaches every head (DDP wants all grads).
        """
        non_empty = (target.flatten(1).amax(dim=1) > 0).to(target.dtype)
        weights = non_empty / non_empty.sum().clamp(min=1.0)
        losses = []
        for stage_logits in stages:
            # a stage pixel is salt if any full-size pixel under it is
            stage_target = F.adaptive_max_pool2d(target, stage_logits.shape[-2:])
            losses.append((self.per_image_mask_loss(stage_logits, stage_target, name) * weights).sum())
        return torch.stack(losses).mean()
