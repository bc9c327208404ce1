"""Reading and writing the competition's images, masks and depths.

The Kaggle layout (what `python -m pipeline kaggle download` unpacks and `synth` writes):

    <data>/train/images/<id>.png   101x101 seismic image, RGB with three equal channels
    <data>/train/masks/<id>.png    its salt mask: 8-bit zeros when empty, 16-bit 0/65535 otherwise
    <data>/train.csv               id,rle_mask (the same masks, run-length encoded)
    <data>/depths.csv              id,z for train and test ids (optional here)
    <data>/test/images/<id>.png    test images

Images come back as uint8 [N,101,101] (one channel), masks as bool [N,101,101] where any
non-zero pixel is salt: the real masks are 16-bit 0/65535, so dividing by 255 would be
wrong. Every unreadable or malformed file raises a one-line `PipelineError` naming it.
"""

from __future__ import annotations

import hashlib
import io
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline import fileio
from pipeline.errors import PipelineError, one_line

IMAGE_SIZE = 101
# Decoding a 101x101 PNG is ~100 us of mostly Python-side Pillow work; a few threads
# overlap the zlib part (which releases the GIL) with the rest. Measured on the 3001-image
# sample: ~0.75 s serial, ~0.6 s with 4 threads for images + masks on 2 busy cores.
_READ_THREADS = 4
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# A 101x101 PNG is at most ~82 KB even as 16-bit RGBA stored uncompressed; a few MB leaves room for
# metadata while a huge or endless file (a device, a wrongly named video) is refused unread.
MAX_PNG_BYTES = 4 << 20


@dataclass
class TrainSet:
    ids: list[str]
    images: np.ndarray  # uint8 [N,101,101]
    masks: np.ndarray  # bool [N,101,101]
    depths: np.ndarray  # float32 [N], nan where depths.csv has no row

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class TestSet:
    ids: list[str]
    images: np.ndarray  # uint8 [N,101,101]
    depths: np.ndarray  # float32 [N]

    def __len__(self) -> int:
        return len(self.ids)


# ---------------------------------------------------------------- single files


def png_damage(raw: bytes) -> str:
    """What is broken in the chunks of a file that starts like a PNG ("" when every chunk up
    to IEND is complete and matches its CRC).

    Pillow checks no CRC of the pixel data (IDAT) and stops inflating once it has every row,
    so without this a flipped bit in a mask file decodes silently to other pixels (a third
    of single-bit flips in the real masks did).
    """
    view = memoryview(raw)
    position = len(PNG_SIGNATURE)
    while True:
        if position + 12 > len(raw):
            return "truncated file: it ends before the IEND chunk"
        length = int.from_bytes(view[position:position + 4], "big")
        kind = bytes(view[position + 4:position + 8])
        name = kind.decode("latin-1") if kind.isalpha() else "a"
        end = position + 12 + length
        if end > len(raw):
            return f"truncated file: it ends inside {name} chunk"
        if zlib.crc32(view[position + 4:end - 4]) != int.from_bytes(view[end - 4:end], "big"):
            return f"damaged file: {name} chunk at byte {position} fails its CRC check"
        if kind == b"IEND":
            return ""
        position = end


def _open_png(path: str | os.PathLike) -> Image.Image:
    """The decoded PNG at `path`, checked to be whole (chunk CRCs) and 101x101."""
    try:
        with open(path, "rb") as handle:
            raw = fileio.read_at_most(handle, MAX_PNG_BYTES)
    except FileNotFoundError:
        raise PipelineError(f"{path}: not a readable PNG (file not found)") from None
    except IsADirectoryError:
        raise PipelineError(f"{path}: not a readable PNG (it is a folder)") from None
    except OSError as exc:  # permissions, I/O errors: the strerror says it without repeating the path
        raise PipelineError(f"{path}: not a readable PNG ({exc.strerror or one_line(exc)})") from None
    if len(raw) > MAX_PNG_BYTES:
        raise PipelineError(f"{path}: over {MAX_PNG_BYTES >> 20} MiB, far too large for a 101x101 PNG")
    if raw.startswith(PNG_SIGNATURE):
        damage = png_damage(raw)
        if damage:
            raise PipelineError(f"{path}: not a readable PNG ({damage})")
    try:
        image = Image.open(io.BytesIO(raw))
    except UnidentifiedImageError:
        raise PipelineError(f"{path}: not a readable PNG ({'empty file' if not raw else 'not an image file'})") from None
    except Exception as exc:  # Pillow raises many types for garbage bytes
        raise PipelineError(f"{path}: not a readable PNG ({one_line(exc)})") from None
    try:
        if image.format != "PNG":
            raise PipelineError(f"{path}: not a readable PNG (it is a {image.format} file)")
        width, height = image.size
        if (width, height) != (IMAGE_SIZE, IMAGE_SIZE):
            raise PipelineError(f"{path}: image is {width}x{height}, expected {IMAGE_SIZE}x{IMAGE_SIZE}")
        image.load()  # truncated or corrupt pixel data only shows up here
    except PipelineError:
        image.close()
        raise
    except Exception as exc:
        image.close()
        raise PipelineError(f"{path}: not a readable PNG ({one_line(exc)})") from None
    return image


