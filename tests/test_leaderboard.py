"""The leaderboard CSV: one row per run, ranked by tuned CV, safe under concurrent writers;
and config diffs between runs."""

from __future__ import annotations

import csv
import json
import re
import threading

import pytest

from pipeline.config import Config, save_config
from pipeline.errors import PipelineError
from pipeline.leaderboard import (COLUMNS, diff_runs, format_leaderboard, read_leaderboard, record_run,
                                  save_wall_minutes)
from pipeline.rundir import FoldDir
from tests.fake_run import write_fold


def make_run(root, name: str, **train) -> Config:
    """A run dir with config.yaml and fold done.json files (2 folds of 90 s and 150 s)."""
    import numpy as np

    cfg = Config(name=name, runs_dir=str(root / "runs"), n_folds=2)
    for key, value in train.items():
        setattr(cfg.train, key, value)
    save_config(cfg, cfg.run_dir / "config.yaml")
    for fold, seconds in ((0, 90.0), (1, 150.0)):
        write_fold(cfg.run_dir, fold, ["a"], np.zeros((1, 101, 101), np.float32), seconds=seconds)
    return cfg


def tune_result(cv: float) -> dict:
    return {"threshold": 0.42, "empty_threshold": 0.8, "min_area": 20, "cv_at_05": cv - 0.01, "cv_tuned": cv}


def test_rows_are_ranked_by_cv_tuned_and_a_rerecorded_run_replaces_its_row(tmp_path):
    board = tmp_path / "leaderboard.csv"
    for name, cv in (("low", 0.70), ("high", 0.85), ("mid", 0.80)):
        record_run(make_run(tmp_path, name).run_dir, tune_result(cv), leaderboard_csv=board)
    assert [r["run"] for r in read_leaderboard(board)] == ["high", "mid", "low"]

    record_run(tmp_path / "runs" / "low", tune_result(0.90), leaderboard_csv=board)
    rows = read_leaderboard(board)
    assert [r["run"] for r in rows] == ["low", "high", "mid"]
    assert rows[0]["cv_tuned"] == "0.9000"
    table = format_leaderboard(board).splitlines()
    assert [line.split()[1] for line in table[2:5]] == ["low", "high", "mid"]


