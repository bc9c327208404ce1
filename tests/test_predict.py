"""Test-time augmentation: flips are undone before averaging, at 101x101, in any batch split."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.config import Config
from pipeline.errors import PipelineError
from pipeline.predict import parse_tta, predict_probs
from pipeline.runtime import resolve_runtime
from tests.conftest import batched


class PixelModel(nn.Module):
    """A 1x1 conv: it commutes with every flip (flip-equivariant)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 1)
        with torch.no_grad():
            self.conv.weight.fill_(6.0)
            self.conv.bias.fill_(-3.0)

    def forward(self, x):
        return {"mask": self.conv(x)}


class LeftLeaningModel(nn.Module):
    """A lopsided 1x3 conv: shift-equivariant (as a UNet is) but NOT flip-equivariant, so hflip
    TTA must change its output, into exactly the mean of the model and its mirror image.
    (A model that depends on absolute position would not do: 101 -> 128 pads 13 columns
    before and 14 after, so a flip moves the image by one column inside the padded frame.)"""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, (1, 3), padding=(0, 1))
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([3.0, 1.0, -2.0]).view(1, 1, 1, 3))
            self.conv.bias.fill_(-1.0)

    def forward(self, x):
        return {"mask": self.conv(x)}


@pytest.fixture
def cfg() -> Config:
    cfg = Config()
    cfg.input.mode, cfg.input.size = "pad", 128
    return cfg


@pytest.fixture
def images() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (7, 101, 101), dtype=np.uint8)


FP32 = dict(precision="off", channels_last="off", device="cpu")


@pytest.mark.parametrize("tta", [["none", "hflip"], ["none", "hflip", "vflip", "hvflip"]])
def test_tta_of_a_flip_equivariant_model_equals_the_plain_prediction(cfg, images, tta):
    rt = resolve_runtime(**FP32)
    model = PixelModel()
    plain = predict_probs(model, images, batched(cfg, 4), rt)
    with_tta = predict_probs(model, images, batched(cfg, 4), rt, tta=tta)
    assert plain.shape == (7, 101, 101)
    np.testing.assert_allclose(with_tta, plain, atol=1e-6)


def test_hflip_tta_averages_the_model_with_its_mirror_image(cfg, images):
    """Each flipped prediction is flipped back before averaging: the result is the mean of
    sigmoid(model(x)) and mirror(sigmoid(model(mirror(x))))."""
    rt = resolve_runtime(**FP32)
    model = LeftLeaningModel()
    plain = predict_probs(model, images, batched(cfg, 3), rt)
    mirrored = predict_probs(model, images[:, :, ::-1].copy(), batched(cfg, 3), rt)[:, :, ::-1]
    with_tta = predict_probs(model, images, batched(cfg, 3), rt, tta=["none", "hflip"])
    assert not np.allclose(plain, with_tta, atol=1e-3)  # the model is not equivariant
    np.testing.assert_allclose(with_tta, (plain + mirrored) / 2, atol=1e-6)


def test_batch_size_does_not_change_the_prediction(cfg, images):
    rt = resolve_runtime(**FP32)
    model = LeftLeaningModel()
    one = predict_probs(model, images, batched(cfg, 1), rt, tta=["none", "hflip"])
    all_at_once = predict_probs(model, images, batched(cfg, 64), rt, tta=["none", "hflip"])
    np.testing.assert_allclose(one, all_at_once, atol=1e-6)


def test_resize_mode_tta_is_undone_at_101(images):
    cfg = Config()
    cfg.input.mode, cfg.input.size = "resize", 128
    rt = resolve_runtime(**FP32)
    probs = predict_probs(PixelModel(), images, batched(cfg, 4), rt, tta=["none", "hflip"])
    plain = predict_probs(PixelModel(), images, batched(cfg, 4), rt)
    assert probs.shape == (7, 101, 101)
    np.testing.assert_allclose(probs, plain, atol=1e-5)


def test_parse_tta_takes_a_comma_list_and_refuses_unknown_flips():
    assert parse_tta(None, ["none", "hflip"]) == ["none", "hflip"]
    assert parse_tta("none, vflip", ["none"]) == ["none", "vflip"]
    with pytest.raises(PipelineError, match="--tta 'rotate'"):
        parse_tta("rotate", ["none"])
    with pytest.raises(PipelineError):
        parse_tta(" , ", ["none"])


@pytest.mark.parametrize("mode, size, in_chans", [("pad", 128, 1), ("pad", 112, 3), ("resize", 128, 1)])
def test_to_batch_copies_the_uint8_batch_then_converts_and_pads_on_the_device(monkeypatch, mode, size, in_chans):
    from pipeline.geometry import pad_or_resize, to_model_input
    from pipeline.geometry import to_batch

    cfg = Config()
    cfg.input.mode, cfg.input.size, cfg.model.in_chans = mode, size, in_chans
    rt = resolve_runtime("off", "on", "cpu", 1)
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (3, 101, 101), dtype=np.uint8))
    masks = torch.from_numpy((rng.random((3, 101, 101)) > 0.6).astype(np.uint8))
    # as it was done before: convert and pad on the host, then copy the float32 batch
    host_x = to_model_input(images, mode, size).expand(-1, in_chans, -1, -1)
    host_target = (pad_or_resize(masks[:, None].float(), mode, size) > 0.5).float()

    copied = []
    original_to = torch.Tensor.to

    def recording_to(self, *args, **kwargs):
        copied.append(self.dtype)
        return original_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", recording_to)
    x, target = to_batch(images, masks, cfg, rt)
    monkeypatch.undo()
    # what crosses to the device is uint8, 1 byte a pixel (a later .to of the float batch is a no-op)
    assert copied[0] == torch.uint8 and copied.count(torch.uint8) == 2
    assert torch.equal(x, host_x) and torch.equal(target, host_target)
    assert x.is_contiguous(memory_format=torch.channels_last) and x.shape == (3, in_chans, size, size)


