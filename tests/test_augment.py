"""Training augmentation: image and mask move together, masks stay binary, and a new option
at its neutral value draws exactly what the older runs drew (their digests leave it out)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from pipeline.augment import build_train_transform
from pipeline.config import AugmentConfig
from pipeline.data import load_train

ALL_OFF = dict(hflip=0.0, shift_scale=0.0, brightness_contrast=0.0)


def bar_image() -> tuple[np.ndarray, np.ndarray]:
    """A horizontal bed of 'salt' (1.0) across a 0.0 section; its mask is the bed itself."""
    image = np.zeros((101, 101), np.float32)
    image[40:60, :] = 1.0
    return image, (image > 0.5).astype(np.uint8)


def test_all_off_is_the_identity():
    cfg = AugmentConfig(**ALL_OFF)
    image, mask = bar_image()
    out = build_train_transform(cfg, seed=0)(image=image, mask=mask)
    np.testing.assert_array_equal(out["image"], image)
    np.testing.assert_array_equal(out["mask"], mask)


def test_rotation_tilts_image_and_mask_together():
    cfg = AugmentConfig(**{**ALL_OFF, "shift_scale": 1.0, "shift_limit": 0.0, "scale_limit": 0.0},
                        rotate_limit=30.0)
    image, mask = bar_image()
    transform = build_train_transform(cfg, seed=0)
    tilted = 0
    for _ in range(8):
        out = transform(image=image, mask=mask)
        assert set(np.unique(out["mask"])) <= {0, 1}  # nearest-neighbour for masks
        # the mask still marks the image's bright pixels (edges interpolate: allow 3%)
        assert np.mean((out["image"] > 0.5) == (out["mask"] == 1)) > 0.97
        # a level bed becomes a tilted one: its rows are no longer all-or-nothing
        rows = out["mask"].mean(axis=1)
        tilted += np.any((rows > 0.05) & (rows < 0.95))
    assert tilted >= 6  # angles near 0 are drawn too, rarely


def test_zero_rotation_draws_what_the_earlier_affine_drew():
    """Runs made before `rotate_limit` existed used an Affine with no rotate argument; the
    option at 0 must reproduce them bit for bit (rundir.NEUTRAL_DEFAULTS relies on it)."""
    import albumentations as A

    cfg = AugmentConfig(hflip=0.0, shift_scale=1.0, brightness_contrast=0.0)
    ours = build_train_transform(cfg, seed=3)
    earlier = A.Compose([A.Affine(scale=(0.9, 1.1), translate_percent=(-0.1, 0.1),
                                  border_mode=cv2.BORDER_REFLECT_101, p=1.0)], seed=3)
    rng = np.random.default_rng(0)
    for _ in range(5):
        image = rng.random((101, 101), dtype=np.float32)
        mask = (image > 0.7).astype(np.uint8)
        a, b = ours(image=image, mask=mask), earlier(image=image, mask=mask)
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["mask"], b["mask"])


def test_real_masks_stay_binary_and_aligned_under_the_strongest_augmentation(tgs_sample):
    train = load_train(tgs_sample)
    salty = [i for i in range(len(train.ids)) if 500 < train.masks[i].sum() < 9000][:20]
    assert len(salty) == 20
    cfg = AugmentConfig(hflip=0.5, shift_scale=1.0, shift_limit=0.1, scale_limit=0.2, rotate_limit=15.0,
                        brightness_contrast=1.0)
    transform = build_train_transform(cfg, seed=1)
    for i in salty:
        mask = train.masks[i].astype(np.uint8)
        out = transform(image=train.images[i], mask=mask)
        assert out["image"].shape == out["mask"].shape == (101, 101)
        assert set(np.unique(out["mask"])) <= {0, 1}
        # a real mask keeps most of its area (scale <= 1.2, reflect border, small tilt)
        assert 0.5 < out["mask"].sum() / mask.sum() < 2.0


@pytest.mark.parametrize("limit", [0.0, 10.0])
def test_rotation_option_keeps_identity_flag_honest(limit):
    # rotation lives inside the affine: with the affine off nothing moves whatever the limit
    image, mask = bar_image()
    transform = build_train_transform(AugmentConfig(**ALL_OFF, rotate_limit=limit), seed=0)
    for _ in range(4):
        out = transform(image=image, mask=mask)
        np.testing.assert_array_equal(out["image"], image)
        np.testing.assert_array_equal(out["mask"], mask)