def _pixel_planes(image: Image.Image) -> np.ndarray:
    """Pixels as [H,W] or [H,W,C] without alpha, in the file's own integer range."""
    if image.mode in ("P", "PA"):
        image = image.convert("RGBA")
    elif image.mode == "1":
        image = image.convert("L")
    pixels = np.asarray(image)
    if image.mode in ("LA", "RGBA", "La", "RGBa"):
        pixels = pixels[..., :-1]
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[..., 0]
    return pixels


def read_image(path: str | os.PathLike) -> np.ndarray:
    """A 101x101 image as uint8. Colour images give their first channel (the TGS images
    store the same gray value in all three); 16-bit images are scaled to 0..255."""
    with _open_png(path) as image:
        pixels = _pixel_planes(image)
    if pixels.ndim == 3:
        pixels = pixels[..., 0]
    if pixels.dtype == np.uint8:
        return np.ascontiguousarray(pixels)
    # 16-bit PNGs (I;16 / I): 65535 -> 255, rounded, so 257*v maps back to v exactly.
    wide = np.clip(pixels.astype(np.int64), 0, 65535)
    return ((wide * 255 + 32767) // 65535).astype(np.uint8)


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """A 101x101 mask as bool: any non-zero value (255 or 65535 alike) is salt."""
    with _open_png(path) as image:
        pixels = _pixel_planes(image)
    if pixels.ndim == 3:
        return np.any(pixels != 0, axis=2)
    return pixels != 0


def png_bytes(pixels: np.ndarray) -> bytes:
    """PNG encoding of uint8 [H,W] (8-bit gray), uint8 [H,W,3] (RGB) or uint16 [H,W] (16-bit gray)."""
    if pixels.dtype == np.uint16 and pixels.ndim == 2:
        image = Image.fromarray(np.ascontiguousarray(pixels, dtype="<u2"))  # -> mode I;16
    elif pixels.dtype == np.uint8 and (pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[2] == 3)):
        image = Image.fromarray(np.ascontiguousarray(pixels))
    else:
        raise ValueError(f"cannot encode a {pixels.dtype} array of shape {pixels.shape} as PNG")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def image_png_bytes(image: np.ndarray) -> bytes:
    """A uint8 [H,W] image in the competition's format: RGB with three equal channels."""
    if image.dtype != np.uint8 or image.ndim != 2:
        raise ValueError(f"expected a uint8 [H,W] image, got {image.dtype} {image.shape}")
    return png_bytes(np.repeat(image[:, :, None], 3, axis=2))


def mask_png_bytes(mask: np.ndarray, *, sixteen_bit: bool = False) -> bytes:
    """A mask as 8-bit 0/255 gray PNG, or (sixteen_bit, Kaggle's salt masks) 16-bit 0/65535."""
    if mask.ndim != 2:
        raise ValueError(f"expected a [H,W] mask, got shape {mask.shape}")
    salt = np.asarray(mask) != 0
    if sixteen_bit:
        return png_bytes(salt.astype(np.uint16) * np.uint16(65535))
    return png_bytes(salt.astype(np.uint8) * np.uint8(255))


def write_image_png(path: str | os.PathLike, image: np.ndarray) -> None:
    """Atomically write a uint8 [H,W] image as RGB with three equal channels (Kaggle's format)."""
    fileio.write_bytes(path, image_png_bytes(image))


def write_mask_png(path: str | os.PathLike, mask: np.ndarray, *, sixteen_bit: bool = False) -> None:
    """Atomically write a mask as an 8-bit 0/255 gray PNG (viewable; read_mask reads it back)."""
    fileio.write_bytes(path, mask_png_bytes(mask, sixteen_bit=sixteen_bit))


