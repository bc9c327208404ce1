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


PICTURES = ["oof_worst.png", "oof_by_class.png", "test_samples.png", "threshold.png", "curves.png"]


@pytest.mark.e2e
def test_show_writes_the_five_pictures_and_a_page_into_the_run(shown):
    run, paths = shown
    assert [p.name for p in paths] == PICTURES + ["index.html"]
    assert all(p.parent == run / "show" and p.stat().st_size > 4_000 for p in paths)


def test_pictures_have_the_designed_pixel_size(shown, synth_data):
    from pipeline.data import load_train
    from pipeline.folds import coverage_class

    _, paths = shown
    by_name = {p.name: p for p in paths}
    # 16 worst, 4 per row, each beside its probability map
    assert png_size(by_name["oof_worst.png"]) == grid_pixels(4, 8) == (1600, 980)
    assert png_size(by_name["test_samples.png"]) == (800, 980)
    assert png_size(by_name["curves.png"]) == (1500, 400)
    assert png_size(by_name["threshold.png"]) == (800, 400)
    n_classes = len(np.unique(coverage_class(np.asarray(load_train(synth_data).masks, bool))))
    assert png_size(by_name["oof_by_class.png"]) == grid_pixels(n_classes, 4)


def near(pixels: np.ndarray, rgb: tuple[int, int, int], tolerance: int = 30) -> np.ndarray:
    return (np.abs(pixels.astype(int) - np.array(rgb)) <= tolerance).all(axis=-1)


def test_worst_grid_fills_predictions_and_outlines_truth_in_a_colour_blind_safe_pair(shown):
    _, paths = shown
    with Image.open(paths[0]) as image:
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.std() > 10
    truth_yellow = near(pixels, (240, 228, 66))
    # a translucent sky-blue fill over grey: blue well above red, whatever the grey underneath
    tinted = (pixels[..., 2].astype(int) - pixels[..., 0] > 40) & (pixels[..., 1].astype(int) - pixels[..., 0] > 15)
    assert truth_yellow.sum() > 50 and tinted.sum() > 2000  # outlines drawn, predicted areas filled
    red = (pixels[..., 0] > 200) & (pixels[..., 1] < 80) & (pixels[..., 2] < 80)
    green = (pixels[..., 1] > 200) & (pixels[..., 0] < 80) & (pixels[..., 2] < 80)
    assert red.sum() == 0 and green.sum() == 0  # no red-green pair for deuteranopes to confuse
    # the second tile of each pair is a probability map: cividis' dark blue fills the low probabilities
    second_tile = pixels[:, 200:400]
    assert near(second_tile, (0, 34, 78), tolerance=25).mean() > 0.3


def test_a_full_predicted_mask_shows_as_a_tinted_tile_not_nothing(tmp_path):
    """`1 10201` (all salt) used to draw no outline at all: the tile looked empty."""
    from pipeline.show import _tile_grid

    grey = np.full((101, 101), 128, np.uint8)
    path = _tile_grid([{"image": grey, "pred": np.ones((101, 101), bool), "title": "full"},
                       {"image": grey, "pred": np.zeros((101, 101), bool), "title": "empty"}], 1, 2,
                      tmp_path / "grid.png")
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB")).astype(int)
    width = pixels.shape[1] // 2
    full, empty = pixels[60:180, 20:width - 20], pixels[60:180, width + 20:-20]
    assert (full[..., 2] - full[..., 0] > 40).mean() > 0.95  # the whole tile tinted blue
    assert (np.abs(empty - 128) <= 2).all(axis=-1).mean() > 0.95  # an empty prediction leaves the grey alone


def test_page_puts_the_tables_and_every_picture_on_one_page(shown):
    run, paths = shown
    page = (run / "show" / "index.html").read_text(encoding="utf-8")
    for name in PICTURES:
        assert f'<img src="{name}"' in page
    assert "Tuned on the out-of-fold predictions" in page and "threshold 0.2, empty threshold 0.25" in page
    assert "<h2>Folds</h2>" in page and page.count("<tr><td>") >= 3 + 4  # 3 folds + the summary rows
    assert "<h2>Config</h2>" in page and "name: fake" in page
    assert 'href="../log.txt"' in page


@pytest.mark.e2e
def test_threshold_curve_needs_tune_json_and_the_page_says_so(shown, tmp_path):
    run, _ = shown
    copy = tmp_path / "runs" / "untuned"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("show", "tune.json"))
    (copy / "config.yaml").write_text((copy / "config.yaml").read_text().replace("name: fake", "name: untuned"))
    names = [p.name for p in show_run(copy)]
    assert "threshold.png" not in names and names[-1] == "index.html"
    assert "Not tuned yet" in (copy / "show" / "index.html").read_text(encoding="utf-8")


@pytest.mark.e2e
def test_curves_draw_logs_written_before_the_lr_column(shown, tmp_path):
    run, _ = shown
    copy = tmp_path / "runs" / "old"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("show"))
    for log in copy.glob("fold*/log.csv"):
        lines = log.read_text().splitlines()
        log.write_text("\n".join(",".join(c for i, c in enumerate(line.split(",")) if i != 1) for line in lines))
    assert "curves.png" in [p.name for p in show_run(copy)]


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


@pytest.mark.e2e
def test_cli_show_prints_the_paths(shown, capsys):
    from pipeline.cli import main

    run, _ = shown
    assert main(["show", "--run", str(run)]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(run / "show" / n) for n in PICTURES + ["index.html"]]
