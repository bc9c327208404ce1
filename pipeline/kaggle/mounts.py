"""Where a Kaggle kernel's data sources are: found under /kaggle/input, not assumed.

Kaggle has moved its mounts: a competition at /kaggle/input/competitions/<slug>/ (earlier
/kaggle/input/<slug>/), a dataset at /kaggle/input/datasets/<owner>/<slug>/ or
/kaggle/input/<slug>/, the files as uploaded (zips) or unpacked. The kernel searches a few
levels below the input folder for what it needs, so any of these layouts works and the next
one most likely too; when nothing fits, the one-line error lists what is there.

Only the root (/kaggle) can be moved, by TGS_KAGGLE_ROOT, so that a test rehearses exactly
the search that runs on Kaggle. Imported inside the kernel: standard library and
`pipeline.errors` only.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

from pipeline.errors import PipelineError
from pipeline.kaggle import COMPETITION
from pipeline.kaggle.dataset import _walk_dirs

KAGGLE_ROOT = Path("/kaggle")
ROOT_ENV = "TGS_KAGGLE_ROOT"
# input/competitions/<slug>/ is 2 levels down, input/datasets/<owner>/<slug>/ 3; one more
# for a source that wraps its files in a folder of its own.
SEARCH_DEPTH = 4
_LISTED = 12  # entries an error line names at most


def kaggle_root(environ: Mapping[str, str] = os.environ) -> Path:
    return Path(environ.get(ROOT_ENV) or KAGGLE_ROOT)


def input_dir(root: Path) -> Path:
    return root / "input"


def working_dir(root: Path) -> Path:
    return root / "working"


def is_competition_folder(folder: Path) -> bool:
    """The competition's files: train.csv beside train/ (unpacked) or train.zip /
    competition_data.zip (as uploaded)."""
    return (folder / "train.csv").is_file() and (
        (folder / "train").is_dir() or (folder / "train.zip").is_file()
        or (folder / "competition_data.zip").is_file())


def find_competition(inputs: Path, slug: str = COMPETITION) -> Path:
    """The shallowest folder under `inputs` holding the competition's files, one named after
    the competition first."""
    candidates = [folder for folder, _ in _walk_dirs(inputs, SEARCH_DEPTH) if is_competition_folder(folder)]
    named = [folder for folder in candidates if slug in folder.parts]
    if named or candidates:
        return (named or candidates)[0]
    raise PipelineError(f"{inputs}: no competition data (train.csv beside train/ or train.zip) within "
                        f"{SEARCH_DEPTH} levels — add the competition '{slug}' as the kernel's data source; "
                        f"it holds {describe(inputs)}")


def find_dataset(inputs: Path, dataset_id: str) -> Path:
    """The mount of dataset "owner/slug": a folder named slug under `inputs`, one inside a
    folder named owner (datasets/<owner>/<slug>) first, else the shallowest."""
    owner, slug = dataset_id.split("/", 1)
    candidates = [folder for folder, _ in _walk_dirs(inputs, SEARCH_DEPTH) if folder.name == slug]
    owned = [folder for folder in candidates if folder.parent.name == owner]
    if owned or candidates:
        return (owned or candidates)[0]
    raise PipelineError(f"{inputs}: dataset {dataset_id} not mounted (no folder '{slug}' within {SEARCH_DEPTH} "
                        f"levels) — add it to the kernel's data sources; it holds {describe(inputs)}")


def describe(inputs: Path) -> str:
    """What is under `inputs`, for an error line: each folder that holds files, with their
    count ("competitions/x/ (5 files), datasets/a/b/ (1 file)")."""
    if not inputs.is_dir():
        return "nothing (the folder does not exist)"
    entries = []
    for folder, level in _walk_dirs(inputs, SEARCH_DEPTH - 1):
        try:
            files = sum(1 for entry in os.scandir(folder) if entry.is_file())
        except OSError:
            continue
        if files and level:
            entries.append(f"{folder.relative_to(inputs).as_posix()}/ ({files} file{'s' if files > 1 else ''})")
        elif files:
            entries.append(f"{files} loose file{'s' if files > 1 else ''}")
    if not entries:
        return "nothing" if not any(inputs.iterdir()) else "only empty folders"
    more = f", and {len(entries) - _LISTED} more" if len(entries) > _LISTED else ""
    return ", ".join(entries[:_LISTED]) + more
