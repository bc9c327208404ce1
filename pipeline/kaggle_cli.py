"""Kaggle integration: download and verify the data, submit a CSV, and build/push/follow the
training kernel — `python -m pipeline kaggle ...`.

Kaggle is reached through the official `kaggle` executable run as a subprocess, never
through `import kaggle`: importing it authenticates (and may exit the process) at import
time, and a subprocess lets the tests put a fake `kaggle` first on PATH. Credentials are
checked here first so a missing token is one clear line instead of the CLI's help page.

The same unpacking code serves the `download` command and the kernel on Kaggle (whose
bundle imports `prepare_kernel_data` from this module): the competition ships a zip that
holds `train.zip`/`test.zip` beside the CSVs, Kaggle's input mount may hold either those
zips or extracted folders, and both end up in the layout `pipeline.data` reads.

This module is imported inside the Kaggle kernel, so its top level uses the standard
library and `pipeline.errors`/`pipeline.fileio` only.
"""

from __future__ import annotations

import argparse
import base64
import codecs
import hashlib
import io
import os
import re
import secrets
import shutil
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import Mapping, Sequence

from pipeline.errors import PipelineError, one_line

COMPETITION = "tgs-salt-identification-challenge"
RULES_URL = f"https://www.kaggle.com/competitions/{COMPETITION}/rules"
KERNEL_INPUT = Path("/kaggle/input") / COMPETITION
KERNEL_WORKING = Path("/kaggle/working")
METADATA_FILE = "kernel-metadata.json"
KERNEL_FILE = "kernel.py"
PLACEHOLDER_USER = "your-kaggle-username"

# The layout pipeline.data reads; the first four are required.
LAYOUT_DIRS = ("train/images", "train/masks", "test/images")
LAYOUT_FILES = ("train.csv", "depths.csv", "sample_submission.csv")
REQUIRED = ("train/images", "train/masks", "test/images", "train.csv")
# Zips inside the competition archive (or the kernel's input mount) worth opening. Others
# (the real archive also carries unrelated extras) are left alone.
NESTED_ZIPS = ("train", "test", "competition_data")
_SEARCH_DEPTH = 3  # how deep below the archive root the layout may sit

NO_CREDENTIALS = (
    "no Kaggle credentials: put kaggle.json in ~/.kaggle/ (chmod 600) or set KAGGLE_USERNAME "
    "and KAGGLE_KEY (or KAGGLE_API_TOKEN)"
)
NO_EXECUTABLE = (
    "the `kaggle` command was not found: install the project (`pip install -e .` in the "
    "repository, or ./run.sh) so the kaggle CLI is on PATH"
)
_HTTP_HINTS = {
    401: "check your Kaggle credentials (kaggle.json / KAGGLE_KEY / KAGGLE_API_TOKEN)",
    403: f"accept the competition rules on the website first: {RULES_URL}",
    404: "check the competition name or the kernel id (user/slug) in kernel-metadata.json",
    429: "rate limited by Kaggle: wait a little and retry",
}
# Lines the kaggle CLI prints after an error that say nothing about the error itself.
_BOILERPLATE = ("If this is unexpected", "traceback. If you think", "If you think this is a bug")
_VENV_BIN = Path(sys.executable).parent  # `.venv/bin/python -m pipeline` without an activated venv


# ---------------------------------------------------------------- credentials and the CLI


def kaggle_config_dir(env: Mapping[str, str] = os.environ) -> Path:
    """Where the kaggle CLI looks for kaggle.json: $KAGGLE_CONFIG_DIR, else ~/.kaggle when it
    exists, else $XDG_CONFIG_HOME/kaggle (the order of kaggle 2.2's KaggleApi.config_dir)."""
    if env.get("KAGGLE_CONFIG_DIR"):
        return Path(env["KAGGLE_CONFIG_DIR"]).expanduser()
    home_dir = Path("~/.kaggle").expanduser()
    if home_dir.exists():
        return home_dir
    xdg = env.get("XDG_CONFIG_HOME") or str(Path("~/.config").expanduser())
    return Path(xdg) / "kaggle"


