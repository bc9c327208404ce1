"""Training augmentation (albumentations), kept small and seismic-safe.

Only transforms that keep a seismic section plausible: horizontal flip (geology has no
left/right preference; a vertical flip would put deep beds on top), a small shift/scale
(and, when asked, a small rotation),
and mild brightness/contrast. Applied at 101x101 before padding, so reflect padding
sees the augmented image, as at test time.
"""

from __future__ import annotations

import os

from pipeline.config import AugmentConfig

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def build_train_transform(cfg: AugmentConfig, seed: int):
    """An albumentations Compose with its own RNG (global seeds never reach it)."""
    import albumentations as A
    import cv2

    # OpenCV's own thread pool fights torch for the 2 cores and can hang in workers.
    cv2.setNumThreads(0)
    transforms = []
    if cfg.hflip > 0:
        transforms.append(A.HorizontalFlip(p=cfg.hflip))
    if cfg.shift_scale > 0:
        transforms.append(
            A.Affine(
                scale=(1 - cfg.scale_limit, 1 + cfg.scale_limit),
                translate_percent=(-cfg.shift_limit, cfg.shift_limit),
                rotate=(-cfg.rotate_limit, cfg.rotate_limit),
                # albumentations 2 defaults to BORDER_CONSTANT (black bands the test set never has)
                border_mode=cv2.BORDER_REFLECT_101,
                p=cfg.shift_scale,
            )
        )
    if cfg.brightness_contrast > 0:
        transforms.append(
            A.RandomBrightnessContrast(
                brightness_limit=cfg.brightness_limit,
                contrast_limit=cfg.contrast_limit,
                p=cfg.brightness_contrast,
            )
        )
    return A.Compose(transforms, seed=seed)
