"""A synthetic seismic-like dataset in the exact TGS competition layout and formats.

It lets every command (folds, train, tune, predict, submit) run end to end without the
competition data, and gives tests a dataset whose masks are known. What it imitates,
measured on the real sample (../shared/tgs):

- layout: train/images, train/masks, test/images, train.csv, depths.csv, sample_submission.csv;
- formats: images are 101x101 RGB PNGs with three equal channels; empty masks are 8-bit
  gray PNGs of zeros, salt masks 16-bit gray PNGs of 0/65535; train.csv is id,rle_mask
  in a fixed shuffled order; sample_submission.csv has "1 1" for every test id;
- ids: 10 lowercase hex characters; depths z: integers 50..959 feet;
- content: 39% empty masks, 2% blank images (all zeros, empty mask), salt coverage
  skewed to small with a flat tail up to whole-image salt, and nearly every salt mask
  touching the image border (99.6% in the real sample);
- texture: layered reflectors (a Ricker-filtered reflectivity series plus a chirp,
  sampled along folded, dipping horizons) outside salt; weak chaotic texture inside
  salt (the real sample's vertical gradient is ~2.6x weaker in salt), joined by a soft,
  unevenly bright top-of-salt reflector, so the boundary is visible but imperfect.

Everything is drawn from one `numpy.random.Generator(seed)`: the same seed writes
byte-identical files. About 2 ms an image written, so 1000 train + 200 test take ~2.5 s.
"""

from __future__ import annotations

import os
import secrets
import shutil
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

import numpy as np

from pipeline.data import IMAGE_SIZE, image_png_bytes, mask_png_bytes
from pipeline.errors import PipelineError

EMPTY_FRACTION = 0.39
BLANK_FRACTION = 0.02
# What `generate` may find in an existing output folder and replace; anything else
# there means the folder is not a previous synthetic dataset, and is left alone.
DATASET_ENTRIES = ("train", "test", "train.csv", "depths.csv", "sample_submission.csv")

_COORDS = np.arange(IMAGE_SIZE, dtype=np.float64)


# ---------------------------------------------------------------- random fields


@lru_cache(maxsize=64)
def _bump_basis(scale: float) -> np.ndarray:
    """[101, n] Gaussian bumps `scale` px wide on a grid overhanging the image by 2 widths.

    basis @ W @ basis.T with W ~ N(0,1) is a smooth random field with correlation length
    ~scale; unlike FFT-filtered noise it does not wrap around the image edges.
    """
    step = max(scale / 1.5, 0.75)
    centres = np.arange(-2 * scale, IMAGE_SIZE + 2 * scale + step, step)
    return np.exp(-0.5 * ((_COORDS[:, None] - centres[None, :]) / scale) ** 2)


def smooth_field(rng: np.random.Generator, scale_y: float, scale_x: float | None = None) -> np.ndarray:
    """A zero-mean, unit-std random field [101,101] with correlation lengths (scale_y, scale_x) px."""
    basis_y = _bump_basis(round(float(scale_y), 1))
    basis_x = _bump_basis(round(float(scale_x if scale_x is not None else scale_y), 1))
    weights = rng.standard_normal((basis_y.shape[1], basis_x.shape[1]))
    field = basis_y @ weights @ basis_x.T
    return (field - field.mean()) / (field.std() + 1e-12)


def _ricker(wavelength: float) -> np.ndarray:
    """Ricker wavelet with its dominant period `wavelength` samples (the usual seismic source)."""
    half = int(np.ceil(1.5 * wavelength))
    t = np.arange(-half, half + 1) / wavelength
    arg = (np.pi * t) ** 2
    return (1 - 2 * arg) * np.exp(-arg)


# ---------------------------------------------------------------- one image


def _stratigraphy(rng: np.random.Generator) -> np.ndarray:
    """Layered reflectors along folded, dipping horizons, unit std."""
    yy, xx = np.meshgrid(_COORDS, _COORDS, indexing="ij")
    dip = rng.uniform(-0.5, 0.5) if rng.random() < 0.7 else rng.uniform(-1.5, 1.5)
    fold_amp, fold_len = rng.uniform(0, 14), rng.uniform(50, 260)
    horizon = (yy + dip * (xx - 50) + fold_amp * np.sin(2 * np.pi * xx / fold_len + rng.uniform(0, 2 * np.pi))
               + rng.uniform(0, 6) * smooth_field(rng, rng.uniform(20, 45)))
    start = int(np.floor(horizon.min())) - 2
    depth_axis = np.arange(start, int(np.ceil(horizon.max())) + 3, dtype=np.float64)
    # reflectivity: sparse spikes (layer boundaries) filtered by a source wavelet...
    spikes = rng.standard_normal(len(depth_axis)) * (rng.random(len(depth_axis)) < rng.uniform(0.08, 0.3))
    wavelength = rng.uniform(3.5, 9.0) if rng.random() < 0.75 else rng.uniform(9.0, 20.0)  # some zoomed in
    trace = np.convolve(spikes, _ricker(wavelength), mode="same")
    # ...plus a chirp, so layer spacing changes with depth as in compacted sediments
    f0, f1 = rng.uniform(0.04, 0.2), rng.uniform(0.04, 0.2)
    frequency = np.linspace(f0, f1, len(depth_axis))
    trace = trace / (trace.std() + 1e-12) + rng.uniform(0.2, 1.0) * np.sin(2 * np.pi * np.cumsum(frequency))
    layers = np.interp(horizon, depth_axis, trace)
    lateral_gain = 1 + 0.35 * smooth_field(rng, rng.uniform(15, 40))  # amplitude varies along a layer
    layers = layers * np.clip(lateral_gain, 0.2, None)
    return layers / (layers.std() + 1e-12)