def find_credentials(env: Mapping[str, str] = os.environ) -> str | None:
    """A short description of the first Kaggle credential found, or None."""
    if env.get("KAGGLE_API_TOKEN"):
        return "KAGGLE_API_TOKEN"
    if env.get("KAGGLE_USERNAME") and env.get("KAGGLE_KEY"):
        return "KAGGLE_USERNAME/KAGGLE_KEY"
    config_dir = kaggle_config_dir(env)
    home_dir = Path("~/.kaggle").expanduser()
    # access_token is read from ~/.kaggle by kagglesdk whatever the config dir; credentials.json
    # is what `kaggle auth login` (OAuth) leaves there.
    candidates = [config_dir / "kaggle.json", config_dir / "access_token",
                  home_dir / "access_token", home_dir / "access_token.txt", home_dir / "credentials.json"]
    for path in candidates:
        if path.is_file():
            return str(path)
    return None


def require_credentials() -> str:
    found = find_credentials()
    if found is None:
        raise PipelineError(NO_CREDENTIALS)
    return found


def kaggle_executable() -> str:
    found = shutil.which("kaggle")
    if found:
        return found
    beside_python = _VENV_BIN / "kaggle"
    if beside_python.is_file() and os.access(beside_python, os.X_OK):
        return str(beside_python)
    raise PipelineError(NO_EXECUTABLE)


def error_line(output: str) -> str:
    """The line of the kaggle CLI's output that says what went wrong.

    An HTTP status line ("403 Client Error: Forbidden for url: ...") wins; else the last
    non-empty line that is not the CLI's generic "re-run with --debug" boilerplate.
    """
    lines = [line.strip() for line in re.split(r"[\r\n]+", output) if line.strip()]
    for line in lines:
        if re.match(r"^\d{3} (Client|Server) Error\b", line):
            return line
    if any(line.startswith("Authentication required") for line in lines):
        return "Authentication required (the Kaggle API rejected or found no credentials)"
    meaningful = [line for line in lines if not line.startswith(_BOILERPLATE)]
    return meaningful[-1] if meaningful else "(no output)"


def _hint(line: str) -> str:
    match = re.match(r"^(\d{3}) ", line)
    if match and int(match.group(1)) in _HTTP_HINTS:
        return f" — {_HTTP_HINTS[int(match.group(1))]}"
    if line.startswith("Authentication required"):
        return f" — {_HTTP_HINTS[401]}"
    return ""


def run_kaggle(args: Sequence[str], *, echo: bool = True) -> str:
    """Run `kaggle ARGS...` after checking credentials; returns its (merged) output.

    The output is echoed as it arrives (downloads show their progress bar). A non-zero
    exit becomes a one-line PipelineError quoting the line that explains it.
    """
    require_credentials()
    executable = kaggle_executable()
    argv = [executable, *args]
    try:
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL)
    except OSError as exc:
        raise PipelineError(f"{executable}: cannot run ({exc.strerror or exc})") from None
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    chunks: list[str] = []
    assert process.stdout is not None
    while True:
        # raw chunks, not lines: tqdm redraws its bar with "\r" and never ends the line
        block = os.read(process.stdout.fileno(), 8192)
        if not block:
            break
        text = decoder.decode(block)
        chunks.append(text)
        if echo:
            sys.stdout.write(text)
            sys.stdout.flush()
    process.stdout.close()
    returncode = process.wait()
    output = "".join(chunks) + decoder.decode(b"", final=True)
    if returncode != 0:
        line = error_line(output)
        command = " ".join(args[:2])
        raise PipelineError(f"kaggle {command} failed (exit {returncode}): {line[:300]}{_hint(line)}")
    return output


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


# ---------------------------------------------------------------- the kernel


def title_from_slug(slug: str) -> str:
    """"tgs-salt-pipeline-train" -> "TGS Salt Pipeline Train" (Kaggle slugifies the title
    back to exactly the slug, which it wants to match the id)."""
    acronyms = {"tgs", "gpu", "tpu", "cv", "tta", "oof"}
    return " ".join(word.upper() if word in acronyms else word.capitalize() for word in slug.split("-"))


