"""pipeline.geometry: 101 <-> model size by reflect-pad/crop or bilinear resize."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from pipeline.errors import PipelineError
from pipeline.geometry import pad_amounts, pad_or_resize, reflect_indices, restore, to_model_input


def random_images(n: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 101, 101), dtype=np.uint8)


def test_pad_to_128_puts_13_before_and_14_after():
    assert pad_amounts(101, 128) == (13, 14)
    padded = pad_or_resize(torch.zeros(1, 1, 101, 101), "pad", 128)
    assert padded.shape == (1, 1, 128, 128)


def test_pad_equals_torch_reflect_pad():
    x = torch.rand(2, 3, 101, 101)
    expected = F.pad(x, (13, 14, 13, 14), mode="reflect")
    assert torch.equal(pad_or_resize(x, "pad", 128), expected)


@pytest.mark.parametrize("length,before,after", [(101, 109, 110), (101, 77, 78), (3, 10, 7), (5, 0, 0)])
def test_reflect_indices_repeat_reflection_like_numpy_for_any_width(length, before, after):
    # numpy's reflect repeats the reflection when the pad is wider than the array
    expected = np.pad(np.arange(length), (before, after), mode="reflect")
    assert np.array_equal(reflect_indices(length, before, after), expected)


@pytest.mark.parametrize("size", [101, 128, 160, 256, 320])
def test_restore_undoes_pad_exactly(size):
    x = torch.rand(2, 1, 101, 101)
    padded = pad_or_resize(x, "pad", size)
    assert padded.shape == (2, 1, size, size)
    assert torch.equal(restore(padded, "pad"), x)


def test_pad_roundtrip_is_exact_on_real_images_and_masks(tgs_sample):
    from pipeline.data import read_image, read_mask

    paths = sorted((tgs_sample / "train" / "images").glob("*.png"))[:8]
    images = np.stack([read_image(p) for p in paths])
    masks = np.stack([read_mask(tgs_sample / "train" / "masks" / p.name) for p in paths])
    x = to_model_input(images, "pad", 128)
    assert torch.equal(restore(x, "pad")[:, 0], torch.from_numpy(images).float() / 255)
    target = pad_or_resize(torch.from_numpy(masks)[:, None].float(), "pad", 128)
    assert torch.equal(restore(target, "pad")[:, 0] > 0.5, torch.from_numpy(masks))


def test_pad_works_on_integer_and_bool_tensors():
    masks = torch.from_numpy(random_images() > 128)[:, None]
    assert torch.equal(restore(pad_or_resize(masks, "pad", 128), "pad"), masks)


def test_resize_gives_model_size_and_back_to_101():
    x = torch.rand(2, 1, 101, 101)
    resized = pad_or_resize(x, "resize", 128)
    assert resized.shape == (2, 1, 128, 128)
    assert restore(resized, "resize").shape == (2, 1, 101, 101)


def test_resize_roundtrip_keeps_a_constant_image():
    x = torch.full((1, 1, 101, 101), 0.3)
    assert torch.allclose(restore(pad_or_resize(x, "resize", 128), "resize"), x)


@pytest.mark.parametrize("mode", ["pad", "resize"])
def test_gradient_flows_through_pad_or_resize_and_restore(mode):
    x = torch.rand(1, 1, 101, 101, requires_grad=True)
    restore(pad_or_resize(x, mode, 128) * 2.0, mode).sum().backward()
    assert x.grad is not None and torch.all(torch.isfinite(x.grad))
    if mode == "pad":  # a crop of a pad: every original pixel is passed through once
        assert torch.equal(x.grad, torch.full_like(x, 2.0))
    else:
        assert float(x.grad.abs().sum()) > 0


def test_a_pad_first_made_under_inference_mode_still_trains():
    """predict (inference_mode) before training in one process -- a pseudo-label teacher, a
    validation first -- must not leave a cached inference tensor in the pad's gather index."""
    from pipeline.geometry import _reflect_index

    _reflect_index.cache_clear()
    with torch.inference_mode():
        pad_or_resize(torch.rand(1, 1, 101, 101), "pad", 128)
    x = torch.rand(1, 1, 101, 101, requires_grad=True)
    restore(pad_or_resize(x, "pad", 128), "pad").sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_to_model_input_scales_uint8_to_unit_range_with_a_channel_dim():
    images = random_images()
    images[0, 0, 0], images[0, 0, 1] = 0, 255
    x = to_model_input(images, "pad", 128)
    assert x.shape == (3, 1, 128, 128) and x.dtype == torch.float32
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert torch.equal(x, to_model_input(torch.from_numpy(images), "pad", 128))
    assert torch.equal(restore(x, "pad")[:, 0] * 255, torch.from_numpy(images).float())


def test_to_model_input_keeps_float_images_as_given():
    images = np.random.default_rng(1).random((2, 101, 101), dtype=np.float32)
    assert torch.equal(restore(to_model_input(images, "pad", 128), "pad")[:, 0], torch.from_numpy(images))


@pytest.mark.parametrize("call", [
    lambda: to_model_input(random_images(), "crop", 128),
    lambda: to_model_input(random_images().astype(np.int32), "pad", 128),
    lambda: to_model_input(random_images()[0], "pad", 128),
    lambda: pad_or_resize(torch.rand(1, 1, 101, 101), "pad", 96),
    lambda: restore(torch.rand(1, 1, 96, 96), "pad"),
])
def test_bad_mode_dtype_or_size_raise_one_line_pipeline_errors(call):
    with pytest.raises(PipelineError) as info:
        call()
    assert "\n" not in str(info.value)
