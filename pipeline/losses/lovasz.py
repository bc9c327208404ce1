"""The Lovasz hinge (Berman, Rannen Triki & Blaschko, CVPR 2018): the tight convex surrogate of
the Jaccard loss 1 - IoU, computed per image on LOGITS (never probabilities), which is what the
competition's per-image IoU metric rewards (+0.010 over BCE in reported ablations). Known
behaviour kept as published: on an empty mask it only penalises the worst pixel, so pair it with
BCE (`bce_lovasz`) or a salt-present head; `loss.symmetric_lovasz` averages L(x, y) and
L(-x, 1-y), which also scores the background as a class (the 9th place reported +0.02).

The per-image Lovasz is batched: one sort over [B, H*W] instead of a Python loop.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from pipeline.config import LOVASZ_HINGES, LossConfig
from pipeline.errors import PipelineError


def lovasz_grad(gt_sorted: torch.Tensor) -> torch.Tensor:
    """Gradient of the Lovasz extension of the Jaccard loss w.r.t. errors sorted descending.

    gt_sorted: [..., P] 0/1 labels in the order of decreasing error. Entry i is
    J(first i+1 pixels wrong) - J(first i pixels wrong), J = 1 - IoU.
    """
    if not gt_sorted.is_floating_point():
        gt_sorted = gt_sorted.float()
    gts = gt_sorted.sum(dim=-1, keepdim=True)
    intersection = gts - gt_sorted.cumsum(dim=-1)
    union = gts + (1.0 - gt_sorted).cumsum(dim=-1)  # >= 1 everywhere: never divides by zero
    jaccard = 1.0 - intersection / union
    return torch.cat([jaccard[..., :1], jaccard[..., 1:] - jaccard[..., :-1]], dim=-1)


def hinge(errors: torch.Tensor, kind: str = "relu") -> torch.Tensor:
    """The hinge of Lovasz errors 1 - x(2y - 1): relu(e) as published, or elu(e) + 1 (smooth,
    positive everywhere: a pixel right by more than the margin still has gradient exp(e))."""
    if kind == "relu":
        return F.relu(errors)
    if kind == "elu":
        return F.elu(errors) + 1.0
    raise PipelineError(f"loss.lovasz_hinge {kind!r}: choose one of {list(LOVASZ_HINGES)}")


def lovasz_hinge_flat(logits: torch.Tensor, labels: torch.Tensor, symmetric: bool = False,
                      kind: str = "relu") -> torch.Tensor:
    """Lovasz hinge of one image: logits [P], labels [P] in {0,1}; or a batch [B,P] -> [B].
    `kind` is the hinge (see `hinge`).

    symmetric=True returns (L(x, y) + L(-x, 1 - y)) / 2 from ONE sort: the hinge errors
    1 - x(2y - 1) are the same for (-x, 1 - y), so only the Jaccard gradient differs (the
    Lovasz stage of cpu_best spends its extra time in these sorts).
    """
    if logits.shape[-1] == 0:
        return logits.sum(dim=-1) * 0.0
    labels = labels.to(logits.dtype)
    errors = 1.0 - logits * (2.0 * labels - 1.0)
    errors_sorted, order = torch.sort(errors, dim=-1, descending=True)
    gt_sorted = torch.gather(labels, -1, order)
    grad = lovasz_grad(gt_sorted)
    if symmetric:
        grad = (grad + lovasz_grad(1.0 - gt_sorted)) / 2
    return (hinge(errors_sorted, kind) * grad).sum(dim=-1)


def lovasz_hinge(logits: torch.Tensor, labels: torch.Tensor, per_image: bool = True,
                 symmetric: bool = False, kind: str = "relu") -> torch.Tensor:
    """Mean per-image Lovasz hinge of logits [B,H,W] against labels [B,H,W] (0/1);
    per_image=False treats the whole batch as one image."""
    if per_image:
        return lovasz_hinge_flat(logits.flatten(1), labels.flatten(1), symmetric, kind).mean()
    return lovasz_hinge_flat(logits.flatten(), labels.flatten(), symmetric, kind)


def lovasz(logits: torch.Tensor, target: torch.Tensor, cfg: LossConfig) -> tuple[torch.Tensor, dict]:
    """The registered loss `lovasz` (pipeline/registry.py): per-image Lovasz hinge of [B,1,H,W]."""
    per_image = lovasz_hinge_flat(logits[:, 0].flatten(1), target[:, 0].flatten(1), cfg.symmetric_lovasz,
                                  cfg.lovasz_hinge)
    return per_image, {"lovasz": per_image}
