"""A fold's training batches, epoch by epoch, with DataLoader workers that live for the fold.

Every epoch is seeded from (seed, fold, epoch) alone (epoch_seed), which is what makes a
resumed run equal an uninterrupted one. The workers start once per fold (a fork and a copy of
the dataset per worker per epoch would cost more than small epochs take), so the epoch's seed
travels with the indices: the sampler yields (index, worker seed) pairs, and a worker that sees
a new seed re-seeds its augmentation and torch RNG as a freshly started worker would
(seed * 100 + worker id, `seed_loader_worker`). Batches go to workers round-robin from worker 0
every epoch, so every batch equals that of a loader made for the epoch, bit for bit (tested).

Without workers (num_workers 0, the CPU presets) the loader is made per epoch: it costs
nothing to make, and the main process's RNG is seeded by the loop.
"""

from __future__ import annotations

import functools

import numpy as np
import torch


def epoch_seed(seed: int, fold: int, epoch: int) -> int:
    return (seed * 1_000_003 + fold * 10_007 + epoch) % 2**31


class SaltDataset(torch.utils.data.Dataset):
    """In-memory 101x101 images and masks (the whole train set is ~40 MB), augmented per item."""

    def __init__(self, images: np.ndarray, masks: np.ndarray, transform=None):
        self.images = images
        self.masks = masks.astype(np.uint8)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        image, mask = self.images[index], self.masks[index]
        if self.transform is not None:
            out = self.transform(image=image, mask=mask)
            image, mask = out["image"], out["mask"]
        return torch.from_numpy(np.ascontiguousarray(image)), torch.from_numpy(np.ascontiguousarray(mask))


def shuffled_indices(n: int, seed: int) -> list[int]:
    """The order of a fresh `DataLoader(shuffle=True, generator=Generator().manual_seed(seed))`:
    the loader draws its workers' base seed from the generator first, then RandomSampler permutes."""
    generator = torch.Generator().manual_seed(seed)
    torch.empty((), dtype=torch.int64).random_(generator=generator)
    return torch.randperm(n, generator=generator).tolist()


class EpochSampler(torch.utils.data.Sampler):
    """Yields (index, worker seed) for the epoch set by `set_epoch`: a shuffle of every index, or
    this rank's DistributedSampler share."""

    def __init__(self, n: int, world_size: int = 1, rank: int = 0):
        self.n, self.world_size, self.rank = n, world_size, rank
        self.seed = self.worker_seed = None

    def set_epoch(self, seed: int, worker_seed: int) -> None:
        self.seed, self.worker_seed = seed, worker_seed

    def indices(self) -> list[int]:
        if self.seed is None:
            raise RuntimeError("EpochSampler: set_epoch was not called")
        if self.world_size == 1:
            return shuffled_indices(self.n, self.seed)
        return list(torch.utils.data.DistributedSampler(range(self.n), num_replicas=self.world_size, rank=self.rank,
                                                        shuffle=True, seed=self.seed, drop_last=True))

    def __iter__(self):
        return iter([(index, self.worker_seed) for index in self.indices()])

    def __len__(self) -> int:
        return self.n if self.world_size == 1 else self.n // self.world_size


class EpochSeededDataset(torch.utils.data.Dataset):
    """`dataset[(index, worker_seed)]`: re-seeds this worker's augmentation when the seed changes."""

    def __init__(self, dataset):
        self.dataset = dataset
        self.seed = None

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item):
        index, worker_seed = item
        if worker_seed != self.seed:
            info = torch.utils.data.get_worker_info()
            reseed(self.dataset.transform, worker_seed, info.id if info is not None else 0)
            self.seed = worker_seed
        return self.dataset[index]


def seed_loader_worker(seed: int, worker_id: int) -> None:
    """Each DataLoader worker gets its own augmentation stream (albumentations' Compose has its
    own RNG, copied into every worker: unseeded, all workers would repeat one sequence)."""
    info = torch.utils.data.get_worker_info()
    if info is not None and info.dataset.transform is not None:
        info.dataset.transform.set_random_seed(seed * 100 + worker_id)
    torch.manual_seed(seed * 100 + worker_id)


def reseed(transform, worker_seed: int, worker_id: int) -> None:
    """What a freshly started worker does (seed_loader_worker): its own augmentation stream."""
    if transform is not None:
        transform.set_random_seed(worker_seed * 100 + worker_id)
    torch.manual_seed(worker_seed * 100 + worker_id)


class TrainLoader:
    """`loader.epoch(seed)` -> that epoch's batches (an iterable with `.sampler`)."""

    def __init__(self, dataset, *, batch_size: int, num_workers: int, drop_last: bool, pin_memory: bool,
                 world_size: int = 1, rank: int = 0, persistent: bool = True):
        self.dataset, self.batch_size, self.num_workers = dataset, batch_size, num_workers
        self.drop_last, self.pin_memory = drop_last, pin_memory
        self.world_size, self.rank = world_size, rank
        self.persistent = persistent and num_workers > 0
        self._loader = None
        if self.persistent:
            self.sampler = EpochSampler(len(dataset), world_size, rank)
            self._loader = torch.utils.data.DataLoader(
                EpochSeededDataset(dataset), batch_size=batch_size, sampler=self.sampler, drop_last=drop_last,
                num_workers=num_workers, pin_memory=pin_memory, persistent_workers=True,
                # a generator of its own: the base seed it draws must not come from the global RNG
                generator=torch.Generator().manual_seed(0))

    def worker_seed(self, seed: int) -> int:
        return seed + 1000 * self.rank

    def epoch(self, seed: int):
        if self.persistent:
            self.sampler.set_epoch(seed, self.worker_seed(seed))
            return self._loader
        return self.fresh_loader(seed)

    def fresh_loader(self, seed: int):
        """The per-epoch DataLoader (no workers, or persistence off)."""
        sampler = None
        if self.world_size > 1:
            sampler = torch.utils.data.DistributedSampler(self.dataset, num_replicas=self.world_size, rank=self.rank,
                                                          shuffle=True, seed=seed, drop_last=True)
        return torch.utils.data.DataLoader(
            self.dataset, batch_size=self.batch_size, shuffle=sampler is None, sampler=sampler,
            drop_last=self.drop_last, num_workers=self.num_workers,
            generator=torch.Generator().manual_seed(seed), pin_memory=self.pin_memory,
            worker_init_fn=functools.partial(seed_loader_worker, self.worker_seed(seed)) if self.num_workers else None,
        )
