"""pipeline.loader: workers that live for the fold give the very batches that per-epoch loaders
(fresh workers every epoch, seeded in worker_init_fn) gave, epoch after epoch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.augment import build_train_transform
from pipeline.config import AugmentConfig
from pipeline.loader import TrainLoader, shuffled_indices
from pipeline.loader import SaltDataset


def salt_dataset(n: int = 36) -> SaltDataset:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 101, 101), dtype=np.uint8)
    masks = (rng.random((n, 101, 101)) > 0.5).astype(np.uint8)
    return SaltDataset(images, masks, build_train_transform(AugmentConfig(), seed=42))


def epochs_of(loader: TrainLoader, seeds) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    return [[(images.clone(), masks.clone()) for images, masks in loader.epoch(seed)] for seed in seeds]


@pytest.mark.parametrize("world_size, rank", [(1, 0), (2, 1)])
def test_persistent_workers_give_the_per_epoch_loaders_batches_bit_for_bit(world_size, rank):
    dataset = salt_dataset()
    options = dict(batch_size=5, num_workers=2, drop_last=True, pin_memory=False, world_size=world_size, rank=rank)
    seeds = [11, 12, 13]
    fresh = epochs_of(TrainLoader(dataset, persistent=False, **options), seeds)
    persistent_loader = TrainLoader(dataset, **options)
    persistent = epochs_of(persistent_loader, seeds)
    assert persistent_loader.epoch(14) is persistent_loader.epoch(15)  # one loader, its workers kept
    assert [len(epoch) for epoch in persistent] == [len(epoch) for epoch in fresh] and len(fresh[0]) > 1
    for fresh_epoch, persistent_epoch in zip(fresh, persistent):
        for (a_images, a_masks), (b_images, b_masks) in zip(fresh_epoch, persistent_epoch):
            assert torch.equal(a_images, b_images) and torch.equal(a_masks, b_masks)
    assert not torch.equal(persistent[0][0][0], persistent[1][0][0])  # epochs differ from each other


def test_shuffle_is_that_of_a_fresh_seeded_dataloader_and_leaves_the_global_rng_alone():
    loader = torch.utils.data.DataLoader(range(50), batch_size=50, shuffle=True,
                                         generator=torch.Generator().manual_seed(7))
    assert next(iter(loader)).tolist() == shuffled_indices(50, 7)
    state = torch.get_rng_state()
    for _ in TrainLoader(salt_dataset(12), batch_size=4, num_workers=1, drop_last=True, pin_memory=False).epoch(3):
        pass
    assert torch.equal(torch.get_rng_state(), state)


def test_without_workers_the_loader_is_made_per_epoch_as_before():
    loader = TrainLoader(salt_dataset(12), batch_size=4, num_workers=0, drop_last=True, pin_memory=False)
    assert loader.epoch(1) is not loader.epoch(1) and len(loader.epoch(1).sampler) == 12
