"""DDP scores the weights best.pt keeps: two gloo processes, one of them with BatchNorm
statistics of its own (what its last unsynchronised step leaves), validate the same weights to
the same probabilities and score as one process does."""

from __future__ import annotations

import pytest

import json
import os

import numpy as np
import torch

from tests.test_scale import free_port

# two DDP processes: the fast suite, not the quick tier
pytestmark = pytest.mark.e2e

N_IMAGES = 10


def _validation(dist, out_dir: str | None = None, perturb: bool = False):
    from pipeline.config import load_config
    from pipeline.rundir import FoldDir
    from pipeline.runtime import resolve_runtime
    from pipeline.train_fold import FoldContext, FoldData, build_training, validate_epoch

    cfg = load_config(None, ["model.n_filters=4", "train.precision=off", "train.channels_last=off",
                             "predict.batch_size=4", "run.threads=1"])
    rt = resolve_runtime("off", "off", "cpu", 1)
    ctx = FoldContext(cfg, 0, rt, dist, FoldDir(out_dir or ".", 0), "digest")
    parts = build_training(ctx)  # seeded: the same weights in every process
    if perturb:  # this rank's own running statistics, as after a step on its half batch
        for name, buffer in parts.model.named_buffers():
            if name.endswith("running_mean"):
                buffer.add_(0.7)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (N_IMAGES, 101, 101), dtype=np.uint8)
    masks = (images > 127).astype(np.uint8)
    split = FoldData(train_set=None, val_index=np.arange(N_IMAGES), val_images=images, val_masks=masks,
                     val_shard=dist.shard(N_IMAGES))
    return validate_epoch(ctx, parts, split, epoch=0)


def _rank(rank: int, port: int, out_dir: str) -> None:
    from pipeline.distributed import DistContext

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        scores = _validation(DistContext(rank=rank, world_size=2), out_dir, perturb=rank == 1)
        np.save(os.path.join(out_dir, f"probs{rank}.npy"), scores.probs)
        with open(os.path.join(out_dir, f"score{rank}.json"), "w") as handle:
            json.dump({"score": scores.score, "loss": scores.loss}, handle)
    finally:
        torch.distributed.destroy_process_group()


def test_ddp_validation_scores_rank_0s_weights_as_one_process_does(tmp_path):
    from pipeline.distributed import DistContext

    torch.set_num_threads(1)
    single = _validation(DistContext(), str(tmp_path))
    torch.multiprocessing.spawn(_rank, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        result = json.loads((tmp_path / f"score{rank}.json").read_text())
        np.testing.assert_allclose(np.load(tmp_path / f"probs{rank}.npy"), single.probs, atol=1e-5)
        assert result["score"] == single.score
        assert abs(result["loss"] - single.loss) < 1e-5
