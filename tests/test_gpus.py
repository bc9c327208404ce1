"""Folds on several GPUs, and several folds on one: the planning and the launch, with the GPU
count patched and the fold processes replaced by a recorder (no GPU needed)."""

from __future__ import annotations

import pytest
import torch

from pipeline import fileio, train_folds
from pipeline.train_folds import fans_out_by_default, plan_workers, slot_gpu, visible_gpus
from tests.test_train import tiny_config


@pytest.mark.parametrize("folds, gpus, cores, workers, expected", [
    (5, 1, 16, 0, (1, 16)),  # one GPU, default: one fold at a time
    (5, 1, 16, 3, (3, 5)),  # fold_workers on CUDA: processes per GPU
    (5, 2, 16, 0, (2, 8)),  # Kaggle's T4 x2: one fold per GPU
    (5, 2, 16, 2, (4, 4)),
    (2, 1, 16, 4, (2, 8)),  # never more processes than folds
])
def test_fold_workers_on_cuda_are_processes_per_gpu(folds, gpus, cores, workers, expected):
    assert plan_workers(folds, gpus, cores, 0, workers) == expected


@pytest.mark.parametrize("mask, n_gpus, expected", [
    (None, 2, ["0", "1"]),
    ("2,3", 2, ["2", "3"]),  # the inherited mask: its own ids, not 0 and 1 again
    ("3", 1, ["3"]),
    ("GPU-aa11, GPU-bb22", 2, ["GPU-aa11", "GPU-bb22"]),
    ("1,7,bogus", 2, ["1", "7"]),  # CUDA stops at an invalid entry: device_count says how many
])
def test_visible_gpus_respects_an_inherited_cuda_visible_devices(mask, n_gpus, expected):
    environ = {} if mask is None else {"CUDA_VISIBLE_DEVICES": mask}
    assert visible_gpus(environ, n_gpus) == expected


def test_slots_go_round_the_gpus():
    assert [slot_gpu(slot, ["2", "3"]) for slot in range(4)] == ["2", "3", "2", "3"]


@pytest.mark.parametrize("n_gpus, n_folds, world_size, device, expected", [
    (2, 5, 1, None, True), (1, 5, 1, None, False), (2, 1, 1, None, False),
    (2, 5, 2, None, False),  # torchrun: DDP trains each fold on all the GPUs
    (2, 5, 1, "cpu", False)])
def test_several_gpus_train_one_fold_each_by_default(n_gpus, n_folds, world_size, device, expected):
    assert fans_out_by_default(n_gpus, n_folds, world_size, device) is expected


@pytest.mark.e2e
def test_each_fold_process_gets_one_gpu_of_the_inherited_mask(synth_data, tmp_path, monkeypatch, capsys):
    cfg = tiny_config(synth_data, tmp_path, "folds=[0,1,2]", "run.parallel_folds=true", "run.fold_workers=2")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    launched = {}

    def fake_fold_process(command, env, log, report, running):
        fold = int(command[command.index("--folds") + 1])
        launched[fold] = env["CUDA_VISIBLE_DEVICES"]
        fileio.write_json(cfg.run_dir / f"fold{fold}" / "done.json",
                          {"fold": fold, "best_score": 0.5, "seconds": 1.0})
        return 0

    monkeypatch.setattr(train_folds, "run_fold_process", fake_fold_process)
    results = train_folds.train_folds_in_parallel(cfg)
    assert [r["fold"] for r in results] == [0, 1, 2]
    assert set(launched) == {0, 1, 2} and set(launched.values()) <= {"2", "3"}
    assert set(launched.values()) == {"2", "3"}  # 4 slots on 2 GPUs: both used
    assert "in 3 parallel processes (on GPUs 2,3" in capsys.readouterr().out
