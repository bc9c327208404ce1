"""Pictures of a run, for looking before trusting a number: `tgs show --run runs/x`.

Writes into `runs/<name>/show/`:
    oof_worst.png     the worst-scored OOF images, each beside its probability map (gray image,
                      the submitted mask filled in translucent sky blue, the truth outlined in
                      yellow; title: id, salt coverage, image score)
    oof_by_class.png  a few OOF examples of every coverage class
    test_samples.png  test images with the predicted mask filled (after `predict`)
    threshold.png     the OOF CV against the mask threshold, the tuned rule marked (after `tune`)
    curves.png        per fold: train/val loss, val_score and the learning rate per epoch
    index.html        the run's tables (tune.json, folds, config) and the pictures on one page
Masks are binarised with the tuned post-processing (threshold, empty threshold, min area,
blank images) when tune.json exists, else at 0.5. A prediction is a fill, so a full mask
(`1 10201`) shows as a tinted tile and the salt side of its edge is plain; the truth is an
outline, so both show at once. Okabe-Ito sky blue (fill) and yellow (outline): a blue-yellow
pair, which red-green colour-vision deficiencies keep apart, and both light enough to read
on dark and mid grey seismic (the old blue outline was lost on it).
matplotlib is imported here only, on its Agg (file-only) backend.
"""

from __future__ import annotations

import csv
import io
import sys
from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError
from pipeline.postprocess import PostProcess, read_tuned_or_default
from pipeline.rundir import FoldDir, RunDir

DPI = 100
TILE_INCHES = 2.0  # one 101x101 image
TITLE_INCHES = 0.45  # two lines of small title above it
GRID_COLS = 4
N_WORST = 16
N_PER_CLASS = 4
N_TEST = 16
CURVES_INCHES = (15.0, 4.0)
THRESHOLD_INCHES = (8.0, 4.0)
TRUTH_COLOR = "#F0E442"  # Okabe-Ito yellow: the truth's outline
TRUTH_WIDTH = 1.5
PRED_COLOR = "#56B4E9"  # Okabe-Ito sky blue: the prediction's fill
PRED_ALPHA = 0.45
PLOT_COLORS = ("#0072B2", "#E69F00")  # Okabe-Ito blue and orange: lines on a white plot
PROB_CMAP = "cividis"  # perceptually uniform and colour-blind safe
PROB_TRUTH_COLOR = "white"  # the truth outline on the probability map


def grid_pixels(rows: int, cols: int) -> tuple[int, int]:
    """(width, height) in pixels of a tile grid figure: what the PNG will measure."""
    return round(cols * TILE_INCHES * DPI), round(rows * (TILE_INCHES + TITLE_INCHES) * DPI)


# ---------------------------------------------------------------- drawing


def _figure(width_in: float, height_in: float):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    # A bare Figure (no pyplot): no global state, nothing left open between calls.
    return Figure(figsize=(width_in, height_in), dpi=DPI)


def _save(fig, path: Path) -> Path:
    from pipeline.fileio import write_bytes

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)  # no bbox_inches="tight": the size stays as designed
    write_bytes(path, buffer.getvalue())
    return path


def _outline(ax, mask: np.ndarray, color: str) -> None:
    if mask.any() and not mask.all():  # contour needs both levels present
        ax.contour(mask.astype(np.float32), levels=[0.5], colors=color, linewidths=TRUTH_WIDTH)


def _fill(ax, mask: np.ndarray, color: str, alpha: float) -> None:
    """The mask's pixels tinted (the rest untouched): a full mask tints the whole tile."""
    from matplotlib.colors import to_rgb

    overlay = np.zeros((*mask.shape, 4), np.float32)
    overlay[mask.astype(bool)] = (*to_rgb(color), alpha)
    ax.imshow(overlay, interpolation="nearest")