def _salt_coverage(rng: np.random.Generator) -> float:
    # Real non-empty coverage: ~24% under 10%, then roughly flat to 100%.
    kind = rng.random()
    if kind < 0.25:
        return float(np.exp(rng.uniform(np.log(0.003), np.log(0.1))))
    if kind < 0.96:
        return float(rng.uniform(0.1, 0.97))
    return float(rng.uniform(0.97, 1.0001))  # some whole-image salt


def _salt_mask(rng: np.random.Generator) -> np.ndarray:
    """A smooth salt body: thresholded low-frequency noise, biased so it enters from an edge."""
    yy, xx = np.meshgrid(_COORDS, _COORDS, indexing="ij")
    field = smooth_field(rng, rng.uniform(10, 35))
    if rng.random() < 0.95:
        # a ramp from a random side (salt below a horizon, or a flank), so the body crosses
        # the border like ~all real masks; mostly from below, as salt rises from depth
        angle = rng.normal(np.pi / 2, 0.9) if rng.random() < 0.7 else rng.uniform(0, 2 * np.pi)
        ramp = ((xx - 50) * np.cos(angle) + (yy - 50) * np.sin(angle)) / 50
        field = field + rng.uniform(0.7, 3.0) * ramp
    else:  # an isolated diapir in the middle of the image
        cy, cx, radius = rng.uniform(20, 80), rng.uniform(20, 80), rng.uniform(15, 45)
        field = 0.6 * field - ((yy - cy) ** 2 + (xx - cx) ** 2) / radius**2
    coverage = _salt_coverage(rng)
    if coverage >= 1.0:
        return np.ones((IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
    mask = field > np.quantile(field, 1 - coverage)
    return mask if mask.any() else field == field.max()


def _soften(mask: np.ndarray, width: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(mask.astype(np.float64), width, mode="nearest")


def _render(rng: np.random.Generator, mask: np.ndarray) -> np.ndarray:
    """The uint8 seismic image for a salt `mask` (all False = sediments only)."""
    signal = _stratigraphy(rng)
    if mask.any():
        inside = _soften(mask, rng.uniform(0.6, 2.5))  # soft, imperfect boundary
        chaos = smooth_field(rng, rng.uniform(1.0, 2.5), rng.uniform(2.0, 6.0))
        salt = rng.uniform(0.15, 0.7) * chaos + rng.uniform(0.0, 0.3) * signal
        signal = (1 - inside) * signal + inside * salt
        # top-of-salt reflector: a bright/dark rim whose strength varies along the edge
        from scipy.ndimage import gaussian_gradient_magnitude

        rim = gaussian_gradient_magnitude(mask.astype(np.float64), rng.uniform(0.8, 1.8), mode="nearest")
        rim_gain = rng.choice([-1.0, 1.0]) * rng.uniform(0.0, 6.0)
        signal = signal + rim_gain * rim * np.clip(1 + 0.8 * smooth_field(rng, 12), 0, None)
    if rng.random() < 0.1:
        # a chaotic patch outside any salt (faults, gas): real sediments are not all clean layers
        patch = np.clip(smooth_field(rng, 20) - rng.uniform(0.0, 1.0), 0, 1) * ~mask
        signal = (1 - patch) * signal + patch * 0.5 * smooth_field(rng, rng.uniform(1.0, 2.5), rng.uniform(2.0, 6.0))
    signal = signal + rng.uniform(0.03, 0.3) * rng.standard_normal(signal.shape)
    depth_gain = 1 + rng.uniform(-0.4, 0.4) * (_COORDS[:, None] / 100 - 0.5)
    gray = rng.normal(122, 22) + rng.uniform(18, 50) * depth_gain * signal
    return np.clip(np.rint(gray), 0, 255).astype(np.uint8)


def synth_images(rng: np.random.Generator, count: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images [count,101,101] and bool masks: 39% empty, 2% blank (zeros, empty mask)."""
    n_empty = int(round(EMPTY_FRACTION * count))
    n_blank = min(n_empty, int(round(BLANK_FRACTION * count)))
    order = rng.permutation(count)
    blank, empty = set(order[:n_blank].tolist()), set(order[:n_empty].tolist())
    images = np.zeros((count, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    masks = np.zeros((count, IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
    for index in range(count):
        if index in blank:
            continue  # real blank images are all-zero with an empty mask
        if index not in empty:
            masks[index] = _salt_mask(rng)
        images[index] = _render(rng, masks[index])
    return images, masks


def random_ids(rng: np.random.Generator, count: int) -> list[str]:
    """`count` distinct 10-hex-character ids, like Kaggle's."""
    ids: list[str] = []
    seen: set[str] = set()
    while len(ids) < count:
        for value in rng.integers(0, 16**10, size=count - len(ids), dtype=np.int64).tolist():
            text = f"{value:010x}"
            if text not in seen:
                seen.add(text)
                ids.append(text)
    return ids


# ---------------------------------------------------------------- writing


def _check_output_folder(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise PipelineError(f"{out}: exists and is not a folder")
    if out.is_dir():
        foreign = sorted(set(os.listdir(out)) - set(DATASET_ENTRIES))
        if foreign:
            raise PipelineError(f"{out}: not empty and holds {foreign[0]!r}, which a synthetic dataset "
                                "does not; choose a new or empty folder")


def _write_dataset(folder: Path, n_train: int, n_test: int, seed: int) -> None:
    import pandas as pd

    from pipeline import fileio
    from pipeline.rle import encode_many, write_rle_csv

    rng = np.random.default_rng(seed)
    ids = random_ids(rng, n_train + n_test)
    train_ids, test_ids = ids[:n_train], ids[n_train:]
    train_images, train_masks = synth_images(rng, n_train)
    test_images, _ = synth_images(rng, n_test)
    depths = rng.integers(50, 960, size=len(ids))
    depth_order = rng.permutation(len(ids))  # the real depths.csv mixes train and test ids

    for sub in ("train/images", "train/masks", "test/images"):
        (folder / sub).mkdir(parents=True)
    # Plain writes: the whole folder is renamed into place at the end, which makes the
    # dataset appear complete or not at all (and skips thousands of per-file fsyncs).
    def write_train(index: int) -> None:
        image_id, mask = train_ids[index], train_masks[index]
        (folder / "train" / "images" / f"{image_id}.png").write_bytes(image_png_bytes(train_images[index]))
        # Kaggle's formats: 8-bit zeros when empty, 16-bit 0/65535 when there is salt
        (folder / "train" / "masks" / f"{image_id}.png").write_bytes(mask_png_bytes(mask, sixteen_bit=bool(mask.any())))

    def write_test(index: int) -> None:
        (folder / "test" / "images" / f"{test_ids[index]}.png").write_bytes(image_png_bytes(test_images[index]))

    # PNG deflate (~1.4 ms a noisy image) releases the GIL: threads halve the write time.
    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(write_train, range(n_train)))
        list(pool.map(write_test, range(n_test)))
    write_rle_csv(folder / "train.csv", train_ids, encode_many(train_masks))
    fileio.write_csv(folder / "depths.csv", pd.DataFrame({
        "id": [ids[i] for i in depth_order], "z": depths[depth_order]}))
    write_rle_csv(folder / "sample_submission.csv", test_ids, ["1 1"] * len(test_ids))


def generate(out_dir: str | os.PathLike, n_train: int = 800, n_test: int = 200, seed: int = 0) -> None:
    """Write a synthetic dataset to `out_dir` in the competition layout (see module docstring).

    The dataset is built in a hidden sibling folder and renamed into place, so `out_dir`
    never holds half a dataset. An existing `out_dir` is replaced only when it is empty or
    holds nothing but a previous dataset's entries.
    """
    if n_train < 1:
        raise PipelineError(f"synth: n_train must be at least 1, got {n_train}")
    if not 0 <= seed <= 2**32 - 1:  # numpy's own check is a ValueError traceback
        raise PipelineError(f"synth: seed must be in 0..{2**32 - 1}, got {seed}")
    if n_test < 0:
        raise PipelineError(f"synth: n_test must be 0 or more, got {n_test}")
    out = Path(os.path.abspath(out_dir))  # "." or "x/" still has a parent to stage beside
    _check_output_folder(out)
    staging = out.parent / f".{out.name}.synth-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        staging.mkdir(parents=True)
        _write_dataset(staging, n_train, n_test, seed)
        _check_output_folder(out)
        if out.is_dir():
            retired = out.parent / f".{out.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
            os.rename(out, retired)
            os.rename(staging, out)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.rename(staging, out)
    except OSError as exc:
        raise PipelineError(f"{out}: could not write the dataset ({exc.strerror or exc})") from exc
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
