"""What steps a fold's weights: the optimizer, the lr schedule and the weight average (EMA),
built from the config's train: section."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.config import Config


def build_optimizer(cfg: Config, model: nn.Module, fused: bool | None = None) -> torch.optim.Optimizer:
    """fused (default: on CUDA) steps every parameter in one kernel and, beside a GradScaler,
    takes the inf check on the device: an unfused optimizer makes GradScaler.step read
    `found_inf` on the host every step (a sync, fp16 only). The CPU keeps the unfused maths it
    always had (tests/benchmarks pass fused=True to count the CUDA path's syncs here)."""
    t = cfg.train
    params = [p for p in model.parameters() if p.requires_grad]
    if fused is None:
        fused = next(model.parameters()).is_cuda
    options = {"fused": True} if fused else {}
    if t.optimizer == "adam":
        return torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay, **options)
    if t.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay, **options)
    return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay, nesterov=True,
                           **options)


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


def build_ema(model: nn.Module, decay: float) -> "WeightEMA | None":
    """An exponential moving average of `model`'s weights and buffers (BatchNorm running
    statistics: the average is used as it is, no BN recalibration pass), or None when decay is 0.
    Why buffers too: averaged weights with the raw model's running statistics mismatch."""
    return WeightEMA(model, decay) if decay else None


class WeightEMA(nn.Module):
    """torch's AveragedModel EMA (same maths: the first update copies, then lerp by 1 - decay;
    same state_dict: `module.*` and `n_averaged`), without its per-step host work: AveragedModel
    reads `n_averaged == 0` and copies `n_averaged` to the device on every update (a blocking
    host-to-device copy on a GPU). Here the count lives on the host as a Python int and the
    update is one foreach lerp over the floating tensors (integer buffers, e.g. BatchNorm's
    num_batches_tracked, are copied)."""

    def __init__(self, model: nn.Module, decay: float):
        super().__init__()
        import copy

        self.module = copy.deepcopy(model)
        self.decay = decay
        self.register_buffer("n_averaged", torch.tensor(0, dtype=torch.long))
        self.updates = 0

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        mine = [*self.module.parameters(), *self.module.buffers()]
        theirs = [t.detach() for t in (*model.parameters(), *model.buffers())]
        floats = [i for i, t in enumerate(mine) if t.is_floating_point()]
        others = [i for i, t in enumerate(mine) if not t.is_floating_point()]
        if self.updates == 0:
            torch._foreach_copy_([t.detach() for t in mine], theirs)
        elif floats:
            torch._foreach_lerp_([mine[i].detach() for i in floats], [theirs[i] for i in floats], 1.0 - self.decay)
        for i in others if self.updates else ():
            mine[i].copy_(theirs[i])
        self.updates += 1

    def state_dict(self, *args, **kwargs):
        self.n_averaged.fill_(self.updates)  # a host tensor: no device work
        return super().state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self.updates = int(self.n_averaged)  # once, at resume
        return result
