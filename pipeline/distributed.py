"""Multi-GPU (and multi-process CPU) training with torchrun and DistributedDataParallel.

`torchrun --nproc-per-node N -m pipeline train --config CFG --folds 0` trains one fold on
N processes: each takes 1/N of every global batch (train.batch_size stays the global
batch), validation is split into contiguous shards and gathered so every rank sees the
same metric and takes the same early-stop/best-checkpoint decisions, and only rank 0
writes files and prints. NCCL on CUDA, gloo on CPU (what the tests use).
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

    def mean(self, value: float) -> float:
        if not self.enabled:
            return value
        tensor = torch.tensor([value], dtype=torch.float64)
        torch.distributed.all_reduce(tensor)
        return float(tensor.item()) / self.world_size


def init_from_env() -> DistContext:
    """Read torchrun's environment and join the process group (no-op for a single process)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        torch.distributed.init_process_group(backend=backend)
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank)


def shutdown(ctx: DistContext) -> None:
    if ctx.enabled and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