def _check_kernel_names(user: str, slug: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", user):
        raise PipelineError(f"--user {user!r}: expected your Kaggle user name (letters, digits, '-', '_')")
    if not re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", slug) or len(slug) < 5:
        raise PipelineError(f"--slug {slug!r}: expected at least 5 lowercase letters/digits joined by '-', "
                            "e.g. tgs-salt-pipeline-train")


def kernel_metadata(user: str, slug: str, machine_shape: str = "NvidiaTeslaT4") -> dict:
    """kernel-metadata.json for `kaggle kernels push`. enable_internet is set explicitly: the
    kaggle CLI defaults it to true, and this kernel needs no network."""
    _check_kernel_names(user, slug)
    return {
        "id": f"{user}/{slug}",
        "title": title_from_slug(slug),
        "code_file": KERNEL_FILE,
        "language": "python",
        "kernel_type": "script",
        "is_private": True,
        "enable_gpu": True,
        "enable_tpu": False,
        "enable_internet": False,
        "machine_shape": machine_shape,
        "dataset_sources": [],
        "competition_sources": [COMPETITION],
        "kernel_sources": [],
        "model_sources": [],
    }


def package_files(package_dir: Path | None = None) -> list[Path]:
    """Every pipeline/**/*.py, sorted (what the kernel bundles)."""
    package_dir = package_dir or Path(__file__).resolve().parent
    return sorted(p for p in package_dir.rglob("*.py") if "__pycache__" not in p.parts)


def build_bundle(config_yaml: str, package_dir: Path | None = None) -> bytes:
    """A zip of the pipeline package plus `config.yaml`. Fixed timestamps and order, so the
    same sources and config always give the same bytes (and the same kernel.py)."""
    package_dir = package_dir or Path(__file__).resolve().parent
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as bundle:
        for path in package_files(package_dir):
            name = "pipeline/" + path.relative_to(package_dir).as_posix()
            bundle.writestr(zipfile.ZipInfo(name, date_time=(2018, 7, 19, 0, 0, 0)), path.read_bytes(),
                            compress_type=zipfile.ZIP_DEFLATED)
        bundle.writestr(zipfile.ZipInfo("config.yaml", date_time=(2018, 7, 19, 0, 0, 0)),
                        config_yaml.encode("utf-8"), compress_type=zipfile.ZIP_DEFLATED)
    return buffer.getvalue()


_KERNEL_TEMPLATE = '''\
"""TGS Salt pipeline: training kernel for Kaggle.

Generated by `python -m pipeline kaggle kernel build` from config {config_name!r}; do not
edit (rebuild instead). The pipeline package and the resolved config are embedded below
as a base64 zip (BUNDLE_SHA256); this script unpacks them to a temporary folder and runs
`python -m pipeline all` on the competition data:

    folds -> train -> tune -> predict -> submit -> check-submission -> leaderboard

With PSEUDO_ROUND it then trains the same config again as '<name>_pseudo', each fold also on
the test images the first run's same fold labels confidently (`pseudo.teacher`), and that
second run writes submission.csv (the first one's is submission_teacher.csv).

It needs no internet and no pip install: the Kaggle Python image carries torch, timm,
albumentations, pandas, scikit-learn, PyYAML and Pillow.

Environment (for trying it locally):
    TGS_KAGGLE_INPUT    the competition data (default {default_input})
    TGS_KAGGLE_WORKING  where runs/, folds/ and submission.csv go (default {default_working})
"""

import atexit
import base64
import io
import os
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

BUNDLE_SHA256 = "{digest}"
RUN_NAME = {config_name!r}
PSEUDO_ROUND = {pseudo_round}
BUNDLE = (
{bundle_lines}
)


def unpack_bundle(dest):
    """Unpack the embedded pipeline package and config.yaml into dest; returns dest."""
    dest = Path(dest)
    with zipfile.ZipFile(io.BytesIO(base64.b64decode(BUNDLE))) as bundle:
        bundle.extractall(dest)
    return dest


def main():
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no version check: the kernel is offline
    input_dir = Path(os.environ.get("TGS_KAGGLE_INPUT", "{default_input}"))
    working = Path(os.environ.get("TGS_KAGGLE_WORKING", "{default_working}")).resolve()
    working.mkdir(parents=True, exist_ok=True)
    # The sources go to a temporary folder so the kernel's output holds only results.
    src = unpack_bundle(tempfile.mkdtemp(prefix="tgs-pipeline-src-"))
    atexit.register(shutil.rmtree, src, True)
    sys.path.insert(0, str(src))
    os.chdir(working)  # the leaderboard and any relative path of the config land in the output

    import pipeline
    from pipeline import cli
    from pipeline.errors import PipelineError
    from pipeline.kaggle_cli import prepare_kernel_data

    print(f"pipeline from {{Path(pipeline.__file__).parent}}", flush=True)

    try:
        # Zipped inputs unpack outside the working folder: everything there becomes the
        # kernel's output, and `kaggle kernels output` would fetch 22,000 PNGs one by one.
        data = prepare_kernel_data(input_dir, Path(tempfile.gettempdir()) / "tgs-salt-data")
    except PipelineError as exc:
        print(f"error: {{exc}}", file=sys.stderr)
        return 2
    run_all = ["all", "--config", str(src / "config.yaml"), "--data", str(data),
               "--set", "runs_dir=" + str(working / "runs"),
               "--set", "folds_csv=" + str(working / "folds" / "folds.csv")]
    if not PSEUDO_ROUND:
        return cli.main(run_all + ["--submission", str(working / "submission.csv")])
    code = cli.main(run_all + ["--submission", str(working / "submission_teacher.csv")])
    if code:
        return code
    return cli.main(run_all + [
        "--set", "name=" + RUN_NAME + "_pseudo",
        "--set", "pseudo.teacher=" + str(working / "runs" / RUN_NAME),
        "--submission", str(working / "submission.csv"),
    ])


if __name__ == "__main__":
    raise SystemExit(main())
'''


def render_kernel(bundle: bytes, config_name: str, pseudo_round: bool = False) -> str:
    """kernel.py: the bundle as base64 lines of 100 characters inside a small launcher;
    pseudo_round: train a second run on the first one's confident test labels."""
    encoded = base64.b64encode(bundle).decode("ascii")
    lines = "\n".join(f'    "{encoded[i:i + 100]}"' for i in range(0, len(encoded), 100))
    return _KERNEL_TEMPLATE.format(
        config_name=config_name, digest=hashlib.sha256(bundle).hexdigest(), bundle_lines=lines,
        default_input=str(KERNEL_INPUT), default_working=str(KERNEL_WORKING), pseudo_round=bool(pseudo_round),
    )


def build_kernel(config: str | os.PathLike, overrides: Sequence[str], user: str, slug: str,
                 out: str | os.PathLike, machine_shape: str = "NvidiaTeslaT4", pseudo_round: bool = False) -> Path:
    """Render `out`/kernel-metadata.json and `out`/kernel.py; returns `out`."""
    from pipeline.config import dump_yaml, load_config
    from pipeline.fileio import write_json, write_text

    metadata = kernel_metadata(user, slug, machine_shape)  # checks user and slug first
    cfg = load_config(config, list(overrides))
    out = Path(out)
    if pseudo_round and cfg.pseudo.teacher:
        raise PipelineError(f"--pseudo-round: the config already names pseudo.teacher {cfg.pseudo.teacher!r}; "
                            f"the kernel's teacher is its own first run")
    write_text(out / KERNEL_FILE, render_kernel(build_bundle(dump_yaml(cfg)), cfg.name, pseudo_round))
    write_json(out / METADATA_FILE, metadata)
    return out


def read_metadata(kernel_dir: str | os.PathLike) -> dict:
    """A rendered kernel folder's metadata, checked to be pushable."""
    from pipeline.fileio import read_json

    kernel_dir = Path(kernel_dir)
    path = kernel_dir / METADATA_FILE
    if not path.is_file():
        raise PipelineError(f"{path}: missing — run `python -m pipeline kaggle kernel build "
                            "--config CFG --user YOU` first")
    metadata = read_json(path)
    if not isinstance(metadata, dict) or not isinstance(metadata.get("id"), str) or "/" not in metadata["id"]:
        raise PipelineError(f"{path}: no 'id' of the form user/slug")
    if metadata["id"].startswith(PLACEHOLDER_USER + "/"):
        raise PipelineError(f"{path}: id is still the placeholder {metadata['id']!r} — run `python -m "
                            "pipeline kaggle kernel build --config CFG --user YOU` first")
    return metadata


# ---------------------------------------------------------------- commands


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


def validate_csv(csv: str | os.PathLike) -> int:
    """Header, ids and every RLE of a submission (without a test folder to compare ids to)."""
    from pipeline.rle import decode_many, read_rle_csv

    table = read_rle_csv(csv)
    if table.empty:
        raise PipelineError(f"{csv}: no rows")
    decode_many(table["rle_mask"].tolist(), (101, 101), ids=table["id"].tolist(), where=str(csv))
    return len(table)


def submit(csv: str | os.PathLike, message: str, test: str | os.PathLike | None = None) -> None:
    if test is not None:
        from pipeline.submit import check_submission

        rows = check_submission(csv, test)
        print(f"{csv}: valid submission, {rows} rows (checked against {test})")
    else:
        rows = validate_csv(csv)
        print(f"{csv}: {rows} rows, header and RLE valid (give --test DATA to check the ids too)")
    if not message.strip():
        raise PipelineError("-m/--message: empty; Kaggle needs a submission description")
    run_kaggle(["competitions", "submit", COMPETITION, "-f", str(csv), "-m", message])


def push_kernel(kernel_dir: str | os.PathLike) -> str:
    kernel_dir = Path(kernel_dir)
    metadata = read_metadata(kernel_dir)
    code = kernel_dir / str(metadata.get("code_file", KERNEL_FILE))
    if not code.is_file():
        raise PipelineError(f"{code}: missing — run `python -m pipeline kaggle kernel build "
                            "--config CFG --user YOU` first")
    output = run_kaggle(["kernels", "push", "-p", str(kernel_dir)])
    # The CLI reports a rejected push on stdout and still exits 0.
    rejected = [line for line in output.splitlines() if line.startswith("Kernel push error")]
    if rejected:
        raise PipelineError(f"kaggle kernels push: {rejected[0].strip()[:300]}")
    return metadata["id"]


def kernel_status(kernel_dir: str | os.PathLike) -> str:
    kernel_id = read_metadata(kernel_dir)["id"]
    output = run_kaggle(["kernels", "status", kernel_id])
    match = re.search(r'has status "([^"]*)"', output)
    # kaggle 2.2 prints the enum ("KernelWorkerStatus.COMPLETE"); older versions "complete"
    status = match.group(1).rsplit(".", 1)[-1].lower() if match else "unknown"
    if status == "error":
        failure = re.search(r'Failure message: "(.*)"', output)
        detail = f": {failure.group(1)}" if failure else ""
        raise PipelineError(f"kernel {kernel_id} failed{detail} — see its log with "
                            f"`kaggle kernels logs {kernel_id}` or on the website")
    return status


def kernel_output(kernel_dir: str | os.PathLike, out: str | os.PathLike) -> Path:
    kernel_id = read_metadata(kernel_dir)["id"]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    run_kaggle(["kernels", "output", kernel_id, "-p", str(out)])
    submission = out / "submission.csv"
    if not submission.is_file():
        raise PipelineError(f"{out}: the kernel's output has no submission.csv — has {kernel_id} finished? "
                            "(python -m pipeline kaggle kernel status)")
    return submission


def dispatch(args: argparse.Namespace) -> int:
    """`python -m pipeline kaggle ...` (parsed in pipeline/cli.py)."""
    command = args.kaggle_command
    if command == "download":
        download(args.out)
    elif command == "submit":
        submit(args.csv, args.message, args.test)
    elif command == "kernel":
        sub = args.kernel_command
        if sub == "build":
            if args.gpu.lower() == "nvidiateslap100":
                print("note: Kaggle retired NvidiaTeslaP100; such sessions run on NvidiaTeslaT4")
            out = build_kernel(args.config, args.overrides, args.user, args.slug, args.out, args.gpu,
                               args.pseudo_round)
            print(f"wrote {out / METADATA_FILE} and {out / KERNEL_FILE} ({args.user}/{args.slug}); "
                  f"next: python -m pipeline kaggle kernel push --dir {out}")
        elif sub == "push":
            kernel_id = push_kernel(args.dir)
            print(f"pushed {kernel_id}; follow it with: python -m pipeline kaggle kernel status --dir {args.dir}")
        elif sub == "status":
            status = kernel_status(args.dir)
            if status == "complete":
                print(f"next: python -m pipeline kaggle kernel output --dir {args.dir}")
        elif sub == "output":
            submission = kernel_output(args.dir, args.out)
            print(f"submission: {submission}; submit it with: python -m pipeline kaggle submit "
                  f"--csv {submission} -m \"kernel run\"")
        else:  # argparse only lets the known ones through
            raise AssertionError(f"unknown kernel command {sub!r}")
    else:
        raise AssertionError(f"unknown kaggle command {command!r}")
    return 0
