"""`show` draws real PNGs of the designed size from a run dir."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from pipeline.errors import PipelineError
from pipeline.postprocess import PostProcess, read_tuned_or_default
from pipeline.show import grid_pixels, show_run
from tests.fake_run import make_fake_run


@pytest.fixture(scope="module")
def shown(synth_data, tmp_path_factory):
    run = make_fake_run(synth_data, tmp_path_factory.mktemp("show"))
    (run / "tune.json").write_text(json.dumps({"threshold": 0.2, "empty_threshold": 0.25, "min_area": 10,
                                               "empty_blank": False}))
    return run, show_run(run)


def png_size(path) -> tuple[int, int]:
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.load()  # a truncated file fails here
        return image.size


def test_show_writes_the_four_pictures_into_the_run(shown):
    run, paths = shown
    assert [p.name for p in paths] == ["oof_worst.png", "oof_by_class.png", "test_samples.png", "curves.png"]
    assert all(p.parent == run / "show" and p.stat().st_size > 5_000 for p in paths)


def test_pictures_have_the_designed_pixel_size(shown, synth_data):
    from pipeline.data import load_train
    from pipeline.folds import coverage_class

    _, paths = shown
    by_name = {p.name: p for p in paths}
    assert png_size(by_name["oof_worst.png"]) == grid_pixels(4, 4) == (800, 980)  # 16 worst, 4 per row
    assert png_size(by_name["test_samples.png"]) == (800, 980)
    assert png_size(by_name["curves.png"]) == (1200, 400)
    n_classes = len(np.unique(coverage_class(np.asarray(load_train(synth_data).masks, bool))))
    assert png_size(by_name["oof_by_class.png"]) == grid_pixels(n_classes, 4)


def test_worst_grid_is_not_a_blank_canvas(shown):
    _, paths = shown
    with Image.open(paths[0]) as image:
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.std() > 10
    red = (pixels[..., 0] > 200) & (pixels[..., 1] < 80) & (pixels[..., 2] < 80)
    green = (pixels[..., 1] > 200) & (pixels[..., 0] < 80) & (pixels[..., 2] < 80)
    assert red.sum() > 50 and green.sum() > 50  # prediction and truth outlines are drawn


def test_threshold_comes_from_tune_json_else_05(tmp_path):
    assert read_tuned_or_default(tmp_path) == PostProcess(0.5, 0, 0.5, False)
    # a tune.json from before the empty threshold: emptiness decided at the threshold
    (tmp_path / "tune.json").write_text(json.dumps({"threshold": 0.3, "min_area": 20, "empty_blank": True}))
    assert read_tuned_or_default(tmp_path) == PostProcess(0.3, 20, 0.3, True)
    (tmp_path / "tune.json").write_text(json.dumps({"threshold": 0.3, "empty_threshold": 0.8, "min_area": 20}))
    assert read_tuned_or_default(tmp_path) == PostProcess(0.3, 20, 0.8, False)


def test_show_on_an_empty_run_is_one_line_error(shown, tmp_path):
    run, _ = shown
    empty = tmp_path / "runs" / "empty"
    empty.mkdir(parents=True)
    shutil.copy(run / "config.yaml", empty / "config.yaml")
    with pytest.raises(PipelineError) as exc:
        show_run(empty)
    assert "\n" not in str(exc.value) and "nothing to show yet" in str(exc.value)


def test_cli_show_prints_the_paths(shown, capsys):
    from pipeline.cli import main

    run, _ = shown
    assert main(["show", "--run", str(run)]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(run / "show" / n) for n in ("oof_worst.png", "oof_by_class.png", "test_samples.png",
                                                        "curves.png")]
