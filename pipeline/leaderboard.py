"""The local leaderboard: one row per tuned run in submissions/leaderboard.csv, ranked by CV.

`record_run` is called by `tune`; re-tuning a run replaces its row. `pipeline all` also records
its end-to-end wall time (`wall.json` in the run dir, shown as wall_min) when it made the run
from nothing, so a budget ("60 minutes on 2 cores") is read off the table. The file is rewritten
atomically under a lock, so runs that finish at the same moment (parallel folds, two
terminals) all land. `diff_runs` answers "what did I change between these two?".

Scores on different data are not comparable (a synthetic set scores above real data), so
every row names its dataset (`data`: the folder's name, `data_fingerprint`: a hash of its
training files, pipeline.data.dataset_identity, kept in the run's data.json from its first
tune) and runs are ranked within a dataset. `write_leaderboard_page` writes
`runs/index.html`: every run ranked, links to its pictures, tuned CV against training minutes.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError
from pipeline.rundir import LEADERBOARD_CSV, RunDir

COLUMNS = [
    "run", "model", "loss", "folds", "cv_at_05", "cv_tuned", "threshold", "empty_threshold", "min_area", "tta",
    "train_minutes", "git_commit", "date", "config_hash", "run_dir", "wall_minutes", "members",
    "data", "data_fingerprint",
]
# What the text table shows, and how: (column, header, right-aligned)
TABLE_COLUMNS = [
    ("run", "run", False), ("data", "data", False), ("model", "model", False), ("loss", "loss", False), ("folds", "folds", True),
    ("cv_tuned", "cv_tuned", True), ("cv_at_05", "cv@0.5", True), ("threshold", "thr", True),
    ("empty_threshold", "empty_thr", True), ("min_area", "min_area", True), ("tta", "tta", False),
    ("train_minutes", "train_min", True), ("wall_minutes", "wall_min", True), ("date", "date (UTC)", False),
    ("git_commit", "commit", False), ("members", "members", False),
]


def git_commit(cwd: str | Path | None = None) -> str:
    """Short hash of HEAD of the repo holding the code ("" outside a git checkout)."""
    folder = Path(cwd) if cwd is not None else Path(__file__).resolve().parent
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=folder, capture_output=True,
                              text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def _loss_label(cfg) -> str:
    label = cfg.loss.name
    if cfg.loss.stage2_from_epoch >= 0 and cfg.loss.stage2_name != cfg.loss.name:
        label += f">{cfg.loss.stage2_name}@{cfg.loss.stage2_from_epoch}"
    return label


def _train_minutes(run: Path, folds: list[int]) -> float:
    """Minutes of training: the folds' training seconds added up, or, where folds overlapped in
    time (--parallel-folds), the span from the first start to the last finish (done.json's
    `finished` minus `seconds` is a fold's start), whichever is shorter."""
    from pipeline.fileio import read_json
    from pipeline.rundir import FoldDir

    spans: list[tuple[float, float | None]] = []  # (seconds, finished)
    for fold in folds:
        done = FoldDir.of(run, fold).done
        if done.exists():
            try:
                info = read_json(done)
                finished = info.get("finished")
                spans.append((float(info.get("seconds", 0.0)), None if finished is None else float(finished)))
            except (PipelineError, TypeError, ValueError, AttributeError):
                pass  # a damaged done.json costs the time column, not the row
    total = sum(seconds for seconds, _ in spans)
    if spans and all(finished is not None for _, finished in spans):
        span = max(f for _, f in spans) - min(f - s for s, f in spans)
        total = min(total, span)
    return total / 60.0


def save_wall_minutes(run_dir: str | Path, minutes: float, config_digest: str) -> None:
    """Record how long `pipeline all` took to make this run from nothing (data to submission)."""
    from pipeline.fileio import write_json

    write_json(RunDir(Path(run_dir)).wall, {"minutes": round(float(minutes), 2), "config_digest": config_digest})


def _wall_minutes(run: Path, config_digest: str) -> str:
    """wall.json's minutes ("" when absent, unreadable, or written for another config)."""
    from pipeline.fileio import read_json

    path = RunDir(run).wall
    if not path.exists():
        return ""
    try:
        info = read_json(path)
        if info.get("config_digest") != config_digest:
            return ""
        return f"{float(info['minutes']):.1f}"
    except (PipelineError, TypeError, ValueError, KeyError, AttributeError):
        return ""


def _tta_used(run: Path, default: list[str]) -> str:
    from pipeline.fileio import read_json

    predicted = RunDir(run).predict
    tta = default
    if predicted.exists():
        try:
            tta = read_json(predicted).get("tta", default)
        except (PipelineError, AttributeError):
            pass
    return "+".join(tta)


def run_row(run_dir: str | Path, tune_result: dict[str, Any]) -> dict[str, str]:
    """The leaderboard row of a tuned run (all values as the strings written to the CSV)."""
    from pipeline.rundir import load_run_config

    run = Path(run_dir)
    cfg = load_run_config(run)
    folds = cfg.fold_list()
    digest = cfg.digest()
    members = _blend_members(run)
    data = run_data_identity(run, cfg.data)
    return {
        "run": cfg.name,
        # a blend's config is its first member's, renamed: its model and loss describe no one model
        "model": "blend" if members else cfg.model.name,
        "loss": "-" if members else _loss_label(cfg),
        "folds": f"{len(folds)}/{cfg.n_folds}",
        "cv_at_05": f"{float(tune_result['cv_at_05']):.4f}",
        "cv_tuned": f"{float(tune_result['cv_tuned']):.4f}",
        "threshold": f"{float(tune_result['threshold']):.2f}",
        # the threshold deciding "any salt?" (a tune result without one decided at the threshold)
        "empty_threshold": f"{float(tune_result.get('empty_threshold', tune_result['threshold'])):.2f}",
        "min_area": str(int(tune_result["min_area"])),
        "tta": _tta_used(run, cfg.predict.tta),
        "train_minutes": f"{_train_minutes(run, folds):.1f}",
        "git_commit": git_commit(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config_hash": digest,
        "run_dir": str(run),
        "wall_minutes": _wall_minutes(run, digest),
        "members": members,
        "data": data.get("name", ""),
        "data_fingerprint": data.get("fingerprint", ""),
    }


def run_data_identity(run: Path, data_dir: str) -> dict[str, str]:
    """The run's data.json, written from its config's data folder the first time it is asked
    for (tune), so the row keeps naming the data the run used after the folder moves."""
    from pipeline.data import dataset_identity
    from pipeline.fileio import read_json, write_json

    path = RunDir(run).data
    if path.exists():
        try:
            recorded = read_json(path)
            if isinstance(recorded, dict) and isinstance(recorded.get("name"), str):
                return {"name": recorded["name"], "fingerprint": str(recorded.get("fingerprint", ""))}
        except PipelineError:
            pass  # damaged: made again below
    identity = dataset_identity(data_dir)
    if identity["fingerprint"]:  # only a folder that is there names the data
        write_json(path, identity)
    return identity


def _blend_members(run: Path) -> str:
    """'A:0.50 B:0.50' for a blend (its blend.json), "" for a trained run."""
    from pipeline.fileio import read_json

    path = RunDir(run).blend
    if not path.exists():
        return ""
    blend = read_json(path)
    return describe_members(blend) if isinstance(blend, dict) else ""


def describe_members(blend: dict[str, Any]) -> str:
    """'A:0.50 B:0.50': a blend.json's members and weights, as the members column shows them."""
    return " ".join(f"{m['name']}:{float(m['weight']):.2f}" for m in blend.get("members", []))


def read_leaderboard(path: str | Path) -> list[dict[str, str]]:
    """The rows of a leaderboard CSV ([] when it does not exist yet). A row from a file written
    before a column existed has "" there, except empty_threshold: the row's threshold (what it was).

    Every row is one line (no value holds a line break), so each line is parsed on its own: an
    unbalanced quote (a hand edit) spoils its own row, never the rows after it, and is warned
    about. A byte-order mark (a spreadsheet's "CSV UTF-8") is skipped."""
    from pipeline.fileio import read_text

    path = Path(path)
    if not os.path.lexists(path):
        return []
    # a folder, permissions, not UTF-8, far too large: one line naming it; a BOM is not the header's
    text = read_text(path).removeprefix("\ufeff")
    try:
        lines = [(number, line) for number, line in enumerate(text.splitlines(), start=1) if line.strip()]
        if not lines:
            return []
        fieldnames = next(csv.reader([lines[0][1]]))
        if "run" not in fieldnames or "cv_tuned" not in fieldnames:
            raise PipelineError(f"{path}: not a leaderboard (header lacks run/cv_tuned)")
        rows = []
        for number, line in lines[1:]:
            if line.count('"') % 2:
                print(f"warning: {path}: line {number} has an unbalanced quote; its row is read as it stands",
                      file=sys.stderr)
            values = next(csv.reader([line]))
            row = dict(zip(fieldnames, values + [""] * (len(fieldnames) - len(values))))
            rows.append({k: (v or "") for k, v in row.items()})
    except csv.Error as exc:
        raise PipelineError(f"{path}: malformed CSV ({exc})") from None
    if "empty_threshold" not in fieldnames:
        for row in rows:
            row["empty_threshold"] = row.get("threshold", "")
    return rows


def _cv(row: dict[str, str]) -> float:
    try:
        return float(row.get("cv_tuned", ""))
    except ValueError:
        return float("-inf")  # unreadable scores sink to the bottom


def rank_rows(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    return sorted(rows, key=_cv, reverse=True)


def dataset_key(row: dict[str, str]) -> str:
    """'name' or 'name:fingerprint': the dataset a row is ranked within ("?" before the column)."""
    name, fingerprint = row.get("data", ""), row.get("data_fingerprint", "")
    if not name:
        return "?"
    return f"{name}:{fingerprint}" if fingerprint else name


def by_dataset(rows: list[dict[str, str]]) -> dict[str, list[dict[str, str]]]:
    """Rows grouped by dataset, each group ranked by cv_tuned; the group with the most runs first."""
    groups: dict[str, list[dict[str, str]]] = {}
    for row in rank_rows(rows):
        groups.setdefault(dataset_key(row), []).append(row)
    return dict(sorted(groups.items(), key=lambda item: (-len(item[1]), item[0])))


def matches_data(row: dict[str, str], wanted: str) -> bool:
    """--data: a folder name (tgs), a path to it (data/tgs), or a fingerprint's start."""
    wanted = wanted.strip()
    name = Path(wanted.rstrip("/")).name if wanted else ""
    return bool(wanted) and (row.get("data") in (wanted, name) or
                             (len(wanted) >= 4 and row.get("data_fingerprint", "").startswith(wanted)))


def record_run(run_dir: str | Path, tune_result: dict[str, Any],
               leaderboard_csv: str | Path = LEADERBOARD_CSV) -> dict[str, str]:
    """Append the run's row, or replace the row of a run with the same name; returns the row."""
    from pipeline.fileio import file_lock, write_text

    row = run_row(run_dir, tune_result)
    path = Path(leaderboard_csv)
    with file_lock(f"{path}.lock", what="the leaderboard"):
        rows = [r for r in read_leaderboard(path) if r.get("run") != row["run"]]
        rows.append(row)
        # keep columns an older or newer version of the file has, after ours
        extra = [k for r in rows for k in r if k not in COLUMNS]
        fieldnames = COLUMNS + list(dict.fromkeys(extra))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=fieldnames, restval="", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rank_rows(rows))
        write_text(path, buffer.getvalue())
    return row


def _table(rows: list[dict[str, str]]) -> str:
    header = ["#"] + [title for _, title, _ in TABLE_COLUMNS]
    body = []
    for rank, row in enumerate(rows, start=1):
        cells = [str(rank)]
        for key, _, _ in TABLE_COLUMNS:
            value = row.get(key, "")
            if key == "date":
                value = value[:16].replace("T", " ")  # minutes are enough to tell runs apart
            cells.append(value)
        body.append(cells)
    right = [True] + [r for _, _, r in TABLE_COLUMNS]
    widths = [max(len(line[i]) for line in [header] + body) for i in range(len(header))]

    def fmt(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right)).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(header), rule] + [fmt(cells) for cells in body])