# ---------------------------------------------------------------- folders


def list_image_ids(folder: str | os.PathLike) -> list[str]:
    """Sorted stems of the `<id>.png` files in `folder` (hidden files and sub-folders skipped).

    The one rule for names, in every scan (train images, masks, test images): a file there is
    read only as `<id>.png` with that lowercase extension, and any other visible file (`X.PNG`,
    `X.jpg`, `notes.txt`) is refused naming it, rather than dropped: a dropped test image is a
    missing submission row."""
    try:
        with os.scandir(folder) as entries:
            names = [entry.name for entry in entries
                     if not entry.name.startswith(".") and _is_png_file(folder, entry)]
    except FileNotFoundError:
        raise PipelineError(f"{folder}: folder not found") from None
    except NotADirectoryError:
        raise PipelineError(f"{folder}: not a folder") from None
    except OSError as exc:  # permissions, a symbolic link loop as the folder itself, I/O errors
        raise PipelineError(f"{folder}: cannot list the folder ({exc.strerror or one_line(exc)})") from None
    others = sorted(name for name in names if not name.endswith(".png") or name == ".png")
    if others:
        raise PipelineError(f"{Path(folder) / others[0]}: not named <id>.png ({len(others)} such file(s) here); "
                            "images and masks are read only as <id>.png with a lowercase extension: "
                            "rename or move them out")
    ids = sorted(name[:-4] for name in names)
    spaced = [image_id for image_id in ids if has_whitespace(image_id)]
    if spaced:  # test_ids.txt and oof_ids.txt hold ids split on whitespace: "a b" would become two
        raise PipelineError(f"{Path(folder) / (spaced[0] + '.png')}: id {spaced[0]!r} holds whitespace "
                            f"({len(spaced)} such file(s)); rename them")
    return ids


def has_whitespace(image_id: str) -> bool:
    return any(char.isspace() for char in image_id)


def _is_png_file(folder: str | os.PathLike, entry: os.DirEntry) -> bool:
    """Whether an entry is a file to read (sub-folders are skipped); a link that leads
    nowhere (dangling, or a loop) is refused, naming it, rather than dropped from the data."""
    path = Path(folder) / entry.name
    try:
        if entry.is_file():
            return True
        if entry.is_symlink():
            raise PipelineError(f"{path}: broken symbolic link (its target does not exist)")
        return False
    except OSError as exc:
        raise PipelineError(f"{path}: cannot read ({exc.strerror or one_line(exc)})") from None


def _read_many(reader: Callable[[Path], np.ndarray], paths: Sequence[Path], dtype) -> np.ndarray:
    stack = np.empty((len(paths), IMAGE_SIZE, IMAGE_SIZE), dtype=dtype)
    if len(paths) < 64:
        for index, path in enumerate(paths):
            stack[index] = reader(path)
        return stack
    with ThreadPoolExecutor(max_workers=_READ_THREADS) as pool:
        # map yields in order, so the first bad file in id order is the one reported
        for index, pixels in enumerate(pool.map(reader, paths, chunksize=32)):
            stack[index] = pixels
    return stack


def read_images(paths: Sequence[str | os.PathLike]) -> np.ndarray:
    """uint8 [N,101,101] from N image PNGs (decoded on a few threads)."""
    return _read_many(read_image, [Path(p) for p in paths], np.uint8)


def read_masks(paths: Sequence[str | os.PathLike]) -> np.ndarray:
    """bool [N,101,101] from N mask PNGs."""
    return _read_many(read_mask, [Path(p) for p in paths], bool)


def _resolve_ids(images_dir: Path, ids: Sequence[str] | None) -> list[str]:
    available = list_image_ids(images_dir)
    if ids is None:
        if not available:
            raise PipelineError(f"{images_dir}: no .png images")
        return available
    chosen = [str(i) for i in ids]
    if len(set(chosen)) != len(chosen):
        repeated = next(i for i in chosen if chosen.count(i) > 1)
        raise PipelineError(f"{images_dir}: id {repeated} was asked for more than once")
    missing = sorted(set(chosen) - set(available))
    if missing:
        raise PipelineError(f"{images_dir / (missing[0] + '.png')}: no image for id {missing[0]}"
                            + (f" ({len(missing) - 1} more ids have none)" if len(missing) > 1 else ""))
    return chosen


