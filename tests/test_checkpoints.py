"""The one checkpoint saver and the fold folder's names: what each kind of checkpoint holds,
last.pt rotated into prev.pt, snapshots listed in cycle order (not name order)."""

from __future__ import annotations

import torch

from pipeline.checkpoints import CheckpointSaver, fold_checkpoints, load_checkpoint, load_resume_checkpoint
from pipeline.config import Config
from pipeline.rundir import FoldDir


def weights(value: float) -> dict:
    return {"w": torch.full((2,), value)}


def test_saver_keeps_the_metric_inside_and_rotates_last_into_prev(tmp_path):
    folder = FoldDir.of(tmp_path, 3)
    folder.path.mkdir()
    saver = CheckpointSaver(folder, "abc")
    saver.save(weights=weights(1.0), resume={"model": weights(1.0), "state": {"epoch": 1}}, epoch=0,
               val_score=0.5, best=True)
    saver.save(weights=weights(2.0), resume={"model": weights(2.0), "state": {"epoch": 2}}, epoch=1,
               val_score=0.4, snapshot=0, stage1=True)
    best = load_checkpoint(folder.best)
    assert (best["epoch"], best["val_score"], best["config_digest"], best["fold"]) == (0, 0.5, "abc", 3)
    assert torch.equal(best["model"]["w"], weights(1.0)["w"])
    assert load_checkpoint(folder.snapshot(0))["val_score"] == 0.4
    last, prev, stage1 = (load_checkpoint(p) for p in (folder.last, folder.prev, folder.stage1))
    assert (last["state"]["epoch"], prev["state"]["epoch"], stage1["state"]["epoch"]) == (2, 1, 2)
    assert last["config_digest"] == prev["config_digest"] == "abc" and last["fold"] == 3
    assert load_resume_checkpoint(folder, "abc")["state"]["epoch"] == 2
    folder.last.write_bytes(b"torn")  # a damaged last.pt falls back to prev.pt
    assert load_resume_checkpoint(folder, "abc")["state"]["epoch"] == 1


def test_snapshots_are_listed_in_cycle_order_and_predict_from_them(tmp_path):
    cfg = Config(runs_dir=str(tmp_path), name="run")
    cfg.train.scheduler, cfg.train.snapshots = "cosine_restarts", True
    folder = FoldDir.of(cfg, 0)
    folder.path.mkdir(parents=True)
    for cycle in (10, 2, 1):
        folder.snapshot(cycle).write_bytes(b"")
    assert folder.snapshots() == [folder.snapshot(1), folder.snapshot(2), folder.snapshot(10)]
    assert fold_checkpoints(cfg, 0) == folder.snapshots()
    assert set(folder.training_files()) >= {folder.best, folder.last, folder.done, *folder.snapshots()}
