"""Integrity, third round (issue 29): nothing stale, nothing destroyed. Outputs never replace what
is not a regular file; manifests fingerprint the bytes of the data and everything that shapes
the test probabilities; names are matched by one rule; configs cannot explode; every refusal
names a command that fixes it; numbers read from files are range-checked.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest

from pipeline import cli, data, fileio
from pipeline.errors import PipelineError, short_repr
from tests.fake_run import make_fake_run


def refusal(call, *args, **kwargs) -> str:
    with pytest.raises(PipelineError) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, repr(message)
    return message


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) <= 1, err
    return code, captured.out, err


# ---------------------------------------------------------------- 1. what an output may replace


def test_output_through_a_symlink_writes_its_target_in_another_folder(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "real.csv").write_text("old\n")
    out = tmp_path / "out"
    out.mkdir()
    link = out / "link.csv"
    link.symlink_to(elsewhere / "real.csv")
    fileio.write_text(link, "new\n")
    assert link.is_symlink() and (elsewhere / "real.csv").read_text() == "new\n"
    assert not list(out.glob(".*.tmp")) and not list(elsewhere.glob(".*.tmp"))
    dangling = out / "dangling.csv"
    dangling.symlink_to(elsewhere / "made.csv")
    fileio.write_text(dangling, "x\n")
    assert dangling.is_symlink() and (elsewhere / "made.csv").read_text() == "x\n"


def test_fifo_folder_and_device_are_refused_and_left_as_they_are(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    assert "FIFO" in refusal(fileio.write_text, fifo, "x")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    link = tmp_path / "to-pipe"
    link.symlink_to(fifo)
    assert "FIFO" in refusal(fileio.write_bytes, link, b"x")
    assert link.is_symlink() and stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert "folder" in refusal(fileio.write_text, tmp_path, "x")
    # a character device: refused before any temp file or rename (never written to /dev itself)
    assert "character device" in refusal(fileio.write_text, "/dev/null", "x")
    assert stat.S_ISCHR(os.lstat("/dev/null").st_mode)
    assert not list(tmp_path.glob(".*.tmp"))


def test_cli_out_to_a_device_or_stdout_link_is_one_line(tmp_path, capsys, synth_data):
    code, _, err = run_cli(capsys, "rle", "encode", "--masks", str(synth_data / "train" / "masks"),
                           "--out", "/dev/null")
    assert code != 0 and "/dev/null" in err and "not a regular file" in err
    assert stat.S_ISCHR(os.lstat("/dev/null").st_mode)


def test_new_files_follow_the_umask_and_replaced_files_keep_their_mode(tmp_path):
    old = os.umask(0o027)
    try:
        from pipeline.fileio import atomic

        atomic._umask = None  # read again under this test's umask
        fileio.write_text(tmp_path / "new.txt", "x")
        assert stat.S_IMODE(os.stat(tmp_path / "new.txt").st_mode) == 0o640
        (tmp_path / "kept.txt").write_text("a")
        os.chmod(tmp_path / "kept.txt", 0o604)
        fileio.write_text(tmp_path / "kept.txt", "b")
        assert stat.S_IMODE(os.stat(tmp_path / "kept.txt").st_mode) == 0o604
    finally:
        os.umask(old)
        atomic._umask = None


# ---------------------------------------------------------------- 4. one rule for names


@pytest.mark.parametrize("name", ["X.PNG", "X.Png", "X.jpg", "notes.txt", "X.png.bak", ".png"])
def test_a_file_not_named_id_png_is_refused_in_every_scan(tmp_path, synth_data, name):
    copy = tmp_path / "d"
    shutil.copytree(synth_data, copy)
    for folder in ("test/images", "train/images", "train/masks"):
        odd = copy / folder / name
        shutil.copy(next((copy / folder).glob("*.png")), odd)
        if name == ".png":  # a hidden file: skipped like every dot file
            assert data.list_image_ids(copy / folder)
        else:
            message = refusal(data.list_image_ids, copy / folder)
            assert name in message and "<id>.png" in message
        odd.unlink()


def test_check_submission_compares_with_sample_submission(tmp_path, synth_data, capsys):
    copy = tmp_path / "d"
    shutil.copytree(synth_data, copy)
    ids = data.list_image_ids(copy / "test" / "images")
    sub = tmp_path / "sub.csv"
    sub.write_text("id,rle_mask\n" + "".join(f"{i},\n" for i in ids))
    (copy / "sample_submission.csv").write_text("id,rle_mask\n" + "".join(f"{i},1 1\n" for i in ids + ["zz"]))
    code, _, err = run_cli(capsys, "check-submission", "--csv", str(sub), "--test", str(copy))
    assert code != 0 and "sample_submission.csv" in err and "zz" in err


# ---------------------------------------------------------------- 5. configs cannot explode

BOMB = "".join([
    "name: x\n",
    'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n',
    *(f"{b}: &{b} [{','.join([f'*{a}'] * 9)}]\n" for a, b in zip("abcdef", "bcdefg")),
    "train: {epochs: *g}\n",
])


def test_a_yaml_alias_bomb_is_refused_in_a_file_and_in_set(tmp_path, capsys):
    from pipeline.config import load_config

    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB)
    assert len(BOMB) < 600
    message = refusal(load_config, path)
    assert "aliases" in message and str(path) in message and len(message) < 300
    message = refusal(load_config, None, ["train.epochs=[&a [1,1,1,1], &b [*a,*a,*a,*a], [*b,*b]]"])
    assert "aliases" in message and len(message) < 300


def test_a_huge_user_value_is_echoed_short(tmp_path):
    from pipeline.config import load_config

    message = refusal(load_config, None, ["train.epochs=[" + ",".join(["1"] * 100_000) + "]"])
    assert "train.epochs" in message and len(message) < 300
    path = tmp_path / "long.yaml"
    path.write_text("input:\n  mode: " + "p" * 100_000 + "\n")
    assert len(refusal(load_config, path)) < 300
    assert short_repr("x" * 1000, 20) == "'xxxxxxxxxxxxxxxx..." and short_repr(5) == "5"


# ---------------------------------------------------------------- 2, 3. manifests fingerprint what shapes them


@pytest.fixture
def own_run(synth_data, tmp_path, monkeypatch) -> Path:
    """A fake run made from a private copy of the data (free to change), tuned and predicted."""
    from tests.fake_run import fake_tune

    copy = tmp_path / "data"
    shutil.copytree(synth_data, copy)
    monkeypatch.chdir(tmp_path)
    run = make_fake_run(copy, tmp_path)
    fake_tune(run, {"threshold": 0.2, "min_area": 0})
    return run


def _swap_pixels(folder: Path) -> None:
    first, second = sorted(folder.glob("*.png"))[:2]
    a, b = first.read_bytes(), second.read_bytes()
    first.write_bytes(b)
    second.write_bytes(a)


def test_the_data_fingerprint_follows_bytes_not_sizes_or_times(tmp_path, synth_data):
    copy = tmp_path / "d"
    shutil.copytree(synth_data, copy)
    before = data.fingerprint_data(copy, "test")
    assert data.fingerprint_data(copy, "test") == before  # cached within the process
    path = sorted((copy / "test" / "images").glob("*.png"))[0]
    times = os.stat(path)
    raw = bytearray(path.read_bytes())
    raw[-13] ^= 1  # same size; then the old modification time back
    path.write_bytes(bytes(raw))
    os.utime(path, ns=(times.st_atime_ns, times.st_mtime_ns))
    data._fingerprints.clear()  # as a new process sees it
    assert data.fingerprint_data(copy, "test") != before
    train = data.fingerprint_data(copy, "train")
    (copy / "train.csv").write_text((copy / "train.csv").read_text() + "\n")
    assert data.fingerprint_data(copy, "train") != train


def test_submit_refuses_swapped_test_pixels_and_other_data_with_the_same_ids(own_run, tmp_path):
    from pipeline.rundir import load_run_config
    from pipeline.submit import submit_run

    data_dir = Path(load_run_config(own_run).data)
    submit_run(own_run)  # accepted as made
    other = tmp_path / "other"
    shutil.copytree(data_dir, other)
    _swap_pixels(other / "test" / "images")
    message = refusal(submit_run, own_run, data_dir=other)
    assert "predict.json" in message and f"predict --run {own_run} --data {other}" in message
    _swap_pixels(data_dir / "test" / "images")
    message = refusal(submit_run, own_run)
    assert "other test images" in message and "predict --run" in message


def test_blanked_train_masks_make_tune_json_stale_and_tune_repairs_it(own_run, capsys):
    from pipeline.rundir import load_run_config
    from pipeline.manifests import tune_is_current
    from pipeline.submit import submit_run
    from pipeline.tune import tune_run

    cfg = load_run_config(own_run)
    assert tune_is_current(cfg, own_run)
    masks = Path(cfg.data) / "train" / "masks"
    blank = data.mask_png_bytes(np.zeros((101, 101), bool))
    for path in masks.glob("*.png"):
        path.write_bytes(blank)
    assert not tune_is_current(cfg, own_run)  # `all` tunes again
    message = refusal(submit_run, own_run)
    assert "other train masks" in message and f"tune --run {own_run}" in message
    tune_run(own_run, leaderboard_csv=own_run.parent.parent / "lb.csv")  # the hint's command works
    assert tune_is_current(cfg, own_run)
    submit_run(own_run)


def test_predict_json_records_the_recipe_and_a_tta_change_makes_it_stale(own_run):
    from pipeline.config import save_config
    from pipeline.rundir import load_run_config
    from pipeline.manifests import predictions_are_current

    cfg = load_run_config(own_run)
    meta = json.loads((own_run / "predict.json").read_text())
    assert meta["recipe"]["tta"] == cfg.predict.tta and "checkpoints" in meta["recipe"]
    assert predictions_are_current(cfg, own_run, cfg.data)
    cfg.predict.tta = ["none", "hflip", "vflip", "hvflip"]  # as `all --set predict.tta=[...]` saves it
    save_config(cfg, own_run / "config.yaml")
    assert not predictions_are_current(load_run_config(own_run), own_run, cfg.data)
    cfg.predict.tta = ["none"]
    cfg.input.size = 128
    assert not predictions_are_current(cfg, own_run, cfg.data)


# ---------------------------------------------------------------- 7. numbers from files


@pytest.mark.parametrize("text", ["1e308,1e308", "1e7,1", "nan,1", "-1,2", "inf,1"])
def test_blend_weights_beyond_range_are_refused(text):
    from pipeline.blend import parse_weights

    message = refusal(parse_weights, text, 2)
    assert "--weights" in message and len(message) < 200
    assert np.allclose(parse_weights("1,3", 2), [0.25, 0.75])


@pytest.mark.parametrize("change", [{"threshold": float("nan")}, {"threshold": -0.1}, {"min_area": 1e30},
                                    {"min_area": 2.5}, {"empty_threshold": 7}, {"threshold": "0.5"}])
def test_a_hand_edited_tune_json_is_range_checked(tmp_path, change):
    from pipeline.postprocess import read_tuned

    rule = {"threshold": 0.4, "empty_threshold": 0.4, "min_area": 10, **change}
    (tmp_path / "tune.json").write_text(json.dumps(rule))
    message = refusal(read_tuned, tmp_path)
    assert "tune.json" in message and next(iter(change)) in message and "tune --run" in message


# ---------------------------------------------------------------- 6. hints that fix, 8. smaller


def test_a_fifo_as_an_input_is_refused_not_waited_on(tmp_path, capsys, synth_data):
    fifo = tmp_path / "pred.csv"
    os.mkfifo(fifo)
    code, _, err = run_cli(capsys, "score", "--truth", str(synth_data / "train.csv"), "--pred", str(fifo))
    assert code != 0 and "FIFO" in err and str(fifo) in err
    assert "FIFO" in refusal(fileio.read_npy, fifo)


def test_a_damaged_oof_or_removed_checkpoint_makes_the_fold_not_done(own_run):
    from pipeline.rundir import load_run_config
    from pipeline.manifests import fold_is_done
    from pipeline.rundir import FoldDir

    cfg = load_run_config(own_run)
    assert fold_is_done(cfg, 1)
    oof = FoldDir.of(own_run, 1).oof
    raw = bytearray(oof.read_bytes())
    raw[-1] ^= 0xFF
    oof.write_bytes(bytes(raw))
    assert not fold_is_done(cfg, 1)  # `train`/`all` remake it rather than fail at `show`


def test_removed_best_pt_names_a_train_command_that_retrains_that_fold(own_run):
    from pipeline.checkpoints import fold_checkpoints
    from pipeline.rundir import load_run_config

    message = refusal(fold_checkpoints, load_run_config(own_run), 1)
    assert f"--config {own_run / 'config.yaml'} --folds 1 --restart" in message


def test_training_a_blend_run_is_one_line_naming_blend(own_run, capsys):
    from pipeline.rundir import load_run_config
    from pipeline.train_folds import train_folds

    cfg = load_run_config(own_run)
    for fold in cfg.fold_list():  # as blend writes its folds
        path = own_run / f"fold{fold}" / "done.json"
        done = json.loads(path.read_text())
        path.write_text(json.dumps({k: v for k, v in done.items() if k != "best_score"} | {"blend": True}))
    (own_run / "blend.json").write_text(json.dumps({"members": [{"run": "runs/a"}, {"run": "runs/b"}]}))
    message = refusal(train_folds, cfg)
    assert "is a blend" in message and "blend --runs runs/a runs/b --name fake" in message


class Killed(BaseException):
    """A kill at a write boundary, in this process: the write landed, nothing after it runs."""


def killed_after_write(n: int, call, *args, **kwargs) -> None:
    """Run `call` until its n-th file lands (every output is renamed into place: fileio's atomic
    writes), then stop it there, as tests/kill_at_write.py does with SIGKILL in a subprocess."""
    real_replace, landed = os.replace, []

    def replace(src, dst, *a, **k):
        real_replace(src, dst, *a, **k)
        landed.append(dst)
        if len(landed) == n:
            raise Killed(dst)

    os.replace = replace
    try:
        with pytest.raises(Killed):
            call(*args, **kwargs)
    finally:
        os.replace = real_replace


def hinted_command(message: str) -> str:
    import re

    commands = re.findall(r"`(python -m pipeline [^`]*)`", message)
    assert commands, message
    return commands[-1]


@pytest.mark.e2e
@pytest.mark.parametrize("writes", [1, 5, 13])  # blend.json (unfinished); fold 0 done; test_ids.txt
def test_a_blend_killed_part_way_is_refused_by_every_stage_naming_the_blend_that_finishes_it(
        own_run, tmp_path, capsys, writes):
    from pipeline.blend import blend_runs
    from pipeline.rundir import load_run_config
    from pipeline.submit import check_submission

    data_dir = load_run_config(own_run).data
    make_fake_run(Path(data_dir), tmp_path, "b", seed=1)
    killed_after_write(writes, blend_runs, ["runs/fake", "runs/b"], "ab", weights="1,3", runs_dir="runs",
                       pictures=False)
    blend = "python -m pipeline blend --runs runs/fake runs/b --name ab --runs-dir runs --weights 1,3"
    stages = [("submit", "--run", "runs/ab"), ("tune", "--run", "runs/ab"), ("show", "--run", "runs/ab"),
              ("predict", "--run", "runs/ab")]
    if (tmp_path / "runs" / "ab" / "config.yaml").exists():  # written second: a config to train with
        stages += [("train", "--config", "runs/ab/config.yaml"), ("all", "--config", "runs/ab/config.yaml")]
    for stage in stages:
        code, _, err = run_cli(capsys, *stage)
        assert code == 2 and hinted_command(err) == blend, (stage, err)
    # the hint, as printed, finishes the blend: tuned, submitted, checked
    assert cli.main(blend.split()[3:]) == 0
    assert check_submission(tmp_path / "submissions" / "ab.csv", data_dir) > 0
    code, _, _ = run_cli(capsys, "submit", "--run", "runs/ab")
    assert code == 0
    # a finished blend is still no run to train or predict: the same one line
    for stage in [("predict", "--run", "runs/ab"), ("train", "--config", "runs/ab/config.yaml")]:
        code, _, err = run_cli(capsys, *stage)
        assert code == 2 and "is a blend" in err and hinted_command(err) == blend, (stage, err)


def _move_one_id_to_the_next_fold(folds_csv: Path) -> None:
    lines = folds_csv.read_text().splitlines()
    image_id, fold, *rest = lines[1].split(",")
    lines[1] = ",".join([image_id, str((int(fold) + 1) % 2), *rest])  # fold 0 or 1 of 2 or 3 folds
    folds_csv.write_text("\n".join(lines) + "\n")


def test_a_changed_folds_file_is_refused_by_train_and_all_as_by_tune(own_run, capsys):
    from pipeline.rundir import load_run_config
    from pipeline.train_folds import train_folds
    from pipeline.tune import tune_run

    cfg = load_run_config(own_run)
    _move_one_id_to_the_next_fold(cfg.folds_path())
    from_tune = refusal(tune_run, own_run, leaderboard_csv="lb.csv")
    from_train = refusal(train_folds, cfg)  # every fold finished: nothing trains, nothing goes ahead
    assert from_train == from_tune and "the folds file changed since fold" in from_train
    assert hinted_command(from_train) == f"python -m pipeline train --config {own_run / 'config.yaml'} --force"
    code, _, err = run_cli(capsys, "all", "--config", str(own_run / "config.yaml"))
    assert code == 2 and err == f"error: {from_train}"


@pytest.mark.e2e
def test_following_the_changed_folds_hint_trains_on_the_new_split(synth_data, tmp_path, capsys, monkeypatch):
    from pipeline.train_folds import train_folds
    from pipeline.tune import tune_run
    from tests.test_train import tiny_config

    monkeypatch.chdir(tmp_path)
    cfg = tiny_config(synth_data, tmp_path, "train.epochs=1", "train.limit_train=16")  # one step: the split is tested
    train_folds(cfg)
    _move_one_id_to_the_next_fold(cfg.folds_path())
    command = hinted_command(refusal(train_folds, cfg))
    assert cli.main(command.split()[3:]) == 0
    tune_run(cfg.run_dir, leaderboard_csv="lb.csv")  # the OOF is the new split's


@pytest.mark.e2e
def test_train_trains_a_fold_whose_finished_files_changed_again_from_the_start_saying_why(synth_data, tmp_path,
                                                                                       capsys):
    from pipeline.manifests import fold_is_done
    from pipeline.rundir import FoldDir
    from pipeline.train_folds import train_folds
    from tests.test_train import tiny_config

    # no TTA: resuming the finished fold would keep (and record) the damaged OOF as it is
    cfg = tiny_config(synth_data, tmp_path, "train.epochs=1", "train.limit_train=16", "predict.tta=[none]")
    train_folds(cfg)
    folder = FoldDir.of(cfg, 0)
    raw = bytearray(folder.oof.read_bytes())
    raw[-1] ^= 0xFF
    folder.oof.write_bytes(bytes(raw))
    capsys.readouterr()
    train_folds(cfg)
    out = capsys.readouterr().out
    assert "note: fold 0 is trained again from the start" in out and "oof.npy: not the file done.json names" in out
    assert "resuming" not in out and fold_is_done(cfg, 0) and folder.oof.read_bytes() != bytes(raw)
    folder.best.unlink()  # was: a refusal naming `train ... --restart`
    train_folds(cfg)
    out = capsys.readouterr().out
    assert "best.pt: missing, done.json names it" in out and fold_is_done(cfg, 0)


@pytest.mark.e2e
def test_a_fold_trained_on_other_masks_is_trained_again_and_an_older_done_json_still_counts(
        synth_data, tmp_path, capsys, monkeypatch):
    from pipeline.rundir import FoldDir
    from pipeline.train_folds import train_folds
    from tests.test_train import tiny_config

    copy = tmp_path / "data"
    shutil.copytree(synth_data, copy)
    cfg = tiny_config(copy, tmp_path, "train.epochs=1", "train.limit_train=16")
    train_folds(cfg)
    path = FoldDir.of(cfg, 0).done
    done = json.loads(path.read_text())
    assert done["train_fingerprint"] == data.fingerprint_data(copy, "train")
    mask = sorted((copy / "train" / "masks").glob("*.png"))[0]
    mask.write_bytes(data.mask_png_bytes(np.eye(101, dtype=bool)))  # other masks, same ids
    # a done.json from before it recorded the train data: still a finished fold (hours to retrain)
    path.write_text(json.dumps({k: v for k, v in done.items() if k != "train_fingerprint"}))
    capsys.readouterr()
    train_folds(cfg)
    assert "fold 0: already trained" in capsys.readouterr().out
    path.write_text(json.dumps(done))
    hashed = []
    real_hash = data._hash_files
    monkeypatch.setattr(data, "_hash_files", lambda files: hashed.append(1) or real_hash(files))
    train_folds(cfg)
    out = capsys.readouterr().out
    assert "note: fold 0 is trained again from the start" in out and "other train images or masks" in out
    now = data.fingerprint_data(copy, "train")
    assert json.loads(path.read_text())["train_fingerprint"] == now != done["train_fingerprint"]
    assert len(hashed) == 1  # the train data hashed once in the command: compared, loaded, recorded


# ---------------------------------------------------------------- an unfinished fold's data


def _killed_fold(data_dir: Path, tmp_path: Path):
    """A fold killed mid-training: last.pt after its first of two epochs, no done.json."""
    from pipeline.checkpoints import load_checkpoint
    from pipeline.rundir import FoldDir
    from tests.test_train import _train_epochs_then_kill, tiny_config

    # one step an epoch (train.limit_train): what is tested is which epoch the fold starts from
    cfg = tiny_config(data_dir, tmp_path, "train.epochs=2", "train.limit_train=16", "predict.tta=[none]")
    _train_epochs_then_kill(cfg, kill_after=1)
    folder = FoldDir.of(cfg, 0)
    last = load_checkpoint(folder.last)
    assert last["state"]["epoch"] == 1 and not folder.done.exists()
    return cfg, folder, last


def _change_a_mask(data_dir: Path) -> None:
    mask = sorted((data_dir / "train" / "masks").glob("*.png"))[0]
    mask.write_bytes(data.mask_png_bytes(np.eye(101, dtype=bool)))  # other masks, same ids


@pytest.mark.e2e
@pytest.mark.parametrize("parallel", [False, True], ids=["sequential", "fold-process"])
def test_an_unfinished_fold_whose_train_masks_changed_is_trained_again_from_the_start(synth_data, tmp_path, capsys,
                                                                                   monkeypatch, parallel):
    """Resuming last.pt on other masks would continue on data the fold did not start on and record
    the new data in done.json as if trained on it throughout: the fold starts afresh, saying why,
    in the fold's own process too (`--parallel-folds`: the note is in its train.out)."""
    from pipeline.rundir import read_log
    from pipeline.train_folds import train_folds

    copy = tmp_path / "data"
    shutil.copytree(synth_data, copy)
    cfg, folder, last = _killed_fold(copy, tmp_path)
    assert last["train_fingerprint"] == data.fingerprint_data(copy, "train")
    _change_a_mask(copy)
    capsys.readouterr()
    hashed = []
    real_hash = data._hash_files
    monkeypatch.setattr(data, "_hash_files", lambda files: hashed.append(1) or real_hash(files))
    train_folds(cfg, parallel_folds=parallel)
    assert len(hashed) == 1  # in this process: loaded, compared with last.pt, recorded in done.json
    out = folder.train_out.read_text() if parallel else capsys.readouterr().out
    assert "note: fold 0 is trained again from the start (its last.pt was made on other train data)" in out
    assert "resuming" not in out and "fold 0 epoch   1/2" in out  # from epoch 1, not 2
    assert [row["epoch"] for row in read_log(folder.log)] == ["1", "2"]
    done = json.loads(folder.done.read_text())
    assert done["epochs_run"] == 2
    assert done["train_fingerprint"] == data.fingerprint_data(copy, "train") != last["train_fingerprint"]


