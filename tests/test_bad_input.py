"""Bad input, second round (issue 23): every config number range-checked, every filesystem error
one line naming the path, memory bounded before a huge input is looked at, run names that stay
inside runs/, a full disk. Each test asserts the message names the file or key AND the problem:
none passes by a generic "something went wrong".
"""

from __future__ import annotations

import dataclasses
import errno
import os
import typing
from pathlib import Path

import numpy as np
import pytest

from pipeline import cli, config, data, fileio, folds, rle
from pipeline.config import Config, load_config
from pipeline.errors import PipelineError
from pipeline.rundir import load_run_config


def refusal(call, *args, **kwargs) -> str:
    """The one-line PipelineError message `call` raises (any other outcome fails the test)."""
    with pytest.raises(PipelineError) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message and "\r" not in message, repr(message)
    return message


def assert_names(message: str, *parts: str) -> None:
    for part in parts:
        assert part in message, f"{part!r} not in {message!r}"


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    code = cli.main(list(argv))
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) <= 1, err
    return code, err


# ---------------------------------------------------------------- config numbers


@pytest.mark.parametrize("value, problem", [("-1", "must be in (0, 10], got -1"), ("0", "got 0"),
                                            ("nan", "must be a finite number, got nan"),
                                            (".inf", "must be a finite number, got inf"),
                                            ("inf", "must be a finite number, got inf")])
def test_train_lr_negative_zero_nan_inf_is_refused_before_anything_is_written(tmp_path, monkeypatch, capsys,
                                                                              value, problem):
    monkeypatch.chdir(tmp_path)
    code, err = run_cli(capsys, "train", "--config", str(config_path(tmp_path)), "--set", f"train.lr={value}",
                        "--set", f"runs_dir={tmp_path / 'runs'}")
    assert code == 2
    assert_names(err, "'train.lr'", problem)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.yaml"]  # no runs/, folds/ or submissions/


def config_path(tmp_path: Path) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text("name: bad_input\ndata: nowhere\n")
    return path


# (override, the key the message names, what it says is allowed)
OUT_OF_RANGE = [
    ("seed=-1", "'seed'", "in [0, 4294967295]"),
    ("n_folds=1", "'n_folds'", "in [2, 1000]"),
    ("model.n_filters=0", "'model.n_filters'", "in [1, 1024]"),
    ("model.dropout=1", "'model.dropout'", "in [0, 1)"),
    ("model.in_chans=0", "'model.in_chans'", "in [1, 16]"),
    ("model.decoder_channels=[256,0,64,32,16]", "'model.decoder_channels[1]'", "in [1, 4096]"),
    ("input.size=0", "'input.size'", "in [16, 1024]"),
    ("input.size=4096", "'input.size'", "in [16, 1024]"),
    ("augment.shift_scale=-0.1", "'augment.shift_scale'", "probability"),
    ("augment.shift_limit=2", "'augment.shift_limit'", "in [0, 1]"),
    ("augment.scale_limit=1", "'augment.scale_limit'", "in [0, 1)"),
    ("augment.brightness_limit=nan", "'augment.brightness_limit'", "finite"),
    ("augment.contrast_limit=-1", "'augment.contrast_limit'", "in [0, 1]"),
    ("loss.bce_weight=-1", "'loss.bce_weight'", "in [0, 1e+06]"),
    ("loss.lovasz_weight=inf", "'loss.lovasz_weight'", "finite"),
    ("loss.stage2_from_epoch=-2", "'loss.stage2_from_epoch'", "in [-1, 1000000]"),
    ("loss.empty_head_weight=-0.5", "'loss.empty_head_weight'", "in [0, 1e+06]"),
    ("loss.stage_heads_weight=nan", "'loss.stage_heads_weight'", "finite"),
    ("train.epochs=0", "'train.epochs'", "in [1, 1000000]"),
    ("train.batch_size=-4", "'train.batch_size'", "in [1, 65536]"),
    ("train.weight_decay=-0.01", "'train.weight_decay'", "in [0, 1]"),
    ("train.momentum=1", "'train.momentum'", "in [0, 1)"),
    ("train.cycle_epochs=0", "'train.cycle_epochs'", "in [1, 1000000]"),
    ("train.min_lr=-1e-5", "'train.min_lr'", "in [0, 10]"),
    ("train.plateau_patience=-1", "'train.plateau_patience'", "in [0, 1000000]"),
    ("train.plateau_factor=1", "'train.plateau_factor'", "in (0, 1)"),
    ("train.plateau_factor=0", "'train.plateau_factor'", "in (0, 1)"),
    ("train.early_stop_patience=-1", "'train.early_stop_patience'", "in [0, 1000000]"),
    ("run.num_workers=-1", "'run.num_workers'", "in [0, 1024]"),
    ("train.threads=100000", "'run.threads'", "in [0, 1024]"),
    ("train.limit_train=-5", "'train.limit_train'", "in [0, 1000000000]"),
    ("train.grad_clip=-1", "'train.grad_clip'", "in [0, 1e+06]"),
    ("train.ema_decay=nan", "'train.ema_decay'", "finite"),
    ("predict.batch_size=0", "'predict.batch_size'", "in [1, 65536]"),
    ("pseudo.max_uncertain_share=2", "'pseudo.max_uncertain_share'", "in [0, 1]"),
    ("tune.thresholds=[0.5,1.5]", "'tune.thresholds[1]'", "in [0, 1)"),
    ("tune.min_areas=[0,-10]", "'tune.min_areas[1]'", "in [0, 10201]"),
    ("tune.empty_thresholds=[nan]", "'tune.empty_thresholds[0]'", "finite"),
]