class CountingBar:
    def __init__(self):
        self.updates: list[int] = []

    def update(self, n: int) -> None:
        self.updates.append(n)


def test_progress_moves_every_batch_and_counts_each_tta_pass(cfg, images):
    """The bar moved only when a fold ended (0/36000 for ten minutes on 18,000 images)."""
    bar = CountingBar()
    predict_probs(PixelModel(), images, batched(cfg, 3), resolve_runtime(**FP32), tta=["none", "hflip"], bar=bar)
    assert sum(bar.updates) == len(images) * 2 and len(bar.updates) == 6  # 3 batches x 2 flips


def test_accumulating_into_a_buffer_adds_the_weighted_prediction_in_place(cfg, images):
    rt = resolve_runtime(**FP32)
    plain = predict_probs(LeftLeaningModel(), images, batched(cfg, 3), rt, tta=["none", "hflip"])
    buffer = np.full(images.shape, 0.25, np.float32)
    returned = predict_probs(LeftLeaningModel(), images, batched(cfg, 3), rt, tta=["none", "hflip"],
                             out=buffer, weight=0.5)
    assert returned is buffer
    np.testing.assert_allclose(buffer, 0.25 + 0.5 * plain, atol=1e-6)


def _predictable_run(tmp_path, n_images: int, n_folds: int):
    """A run of `n_folds` finished folds whose models are PixelModels, and n_images test PNGs."""
    from pipeline.config import save_config
    from pipeline.data import write_image_png

    root = tmp_path / "data"
    rng = np.random.default_rng(0)
    for i in range(n_images):
        write_image_png(root / "test" / "images" / f"t{i:05d}.png", rng.integers(0, 256, (101, 101), np.uint8))
    (root / "train").mkdir()
    cfg = Config(name="mem", data=str(root), runs_dir=str(tmp_path / "runs"), n_folds=n_folds)
    cfg.input.mode, cfg.input.size = "pad", 112
    cfg.train.precision, cfg.train.channels_last = "off", "off"  # as FP32, whatever the CPU
    save_config(cfg, cfg.run_dir / "config.yaml")
    for fold in range(n_folds):
        (cfg.run_dir / f"fold{fold}").mkdir()
        (cfg.run_dir / f"fold{fold}" / "best.pt").write_bytes(b"")
    return cfg


def test_predict_holds_one_buffer_not_a_copy_per_fold(tmp_path, monkeypatch):
    """predict peaked at 3.07 GB on 18,000 images: the run's total, the fold's total and the
    model's result (float32, 734 MB each) at once, and total / folds again. Now every fold adds
    into one float16 buffer a piece at a time: numpy's allocations (the images, the buffer, a batch's temporaries)
    peak below 1.5 float32 copies of the test set, where they held three at once."""
    import tracemalloc

    from pipeline import predict
    from pipeline.submit import read_test_probs

    n, folds = 600, 3
    cfg = _predictable_run(tmp_path, n, folds)
    monkeypatch.setattr(predict, "finished_inputs", lambda cfg, run: {})
    monkeypatch.setattr(predict, "load_fold_models", lambda cfg, fold, rt: [PixelModel()])
    monkeypatch.setattr(predict, "PIECE_BATCHES", 2)  # pieces of 128 of 600 images, as 1,024 of 18,000 are
    rt = resolve_runtime(**FP32)
    from pipeline.data import load_test

    expected = predict_probs(PixelModel(), load_test(cfg.data).images, batched(cfg, 64), rt, cfg.predict.tta)
    one_float32_copy = n * 101 * 101 * 4
    tracemalloc.start()
    try:
        predict.predict_run(cfg.run_dir, device="cpu")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1.5 * one_float32_copy, f"numpy peaked at {peak / 2**20:.1f} MiB, one float32 copy is " \
                                    f"{one_float32_copy / 2**20:.1f} MiB"
    ids, probs = read_test_probs(cfg.run_dir)
    assert len(ids) == n and probs.dtype == np.float16
    # three identical folds: their mean is the one model's prediction, within float16 rounding
    np.testing.assert_allclose(probs.astype(np.float32), expected, atol=1e-3)


def test_predict_notes_once_test_images_whose_ids_are_train_ids(tmp_path, monkeypatch, capsys):
    import shutil

    from pipeline import predict
    from pipeline.data import ids_also_in_train

    cfg = _predictable_run(tmp_path, 6, 2)
    monkeypatch.setattr(predict, "finished_inputs", lambda cfg, run: {})
    monkeypatch.setattr(predict, "load_fold_models", lambda cfg, fold, rt: [PixelModel()])
    data = tmp_path / "data"
    assert ids_also_in_train(data, ["t00000"]) == []  # train/ has no images folder
    predict.predict_run(cfg.run_dir, device="cpu")
    assert "note:" not in capsys.readouterr().err

    (data / "train" / "images").mkdir()
    for image_id in ("t00003", "t00001", "other"):
        source = data / "test" / "images" / ("t00000.png" if image_id == "other" else f"{image_id}.png")
        shutil.copy(source, data / "train" / "images" / f"{image_id}.png")
    predict.predict_run(cfg.run_dir, device="cpu")
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert notes == [f"note: 2 of the 6 test images in {data / 'test' / 'images'} have an id also in "
                     f"{data / 'train' / 'images'} (e.g. t00001)"]