def format_leaderboard(csv_path: str | Path = LEADERBOARD_CSV, top: int = 0, data: str | None = None) -> str:
    """Fixed-width text tables of the runs, one per dataset, best cv_tuned first (top > 0: only
    the best N of each; data: only that dataset's runs)."""
    path = Path(csv_path)
    rows = read_leaderboard(path)
    if not rows:
        return f"{path}: no runs yet — tune one with `python -m pipeline tune --run runs/NAME`"
    if data is not None:
        rows = [row for row in rows if matches_data(row, data)]
        if not rows:
            return f"{path}: no runs on data {data!r}"
    groups = by_dataset(rows)
    parts = []
    for key, group in groups.items():
        shown = group[:top] if top > 0 else group
        footer = f"{len(shown)} of {len(group)} runs" if len(shown) < len(group) else f"{len(group)} runs"
        heading = f"data {key}\n" if len(groups) > 1 else ""
        parts.append(f"{heading}{_table(shown)}\n({footer}, ranked by cv_tuned within data {key}; {path})")
    return "\n\n".join(parts)


# ---------------------------------------------------------------- run diffs


def _run_config_path(run: str | Path, runs_dir: str | Path) -> Path:
    """A run's config.yaml: `run` is a run's name (looked for in runs_dir) or a path to its folder
    (`runs/x`, `/abs/runs/x`, `runs/x/`), never both joined (`runs/runs/x`)."""
    given = Path(run)
    is_name = not given.is_absolute() and len(given.parts) == 1 and given.name not in ("", ".", "..")
    expected = RunDir(Path(runs_dir) / given if is_name else given).config
    # a bare name that is a run folder in the current directory (`cd runs`) still works
    for candidate in (expected, RunDir(given).config) if is_name else (expected,):
        if candidate.is_file():
            return candidate
    raise PipelineError(f"{expected}: missing, not a run folder (give a run's name in {runs_dir}, or the path "
                        "to its folder)")