@pytest.mark.parametrize("override, key, allowed", OUT_OF_RANGE, ids=[case[0] for case in OUT_OF_RANGE])
def test_out_of_range_config_number_names_the_key_the_value_and_what_is_allowed(override, key, allowed):
    message = refusal(load_config, None, [override])
    assert_names(message, key, allowed)


def _numeric_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        annotation = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(annotation):
            keys += _numeric_keys(annotation, prefix + f.name + ".")
        elif annotation in (int, float):
            keys.append(prefix + f.name)
        elif typing.get_origin(annotation) is list and typing.get_args(annotation)[0] in (int, float):
            keys.append(prefix + f.name + "[]")
    return keys


def test_every_numeric_field_of_every_config_section_has_a_range():
    missing = [key for key in _numeric_keys(Config) if key not in config.NUMBER_RANGES]
    assert not missing, f"no range for {missing}: add them to config.NUMBER_RANGES"
    stale = [key for key in config.NUMBER_RANGES if key not in _numeric_keys(Config)]
    assert not stale, f"ranges for keys that no longer exist: {stale}"


def test_every_shipped_default_sits_inside_its_range():
    defaults = Config()
    outside = [(shown, value) for key, shown, value in config._numbers(defaults)
               if key in config.NUMBER_RANGES and not config.NUMBER_RANGES[key].holds(value)]
    assert not outside
    assert load_config(None) == defaults  # and the validation passes them unchanged


@pytest.mark.parametrize("overrides, key, problem", [
    (["train.lr=0.001", "train.min_lr=0.01"], "'train.min_lr'", "must be <= train.lr"),
    (["train.epochs=10", "loss.stage2_from_epoch=10"], "'loss.stage2_from_epoch'", "must be below train.epochs"),
    (["train.epochs=5", "train.validate_from=6"], "'train.validate_from'", "0..train.epochs"),
    (["loss.name=bce_lovasz", "loss.bce_weight=0", "loss.lovasz_weight=0"], "'loss.bce_weight'", "trains nothing"),
    (["folds=[1,1]"], "'folds'", "fold 1 twice"),
    (["predict.tta=[]"], "'predict.tta'", "is empty"),
])
def test_config_values_that_contradict_each_other_are_refused_naming_both(overrides, key, problem):
    assert_names(refusal(load_config, None, overrides), key, problem)


