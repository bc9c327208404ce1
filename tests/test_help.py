"""`tgs --help` and every command's: each option described, defaults shown, one folds-file rule."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from pipeline.cli import build_parser, main


def _parsers(parser: argparse.ArgumentParser, path: str = "tgs"):
    """(command path, parser) for the top parser and every sub-command, at any depth."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, f"{path} {name}")


COMMANDS = list(_parsers(build_parser()))


def test_the_walk_reaches_every_command():
    names = {path for path, _ in COMMANDS}
    assert {"tgs train", "tgs rle decode", "tgs kaggle kernel build", "tgs leaderboard"} <= names
    assert len(names) > 20


@pytest.mark.parametrize("path, parser", COMMANDS, ids=[path for path, _ in COMMANDS])
def test_every_option_of_every_command_has_help_text(path, parser):
    missing = [action.option_strings[-1] for action in parser._actions
               if action.option_strings and action.help != argparse.SUPPRESS and not (action.help or "").strip()]
    assert missing == [], f"{path}: options without help: {missing}"


@pytest.mark.parametrize("path, parser", COMMANDS, ids=[path for path, _ in COMMANDS])
def test_every_default_worth_knowing_is_shown(path, parser):
    text = parser.format_help()
    for action in parser._actions:
        default = action.default
        if (not action.option_strings or action.help == argparse.SUPPRESS or default in (None, False)
                or default == [] or isinstance(default, bool) or default is argparse.SUPPRESS):
            continue
        # argparse wraps long lines, at hyphens too: compare without any whitespace
        shown = f"(default:{default})".replace(" ", "") in "".join(text.split())
        assert "default" in (action.help or "") or shown, \
            f"{path} {action.option_strings[-1]}: default {default!r} not shown"


def test_defaults_read_in_the_help(capsys):
    with pytest.raises(SystemExit):
        main(["synth", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--n-train N_TRAIN training images (with masks) to draw (default: 800)" in text


def test_version(capsys):
    from pipeline import __version__

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"tgs {__version__}"


def test_all_help_names_every_stage_show_included(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    top = " ".join(capsys.readouterr().out.split())
    assert "all end to end: folds, train, tune, predict, submit, show, leaderboard" in top
    with pytest.raises(SystemExit):
        main(["all", "--help"])
    assert "show" in capsys.readouterr().out


def test_train_takes_data_like_all_predict_submit_and_show():
    parser = build_parser()
    for command in (["train", "--config", "c.yaml"], ["all", "--config", "c.yaml"], ["predict", "--run", "r"],
                    ["submit", "--run", "r"], ["show", "--run", "r"]):
        assert parser.parse_args(command + ["--data", "data/tgs"]).data == "data/tgs"


def test_folds_writes_by_default_the_file_train_and_all_read(tmp_path, monkeypatch, capsys):
    """`tgs folds` wrote folds/folds.csv, a file train and all never read."""
    from pipeline import data
    from pipeline.config import Config

    root = tmp_path / "mydata"
    rng = np.random.default_rng(0)
    for i in range(12):
        data.write_mask_png(root / "train" / "masks" / f"id{i:02d}.png", rng.random((101, 101)) < i / 12)
    monkeypatch.chdir(tmp_path)
    assert main(["folds", "--data", str(root), "--k", "3", "--seed", "7"]) == 0
    expected = Config(data=str(root), n_folds=3, seed=7).folds_path()
    assert expected == tmp_path.joinpath("folds", "mydata-k3-s7.csv").relative_to(tmp_path)
    assert (tmp_path / expected).is_file() and f"wrote {expected}" in capsys.readouterr().out
    for command in ("folds", "train", "all"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "folds/<data folder name>-k" in " ".join(capsys.readouterr().out.split())
