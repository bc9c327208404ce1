"""`runs/index.html`: the leaderboard as a page, written by `leaderboard` and `all`.

One table per dataset (runs ranked by tuned CV within it: scores on different data are not
comparable), each run linked to its pictures (`<run>/show/index.html`, where `show` wrote
them), and a plot of tuned CV against training minutes, one colour and marker per dataset.
The plot is embedded in the page (a PNG as a data: URI), so the page is one self-contained
file; links are relative, so the runs folder can be copied and still opens. No scripts.
"""

from __future__ import annotations

import base64
import html
import io
import os
from pathlib import Path

from pipeline.leaderboard import by_dataset, read_leaderboard
from pipeline.rundir import LEADERBOARD_CSV, RUNS_PAGE, RunDir
from pipeline.showpage import STYLE

# Okabe-Ito colours (told apart with every common colour-vision deficiency) with a marker
# each, so datasets differ in shape too
DATASET_STYLES = [("#0072B2", "o"), ("#D55E00", "s"), ("#009E73", "^"), ("#CC79A7", "D"), ("#E69F00", "v"),
                  ("#56B4E9", "P"), ("#000000", "X")]
PLOT_INCHES = (8.0, 4.5)
COLUMNS = [("run", "run"), ("model", "model"), ("loss", "loss"), ("folds", "folds"), ("cv_tuned", "CV tuned"),
           ("cv_at_05", "CV @0.5"), ("threshold", "thr"), ("min_area", "min area"), ("tta", "TTA"),
           ("train_minutes", "train min"), ("wall_minutes", "wall min"), ("date", "date (UTC)"),
           ("git_commit", "commit")]


def _number(text: str) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def _show_link(row: dict[str, str], page_dir: Path) -> str | None:
    """The run's show/index.html relative to the page, if `show` wrote it."""
    run_dir = row.get("run_dir", "")
    if not run_dir:
        return None
    target = RunDir(run_dir).show_page
    if not target.is_file():
        return None
    return Path(os.path.relpath(target.resolve(), page_dir.resolve())).as_posix()


def _table(rows: list[dict[str, str]], page_dir: Path) -> str:
    head = "<tr><th>#</th>" + "".join(f"<th>{html.escape(title)}</th>" for _, title in COLUMNS) + "<th>pictures</th></tr>"
    body = []
    for rank, row in enumerate(rows, start=1):
        cells = [f"<td>{rank}</td>"]
        for key, _ in COLUMNS:
            value = row.get(key, "")
            if key == "date":
                value = value[:16].replace("T", " ")
            cells.append(f"<td>{html.escape(value)}</td>")
        link = _show_link(row, page_dir)
        cells.append(f'<td><a href="{html.escape(link)}">show</a></td>' if link else "<td>–</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table>{head}{''.join(body)}</table>"


def cv_against_minutes_png(groups: dict[str, list[dict[str, str]]]) -> bytes | None:
    """The plot's PNG bytes; None when no run has both a tuned CV and training minutes."""
    points = {key: [(m, cv, row["run"]) for row in rows
                    if (m := _number(row.get("train_minutes", ""))) is not None
                    and (cv := _number(row.get("cv_tuned", ""))) is not None]
              for key, rows in groups.items()}
    if not any(points.values()):
        return None
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=PLOT_INCHES, dpi=100)
    ax = fig.subplots()
    for index, (key, pts) in enumerate(points.items()):
        if not pts:
            continue
        color, marker = DATASET_STYLES[index % len(DATASET_STYLES)]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], color=color, marker=marker, s=40,
                   edgecolors="black", linewidths=0.5, label=f"data {key} ({len(pts)})", zorder=3)
        for minutes, cv, name in pts:
            ax.annotate(name, (minutes, cv), xytext=(4, 3), textcoords="offset points", fontsize=7, color="#333")
    ax.set(title="tuned CV against training minutes", xlabel="training minutes (folds' time; overlapping folds: "
           "their span)", ylabel="CV (tuned)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.subplots_adjust(left=0.1, right=0.97, bottom=0.13, top=0.91)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def render_page(rows: list[dict[str, str]], page_dir: Path, source: str) -> str:
    groups = by_dataset(rows)
    parts = ["<h1>TGS Salt: every run</h1>",
             f"<p>{len(rows)} tuned run{'s' if len(rows) != 1 else ''} from <code>{html.escape(source)}</code>, "
             "ranked by tuned CV within each dataset (scores on different data are not comparable). "
             "<code>tgs leaderboard</code> prints the same; <code>tgs leaderboard --diff A B</code> lists the "
             "config keys two runs differ in.</p>"]
    png = cv_against_minutes_png(groups)
    if png is not None:
        uri = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
        parts.append(f'<figure><img src="{uri}" alt="tuned CV against training minutes"><figcaption>Tuned CV '
                     "against training minutes, one colour and marker per dataset: up and to the left is "
                     "better.</figcaption></figure>")
    for key, group in groups.items():
        parts.append(f"<h2>data {html.escape(key)}</h2>" + _table(group, page_dir))
    return ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>TGS Salt: leaderboard</title>"
            f"<style>{STYLE}</style></head>\n<body>\n" + "\n".join(parts) + "\n</body></html>\n")


def write_leaderboard_page(csv_path: str | Path = LEADERBOARD_CSV, runs_dir: str | Path = "runs") -> Path | None:
    """Write <runs_dir>/index.html from the leaderboard CSV; None (nothing written) without runs."""
    from pipeline.fileio import write_text

    rows = read_leaderboard(csv_path)
    if not rows:
        return None
    page_dir = Path(runs_dir)
    path = page_dir / RUNS_PAGE
    write_text(path, render_page(rows, page_dir, str(csv_path)))
    return path