def test_number_too_large_for_a_float_is_refused_naming_the_key(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text(f"train:\n  lr: {10**400}\n")
    assert_names(refusal(load_config, path), str(path), "'train.lr' must be a number")


# ---------------------------------------------------------------- run names


@pytest.mark.parametrize("name, problem", [
    ("../escape", "path separator"), ("a/b", "path separator"), ("a\\b", "path separator"),
    ("..", "starts with a dot"), (".hidden", "starts with a dot"), ("", "is empty"), ("   ", "is empty"),
    ("tab\there", "control character"), ("line\nbreak", "control character"), (" padded", "space"),
    ("x" * 201, "longer than 200 bytes"),
])
def test_run_name_must_be_a_plain_folder_name(name, problem):
    message = refusal(config.from_dict, {"name": name}, "cfg.yaml")
    assert_names(message, "cfg.yaml", "'name'", problem)


def test_run_name_with_a_path_writes_nothing_outside_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, err = run_cli(capsys, "all", "--config", str(config_path(tmp_path)), "--set", "name=../../outside")
    assert code == 2 and "'name'" in err and "path separator" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.yaml"]


def test_nul_in_a_path_key_is_refused_naming_the_key():
    assert_names(refusal(load_config, None, ["data=da\0ta"]), "'data'", "NUL")


# ---------------------------------------------------------------- config files


@pytest.mark.parametrize("content, problem", [
    (b"train:\n  lr: 0.001\n  epochs: 3\n  lr: 0.1\n", "key 'lr' appears twice in one section (lines 2 and 4)"),
    (b"name: a\nname: b\n", "key 'name' appears twice"),
    (b"", "empty config"),
    (b"# only a comment\n", "empty config"),
    (b"- train\n- lr\n", "must be a mapping"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe", "not UTF-8"),
    (b"1: 2\nname: x\n", "unknown config key '1'"),
    (b"train: null\n", "'train' must be a mapping"),
])
def test_config_file_of_the_wrong_shape_is_one_line_naming_it(tmp_path, content, problem):
    path = tmp_path / "odd.yaml"
    path.write_bytes(content)
    assert_names(refusal(load_config, path), str(path), problem)


def test_yaml_merge_keys_are_not_mistaken_for_duplicates(tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text("train:\n  <<: {epochs: 3, lr: 0.1}\n  lr: 0.01\n")
    cfg = load_config(path)
    assert (cfg.train.epochs, cfg.train.lr) == (3, 0.01)


def test_config_that_is_a_folder_or_huge_is_refused_naming_it(tmp_path):
    assert_names(refusal(load_config, tmp_path), str(tmp_path), "is a folder")
    huge = tmp_path / "huge.yaml"
    huge.write_bytes(b"# " + b"x" * config.MAX_CONFIG_BYTES + b"\n")
    assert_names(refusal(load_config, huge), str(huge), "too large for a config file")


def test_run_dir_whose_config_yaml_has_another_shape_names_it(tmp_path):
    run = tmp_path / "runs" / "odd"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("- not\n- a mapping\n")
    assert_names(refusal(load_run_config, run), str(run / "config.yaml"), "must be a mapping")
    (run / "config.yaml").unlink()
    assert_names(refusal(load_run_config, run), str(run / "config.yaml"), "missing")


# ---------------------------------------------------------------- filesystem errors while reading data


def _dataset(tmp_path: Path, n: int = 4) -> Path:
    root = tmp_path / "data"
    rng = np.random.default_rng(0)
    for i in range(n):
        data.write_image_png(root / "train" / "images" / f"id{i}.png", rng.integers(0, 255, (101, 101), np.uint8))
        data.write_mask_png(root / "train" / "masks" / f"id{i}.png", rng.random((101, 101)) < 0.3)
        data.write_image_png(root / "test" / "images" / f"t{i}.png", rng.integers(0, 255, (101, 101), np.uint8))
    return root


@pytest.mark.parametrize("folder", ["train/images", "train/masks", "test/images"])
def test_symlink_loop_in_a_data_folder_is_one_line_naming_it(tmp_path, folder):
    root = _dataset(tmp_path)
    loop = root / folder / "loop.png"
    os.symlink(loop.name, loop)
    load = data.load_test if folder.startswith("test") else data.load_train
    assert_names(refusal(load, root), str(loop), "symbolic links")


def test_dangling_symlink_image_is_refused_not_silently_dropped(tmp_path):
    root = _dataset(tmp_path)
    dangling = root / "train" / "images" / "gone.png"
    os.symlink(tmp_path / "nowhere.png", dangling)
    assert_names(refusal(data.load_train, root), str(dangling), "broken symbolic link")


def test_data_folder_that_is_a_symlink_loop_names_it(tmp_path):
    root = _dataset(tmp_path)
    masks = root / "train" / "masks"
    for path in masks.iterdir():
        path.unlink()
    masks.rmdir()
    os.symlink(masks.name, masks)
    assert_names(refusal(data.load_train, root), str(masks), "symbolic links")
    assert_names(refusal(folds.make_folds_for_dir, root, 2, 0, tmp_path / "f.csv"), str(masks), "symbolic links")


def test_unlistable_folder_is_one_line_naming_it(tmp_path, monkeypatch):
    root = _dataset(tmp_path)

    def denied(path):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(data.os, "scandir", denied)
    assert_names(refusal(data.load_test, root), str(root / "test" / "images"), "Permission denied")


def test_unreadable_image_is_one_line_naming_it(tmp_path, monkeypatch):
    root = _dataset(tmp_path)
    target = root / "train" / "images" / "id2.png"
    real_open = open

    def guarded_open(path, *args, **kwargs):
        if Path(path) == target:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", guarded_open)
    assert_names(refusal(data.read_image, target), str(target), "Permission denied")


def test_image_vanishing_between_listing_and_fingerprint_names_it(tmp_path, monkeypatch):
    root = _dataset(tmp_path)
    listed = data.list_image_ids(root / "test" / "images")
    (root / "test" / "images" / "t1.png").unlink()
    monkeypatch.setattr(data, "list_image_ids", lambda folder: listed)
    assert_names(refusal(data.fingerprint_test_images, root), "t1.png", "No such file")


@pytest.mark.parametrize("where", ["train/masks", "test/images"])
def test_file_where_a_folder_should_be_is_named(tmp_path, where):
    root = _dataset(tmp_path)
    folder = root / where
    for path in folder.iterdir():
        path.unlink()
    folder.rmdir()
    folder.write_text("not a folder")
    load = data.load_test if where.startswith("test") else data.load_train
    assert_names(refusal(load, root), str(folder), "not a folder")


def test_rle_csv_and_folds_file_that_are_symlink_loops_are_named(tmp_path):
    for name, reader in (("sub.csv", rle.read_rle_csv), ("folds.csv", folds.load_folds),
                         ("depths.csv", data.read_depths)):
        loop = tmp_path / name
        os.symlink(name, loop)
        message = refusal(reader, loop)
        assert_names(message, str(loop))
        assert "symbolic links" in message or "not found" in message


# ---------------------------------------------------------------- memory bounded by plausible sizes


def test_rle_csv_with_more_rows_than_plausible_is_refused_before_decoding(tmp_path, monkeypatch):
    monkeypatch.setattr(rle, "MAX_CSV_ROWS", 50)
    path = tmp_path / "many.csv"
    rle.write_rle_csv(path, [f"i{n}" for n in range(51)], ["1 1"] * 51)
    from pipeline.metric import score_csvs

    assert_names(refusal(score_csvs, path, path), str(path), "more than 50 rows")


def test_row_limit_keeps_a_whole_csv_of_masks_under_two_gigabytes():
    assert rle.MAX_CSV_ROWS * 101 * 101 < 2 * 2**30
    assert rle.MAX_CSV_ROWS >= 18000 * 5  # room for the whole TGS test set and more


def test_rle_csv_over_the_size_limit_is_refused_unread(tmp_path, monkeypatch):
    monkeypatch.setattr(rle, "MAX_CSV_BYTES", 1000)
    path = tmp_path / "big.csv"
    path.write_text("id,rle_mask\n" + "".join(f"i{n},1 1\n" for n in range(200)))
    assert_names(refusal(rle.read_rle_csv, path), str(path), "over the 0 MiB")


def test_endless_rle_csv_from_a_device_is_refused(monkeypatch):
    monkeypatch.setattr(rle, "MAX_CSV_BYTES", 4096)
    assert_names(refusal(rle.read_rle_csv, "/dev/zero"), "/dev/zero", "endless")


def test_score_csvs_memory_does_not_grow_with_every_mask_at_once(tmp_path, monkeypatch):
    import tracemalloc

    import pandas  # noqa: F401  (imported lazily by the reader: its import is not the reader's memory)

    from pipeline.metric import score_csvs

    monkeypatch.setattr(rle, "_CHUNK", 64)  # the property at a size that keeps the test fast
    count = 2000  # 2000 full masks: 20 MB as one bool stack per file
    path = tmp_path / "full.csv"
    rle.write_rle_csv(path, [f"i{n}" for n in range(count)], ["1 10201"] * count)
    tracemalloc.start()
    try:
        assert score_csvs(path, path) == (1.0, count)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < count * 101 * 101 / 2, f"peak {peak / 2**20:.0f} MiB: the masks were held at once"


def test_check_submission_with_a_bad_rle_in_a_later_chunk_still_names_the_row(tmp_path):
    from pipeline.submit import check_submission

    root = tmp_path / "data"
    ids = [f"t{n:05d}" for n in range(1100)]
    folder = root / "test" / "images"
    folder.mkdir(parents=True)
    image = data.image_png_bytes(np.zeros((101, 101), np.uint8))
    for image_id in ids:
        (folder / f"{image_id}.png").write_bytes(image)
    rles = [""] * len(ids)
    rles[1050] = "10201 5"
    path = tmp_path / "sub.csv"
    rle.write_rle_csv(path, ids, rles)
    assert_names(refusal(check_submission, path, root), str(path), "id t01050", "past the 10201 pixels")


def test_png_far_too_large_for_101x101_is_refused_unread(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "MAX_PNG_BYTES", 2048)
    path = tmp_path / "big.png"
    path.write_bytes(data.PNG_SIGNATURE + bytes(4096))
    assert_names(refusal(data.read_image, path), str(path), "far too large for a 101x101 PNG")


def test_npy_whose_header_claims_terabytes_is_refused_before_allocating(tmp_path):
    path = tmp_path / "test_probs.npy"
    with open(path, "wb") as handle:
        np.lib.format.write_array_header_1_0(handle, {"descr": "<f2", "fortran_order": False,
                                                      "shape": (10**9, 101, 101)})
        handle.write(bytes(100))
    assert_names(refusal(fileio.read_npy, path), str(path), "truncated or damaged")


def test_table_csv_over_its_size_limit_is_refused_naming_it(tmp_path, monkeypatch):
    monkeypatch.setattr(fileio, "MAX_TABLE_BYTES", 100)
    path = tmp_path / "depths.csv"
    path.write_text("id,z\n" + "".join(f"i{n},{n}\n" for n in range(100)))
    monkeypatch.setattr(fileio.read_csv_strings, "__defaults__", (fileio.MAX_TABLE_BYTES,))
    assert_names(refusal(data.read_depths, path), str(path), "over the 0 MiB")


# ---------------------------------------------------------------- CSV cells and headers


def test_csv_with_a_byte_order_mark_reads_like_one_without(tmp_path):
    depths = tmp_path / "depths.csv"
    depths.write_bytes("\ufeffid,z\na,5\n".encode())
    assert data.read_depths(depths) == {"a": 5.0}
    folds_csv = tmp_path / "folds.csv"
    folds_csv.write_bytes("\ufeffid,fold,coverage_class\na,0,0\nb,1,3\n".encode())
    assert folds.load_folds(folds_csv)["fold"].tolist() == [0, 1]
    sub = tmp_path / "sub.csv"
    sub.write_bytes("\ufeffid,rle_mask\na,1 2\n".encode())
    assert rle.read_rle_csv(sub)["id"].tolist() == ["a"]


@pytest.mark.parametrize("text, reader, problem", [
    ("id,z\na,nan\n", "depths", "id a has z 'nan', expected a number"),
    ("id,z\na,1\na,2\n", "depths", "id a appears more than once"),
    ("id,fold\na,NaN\n", "folds", "id a has fold 'NaN'"),
    ("id,rle_mask\na,nan\n", "rle", "'nan' is not an integer"),
    ("id,rle_mask\na,1 1\na,3 1\n", "rle", "duplicate id 'a'"),
    ("image,mask\na,1 1\n", "rle", "expected 'id,rle_mask'"),
])
def test_nan_cells_duplicate_ids_and_wrong_headers_name_the_file_and_row(tmp_path, text, reader, problem):
    path = tmp_path / "table.csv"
    path.write_text(text)
    read = {"depths": data.read_depths, "folds": folds.load_folds,
            "rle": lambda p: rle.decode_many(*(lambda t: (t["rle_mask"], (101, 101), t["id"], str(p)))(
                rle.read_rle_csv(p)))}[reader]
    assert_names(refusal(read, path), str(path), problem)


# ---------------------------------------------------------------- writing: full disk, things in the way


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("where", ["fsync", "replace", "write"])
def test_full_disk_during_an_atomic_write_is_one_line_and_leaves_no_temp_file(tmp_path, monkeypatch, where):
    target = tmp_path / "out" / "tune.json"
    if where == "write":
        real_fdopen = os.fdopen

        class FullDisk:
            def __init__(self, handle):
                self._handle = handle

            def write(self, data):
                _enospc()

            def __getattr__(self, name):
                return getattr(self._handle, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self._handle.close()

        monkeypatch.setattr(fileio.atomic.os, "fdopen", lambda *a, **k: FullDisk(real_fdopen(*a, **k)))
    else:
        monkeypatch.setattr(fileio.atomic.os, where, _enospc)
    assert_names(refusal(fileio.write_json, target, {"threshold": 0.5}), str(target), "No space left on device")
    assert not target.exists()
    assert [p.name for p in target.parent.iterdir()] == []


def test_file_in_the_way_of_an_output_folder_is_one_line_naming_it(tmp_path):
    blocker = tmp_path / "runs"
    blocker.write_text("a file, not a folder")
    target = blocker / "v1" / "config.yaml"
    message = refusal(fileio.write_text, target, "name: v1\n")
    assert_names(message, "runs", "cannot make this folder")


def test_temp_file_that_cannot_be_made_is_one_line_naming_the_target(tmp_path, monkeypatch):
    monkeypatch.setattr(fileio.atomic.tempfile, "mkstemp", lambda **kwargs: _enospc())
    target = tmp_path / "probs.npy"
    assert_names(refusal(fileio.write_npy, target, np.zeros(3)), str(target), "No space left on device")


def test_rle_decode_into_a_path_that_is_a_file_names_it(tmp_path):
    sub = tmp_path / "sub.csv"
    rle.write_rle_csv(sub, ["a"], ["1 1"])
    blocker = tmp_path / "masks"
    blocker.write_text("file")
    assert_names(refusal(data.decode_csv_to_dir, sub, blocker), str(blocker), "a file of that name is in the way")


# ---------------------------------------------------------------- run-dir records


@pytest.mark.parametrize("content, problem", [
    ("[0.5, 10]", "expected a JSON object"),
    ("{\"threshold\": ", "not valid JSON"),
    ("[" * 100_000, "not valid JSON"),
])
def test_tune_json_of_another_shape_is_one_line_naming_it(tmp_path, content, problem):
    from pipeline.postprocess import read_tuned

    (tmp_path / "tune.json").write_text(content)
    assert_names(refusal(read_tuned, tmp_path), str(tmp_path / "tune.json"), problem)


def test_record_that_is_a_folder_is_one_line_naming_it(tmp_path):
    (tmp_path / "tune.json").mkdir()
    assert_names(refusal(fileio.read_json, tmp_path / "tune.json"), "tune.json", "is a folder")


def test_test_ids_that_are_not_text_name_the_file(tmp_path):
    from pipeline.submit import read_test_probs

    fileio.write_npy(tmp_path / "test_probs.npy", np.zeros((1, 101, 101), np.float16))
    (tmp_path / "test_ids.txt").write_bytes(b"\xff\xfe\x00id")
    assert_names(refusal(read_test_probs, tmp_path), str(tmp_path / "test_ids.txt"), "not UTF-8")


# ---------------------------------------------------------------- PNG files


def _encoded(image, fmt: str = "PNG") -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize("make, problem", [
    (lambda Image: _encoded(Image.new("L", (100, 101))), "image is 100x101, expected 101x101"),
    (lambda Image: _encoded(Image.new("RGB", (101, 101)), "JPEG"), "it is a JPEG file"),
    (lambda Image: _encoded(Image.new("L", (101, 101)))[:-20], "truncated file"),
    (lambda Image: b"", "empty file"),
    (lambda Image: b"id,rle_mask\n", "not an image file"),
])
def test_png_of_the_wrong_size_format_or_truncated_names_the_file_and_problem(tmp_path, make, problem):
    from PIL import Image

    path = tmp_path / "odd.png"
    path.write_bytes(make(Image))
    assert_names(refusal(data.read_image, path), str(path), problem)


def test_sixteen_bit_and_palette_masks_read_as_their_salt(tmp_path):
    from PIL import Image

    salt = np.zeros((101, 101), bool)
    salt[10:20, 30:40] = True
    sixteen = tmp_path / "sixteen.png"
    sixteen.write_bytes(data.mask_png_bytes(salt, sixteen_bit=True))
    palette = tmp_path / "palette.png"
    palette.write_bytes(_encoded(Image.fromarray(salt.astype(np.uint8) * 255).convert("P")))
    assert (data.read_mask(sixteen) == salt).all() and (data.read_mask(palette) == salt).all()


# ---------------------------------------------------------------- kills mid-way


def test_predict_killed_between_its_writes_leaves_no_record_claiming_a_finished_prediction(tmp_path, monkeypatch):
    from pipeline import predict
    from pipeline.config import save_config

    root = _dataset(tmp_path)
    cfg = Config(name="killed", data=str(root), runs_dir=str(tmp_path / "runs"), n_folds=2)
    save_config(cfg, cfg.run_dir / "config.yaml")
    (cfg.run_dir / "predict.json").write_text('{"data": "old", "test_fingerprint": "old"}')
    monkeypatch.setattr(predict, "fold_prediction_chunks",
                        lambda cfg, fold, images, *rest: iter([(0, np.zeros(images.shape, np.float16))]))
    monkeypatch.setattr(predict, "finished_inputs", lambda cfg, run: {})  # no trained folds here
    monkeypatch.setattr(predict, "count_passes", lambda *args: 1)
    real_write_text = fileio.write_text

    def killed_at_the_ids(path, text):
        if Path(path).name == "test_ids.txt":
            raise KeyboardInterrupt  # what a SIGINT or the end of a SIGKILLed process looks like here
        real_write_text(path, text)

    monkeypatch.setattr(fileio, "write_text", killed_at_the_ids)
    with pytest.raises(KeyboardInterrupt):
        predict.predict_run(cfg.run_dir, device="cpu")
    assert (cfg.run_dir / "test_probs.npy").exists() and not (cfg.run_dir / "predict.json").exists()


def test_training_log_that_is_a_folder_or_garbage_names_it(tmp_path):
    from pipeline.show import _read_log

    log = tmp_path / "log.csv"
    log.mkdir()
    assert_names(refusal(_read_log, log), str(log), "is a folder")
    log.rmdir()
    log.write_text("epoch,train_loss\n1,abc\n")
    assert_names(refusal(_read_log, log), str(log), "not a training log")


def test_folds_file_with_an_empty_fold_is_refused_before_training(tmp_path):
    from pipeline.train_folds import load_training_data

    root = _dataset(tmp_path)
    folds_csv = tmp_path / "folds.csv"
    folds_csv.write_text("id,fold\nid0,0\nid1,2\nid2,0\nid3,2\n")
    cfg = Config(name="gap", data=str(root), folds_csv=str(folds_csv), n_folds=3)
    assert_names(refusal(load_training_data, cfg), str(folds_csv), "fold 1 holds none of the 4 train images")


# ---------------------------------------------------------------- command-line numbers


@pytest.mark.parametrize("argv, problem", [
    (["synth", "--out", "x", "--seed", "-1"], "argument --seed: expected a non-negative integer"),
    (["folds", "--data", "x", "--seed", str(2**64)], "argument --seed: expected a seed in 0..4294967295"),
    (["synth", "--out", "x", "--n-train", str(10**9)], "argument --n-train: expected at most 100000 images"),
])
def test_command_line_seed_or_count_out_of_range_is_one_argparse_line(tmp_path, monkeypatch, capsys, argv, problem):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and problem in err, err
    assert list(tmp_path.iterdir()) == []


def test_library_seed_out_of_range_is_a_pipeline_error_naming_it(tmp_path):
    from pipeline.synth import generate

    assert_names(refusal(folds.make_folds, ["a", "b"], np.zeros((2, 101, 101), bool), 2, -1), "folds: seed", "-1")
    assert_names(refusal(generate, tmp_path / "s", 2, 1, -5), "synth: seed", "-5")


@pytest.mark.parametrize("device", ["gpu", "tpu", "cpu:x"])
def test_unknown_device_is_one_line_naming_it(device):
    from pipeline.runtime import resolve_runtime

    assert_names(refusal(resolve_runtime, "off", "off", device), f"device {device!r}", "expected cpu, cuda")


def test_damaged_log_csv_met_on_resume_names_the_file_and_line(tmp_path):
    from pipeline.rundir import read_log

    log = tmp_path / "log.csv"
    log.write_text("epoch,train_loss\n0,0.5\n1x,0.4\n")
    assert_names(refusal(read_log, log), str(log), "line 3 has epoch '1x'")
    log.write_bytes(b"epoch\n\xff\n")
    assert_names(refusal(read_log, log), str(log), "not UTF-8")
    assert read_log(tmp_path / "absent.csv") == []
