"""`runs/<name>/show/index.html`: one page with a run's tables and pictures, written by `show`.

Everything on it comes from the run dir (tune.json, fold<k>/done.json, config.yaml, log.txt)
and the pictures beside the page; paths are relative, so the folder can be copied or zipped
and still opens. Plain HTML, no scripts, nothing fetched.
"""

from __future__ import annotations

import html
import time
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError
from pipeline.rundir import CONFIG_FILE, RUN_LOG_FILE, TUNE_FILE, FoldDir, RunDir

CAPTIONS = {
    "oof_worst.png": "The worst-scored out-of-fold images. Left: the image, the submitted mask filled in "
                     "translucent blue, the truth outlined in yellow. Right: the model's probability map "
                     "(dark 0, yellow 1), truth outlined in white.",
    "oof_by_class.png": "A few out-of-fold images of every salt-coverage class (0 = empty, 1 = up to 10% "
                        "salt, ..., 10 = over 90%); prediction filled blue, truth outlined yellow.",
    "test_samples.png": "Test images with the predicted mask filled in translucent blue (half with salt "
                        "predicted, half without).",
    "threshold.png": "The out-of-fold CV against the mask threshold; the star is the rule `tune` chose.",
    "curves.png": "Per fold: train and validation loss, the validation score at threshold 0.5, and the "
                  "learning rate, per epoch.",
}

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1650px; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.7em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f2f2f2; }
figure { margin: 1em 0 2em; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { color: #555; max-width: 60em; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; }
.tables { display: flex; flex-wrap: wrap; gap: 2.5em; }
"""


def _read_json(path: Path) -> Any:
    from pipeline.fileio import read_json

    if not path.exists():
        return None
    try:
        return read_json(path)
    except PipelineError:
        return None  # the page shows what it can; `tune` and `train` report broken files


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "–" if value is None or value == "" else str(value)


def summary_rows(tuned: dict) -> list[list[Any]]:
    """The tune.json figures a reader looks for first, as (what, value) rows."""
    rule = f"threshold {tuned.get('threshold')}, empty threshold {tuned.get('empty_threshold')}, " \
           f"min area {tuned.get('min_area')}" + (", blank images empty" if tuned.get("empty_blank") else "")
    rows = [["CV at threshold 0.5", tuned.get("cv_at_05")], ["CV tuned", tuned.get("cv_tuned")],
            ["tuned rule", rule], ["OOF images", tuned.get("n_images")]]
    decision = tuned.get("empty_decision")
    if isinstance(decision, dict):
        rows += [["salt images submitted empty", f"{decision.get('salt_called_empty')} of {decision.get('n_salt')}"],
                 ["empty images given a mask", f"{decision.get('empty_called_salt')} of {decision.get('n_empty')}"],
                 ["CV if every empty decision were right", decision.get("cv_empty_oracle")]]
    return rows


def fold_rows(run: Path, folds: list[int], tuned: dict | None) -> list[list[Any]]:
    per_fold = (tuned or {}).get("per_fold") or {}
    rows = []
    for fold in folds:
        done = _read_json(FoldDir.of(run, fold).done) or {}
        oof = per_fold.get(str(fold)) or {}
        seconds = done.get("seconds")
        rows.append([fold, done.get("best_epoch"), done.get("epochs_run"), done.get("best_score"),
                     oof.get("score"), oof.get("n"),
                     f"{seconds / 60:.1f}" if isinstance(seconds, (int, float)) else None])
    return rows


def _link_up(name: str) -> str:
    """A link from show/index.html to the run folder's file `name`."""
    return f'<a href="../{html.escape(name)}">{html.escape(name)}</a>'


def write_index(run: Path, cfg, pictures: list[Path], post) -> Path:
    """Write show/index.html for the run; returns its path."""
    from pipeline.fileio import write_text

    run = Path(run)
    tuned = _read_json(RunDir(run).tune)
    parts = [f"<h1>Run {html.escape(cfg.name)}</h1>",
             f"<p>{html.escape(str(run))} · data {html.escape(str(cfg.data))} · page written "
             f"{time.strftime('%Y-%m-%d %H:%M')} · {_link_up(RUN_LOG_FILE)} · {_link_up(CONFIG_FILE)}"
             + (f" · {_link_up(TUNE_FILE)}" if tuned else "") + "</p>",
             '<div class="tables">']
    if isinstance(tuned, dict):
        parts.append("<div><h2>Tuned on the out-of-fold predictions</h2>"
                     + _table(["", "value"], summary_rows(tuned)) + "</div>")
    else:
        parts.append(f"<div><h2>Not tuned yet</h2><p>Masks below use {html.escape(post.describe())}; "
                     f"run <code>tgs tune --run {html.escape(str(run))}</code>.</p></div>")
    parts.append("<div><h2>Folds</h2>" + _table(
        ["fold", "best epoch", "epochs", "best val score @0.5", "OOF tuned", "images", "train min"],
        fold_rows(run, cfg.fold_list(), tuned if isinstance(tuned, dict) else None)) + "</div>")
    per_class = tuned.get("per_class") if isinstance(tuned, dict) else None
    if isinstance(per_class, dict):
        parts.append("<div><h2>Per salt-coverage class</h2>" + _table(
            ["class", "images", "score", "costs the CV"],
            [[k, v.get("n"), v.get("score"), v.get("cv_lost")] for k, v in per_class.items()]) + "</div>")
    parts.append("</div>")
    for picture in pictures:
        caption = CAPTIONS.get(picture.name, "")
        parts.append(f'<figure><img src="{html.escape(picture.name)}" alt="{html.escape(picture.stem)}">'
                     f"<figcaption><b>{html.escape(picture.name)}</b>: {html.escape(caption)}</figcaption></figure>")
    config_path = RunDir(run).config
    if config_path.exists():
        parts.append("<h2>Config</h2><pre>" + html.escape(config_path.read_text(encoding="utf-8")) + "</pre>")
    page = ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(cfg.name)}: TGS Salt run</title><style>{STYLE}</style></head>\n<body>\n"
            + "\n".join(parts) + "\n</body></html>\n")
    path = RunDir(run).show_page
    write_text(path, page)
    return path