def _check_train_csv_has_images(csv_path: Path, image_ids: set[str]) -> None:
    from pipeline.rle import read_rle_csv

    listed = read_rle_csv(csv_path)["id"].tolist()
    missing = [i for i in listed if i not in image_ids]
    if missing:
        raise PipelineError(f"{csv_path}: id {missing[0]} has no image train/images/{missing[0]}.png"
                            + (f" ({len(missing) - 1} more ids have none)" if len(missing) > 1 else ""))


def _masks_from_train_csv(csv_path: Path, ids: list[str]) -> np.ndarray:
    from pipeline.rle import decode_many, read_rle_csv

    table = read_rle_csv(csv_path).set_index("id")["rle_mask"]
    missing = [i for i in ids if i not in table.index]
    if missing:
        raise PipelineError(f"{csv_path}: no row for image {missing[0]} (and no train/masks folder)"
                            + (f" ({len(missing) - 1} more ids missing)" if len(missing) > 1 else ""))
    return decode_many(table.loc[ids].tolist(), shape=(IMAGE_SIZE, IMAGE_SIZE), ids=ids, where=str(csv_path))


def load_train(data_dir: str | os.PathLike, ids: Sequence[str] | None = None) -> TrainSet:
    """The train images, masks and depths (ids sorted unless given).

    Masks come from train/masks/<id>.png, which every image must have; when the whole
    train/masks folder is absent they are decoded from train.csv instead. When train.csv
    exists, every id in it must have an image (a partial unzip shows up here, not in training).
    """
    data = Path(data_dir)
    images_dir, masks_dir, csv_path = data / "train" / "images", data / "train" / "masks", data / "train.csv"
    ids = _resolve_ids(images_dir, ids)
    if csv_path.exists():
        _check_train_csv_has_images(csv_path, set(list_image_ids(images_dir)))
    images = read_images([images_dir / f"{i}.png" for i in ids])
    if masks_dir.is_dir() or _exists_but_not_folder(masks_dir):
        mask_ids = set(list_image_ids(masks_dir))  # a file there: "not a folder", not a silent fallback
        missing = [i for i in ids if i not in mask_ids]
        if missing:
            raise PipelineError(f"{masks_dir / (missing[0] + '.png')}: missing mask for image {missing[0]}"
                                + (f" ({len(missing) - 1} more images have no mask)" if len(missing) > 1 else ""))
        masks = read_masks([masks_dir / f"{i}.png" for i in ids])
    elif csv_path.exists():
        masks = _masks_from_train_csv(csv_path, ids)
    else:
        raise PipelineError(f"{masks_dir}: folder not found (and no {csv_path.name} to decode masks from)")
    return TrainSet(ids=ids, images=images, masks=masks, depths=depths_for(data / "depths.csv", ids))


def masks_differing_from_train_csv(data_dir: str | os.PathLike, train: TrainSet) -> tuple[list[str], int]:
    """(the ids whose train/masks PNG differs from train.csv's rle_mask, how many ids both hold), for
    `train` as load_train read it from `data_dir`; ([], 0) when its masks came from train.csv or
    there is none. The PNGs are what training uses; this only says whether train.csv agrees.

    Cheap: the masks are RLE-encoded and compared as text (0.06 s for the 3,001-image sample, see
    docs/gpu-and-robustness.md); only a row whose text differs is decoded, so an equal mask written
    with other spacing or a malformed row (which counts as differing) costs one decode."""
    from pipeline.rle import decode, encode_many, read_rle_csv

    data = Path(data_dir)
    csv_path = data / "train.csv"
    if not (data / "train" / "masks").is_dir() or not csv_path.is_file():
        return [], 0
    table = read_rle_csv(csv_path)
    by_id = dict(zip(table["id"].tolist(), table["rle_mask"].tolist()))
    differing, compared = [], 0
    for index, (image_id, encoded) in enumerate(zip(train.ids, encode_many(train.masks))):
        listed = by_id.get(image_id)
        if listed is None:
            continue
        compared += 1
        if " ".join(listed.split()) == encoded:
            continue
        try:
            same = np.array_equal(decode(listed, (IMAGE_SIZE, IMAGE_SIZE), where=str(csv_path)), train.masks[index])
        except PipelineError:
            same = False
        if not same:
            differing.append(image_id)
    return differing, compared


