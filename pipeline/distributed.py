"""Multi-GPU (and multi-process CPU) training with torchrun and DistributedDataParallel.

`torchrun --nproc-per-node N -m pipeline train --config CFG --folds 0` trains one fold on
N processes: each takes 1/N of every global batch (train.batch_size stays the global
batch), validation is split into contiguous shards and gathered so every rank sees the
same metric and takes the same early-stop/best-checkpoint decisions, and only rank 0
writes files and prints.

Backends: on CUDA the group is `cpu:gloo,cuda:nccl` -- NCCL for the model's gradients (DDP,
SyncBatchNorm: CUDA tensors), gloo for this module's small host-side collectives (a float
mean, the gathered validation probabilities as pickled objects, barriers), because NCCL has
no CPU tensors at all (an all-reduce of a CPU tensor on a pure NCCL group crashes). On CPU,
gloo alone (what the tests use). Every collective here puts its tensor on `collective_device`,
the device the group's backend map serves (CPU when gloo is in it, else this rank's GPU),
so a group someone else initialised as plain "nccl" works too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    # where this module's collective tensors live (see collective_device)
    device: str = "cpu"

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def shard(self, count: int) -> slice:
        """This rank's contiguous slice of `count` items (shards concatenate back in order)."""
        bounds = np.linspace(0, count, self.world_size + 1).astype(int)
        return slice(int(bounds[self.rank]), int(bounds[self.rank + 1]))

    def gather_concat(self, array: np.ndarray) -> np.ndarray:
        """Concatenate every rank's array in rank order (all ranks get the result)."""
        if not self.enabled:
            return array
        parts: list = [None] * self.world_size
        torch.distributed.all_gather_object(parts, array)
        return np.concatenate(parts, axis=0)

    def broadcast_buffers(self, module) -> None:
        """Every rank takes rank 0's buffers of `module` (BatchNorm running statistics), on the
        buffers' own device (a model's: NCCL on GPUs)."""
        if not self.enabled:
            return
        for buffer in module.buffers():
            torch.distributed.broadcast(buffer, src=0)

    def mean(self, value: float) -> float:
        if not self.enabled:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(tensor)
        return float(tensor.item()) / self.world_size


def init_from_env() -> DistContext:
    """Read torchrun's environment and join the process group (no-op for a single process)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not torch.distributed.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        torch.distributed.init_process_group(backend=process_group_backend(torch.cuda.is_available()))
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank,
                       device=collective_device(torch.distributed.get_backend_config(), local_rank))


def process_group_backend(cuda: bool) -> str:
    """NCCL serves CUDA tensors only: host-side collectives need gloo beside it."""
    return "cpu:gloo,cuda:nccl" if cuda else "gloo"


def backend_map(config: str) -> dict[str, str]:
    """torch's backend config string ("cpu:gloo,cuda:nccl", "cuda:nccl") as {device type: backend}."""
    pairs = (item.split(":", 1) for item in config.split(",") if ":" in item)
    return {device.strip(): backend.strip() for device, backend in pairs}


def collective_device(config: str, local_rank: int) -> str:
    """The device for collective tensors on a group with backend config `config`: the CPU if a
    backend serves it (no device copies for a host float), else this rank's GPU."""
    return "cpu" if "cpu" in backend_map(config) else f"cuda:{local_rank}"


def shutdown(ctx: DistContext) -> None:
    if ctx.enabled and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
