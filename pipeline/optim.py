"""What steps a fold's weights: the optimizer, the lr schedule and the weight average (EMA),
built from the config's train: section."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.config import Config


def build_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    t = cfg.train
    params = [p for p in model.parameters() if p.requires_grad]
    fused = {"fused": True} if next(model.parameters()).is_cuda else {}
    if t.optimizer == "adam":
        return torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay, **fused)
    if t.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay, **fused)
    return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay, nesterov=True)


def build_scheduler(cfg: Config, optimizer: torch.optim.Optimizer):
    t = cfg.train
    if t.scheduler == "cosine_restarts":
        # Snapshot-style cycles (1st and 4th place): the lr restarts every cycle_epochs.
        return torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(optimizer, T_0=t.cycle_epochs, eta_min=t.min_lr)
    if t.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=t.epochs, eta_min=t.min_lr)
    if t.scheduler == "plateau":
        # Keras tutorial: ReduceLROnPlateau(patience=5) on the validation metric.
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max", factor=t.plateau_factor, patience=t.plateau_patience, min_lr=t.min_lr
        )
    return None


def step_scheduler(scheduler, val_score: float) -> None:
    if scheduler is None:
        return
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        scheduler.step(val_score)
    else:
        scheduler.step()


def build_ema(model: nn.Module, decay: float):
    """An exponential moving average of `model`'s weights and buffers (BatchNorm running
    statistics: the average is used as it is, no BN recalibration pass), or None when decay is 0.
    Why buffers too: averaged weights with the raw model's running statistics mismatch."""
    if not decay:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