def _exists_but_not_folder(path: Path) -> bool:
    return os.path.lexists(path) and not path.is_dir()


def load_test(data_dir: str | os.PathLike) -> TestSet:
    """The test images (ids = sorted stems of test/images/*.png) and their depths."""
    data = Path(data_dir)
    images_dir = data / "test" / "images"
    ids = _resolve_ids(images_dir, None)
    images = read_images([images_dir / f"{i}.png" for i in ids])
    return TestSet(ids=ids, images=images, depths=depths_for(data / "depths.csv", ids))


def ids_also_in_train(data_dir: str | os.PathLike, test_ids: Sequence[str]) -> list[str]:
    """The sorted `test_ids` that are also ids of `data_dir`'s train/images: a test set that holds
    training images (a copy of the train folder as test/) scores and submits them like any
    other. Only listed, never read (16 ms for the sample's 3,001 train images); [] when the folder
    is absent or cannot be listed, since this only informs."""
    try:
        train_ids = set(list_image_ids(Path(data_dir) / "train" / "images"))
    except PipelineError:
        return []
    return sorted(train_ids.intersection(test_ids))


def fingerprint_test_images(data_dir: str | os.PathLike) -> str:
    """The content fingerprint of the test images (see `fingerprint_data`)."""
    return fingerprint_data(data_dir, "test")


# What each stage reads of a dataset folder: what its manifest fingerprints. depths.csv is left
# out: no model reads depths, so a changed depths file changes no probability.
DATA_PARTS = {
    "train": ("train/images", "train/masks", "train.csv"),
    "test": ("test/images",),
}
_fingerprints: dict[tuple, str] = {}  # (parts' stat signature) -> fingerprint, for this process


def fingerprint_data(data_dir: str | os.PathLike, which: str) -> str:
    """"<files>-<sha256>" over the sorted (relative name, bytes) of the files `which` ("train":
    images, masks and train.csv; "test": the test images) reads from `data_dir`. A manifest keeps
    it, so a stage made from other data is redone or refused, whatever the files' sizes and
    modification times say. The bytes are hashed once per process and data: a second call with
    the same files (same inode, size, mtime and ctime, which no rewrite keeps) reuses the result.
    Cost: see docs/gpu-and-robustness.md (~0.2 s per 1,000 PNGs)."""
    data = Path(data_dir)
    files = _data_files(data, DATA_PARTS[which])
    signature = []
    for relative, path in files:
        try:
            info = path.stat()
        except OSError as exc:  # vanished since the listing, or unreadable
            raise PipelineError(f"{path}: cannot read ({exc.strerror or one_line(exc)})") from None
        signature.append((relative, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns))
    key = (os.path.realpath(data), which, tuple(signature))
    if key not in _fingerprints:
        _fingerprints[key] = _hash_files(files)
    return _fingerprints[key]


def _data_files(data: Path, parts: Sequence[str]) -> list[tuple[str, Path]]:
    """(relative name, path) of each file of `parts` that exists: every PNG of a folder part."""
    files = []
    for part in parts:
        path = data / part
        if part.endswith(".csv"):
            if path.is_file():
                files.append((part, path))
        elif path.is_dir():
            files += [(f"{part}/{i}.png", path / f"{i}.png") for i in list_image_ids(path)]
    return files


def _hash_files(files: list[tuple[str, Path]]) -> str:
    digest = hashlib.sha256()
    for relative, path in files:
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise PipelineError(f"{path}: cannot read ({exc.strerror or one_line(exc)})") from None
        # the name and the length go in first: ("a", "bc") never hashes like ("ab", "c")
        digest.update(f"{relative}\0{len(raw)}\0".encode())
        digest.update(raw)
    return f"{len(files)}-{digest.hexdigest()[:32]}"


def dataset_identity(data_dir: str | os.PathLike) -> dict[str, str]:
    """Which data a run used: {"name": the folder's name, "fingerprint": "<files>-<hash>"}, the
    training data's content fingerprint (`fingerprint_data`, the one tune.json keeps) cut to 12
    hex digits for the leaderboard: the same for a copy of the folder elsewhere, different for
    the 3,001-image sample and the full 4,000 or a synthetic set. "" when the folder has no
    readable training files (moved or deleted)."""
    data = Path(data_dir)
    try:
        files, digest = fingerprint_data(data, "train").split("-")
    except PipelineError:
        files, digest = "0", ""
    return {"name": data.resolve().name, "fingerprint": f"{files}-{digest[:12]}" if files != "0" else ""}