@pytest.mark.e2e
def test_an_unfinished_fold_whose_split_changed_is_trained_again_on_the_new_split(synth_data, tmp_path, capsys):
    """A changed folds file, with no fold of the run finished: the unfinished fold trains again
    from the start on the split the file holds now (resuming would mix two splits in one model).
    Once a fold is finished, a changed folds file is refused by `train` as by `tune`
    (check_trained_split): that run would mix two splits across its folds, and retraining the
    finished folds costs hours, so the user picks (`train --force`, or the old file back)."""
    from pipeline.folds import load_folds
    from pipeline.train_folds import train_folds

    cfg, folder, last = _killed_fold(synth_data, tmp_path)
    lines = cfg.folds_path().read_text().splitlines()
    moved = next(i for i, line in enumerate(lines[1:], 1) if line.split(",")[1] == "0")
    image_id, _, *rest = lines[moved].split(",")
    lines[moved] = ",".join([image_id, "1", *rest])  # one of fold 0's images now validates in fold 1
    cfg.folds_path().write_text("\n".join(lines) + "\n")
    capsys.readouterr()
    train_folds(cfg)
    out = capsys.readouterr().out
    assert "note: fold 0 is trained again from the start (its last.pt was made on another split)" in out
    assert "resuming" not in out and "fold 0 epoch   1/2" in out
    folds = load_folds(cfg.folds_path())
    assert sorted(folder.oof_ids.read_text().split()) == sorted(folds["id"][folds["fold"] == 0].astype(str))
    assert image_id not in folder.oof_ids.read_text().split()
    # fold 0 finished now: a second change is the run-wide refusal
    lines[moved] = ",".join([image_id, "0", *rest])
    cfg.folds_path().write_text("\n".join(lines) + "\n")
    assert "the folds file changed since fold 0" in refusal(train_folds, cfg)


@pytest.mark.e2e
def test_a_last_pt_from_before_it_recorded_its_data_still_resumes(synth_data, tmp_path, capsys):
    """Backwards compatible: a last.pt without "train_fingerprint" and "split_digest" has nothing
    to compare, and restarting it would throw away the hours it holds."""
    from pipeline.checkpoints import save_checkpoint
    from pipeline.train_folds import train_folds

    copy = tmp_path / "data"
    shutil.copytree(synth_data, copy)
    cfg, folder, last = _killed_fold(copy, tmp_path)
    save_checkpoint(folder.last, {k: v for k, v in last.items() if k not in ("train_fingerprint", "split_digest")})
    _change_a_mask(copy)
    capsys.readouterr()
    train_folds(cfg)
    out = capsys.readouterr().out
    assert "fold 0: resuming at epoch 2/2" in out and "trained again" not in out
    assert json.loads(folder.done.read_text())["epochs_run"] == 2
