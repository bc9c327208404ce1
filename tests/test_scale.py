"""Scaling out: 2-process DDP (gloo on CPU) and folds in parallel give the single-process results."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.checkpoints import load_checkpoint
from pipeline.config import load_config, save_config
from pipeline.fileio import read_json
from pipeline.predict import predict_run
from pipeline.train_folds import plan_workers, train_folds
from pipeline.rundir import FoldDir
from tests.test_train import tiny_config

# end to end (DDP and parallel folds trained): the fast suite, not the quick tier (pyproject.toml markers)
pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port free right now: a fixed one collides when two suites (CI's two environments, a
    developer's second checkout) run the DDP test at once."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_pipeline(args, **env):
    full_env = dict(os.environ, PYTHONPATH=str(REPO), NO_ALBUMENTATIONS_UPDATE="1", **env)
    return subprocess.run([sys.executable, *args], cwd=REPO, env=full_env, capture_output=True, text=True,
                          timeout=300)


def test_two_process_ddp_matches_single_process_metric(synth_data, tmp_path):
    overrides = ("train.epochs=3", "train.batch_size=16", "model.n_filters=8", "train.lr=0.003",
                 "train.threads=1", "augment.shift_scale=0")
    single = tiny_config(synth_data, tmp_path / "single", *overrides)
    (single_done,) = train_folds(single)

    ddp = tiny_config(synth_data, tmp_path / "ddp", *overrides, f"folds_csv={single.folds_path()}")
    config_path = tmp_path / "ddp.yaml"
    save_config(ddp, config_path)
    result = run_pipeline(["-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
                           "-m", "pipeline", "train", "--config", str(config_path)])
    assert result.returncode == 0, result.stderr[-2000:]
    ddp_done = read_json(ddp.run_dir / "fold0" / "done.json")
    # same global batch, same data: the metric agrees within the noise of BN over half batches
    assert abs(ddp_done["best_score"] - single_done["best_score"]) < 0.1, (ddp_done, single_done)
    # only rank 0 logged: one summary line per epoch
    assert result.stdout.count("fold 0 epoch") == 3
    oof = np.load(ddp.run_dir / "fold0" / "oof.npy")
    assert oof.shape[0] == len((ddp.run_dir / "fold0" / "oof_ids.txt").read_text().split())


def test_parallel_folds_equal_sequential_folds(synth_data, tmp_path, capsys, monkeypatch):
    # bit-equal weights are the CPU's promise: no GPU here or in the fold processes
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    overrides = ("folds=[0,1]", "train.epochs=1", "train.threads=1")
    sequential = tiny_config(synth_data, tmp_path / "seq", *overrides)
    train_folds(sequential, device="cpu")
    # asked for by the config (as cpu_best does): the fold processes must not fan out again
    parallel = tiny_config(synth_data, tmp_path / "par", *overrides, f"folds_csv={sequential.folds_path()}",
                           "train.parallel_folds=true", "train.fold_workers=2")
    train_folds(parallel, predict_test=True)  # as `all` does: each fold process predicts the test set
    out = capsys.readouterr().out
    assert "in 2 parallel processes" in out
    # each fold's per-epoch line is echoed by the parent, not only written to its train.out
    assert "fold 0 epoch   1/1" in out and "fold 1 epoch   1/1" in out
    for fold in (0, 1):
        a = load_checkpoint(FoldDir.of(sequential, fold).best)["model"]
        b = load_checkpoint(FoldDir.of(parallel, fold).best)["model"]
        assert all(torch.equal(a[k], b[k]) for k in a), f"fold {fold} differs"
        assert FoldDir.of(parallel, fold).test_predict.is_file() and not FoldDir.of(sequential, fold).test_probs.exists()
    # predict averages the folds' own predictions, and gets the test_probs.npy it computes itself
    predict_run(sequential.run_dir)
    predict_run(parallel.run_dir)
    assert read_json(parallel.run_dir / "predict.json")["from_fold_files"] == [0, 1]
    assert read_json(sequential.run_dir / "predict.json")["from_fold_files"] == []
    assert np.array_equal(np.load(parallel.run_dir / "test_probs.npy"), np.load(sequential.run_dir / "test_probs.npy"))
    # a fold prediction made with other TTA is not averaged: the fold is predicted again
    predict_run(parallel.run_dir, tta="none")
    assert read_json(parallel.run_dir / "predict.json")["from_fold_files"] == []
    capsys.readouterr()
    # the run's config is the parent's, not that of whichever fold process wrote last (which
    # had folds: [k], threads: 1, parallel_folds: false, and left tune/predict seeing one fold)
    assert load_config(parallel.run_dir / "config.yaml") == parallel
    # and the same command again (./run.sh after a finished run) finds nothing to train
    train_folds(parallel)
    assert "folds [0, 1] already trained, skipping" in capsys.readouterr().out


@pytest.mark.parametrize(
    "folds, gpus, cores, threads, workers, expected",
    [(5, 0, 2, 0, 0, (2, 1)), (5, 0, 16, 0, 0, (5, 3)), (5, 4, 16, 0, 0, (4, 4)), (2, 0, 8, 2, 0, (2, 2)),
     (1, 0, 2, 0, 0, (1, 2)),
     # fold_workers: 3 single-thread folds on 2 cores (cpu_best); never more processes than folds
     (3, 0, 2, 0, 3, (3, 1)), (2, 0, 2, 0, 3, (2, 1)), (3, 0, 8, 0, 2, (2, 4)),
     # on GPUs fold_workers counts processes per GPU (tests/test_gpus.py)
     (5, 4, 16, 0, 8, (5, 3))],
)
def test_plan_workers_splits_gpus_then_cores(folds, gpus, cores, threads, workers, expected):
    assert plan_workers(folds, gpus, cores, threads, workers) == expected
