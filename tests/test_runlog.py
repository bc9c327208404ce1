"""Every command acting on a run appends what it printed, with times, to runs/<name>/log.txt;
`train.tensorboard: true` adds TensorBoard scalars; the CLI is called `tgs`."""

from __future__ import annotations

import io
import json
import re
import shutil
import sys
import tomllib
from pathlib import Path

import pytest

from pipeline.cli import build_parser, main
from pipeline.config import Config, load_config
from pipeline.rundir import RUN_LOG_FILE as LOG_NAME
from pipeline.runlog import RunLog, _Tee, run_log, tensorboard_epoch
from tests.fake_run import make_fake_run

REPO = Path(__file__).resolve().parents[1]
STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d  "


@pytest.fixture()
def fake_run(synth_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the leaderboard that tune writes lands here
    return make_fake_run(synth_data, tmp_path)


def log_lines(run: Path) -> list[str]:
    return (run / LOG_NAME).read_text(encoding="utf-8").splitlines()


@pytest.mark.e2e
def test_each_command_on_a_run_appends_its_output_with_times_to_log_txt(fake_run, capsys):
    assert main(["tune", "--run", str(fake_run)]) == 0
    printed = capsys.readouterr().out
    assert main(["show", "--run", str(fake_run)]) == 0
    lines = log_lines(fake_run)
    assert all(re.match(STAMP, line) for line in lines)
    text = [line[21:] for line in lines]  # without the time
    assert text[0] == f"$ tgs tune --run {fake_run}"
    # everything the console saw, in order, then how the command ended
    assert text[1:1 + len(printed.splitlines())] == [line.rstrip() for line in printed.splitlines() if line.strip()]
    assert re.fullmatch(r"exit 0 after \d+\.\d s", text[len(printed.splitlines()) + 1])
    second = text.index(f"$ tgs show --run {fake_run}")
    assert second > 1 and text[second + 1].endswith("oof_worst.png") and text[-1].startswith("exit 0 after")


def test_a_failing_command_logs_its_one_line_error_and_exit_code(fake_run, capsys):
    (fake_run / "tune.json").unlink(missing_ok=True)
    assert main(["submit", "--run", str(fake_run)]) == 2
    err = capsys.readouterr().err
    lines = [line[21:] for line in log_lines(fake_run)]
    assert lines[-2] == err.strip() and lines[-2].startswith("error: ")
    assert lines[-1].startswith("exit 2 after ")


def test_log_keeps_the_last_state_of_a_progress_bar_not_every_redraw(tmp_path):
    console = io.StringIO()
    tee = _Tee(console, RunLog(tmp_path / LOG_NAME))
    tee.write("fold 0 epoch 1/8:   0%|  | 0/200\rfold 0 epoch 1/8:  50%|# | 100/200")
    tee.write("\r" + " " * 40 + "\r")  # tqdm's leave=False clears its line
    tee.write("fold 0 epoch   1/8  train_loss 0.61\nhalf a line")
    tee.finish()
    assert console.getvalue().startswith("fold 0 epoch 1/8:   0%")  # the console sees every byte
    assert [line[21:] for line in log_lines(tmp_path)] == ["fold 0 epoch   1/8  train_loss 0.61", "half a line"]


def test_lines_printed_before_the_run_folder_exists_are_written_once_it_does(tmp_path):
    run = tmp_path / "runs" / "new"
    log = RunLog(run / LOG_NAME)
    log.write_line("== train: runs/new")
    assert not run.exists()  # the log creates no run folder of its own
    run.mkdir(parents=True)
    log.write_line("fold 0: 200 train / 100 val images")
    assert [line[21:] for line in log_lines(run)] == ["== train: runs/new", "fold 0: 200 train / 100 val images"]


def test_run_log_restores_the_console_streams_even_when_the_command_fails(tmp_path):
    before = sys.stdout, sys.stderr
    with pytest.raises(ValueError):
        with run_log(tmp_path, ["tune", "--run", str(tmp_path)]):
            print("about to fail")
            raise ValueError("boom")
    assert (sys.stdout, sys.stderr) == before
    assert [line[21:] for line in log_lines(tmp_path)][-2:] == ["about to fail", "failed: boom after 0.0 s"]


def test_commands_without_a_run_write_no_log(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["synth", "--out", str(tmp_path / "data"), "--n-train", "3", "--n-test", "1"]) == 0
    assert not list(tmp_path.rglob(LOG_NAME))


def test_the_cli_is_called_tgs_as_the_console_script_declares():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"tgs": "pipeline.cli:main"}
    assert build_parser().prog == "tgs"
    assert build_parser().format_usage().startswith("usage: tgs ")