def _tile_grid(tiles: list[dict], rows: int, cols: int, path: Path) -> Path:
    """tiles: {"image" or "probs", "title", optional "truth", "pred"}; row-major into rows x cols."""
    width, height = grid_pixels(rows, cols)
    fig = _figure(width / DPI, height / DPI)
    tile_w, tile_h = 1.0 / cols, 1.0 / rows
    image_h = tile_h * TILE_INCHES / (TILE_INCHES + TITLE_INCHES)
    for index, tile in enumerate(tiles):
        row, col = divmod(index, cols)
        ax = fig.add_axes((col * tile_w + 0.01 * tile_w, 1.0 - (row + 1) * tile_h, 0.98 * tile_w, image_h))
        if "probs" in tile:  # a probability map, the truth outlined on it
            ax.imshow(tile["probs"], cmap=PROB_CMAP, vmin=0.0, vmax=1.0, interpolation="nearest")
        else:
            ax.imshow(tile["image"], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        if tile.get("pred") is not None:  # under the truth's outline
            _fill(ax, tile["pred"], PRED_COLOR, PRED_ALPHA)
        if tile.get("truth") is not None:
            _outline(ax, tile["truth"], PROB_TRUTH_COLOR if "probs" in tile else TRUTH_COLOR)
        ax.set_title(tile["title"], fontsize=7, pad=2)
        ax.set_axis_off()
    return _save(fig, path)


# ---------------------------------------------------------------- what to draw


def _available_oof(run: Path, folds: list[int]) -> tuple[list[str], np.ndarray]:
    """OOF of every fold that has one so far (a fold still training shows its best epoch)."""
    from pipeline.tune import read_fold_oof

    ids: list[str] = []
    parts: list[np.ndarray] = []
    for fold in folds:
        if FoldDir.of(run, fold).oof.exists():
            fold_ids, probs = read_fold_oof(run, fold, require_done=False)
            ids += fold_ids
            parts.append(probs)
    return ids, (np.concatenate(parts) if parts else np.zeros((0, 101, 101), np.float32))


def _oof_tiles(ids, images, truth, pred, scores, classes, order) -> list[dict]:
    area = 101 * 101
    return [{
        "image": images[i], "truth": truth[i], "pred": pred[i],
        "title": f"{ids[i]}\nc{classes[i]} cov {truth[i].sum() / area:.0%}  score {scores[i]:.2f}",
    } for i in order]


def draw_oof(run: Path, data_dir: Path, out_dir: Path, post: PostProcess, folds: list[int]) -> list[Path]:
    from pipeline.data import is_blank, load_train
    from pipeline.folds import coverage_class
    from pipeline.metric import image_scores

    ids, probs = _available_oof(run, folds)
    if not ids:
        return []
    train = load_train(data_dir, ids)
    truth = np.asarray(train.masks, dtype=bool)
    blank = np.asarray(is_blank(train.images), dtype=bool) if post.empty_blank else None
    pred = post.apply(probs, blank=blank)
    scores = np.asarray(image_scores(truth, pred))
    classes = np.asarray(coverage_class(truth))

    # worst first; among equal scores the biggest mistakes (most salt involved) first
    salt = truth.sum(axis=(1, 2)) + pred.sum(axis=(1, 2))
    worst = np.lexsort((-salt, scores))[:N_WORST]
    rows = -(-len(worst) // GRID_COLS)
    tiles = []
    for tile, i in zip(_oof_tiles(ids, train.images, truth, pred, scores, classes, worst), worst):
        tiles += [tile, {"probs": np.asarray(probs[i], np.float32), "truth": truth[i],
                         "title": f"probability\nmax {float(probs[i].max()):.2f}"}]
    paths = [_tile_grid(tiles, rows, 2 * GRID_COLS, out_dir / "oof_worst.png")]

    rng = np.random.default_rng(0)
    present = np.unique(classes)
    tiles: list[dict] = []
    for cls in present:
        members = np.flatnonzero(classes == cls)
        picked = np.sort(rng.choice(members, size=min(N_PER_CLASS, len(members)), replace=False))
        row = _oof_tiles(ids, train.images, truth, pred, scores, classes, picked)
        tiles += row + [{"image": np.full((101, 101), 255, np.uint8), "title": ""}] * (N_PER_CLASS - len(row))
    paths.append(_tile_grid(tiles, len(present), N_PER_CLASS, out_dir / "oof_by_class.png"))
    return paths


def draw_test_samples(run: Path, data_dir: Path, out_dir: Path, post: PostProcess) -> list[Path]:
    from pipeline.data import is_blank, read_image
    from pipeline.submit import read_test_probs

    if not RunDir(run).probs.exists():
        return []
    try:
        ids, probs = read_test_probs(run)
    except PipelineError as exc:  # predictions a kill left half-written, or from before predict.json named them
        print(f"warning: no test samples: {exc}", file=sys.stderr)
        return []
    if not ids:
        return []
    # half the samples where salt was predicted, half where not, so both kinds are seen
    salty = np.flatnonzero(post.apply(probs).any(axis=(1, 2)))
    plain = np.setdiff1d(np.arange(len(ids)), salty)
    rng = np.random.default_rng(0)
    take_salty = min(len(salty), max(N_TEST // 2, N_TEST - len(plain)))
    picked = np.concatenate([rng.choice(salty, take_salty, replace=False),
                             rng.choice(plain, min(len(plain), N_TEST - take_salty), replace=False)])
    picked = np.sort(picked.astype(int))
    images = np.stack([read_image(data_dir / "test" / "images" / f"{ids[i]}.png") for i in picked])
    blank = np.asarray(is_blank(images), dtype=bool) if post.empty_blank else None
    pred = post.apply(probs[picked], blank=blank)
    tiles = [{"image": images[k], "pred": pred[k],
              "title": f"{ids[i]}\npredicted salt {pred[k].mean():.0%}"} for k, i in enumerate(picked)]
    rows = -(-len(tiles) // GRID_COLS)
    return [_tile_grid(tiles, rows, GRID_COLS, out_dir / "test_samples.png")]


def _read_log(path: Path) -> dict[str, np.ndarray]:
    import io

    from pipeline.fileio import read_text

    text = read_text(path)  # a folder, permissions, not UTF-8: one line naming it
    try:
        rows = list(csv.DictReader(io.StringIO(text, newline="")))
        log = {key: np.array([float(r[key]) for r in rows])
               for key in ("epoch", "train_loss", "val_loss", "val_score")}
    except (KeyError, ValueError, TypeError, UnicodeDecodeError, csv.Error):
        raise PipelineError(f"{path}: not a training log (epoch, train_loss, val_loss, val_score)") from None
    try:  # logs from before the lr column have none
        log["lr"] = np.array([float(r["lr"]) for r in rows])
    except (KeyError, ValueError, TypeError):
        pass
    return log


def draw_curves(run: Path, out_dir: Path, folds: list[int]) -> list[Path]:
    logs = {k: _read_log(FoldDir.of(run, k).log) for k in folds if FoldDir.of(run, k).log.exists()}
    logs = {k: v for k, v in logs.items() if len(v["epoch"])}
    if not logs:
        return []
    fig = _figure(*CURVES_INCHES)
    loss_ax, score_ax, lr_ax = fig.subplots(1, 3)
    colors = [f"C{i % 10}" for i in range(len(logs))]
    for color, (fold, log) in zip(colors, logs.items()):
        loss_ax.plot(log["epoch"], log["train_loss"], "--", color=color, label=f"fold {fold} train")
        loss_ax.plot(log["epoch"], log["val_loss"], "-", color=color, label=f"fold {fold} val")
        score_ax.plot(log["epoch"], log["val_score"], "-o", color=color, markersize=3, label=f"fold {fold}")
        if "lr" in log:
            lr_ax.plot(log["epoch"], log["lr"], "-", color=color, label=f"fold {fold}")
    loss_ax.set(title="loss (dashed: train, solid: val)", xlabel="epoch", ylabel="loss")
    score_ax.set(title="validation competition score at threshold 0.5", xlabel="epoch", ylabel="score")
    lr_ax.set(title="learning rate", xlabel="epoch", ylabel="lr")
    if any("lr" in log and (log["lr"] > 0).all() for log in logs.values()):
        lr_ax.set_yscale("log")  # cosine tails and plateau drops span decades
    from matplotlib.ticker import MaxNLocator

    for ax in (loss_ax, score_ax, lr_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, ncol=2)
    fig.subplots_adjust(left=0.05, right=0.99, bottom=0.13, top=0.9, wspace=0.25)
    return [_save(fig, out_dir / "curves.png")]


def draw_threshold(run: Path, data_dir: Path, out_dir: Path, post: PostProcess, folds: list[int]) -> list[Path]:
    """The OOF CV against the mask threshold: the plain rule (min area 0) and the tuned empty
    threshold and min area, with the tuned rule and the untuned 0.5 marked."""
    from pipeline.data import load_train
    from pipeline.fileio import read_json
    from pipeline.metric import threshold_scores

    if not RunDir(run).tune.exists():
        return []
    ids, probs = _available_oof(run, folds)
    if not ids:
        return []
    truth = np.asarray(load_train(data_dir, ids).masks, dtype=bool)
    tuned = read_json(RunDir(run).tune)
    thresholds = np.round(np.arange(0.02, 0.99, 0.02), 2)
    plain = np.asarray(threshold_scores(truth, probs, thresholds))[:, 0]
    if post.empty_threshold != post.threshold:
        rule = np.asarray(threshold_scores(truth, probs, thresholds, [post.min_area],
                                           empty_thresholds=[post.empty_threshold]))[:, 0, 0]
        rule_label = f"empty threshold {post.empty_threshold:.2f}, min area {post.min_area}"
    else:
        rule = np.asarray(threshold_scores(truth, probs, thresholds, [post.min_area]))[:, 0]
        rule_label = f"min area {post.min_area}"
    fig = _figure(*THRESHOLD_INCHES)
    ax = fig.subplots()
    ax.plot(thresholds, plain, "-", color=PLOT_COLORS[0], label="mask threshold only (min area 0)")
    ax.plot(thresholds, rule, "--", color=PLOT_COLORS[1], label=f"with the tuned {rule_label}")
    cv_at_05, cv_tuned = tuned.get("cv_at_05"), tuned.get("cv_tuned")
    if isinstance(cv_at_05, (int, float)):
        ax.plot([0.5], [cv_at_05], "o", color="black", label=f"untuned: 0.50 -> {cv_at_05:.4f}")
    if isinstance(cv_tuned, (int, float)):
        ax.plot([post.threshold], [cv_tuned], "*", color=PLOT_COLORS[1], markersize=14, markeredgecolor="black",
                label=f"tuned: {post.describe()} -> {cv_tuned:.4f}")
        ax.axvline(post.threshold, color="gray", linewidth=0.8, linestyle=":")
    ax.set(title=f"OOF CV against the threshold ({len(ids)} images)", xlabel="mask threshold", ylabel="CV",
           xlim=(0.0, 1.0))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower center")
    fig.subplots_adjust(left=0.09, right=0.98, bottom=0.13, top=0.9)
    return [_save(fig, out_dir / "threshold.png")]


def show_run(run_dir: str | Path, data_dir: str | Path | None = None) -> list[Path]:
    """Write the run's pictures into runs/<name>/show/; returns the paths written."""
    from pipeline.manifests import check_blend_finished
    from pipeline.rundir import load_run_config

    run = Path(run_dir)
    check_blend_finished(run)  # a blend killed part-way: its command, not pictures of half its files
    cfg = load_run_config(run)
    data = Path(data_dir if data_dir is not None else cfg.data)
    post = read_tuned_or_default(run)
    out_dir = RunDir(run).show
    folds = cfg.fold_list()
    paths = draw_oof(run, data, out_dir, post, folds)
    paths += draw_test_samples(run, data, out_dir, post)
    paths += draw_threshold(run, data, out_dir, post, folds)
    paths += draw_curves(run, out_dir, folds)
    if not paths:
        raise PipelineError(f"{run}: nothing to show yet (no fold OOF, log.csv or test_probs.npy)")
    from pipeline.showpage import write_index

    return paths + [write_index(run, cfg, paths, post)]