def test_row_has_every_column_with_values_from_the_run(tmp_path):
    board = tmp_path / "leaderboard.csv"
    cfg = make_run(tmp_path, "one")
    record_run(cfg.run_dir, tune_result(0.8), leaderboard_csv=board)
    with open(board, newline="") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == COLUMNS
        (row,) = list(reader)
    assert row["run"] == "one" and row["model"] == "seed_unet" and row["loss"] == "bce"
    assert row["folds"] == "2/2" and row["threshold"] == "0.42" and row["min_area"] == "20"
    assert row["empty_threshold"] == "0.80"
    assert row["train_minutes"] == "4.0"  # (90 + 150) s
    assert row["config_hash"] == cfg.digest()
    assert row["tta"] == "none+hflip"
    assert re.fullmatch(r"[0-9a-f]{4,40}|", row["git_commit"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", row["date"])


def test_wall_time_of_pipeline_all_shows_for_its_config_only(tmp_path):
    board = tmp_path / "leaderboard.csv"
    cfg = make_run(tmp_path, "timed")
    record_run(cfg.run_dir, tune_result(0.8), leaderboard_csv=board)
    assert read_leaderboard(board)[0]["wall_minutes"] == ""  # tuned, never made by `all`

    save_wall_minutes(cfg.run_dir, 57.93, cfg.digest())
    record_run(cfg.run_dir, tune_result(0.8), leaderboard_csv=board)
    assert read_leaderboard(board)[0]["wall_minutes"] == "57.9"
    assert "57.9" in format_leaderboard(board).splitlines()[2]
    assert "wall_min" in format_leaderboard(board).splitlines()[0]

    save_wall_minutes(cfg.run_dir, 12.0, "another-config")  # stale: the run dir was remade since
    record_run(cfg.run_dir, tune_result(0.8), leaderboard_csv=board)
    assert read_leaderboard(board)[0]["wall_minutes"] == ""
    (cfg.run_dir / "wall.json").write_text("{not json")
    record_run(cfg.run_dir, tune_result(0.8), leaderboard_csv=board)  # unreadable: no time, no error
    assert read_leaderboard(board)[0]["wall_minutes"] == ""


def test_a_leaderboard_from_before_the_empty_threshold_stays_readable(tmp_path):
    board = tmp_path / "leaderboard.csv"
    old_columns = [c for c in COLUMNS if c != "empty_threshold"]
    old_row = {c: "" for c in old_columns} | {"run": "old", "cv_tuned": "0.7000", "threshold": "0.46",
                                               "min_area": "100"}
    with open(board, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=old_columns, lineterminator="\n")
        writer.writeheader()
        writer.writerow(old_row)
    # its rows decided emptiness at the threshold
    assert read_leaderboard(board)[0]["empty_threshold"] == "0.46"
    assert "0.46" in format_leaderboard(board)

    result = tune_result(0.8)
    del result["empty_threshold"]  # a tune result without one: decided at the threshold too
    record_run(make_run(tmp_path, "new").run_dir, result, leaderboard_csv=board)
    rows = {r["run"]: r for r in read_leaderboard(board)}
    assert rows["old"]["empty_threshold"] == "0.46" and rows["old"]["min_area"] == "100"
    assert rows["new"]["empty_threshold"] == "0.42"
    with open(board, newline="") as handle:
        assert csv.DictReader(handle).fieldnames == COLUMNS


def test_concurrent_record_run_calls_all_land(tmp_path):
    board = tmp_path / "leaderboard.csv"
    names = [f"run{i}" for i in range(8)]
    runs = [make_run(tmp_path, name).run_dir for name in names]
    start = threading.Barrier(len(runs))
    errors: list[BaseException] = []

    def record(index: int) -> None:
        try:
            start.wait()
            record_run(runs[index], tune_result(0.5 + index / 100), leaderboard_csv=board)
        except BaseException as exc:  # surfaced below: a thread's exception is otherwise lost
            errors.append(exc)

    threads = [threading.Thread(target=record, args=(i,)) for i in range(len(runs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert sorted(r["run"] for r in read_leaderboard(board)) == sorted(names)
    assert list(tmp_path.glob(".leaderboard.csv.*.tmp")) == []


def test_missing_leaderboard_is_a_friendly_message(tmp_path):
    text = format_leaderboard(tmp_path / "none.csv")
    assert "no runs yet" in text and "python -m pipeline tune" in text


def test_top_n_shows_only_the_best(tmp_path):
    board = tmp_path / "leaderboard.csv"
    for name, cv in (("a", 0.7), ("b", 0.9), ("c", 0.8)):
        record_run(make_run(tmp_path, name).run_dir, tune_result(cv), leaderboard_csv=board)
    lines = format_leaderboard(board, top=1).splitlines()
    assert len(lines) == 4 and lines[2].split()[1] == "b" and "1 of 3 runs" in lines[3]


def test_diff_runs_lists_exactly_the_differing_keys(tmp_path):
    make_run(tmp_path, "base", lr=0.001)
    make_run(tmp_path, "faster", lr=0.003, epochs=10)
    text = diff_runs("base", "faster", runs_dir=tmp_path / "runs")
    lines = text.splitlines()
    assert lines[0].endswith(": 3 keys differ")
    assert sorted(lines[1:]) == ["name: base -> faster", "train.epochs: 30 -> 10", "train.lr: 0.001 -> 0.003"]
    # run dirs work as well as names
    by_dir = diff_runs(tmp_path / "runs" / "base", tmp_path / "runs" / "faster")
    assert by_dir.splitlines()[1:] == lines[1:]
    assert "identical" in diff_runs("base", "base", runs_dir=tmp_path / "runs")


def test_diff_with_unknown_run_is_one_line_error(tmp_path):
    make_run(tmp_path, "base")
    with pytest.raises(PipelineError) as exc:
        diff_runs("base", "ghost", runs_dir=tmp_path / "runs")
    assert "\n" not in str(exc.value) and "ghost" in str(exc.value) and "config.yaml: missing" in str(exc.value)


def test_diff_takes_a_run_as_a_name_or_a_path_and_names_the_right_path_when_missing(tmp_path, monkeypatch, capsys):
    from pipeline.cli import main

    monkeypatch.chdir(tmp_path)  # runs/ relative to here, as from the repository root
    make_run(tmp_path, "base")
    make_run(tmp_path, "other", lr=0.01)
    for a, b in (("base", "other"), ("runs/base", "runs/other/"), (str(tmp_path / "runs" / "base") + "/", "other")):
        assert main(["leaderboard", "--diff", a, b]) == 0
        assert "train.lr: 0.001 -> 0.01" in capsys.readouterr().out
    for given, expected in (("runs/ghost", "runs/ghost/config.yaml"), ("runs/ghost/", "runs/ghost/config.yaml"),
                            (str(tmp_path / "ghost"), f"{tmp_path}/ghost/config.yaml"),
                            ("ghost", "runs/ghost/config.yaml")):
        assert main(["leaderboard", "--diff", "base", given]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {expected}: missing") and err.count("ghost") == 1, err
        assert "runs/runs" not in err


def test_cli_leaderboard_and_diff(tmp_path, capsys):
    from pipeline.cli import main

    board = tmp_path / "leaderboard.csv"
    record_run(make_run(tmp_path, "base").run_dir, tune_result(0.8), leaderboard_csv=board)
    make_run(tmp_path, "other", lr=0.01)
    assert main(["leaderboard", "--file", str(board), "--runs-dir", str(tmp_path / "runs")]) == 0
    assert "base" in capsys.readouterr().out
    assert main(["leaderboard", "--diff", "base", "other", "--runs-dir", str(tmp_path / "runs")]) == 0
    assert "train.lr: 0.001 -> 0.01" in capsys.readouterr().out


def test_folds_trained_concurrently_count_their_wall_span_not_their_sum(tmp_path):
    board = tmp_path / "leaderboard.csv"
    cfg = make_run(tmp_path, "parallel")
    # fold 0: 90 s ending at t=1000; fold 1: 150 s ending at t=1020: both ran from t=870 on
    for fold, finished in ((0, 1000.0), (1, 1020.0)):
        done = FoldDir.of(cfg, fold).done
        done.write_text(json.dumps({**json.loads(done.read_text()), "finished": finished}))
    record_run(cfg.run_dir, tune_result(0.8), leaderboard_csv=board)
    (row,) = read_leaderboard(board)
    assert row["train_minutes"] == "2.5"  # 1020 - 870 s, not 90 + 150


def test_a_reader_that_stops_early_gets_no_traceback(tmp_path):
    # `python -m pipeline leaderboard | head -3`: the pipe closes before the table is written
    import subprocess
    import sys

    board = tmp_path / "leaderboard.csv"
    record_run(make_run(tmp_path, "one").run_dir, tune_result(0.8), leaderboard_csv=board)
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "leaderboard", "--file", str(board),
                             "--runs-dir", str(tmp_path / "runs")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the process prints anything
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141
    assert "Traceback" not in stderr and stderr == ""


# ---------------------------------------------------------------- datasets and the page


def make_dataset(root, name: str, n: int):
    """A folder in the Kaggle layout whose train PNGs have distinct sizes (only listed and stat'ed)."""
    folder = root / "datasets" / name
    for sub in ("images", "masks"):
        (folder / "train" / sub).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            (folder / "train" / sub / f"id{i}.png").write_bytes(b"x" * (10 + i))
    return folder


def record_on(root, board, name: str, data, cv: float) -> Config:
    cfg = make_run(root, name)
    cfg.data = str(data)
    save_config(cfg, cfg.run_dir / "config.yaml")
    record_run(cfg.run_dir, tune_result(cv), leaderboard_csv=board)
    return cfg


def test_dataset_identity_is_the_folder_name_and_a_fingerprint_of_its_training_files(tmp_path):
    from pipeline.data import dataset_identity, fingerprint_data

    sample = make_dataset(tmp_path, "tgs", 3)
    copy = tmp_path / "elsewhere" / "tgs"
    import shutil

    shutil.copytree(sample, copy)
    assert dataset_identity(sample) == dataset_identity(copy)  # a copy is the same data
    assert dataset_identity(sample)["name"] == "tgs"
    # the leaderboard's fingerprint is tune.json's train fingerprint, shortened: one definition
    files, digest = fingerprint_data(sample, "train").split("-")
    assert dataset_identity(sample)["fingerprint"] == f"{files}-{digest[:12]}"
    (copy / "train" / "images" / "id9.png").write_bytes(b"more")
    assert dataset_identity(copy)["fingerprint"] != dataset_identity(sample)["fingerprint"]
    assert dataset_identity(tmp_path / "gone") == {"name": "gone", "fingerprint": ""}


def test_runs_are_ranked_within_their_dataset_and_filtered_by_data(tmp_path):
    """The synthetic demo (0.553) ranked above a real-data run (0.535): scores on different data
    are not comparable, so each dataset gets its own ranking."""
    board = tmp_path / "leaderboard.csv"
    demo, tgs = make_dataset(tmp_path, "demo", 2), make_dataset(tmp_path, "tgs", 4)
    record_on(tmp_path, board, "demo", demo, 0.553)
    real = record_on(tmp_path, board, "cpu_best", tgs, 0.535)
    record_on(tmp_path, board, "cpu_quick", tgs, 0.50)
    rows = {r["run"]: r for r in read_leaderboard(board)}
    assert rows["cpu_best"]["data"] == "tgs" and rows["demo"]["data"] == "demo"
    assert rows["cpu_best"]["data_fingerprint"] == rows["cpu_quick"]["data_fingerprint"] != rows["demo"]["data_fingerprint"]
    assert json.loads((real.run_dir / "data.json").read_text())["name"] == "tgs"  # recorded in the run

    text = format_leaderboard(board)
    tgs_part, demo_part = text.split("\n\n")  # the dataset with more runs first
    assert tgs_part.startswith("data tgs:") and demo_part.startswith("data demo:")
    ranked = [line.split()[:3] for line in tgs_part.splitlines()[3:5]]
    assert ranked == [["1", "cpu_best", "tgs"], ["2", "cpu_quick", "tgs"]]
    assert demo_part.splitlines()[3].split()[:2] == ["1", "demo"]

    for wanted in ("tgs", str(tgs), str(tgs) + "/", rows["cpu_best"]["data_fingerprint"][:8]):
        only = format_leaderboard(board, data=wanted)
        assert "cpu_best" in only and "demo" not in only and "\n\n" not in only, wanted
    assert "no runs on data 'nope'" in format_leaderboard(board, data="nope")


def test_a_run_keeps_naming_its_data_after_the_folder_moves(tmp_path):
    board = tmp_path / "leaderboard.csv"
    data = make_dataset(tmp_path, "tgs", 2)
    cfg = record_on(tmp_path, board, "one", data, 0.6)
    first = read_leaderboard(board)[0]["data_fingerprint"]
    data.rename(tmp_path / "moved")
    record_run(cfg.run_dir, tune_result(0.61), leaderboard_csv=board)  # re-tuned after the move
    assert read_leaderboard(board)[0]["data_fingerprint"] == first != ""


def test_leaderboard_page_ranks_every_run_links_its_pictures_and_plots_cv_against_minutes(tmp_path, capsys):
    from pipeline.cli import main

    board = tmp_path / "leaderboard.csv"
    demo, tgs = make_dataset(tmp_path, "demo", 2), make_dataset(tmp_path, "tgs", 4)
    shown = record_on(tmp_path, board, "cpu_best", tgs, 0.535)
    record_on(tmp_path, board, "demo", demo, 0.553)
    (shown.run_dir / "show").mkdir()
    (shown.run_dir / "show" / "index.html").write_text("<html></html>")
    runs = tmp_path / "runs"
    assert main(["leaderboard", "--file", str(board), "--runs-dir", str(runs)]) == 0
    assert f"page: {runs / 'index.html'}" in capsys.readouterr().out
    page = (runs / "index.html").read_text()
    sections = {part.split(":")[0]: part for part in page.split("<h2>data ")[1:]}
    assert "cpu_best" in sections["tgs"] and "demo</td>" not in sections["tgs"]
    assert "<td>demo</td>" in sections["demo"] and "cpu_best" not in sections["demo"]
    assert '<a href="cpu_best/show/index.html">show</a>' in page  # relative: the folder can move
    assert page.count(">show</a>") == 1  # the demo run has no pictures yet
    assert 'src="data:image/png;base64,' in page and "training minutes" in page
    assert "<script" not in page