_ABSENT = object()  # a key only one config has (configs from different code versions)


def _show(value: Any) -> str:
    if value is _ABSENT:
        return "(absent)"
    return value if isinstance(value, str) else json.dumps(value)


def config_differences(a: dict[str, Any], b: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, value in a, value in b) for every flattened key whose values differ."""
    keys = list(a) + [k for k in b if k not in a]
    return [(k, a.get(k, _ABSENT), b.get(k, _ABSENT)) for k in keys if a.get(k, _ABSENT) != b.get(k, _ABSENT)]


def diff_runs(a: str | Path, b: str | Path, runs_dir: str | Path = "runs") -> str:
    """The config keys in which two runs differ, one "key: A -> B" line each."""
    from pipeline.config import flatten, load_config

    path_a, path_b = _run_config_path(a, runs_dir), _run_config_path(b, runs_dir)
    flat_a, flat_b = flatten(load_config(path_a)), flatten(load_config(path_b))
    differences = config_differences(flat_a, flat_b)
    if not differences:
        return f"{path_a.parent} and {path_b.parent}: identical configs"
    count = f"{len(differences)} key{'s differ' if len(differences) > 1 else ' differs'}"
    lines = [f"{path_a.parent} -> {path_b.parent}: {count}"]
    lines += [f"{key}: {_show(va)} -> {_show(vb)}" for key, va, vb in differences]
    return "\n".join(lines)