def test_tensorboard_changes_no_digest_and_is_also_spelt_train_tensorboard(tmp_path):
    from pipeline.rundir import training_digest

    cfg = Config()
    on = load_config_with(cfg, tensorboard=True)
    assert (training_digest(on), on.digest()) == (training_digest(cfg), cfg.digest())
    config = tmp_path / "c.yaml"
    config.write_text("name: x\ntrain:\n  tensorboard: true\n")
    assert load_config(config).run.tensorboard and load_config(config, ["train.tensorboard=false"]).run == cfg.run


def load_config_with(cfg: Config, **run) -> Config:
    import dataclasses

    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, **run))


def read_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(e.step, round(e.value, 6)) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_scalars_per_epoch_and_fold_when_asked(tmp_path):
    pytest.importorskip("tensorboard")
    from pipeline.runlog import close_tensorboard

    cfg = load_config_with(Config(name="tb", runs_dir=str(tmp_path / "runs")), tensorboard=True)
    rows = [{"epoch": 1, "lr": "0.002", "train_loss": "0.60000", "val_loss": "nan", "val_score": "nan",
             "val_score_raw": "", "seconds": "3.0"},
            {"epoch": 2, "lr": "0.001", "train_loss": "0.40000", "val_loss": "0.50000", "val_score": "0.70000",
             "val_score_raw": "", "seconds": "3.0"}]
    for row in rows:
        tensorboard_epoch(cfg, 1, row)
    close_tensorboard()
    scalars = read_scalars(tmp_path / "runs" / "tb" / "tensorboard" / "fold1")
    assert scalars == {"loss/train": [(1, 0.6), (2, 0.4)], "lr": [(1, 0.002), (2, 0.001)],
                       "loss/val": [(2, 0.5)], "score/val": [(2, 0.7)]}  # no validation at epoch 1: no point


def test_tensorboard_off_writes_nothing(tmp_path):
    cfg = Config(name="quiet", runs_dir=str(tmp_path / "runs"))
    tensorboard_epoch(cfg, 0, {"epoch": 1, "train_loss": "0.5"})
    assert not (tmp_path / "runs").exists()


def test_training_logs_every_epoch_to_log_txt_and_tensorboard(synth_data, tmp_path, monkeypatch, capsys):
    pytest.importorskip("tensorboard")
    from pipeline.runlog import close_tensorboard

    monkeypatch.chdir(tmp_path)
    config = tmp_path / "tiny.yaml"
    shutil.copy(REPO / "configs" / "demo.yaml", config)
    argv = ["train", "--config", str(config), "--folds", "0", "--set", f"data={synth_data}",
            "--set", f"runs_dir={tmp_path / 'runs'}", "--set", f"folds_csv={tmp_path / 'folds.csv'}",
            "--set", "train.epochs=2", "--set", "train.limit_train=16", "--set", "train.batch_size=8",
            "--set", "train.threads=1", "--set", "train.parallel_folds=false", "--set", "predict.tta=[none]",
            "--set", "train.tensorboard=true"]
    assert main(argv) == 0
    close_tensorboard()
    run = tmp_path / "runs" / "demo"
    text = [line[21:] for line in log_lines(run)]
    assert text[0].startswith("$ tgs train --config")
    assert any(line.startswith("fold 0 epoch   2/2  lr ") for line in text)
    assert text[-1].startswith("exit 0 after ")
    scalars = read_scalars(run / "tensorboard" / "fold0")
    assert [step for step, _ in scalars["loss/train"]] == [1, 2] and len(scalars["score/val"]) == 2
    assert json.loads((run / "fold0" / "done.json").read_text())["epochs_run"] == 2
