"""101x101 images <-> the square model input size, and back.

- "pad" (the winners' choice, +0.004 over resizing in reported ablations): reflect-pad
  101 -> size, extra pixel after (128: 13 before, 14 after on each axis). `restore` crops,
  so restore(pad_or_resize(x)) == x bit for bit and predictions are never interpolated.
- "resize": bilinear (align_corners=False) to size and bilinear back to 101.

`to_batch` is the one way a batch of images (and masks) becomes what a model sees, in
training, validation and prediction alike.

Reflection is done by gathering indices, which is the same as F.pad(mode="reflect")
(the edge pixel is not repeated) but also works for any dtype and for pads wider than
the image (the reflection repeats, e.g. 101 -> 320), where F.pad refuses.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import numpy as np

from pipeline.config import INPUT_MODES
from pipeline.errors import PipelineError

if TYPE_CHECKING:
    import torch

    from pipeline.config import Config
    from pipeline.runtime import Runtime

ORIGINAL_SIZE = 101


def pad_amounts(original: int, size: int) -> tuple[int, int]:
    """(before, after) padding of one axis; the odd pixel goes after."""
    total = size - original
    return total // 2, total - total // 2


def reflect_indices(length: int, before: int, after: int) -> np.ndarray:
    """Source index of every output position of a reflect pad (edge not repeated), any width."""
    positions = np.arange(-before, length + after)
    if length == 1:
        return np.zeros_like(positions)
    period = 2 * (length - 1)
    folded = np.mod(positions, period)
    return np.where(folded < length, folded, period - folded)


def _check_mode(mode: str) -> None:
    if mode not in INPUT_MODES:
        raise PipelineError(f"input.mode {mode!r}: choose one of {list(INPUT_MODES)}")


def pad_or_resize(x: "torch.Tensor", mode: str, size: int) -> "torch.Tensor":
    """[N,C,H,W] (H = W = 101 in this project) -> [N,C,size,size]."""
    from torch.nn import functional as F

    _check_mode(mode)
    if x.ndim != 4 or x.shape[-1] != x.shape[-2]:
        raise PipelineError(f"pad_or_resize: expected a square [N,C,H,W] tensor, got shape {tuple(x.shape)}")
    original = x.shape[-1]
    if mode == "resize":
        if not x.is_floating_point():
            raise PipelineError(f"pad_or_resize: resize needs a float tensor, got {x.dtype}")
        return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    if size < original:
        raise PipelineError(f"input.size {size}: cannot pad {original}x{original} images to a smaller size")
    index = _reflect_index(original, size, x.device)
    return x.index_select(-1, index).index_select(-2, index)


@functools.lru_cache(maxsize=32)
def _reflect_index(original: int, size: int, device: "torch.device") -> "torch.Tensor":
    """The pad's gather index, made once per (size, device): a fresh host-to-GPU copy of it per
    batch would be a synchronous copy from pageable memory, i.e. a host sync every step.
    Made outside inference mode even when first asked for by predict (under inference_mode): a
    cached inference tensor could never again be used by a training step's autograd."""
    import torch

    before, after = pad_amounts(original, size)
    with torch.inference_mode(False):
        return torch.from_numpy(reflect_indices(original, before, after)).to(device)


def restore(x: "torch.Tensor", mode: str, original: int = ORIGINAL_SIZE) -> "torch.Tensor":
    """[N,C,S,S] -> [N,C,original,original]: the crop undoing the pad, or a bilinear resize back."""
    from torch.nn import functional as F

    _check_mode(mode)
    size = x.shape[-1]
    if mode == "resize":
        return F.interpolate(x, size=(original, original), mode="bilinear", align_corners=False)
    if size < original or x.shape[-2] != size:
        raise PipelineError(f"restore: cannot crop a {tuple(x.shape[-2:])} tensor to {original}x{original}")
    before, _ = pad_amounts(original, size)
    return x[..., before:before + original, before:before + original]


def to_model_input(images, mode: str, size: int) -> "torch.Tensor":
    """uint8 [N,H,W] (numpy or torch) -> float32 [N,1,size,size] in [0,1].

    uint8 is divided by 255; float input is taken to be in [0,1] already.
    """
    import torch

    tensor = torch.as_tensor(images)
    if tensor.ndim != 3:
        raise PipelineError(f"to_model_input: expected images [N,H,W], got shape {tuple(tensor.shape)}")
    if tensor.dtype == torch.uint8:
        tensor = tensor.float().div_(255.0)
    elif tensor.is_floating_point():
        tensor = tensor.float()
    else:
        raise PipelineError(f"to_model_input: images must be uint8 or float, got {tensor.dtype}")
    return pad_or_resize(tensor[:, None], mode, size).contiguous()


def to_batch(images: "torch.Tensor", masks: "torch.Tensor | None", cfg: "Config", rt: "Runtime"):
    """uint8 [B,101,101] -> model input [B,C,S,S] on rt's device (and a binary target [B,1,S,S])."""
    import torch

    # The raw uint8 batch goes to the device first and is converted and padded there: on a GPU
    # that moves 6x fewer bytes (101x101 uint8 vs 128x128 float) and takes the conversion and
    # reflect pad off the training process's one core, which would otherwise cap the images per
    # second below what the GPU trains (measured: docs/benchmarks.md, "to_batch on the device").
    # On the CPU nothing changes.
    images = torch.as_tensor(images).to(rt.device, non_blocking=True)
    x = rt.to_input(to_model_input(images, cfg.input.mode, cfg.input.size))
    if cfg.model.in_chans > 1:
        x = x.expand(-1, cfg.model.in_chans, -1, -1).contiguous(memory_format=rt.memory_format())
    if masks is None:
        return x, None
    masks = torch.as_tensor(masks).to(rt.device, non_blocking=True)
    target = pad_or_resize(masks[:, None].float(), cfg.input.mode, cfg.input.size)
    return x, (target > 0.5).float()
