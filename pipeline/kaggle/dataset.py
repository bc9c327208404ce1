"""The competition data: download, unpack (safely) into the layout `pipeline.data` reads,
and verify.

The same code serves the `download` command and the kernel on Kaggle (whose bundle imports
`prepare_kernel_data` from here): the competition ships a zip that holds
`train.zip`/`test.zip` beside the CSVs, Kaggle's input mount may hold either those zips or
extracted folders, and both end up in the same layout. Imported inside the kernel, so the
top level uses the standard library and `pipeline.errors` only.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import Sequence

from pipeline.errors import PipelineError, one_line
from pipeline.kaggle import COMPETITION
from pipeline.kaggle.credentials import run_kaggle

# The layout pipeline.data reads; the first four are required.
LAYOUT_DIRS = ("train/images", "train/masks", "test/images")
LAYOUT_FILES = ("train.csv", "depths.csv", "sample_submission.csv")
REQUIRED = ("train/images", "train/masks", "test/images", "train.csv")
# Zips inside the competition archive (or the kernel's input mount) worth opening. Others
# (the real archive also carries unrelated extras) are left alone.
NESTED_ZIPS = ("train", "test", "competition_data")
_SEARCH_DEPTH = 3  # how deep below the archive root the layout may sit


# ---------------------------------------------------------------- safe unzip


def _member_target(archive: Path, name: str, dest: Path) -> Path | None:
    """Where a zip member goes under `dest`; None for entries to skip; PipelineError if unsafe."""
    if name.startswith("__MACOSX/"):
        return None
    posix = PurePosixPath(name.replace("\\", "/"))
    if posix.is_absolute() or re.match(r"^[A-Za-z]:", name) or ".." in posix.parts:
        raise PipelineError(f"{archive}: unsafe entry {name!r} (absolute path or '..'); refusing to unpack it")
    parts = [part for part in posix.parts if part not in ("", ".")]
    return dest.joinpath(*parts) if parts else None


def safe_extract(archive: str | os.PathLike, dest: str | os.PathLike) -> list[str]:
    """Extract a zip into `dest`, refusing absolute or '..' entry names; returns the member names.

    Every name is checked before anything is written. A damaged archive (not a zip, truncated,
    bad CRC) is a one-line PipelineError naming it.
    """
    archive, dest = Path(archive), Path(dest)
    try:
        with zipfile.ZipFile(archive) as bundle:
            members = bundle.infolist()
            targets = [(info, _member_target(archive, info.filename, dest)) for info in members]
            dest.mkdir(parents=True, exist_ok=True)
            for info, target in targets:
                if target is None:
                    continue
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with bundle.open(info) as source, open(target, "wb") as sink:
                    shutil.copyfileobj(source, sink, 1 << 20)
            return [info.filename for info in members]
    except PipelineError:
        raise
    except FileNotFoundError:
        raise PipelineError(f"{archive}: file not found") from None
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError, ValueError) as exc:
        raise PipelineError(f"{archive}: corrupted or unreadable zip archive ({one_line(exc)}); "
                            "delete it and download again") from None
    except OSError as exc:
        raise PipelineError(f"{archive}: cannot unpack ({exc.strerror or one_line(exc)})") from None


def _zip_names(archive: Path) -> list[str]:
    try:
        with zipfile.ZipFile(archive) as bundle:
            return bundle.namelist()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise PipelineError(f"{archive}: corrupted or unreadable zip archive ({one_line(exc)}); "
                            "delete it and download again") from None


# ---------------------------------------------------------------- the competition layout


def _walk_dirs(root: Path, depth: int) -> list[tuple[Path, int]]:
    """Folders under root, breadth first (shallowest first), skipping hidden ones and the
    image folders themselves (thousands of files, never a layout root)."""
    found, frontier = [(root, 0)], [root]
    for level in range(1, depth + 1):
        next_frontier = []
        for folder in frontier:
            try:
                entries = sorted(os.scandir(folder), key=lambda e: e.name)
            except OSError:
                continue
            for entry in entries:
                if entry.is_dir() and not entry.name.startswith((".", "__MACOSX")) \
                        and entry.name not in ("images", "masks"):
                    next_frontier.append(Path(entry.path))
                    found.append((Path(entry.path), level))
        frontier = next_frontier
    return found


def _nested_zips(roots: Sequence[Path]) -> list[tuple[Path, Path]]:
    """(zip path, root it was found under) for the archives worth opening."""
    found = []
    for root in roots:
        for folder, _ in _walk_dirs(root, _SEARCH_DEPTH):
            for stem in NESTED_ZIPS:
                candidate = folder / f"{stem}.zip"
                if candidate.is_file():
                    found.append((candidate, root))
    return found


def _expand_nested_zips(roots: Sequence[Path], staging: Path) -> None:
    """Open train.zip / test.zip (or competition_data.zip) wherever they sit, in rounds (one
    may hold another) until the layout is complete. A zip found at root/x/train.zip unpacks
    to staging/x/train/ — or to staging/x/ when its entries already start with "train/"."""
    opened: set[Path] = set()
    for _ in range(4):
        if all(entry in find_layout(roots) for entry in REQUIRED):
            return
        pending = [(z, root) for z, root in _nested_zips(roots) if z.resolve() not in opened]
        if not pending:
            return
        # competition_data.zip repeats what train.zip/test.zip hold: open it only when they are absent
        preferred = [(z, root) for z, root in pending if z.name != "competition_data.zip"] or pending
        for archive, root in preferred:
            opened.add(archive.resolve())
            parent = staging / archive.parent.relative_to(root)
            stem = archive.name[:-4]
            names = [n for n in _zip_names(archive) if not n.startswith("__MACOSX/")]
            wrapped = bool(names) and all(n.replace("\\", "/").startswith(f"{stem}/") for n in names)
            safe_extract(archive, parent if wrapped else parent / stem)
            if staging in archive.parents:
                archive.unlink()  # a copy we made; the disk is better spent on the images


def find_layout(roots: Sequence[Path]) -> dict[str, Path]:
    """The shallowest path of each layout entry (train/images, train.csv, ...) under `roots`."""
    found: dict[str, Path] = {}
    for root in roots:
        for folder, _ in sorted(_walk_dirs(root, _SEARCH_DEPTH), key=lambda pair: pair[1]):
            for entry in LAYOUT_DIRS + LAYOUT_FILES:
                if entry in found:
                    continue
                candidate = folder / entry
                if (entry in LAYOUT_DIRS and candidate.is_dir()) or (entry in LAYOUT_FILES and candidate.is_file()):
                    found[entry] = candidate
    return found


def is_layout(folder: Path) -> bool:
    return all((folder / entry).is_dir() for entry in LAYOUT_DIRS) and (folder / "train.csv").is_file()


def _place(entry: str, source: Path, out: Path, staging: Path) -> None:
    """Put one layout entry at out/entry: moved when we unpacked it, copied when it lives in a
    folder we must not touch (Kaggle's read-only input mount)."""
    target = out / entry
    if target.resolve() == source.resolve():
        return
    if target.is_dir() and not target.is_symlink():
        shutil.rmtree(target)
    elif target.exists() or target.is_symlink():
        target.unlink()
    target.parent.mkdir(parents=True, exist_ok=True)
    if staging in source.parents:
        os.replace(source, target)
    elif source.is_dir():
        shutil.copytree(source, target)
    else:
        shutil.copy2(source, target)


def unpack_competition(source: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Unpack the competition data into `out` in the layout pipeline.data reads; returns `out`.

    `source` is the downloaded `tgs-salt-identification-challenge.zip` or a folder holding the
    competition files (Kaggle's input mount: plain folders or train.zip/test.zip). Nested
    zips are opened, zip entries with absolute or '..' names are refused, and only the
    layout entries (train/images, train/masks, test/images, train.csv, depths.csv,
    sample_submission.csv) are placed in `out`, replacing older copies. `source` is never
    modified.
    """
    source, out = Path(source), Path(out)
    if not source.exists():
        raise PipelineError(f"{source}: not found")
    out.mkdir(parents=True, exist_ok=True)
    staging = out / f".unpack-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        staging.mkdir()
        if source.is_dir():
            roots = [source, staging]
        else:
            safe_extract(source, staging)
            roots = [staging]
        _expand_nested_zips(roots, staging)
        layout = find_layout(roots)
        missing = [entry for entry in REQUIRED if entry not in layout]
        if missing:
            raise PipelineError(f"{source}: no {missing[0]} inside (expected the competition's "
                                "train.zip/test.zip or train/, test/ folders, and train.csv)")
        for entry, path in layout.items():
            _place(entry, path, out, staging)
    except OSError as exc:
        raise PipelineError(f"{out}: could not unpack {source.name} ({exc.strerror or one_line(exc)})") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def verify_dataset(data_dir: str | os.PathLike) -> dict[str, int]:
    """Check an unpacked dataset: as many train images as masks as train.csv rows, the same
    ids, some test images, every PNG readable, and train.csv decoding to exactly the masks.

    Returns {"train": n, "salt": n with salt, "test": n}; a one-line PipelineError names the
    first file that disagrees.
    """
    import numpy as np

    from pipeline.data import list_image_ids, read_images, read_masks
    from pipeline.rle import decode_many, read_rle_csv

    data = Path(data_dir)
    images_dir, masks_dir, test_dir = data / "train/images", data / "train/masks", data / "test/images"
    csv_path = data / "train.csv"
    image_ids, mask_ids = list_image_ids(images_dir), list_image_ids(masks_dir)
    table = read_rle_csv(csv_path)
    csv_ids = table["id"].tolist()
    if not image_ids:
        raise PipelineError(f"{images_dir}: no .png images")
    if set(mask_ids) != set(image_ids):
        lonely = sorted(set(image_ids) ^ set(mask_ids))[0]
        where = masks_dir if lonely in image_ids else images_dir
        raise PipelineError(f"{where / (lonely + '.png')}: missing ({len(image_ids)} train images, "
                            f"{len(mask_ids)} masks)")
    if set(csv_ids) != set(image_ids):
        lonely = sorted(set(image_ids) ^ set(csv_ids))[0]
        problem = "has no row" if lonely in image_ids else "has a row but no image"
        raise PipelineError(f"{csv_path}: {len(csv_ids)} rows for {len(image_ids)} train images "
                            f"(id {lonely} {problem})")
    test_ids = list_image_ids(test_dir)
    if not test_ids:
        raise PipelineError(f"{test_dir}: no test images")

    read_images([images_dir / f"{i}.png" for i in image_ids])  # readable, 101x101
    read_images([test_dir / f"{i}.png" for i in test_ids])
    masks = read_masks([masks_dir / f"{i}.png" for i in image_ids])
    rles = table.set_index("id").loc[image_ids, "rle_mask"].tolist()
    decoded = decode_many(rles, masks.shape[1:], ids=image_ids, where=str(csv_path))
    differs = np.flatnonzero((decoded != masks).reshape(len(image_ids), -1).any(axis=1))
    if len(differs):
        first = image_ids[int(differs[0])]
        raise PipelineError(f"{csv_path}: row {first} does not match train/masks/{first}.png "
                            f"({len(differs)} of {len(image_ids)} rows differ from the masks)")
    return {"train": len(image_ids), "salt": int(masks.reshape(len(masks), -1).any(axis=1).sum()),
            "test": len(test_ids)}


def prepare_kernel_data(input_dir: str | os.PathLike, work_dir: str | os.PathLike) -> Path:
    """The dataset folder for a kernel run: `input_dir` itself when it already holds the
    layout, else the competition files unpacked into `work_dir` (inputs are read-only)."""
    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise PipelineError(f"{input_dir}: competition data not mounted — add the competition "
                            f"'{COMPETITION}' as the kernel's data source")
    data = input_dir if is_layout(input_dir) else unpack_competition(input_dir, work_dir)
    counts = verify_dataset(data)
    print(f"data: {data} ({counts['train']} train images, {counts['salt']} with salt, "
          f"{counts['test']} test images)", flush=True)
    return data


def download(out: str | os.PathLike) -> dict[str, int]:
    """`kaggle competitions download`, then unpack and verify into `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    run_kaggle(["competitions", "download", COMPETITION, "-p", str(out)])
    archive = out / f"{COMPETITION}.zip"
    if not archive.is_file():
        raise PipelineError(f"{archive}: not there after `kaggle competitions download`")
    unpack_competition(archive, out)
    counts = verify_dataset(out)
    print(f"{out}: {counts['train']} train images ({counts['salt']} with salt), {counts['test']} test "
          f"images; train.csv matches the masks. ({archive.name} can be deleted.)")
    return counts