# ---------------------------------------------------------------- depths


def read_depths(path: str | os.PathLike) -> dict[str, float]:
    """id -> z from an `id,z` CSV; {} when the file does not exist (depths are optional)."""
    path = Path(path)
    if not os.path.lexists(path):  # a link that leads nowhere is an error to show, not "no depths"
        return {}
    table = fileio.read_csv_strings(path, "id,z")
    header = [str(name).strip() for name in table.columns]
    if header != ["id", "z"]:
        raise PipelineError(f"{path}: header is {','.join(header)!r}, expected 'id,z'")
    ids = table["id"].str.strip()
    if (ids == "").any():
        row = int(np.flatnonzero((ids == "").to_numpy())[0]) + 2
        raise PipelineError(f"{path}: line {row} has an empty id")
    duplicated = ids[ids.duplicated()]
    if len(duplicated):
        raise PipelineError(f"{path}: id {duplicated.iloc[0]} appears more than once")
    # Python's float(), not pd.to_numeric: pandas 2.2's fast parser (Kaggle's image) rounds some
    # long decimals in the last bit, and a depth should read back as written
    depths = [_float_or_nan(text) for text in table["z"].str.strip().tolist()]
    bad = ~np.isfinite(np.asarray(depths, dtype=float))
    if bad.any():
        index = int(np.flatnonzero(bad)[0])
        raise PipelineError(f"{path}: id {ids.iloc[index]} has z {table['z'].iloc[index]!r}, expected a number")
    return dict(zip(ids.tolist(), depths))


def _float_or_nan(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return float("nan")


def depths_for(path: str | os.PathLike, ids: Sequence[str]) -> np.ndarray:
    """float32 [N] depths for `ids` from `path`, nan for ids it lacks (or when it is absent)."""
    by_id = read_depths(path)
    return np.array([by_id.get(i, np.nan) for i in ids], dtype=np.float32)


# ---------------------------------------------------------------- helpers


def is_blank(images: np.ndarray) -> np.ndarray:
    """bool [N]: the image is one flat value (about 2% of TGS; all have empty masks)."""
    flat = np.asarray(images).reshape(len(images), -1)
    return (flat == flat[:, :1]).all(axis=1)


def encode_mask_dir(mask_dir: str | os.PathLike, out_csv: str | os.PathLike) -> int:
    """RLE-encode every mask PNG in `mask_dir` into an id,rle_mask CSV (ids sorted)."""
    from pipeline.rle import encode_many, write_rle_csv

    folder = Path(mask_dir)
    ids = list_image_ids(folder)
    if not ids:
        raise PipelineError(f"{folder}: no .png masks")
    masks = read_masks([folder / f"{i}.png" for i in ids])
    write_rle_csv(out_csv, ids, encode_many(masks))
    return len(ids)


def _check_id_is_file_name(csv_path: Path, image_id: str) -> None:
    # An id becomes a file name: one with a path separator would write outside out_dir.
    if "/" in image_id or "\\" in image_id or image_id.startswith(".") or "\0" in image_id:
        raise PipelineError(f"{csv_path}: id {image_id!r} cannot be a file name")


def decode_csv_to_dir(csv: str | os.PathLike, out_dir: str | os.PathLike) -> int:
    """Decode an id,rle_mask CSV into <out_dir>/<id>.png masks.

    The masks are written as 8-bit gray PNGs with 0/255 (viewable in any image viewer),
    not Kaggle's 16-bit 0/65535; `read_mask` treats both the same.
    """
    from pipeline.rle import decode_many, read_rle_csv

    csv_path, folder = Path(csv), Path(out_dir)
    table = read_rle_csv(csv_path)
    ids = table["id"].tolist()
    for image_id in ids:
        _check_id_is_file_name(csv_path, image_id)
    masks = decode_many(table["rle_mask"].tolist(), shape=(IMAGE_SIZE, IMAGE_SIZE), ids=ids, where=str(csv_path))
    fileio.make_dirs(folder)

    def write_one(index: int) -> None:
        write_mask_png(folder / f"{ids[index]}.png", masks[index])

    with ThreadPoolExecutor(max_workers=_READ_THREADS) as pool:
        list(pool.map(write_one, range(len(ids))))
    return len(ids)
