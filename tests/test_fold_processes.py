"""Fold processes seen from the parent: progress from their records (not their words), a
failure cancelling the folds not started and every failure reported, and pretrained weights
resolved once, before any fold process starts. Fold processes are faked (tests/test_gpus.py's
way) or are small real scripts; no training."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from pipeline import fileio, train_folds
from pipeline.errors import PipelineError
from pipeline.rundir import FoldDir
from tests.test_train import tiny_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


def finish(cfg, fold: int) -> None:
    fileio.write_json(FoldDir.of(cfg, fold).done, {"fold": fold, "best_score": 0.5, "seconds": 1.0})


@pytest.mark.e2e
def test_progress_comes_from_the_fold_records_whatever_the_fold_prints(synth_data, tmp_path, monkeypatch, no_gpus,
                                                                        capsys):
    """The fold process prints words the parent has never seen; its epochs still reach the parent,
    from the log.csv rows it writes (a real child process, followed while it runs)."""
    cfg = tiny_config(synth_data, tmp_path, "folds=[0,1]", "run.parallel_folds=true", "run.fold_workers=2")
    child = textwrap.dedent("""
        import sys, time
        from pathlib import Path
        from pipeline import fileio
        from pipeline.rundir import write_log
        folder, fold = Path(sys.argv[1]), int(sys.argv[2])
        rows = []
        for epoch in (1, 2):
            rows.append({"epoch": epoch, "lr": "0.001", "train_loss": f"0.{fold}{epoch}", "val_loss": "0.3",
                         "val_score": "0.61", "val_score_raw": "", "seconds": "1.5"})
            write_log(folder / "log.csv", rows)
            print(f"Durchgang {epoch} fertig, Verlust egal", flush=True)  # no ' epoch ', no 'train_loss'
            time.sleep(1.2)  # the parent sees this row while the process still runs
        fileio.write_json(folder / "done.json", {"fold": fold, "best_score": 0.61, "seconds": 3.0})
    """)
    monkeypatch.setattr(train_folds, "fold_command", lambda cfg, fold, threads, **kw: [
        sys.executable, "-c", child, str(FoldDir.of(cfg, fold).path), str(fold)])
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    train_folds.train_folds_in_parallel(cfg)
    out = capsys.readouterr().out
    for fold in (0, 1):
        assert f"fold {fold} epoch   1/2  lr 0.001  train_loss 0.{fold}1  val_loss 0.3  val_score 0.61" in out
        assert f"fold {fold} epoch   2/2  lr 0.001  train_loss 0.{fold}2" in out
        assert out.count(f"fold {fold} epoch ") == 2  # each epoch once
        assert "Durchgang" in FoldDir.of(cfg, fold).train_out.read_text()  # the words stay in train.out
    assert "Durchgang" not in out


def test_a_resumed_fold_reports_only_its_new_epochs(tmp_path, capsys):
    from pipeline.rundir import write_log

    folder = FoldDir(tmp_path / "fold0", 0)
    folder.path.mkdir()
    row = {"epoch": 1, "lr": "0.001", "train_loss": "0.5", "val_loss": "", "val_score": "", "val_score_raw": "",
           "seconds": "2.0"}
    write_log(folder.log, [row])
    report = train_folds.EpochReporter(folder, epochs=3)
    report()
    assert capsys.readouterr().out == ""
    write_log(folder.log, [row, {**row, "epoch": 2, "train_loss": "0.4"}])
    report()
    report()
    assert capsys.readouterr().out == "fold 0 epoch   2/3  lr 0.001  train_loss 0.4  seconds 2.0\n"


def test_a_failed_fold_cancels_the_folds_not_started(synth_data, tmp_path, monkeypatch, no_gpus, capsys):
    cfg = tiny_config(synth_data, tmp_path, "folds=[0,1,2]", "run.parallel_folds=true", "run.fold_workers=1")
    launched = []

    def fake_fold_process(command, env, log, report, running):
        fold = int(command[command.index("--folds") + 1])
        launched.append(fold)
        if fold == 1:
            log.write("fold 1 epoch 1 ...\nerror: fold1/last.pt: disk full\n")
            return 2
        finish(cfg, fold)
        return 0

    monkeypatch.setattr(train_folds, "run_fold_process", fake_fold_process)
    with pytest.raises(PipelineError) as failure:
        train_folds.train_folds_in_parallel(cfg)
    assert launched == [0, 1]  # fold 2 never started
    message = str(failure.value)
    assert "fold 1 failed" in message and "disk full" in message and "folds [2] cancelled" in message
    assert "\n" not in message
    # the failure shows as it happens, not only at the end
    assert "fold 1: failed" in capsys.readouterr().out


def test_every_failure_of_the_folds_running_together_is_reported(synth_data, tmp_path, monkeypatch, no_gpus):
    cfg = tiny_config(synth_data, tmp_path, "n_folds=4", "folds=[0,1,2,3]", "run.parallel_folds=true",
                      "run.fold_workers=2")
    both_running = threading.Barrier(2, timeout=30)
    launched = []

    def fake_fold_process(command, env, log, report, running):
        fold = int(command[command.index("--folds") + 1])
        launched.append(fold)
        both_running.wait()  # folds 0 and 1 run at once, and both fail
        log.write(f"error: fold {fold} ran out of memory\n")
        return 1

    monkeypatch.setattr(train_folds, "run_fold_process", fake_fold_process)
    with pytest.raises(PipelineError) as failure:
        train_folds.train_folds_in_parallel(cfg)
    assert sorted(launched) == [0, 1]
    message = str(failure.value)
    assert "fold 0 failed" in message and "fold 0 ran out of memory" in message
    assert "fold 1 failed" in message and "fold 1 ran out of memory" in message
    assert "folds [2, 3] cancelled" in message


def test_fold_processes_of_a_pretrained_run_never_ask_the_network(synth_data, tmp_path, monkeypatch, no_gpus):
    cfg = tiny_config(synth_data, tmp_path, "folds=[0,1]", "run.parallel_folds=true", "run.fold_workers=2",
                      "model.name=unet_resnet18", "model.pretrained=true")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    resolved, envs = [], []
    monkeypatch.setattr(train_folds, "resolve_pretrained_weights", lambda cfg: resolved.append(cfg.name))

    def fake_fold_process(command, env, log, report, running):
        envs.append(env)
        finish(cfg, int(command[command.index("--folds") + 1]))
        return 0

    monkeypatch.setattr(train_folds, "run_fold_process", fake_fold_process)
    train_folds.train_folds(cfg)
    assert resolved == ["tiny"]  # once, in the parent
    assert [env.get("HF_HUB_OFFLINE") for env in envs] == ["1", "1"]  # the parent filled the cache


@pytest.mark.e2e
def test_offline_pretrained_is_one_line_in_seconds_before_any_fold_process(synth_data, tmp_path):
    """HF_HUB_OFFLINE and an empty hub cache: one line, fast, and no fold process started
    (before, each fold process spent ~52 s in Hugging Face retries before the same error)."""
    cfg = tiny_config(synth_data, tmp_path, "folds=[0,1]", "model.name=unet_resnet18", "model.pretrained=true")
    config = tmp_path / "pretrained.yaml"
    from pipeline.config import save_config

    save_config(cfg, config)
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"),
               NO_ALBUMENTATIONS_UPDATE="1")
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "pipeline", "train", "--config", str(config), "--parallel-folds"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    seconds = time.monotonic() - started
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "model.pretrained" in lines[0] and "HF_HUB_OFFLINE" in lines[0], lines
    assert "training folds" not in result.stdout  # no fold process was started
    assert not any(cfg.run_dir.glob("fold*/train.out"))
    assert seconds < 30, f"{seconds:.0f} s"  # python + torch start-up included, on a busy 2-core machine
