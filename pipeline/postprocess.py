"""Post-processing: how probabilities become the submitted masks, decided by `tune` on the OOF.

The rule (`PostProcess`): the mask is `probs > threshold`, kept only when at least `min_area`
pixels have `probs > empty_threshold`, else the image is predicted empty; blank images (one
pixel value) are forced empty when `empty_blank`. empty_threshold == threshold is the plain
min-area rule. `tune` decides it and writes it into the run's tune.json (`write_tuned`);
`submit`, `pseudo` (the teacher's labels) and `show` read it back (`read_tuned`) and apply it
(`PostProcess.apply`, i.e. `binarize`): one rule, applied by one function everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError
from pipeline.rundir import RunDir

DEFAULT_THRESHOLD = 0.5
DEFAULT_MIN_AREA = 0
BINARIZE_BLOCK = 1024  # images per block


def binarize(probs: np.ndarray, threshold: float, min_area: int,
             empty_mask: np.ndarray | None = None, empty_threshold: float | None = None) -> np.ndarray:
    """Probabilities [N,H,W] -> bool masks: > threshold; a mask is emptied when fewer than
    min_area pixels are > empty_threshold (None: the threshold itself, the plain min-area rule);
    and the images flagged in empty_mask [N] (e.g. blank images) are forced empty.

    The same rule, compared in the same precision, as metric.threshold_scores scored it while tuning.
    """
    from pipeline import metric

    probs = np.asarray(probs)
    if empty_mask is not None:
        empty_mask = np.asarray(empty_mask, dtype=bool)
        if empty_mask.shape != (len(probs),):
            raise ValueError(f"empty_mask has shape {empty_mask.shape}, expected ({len(probs)},)")
    same_cut = empty_threshold is None or float(empty_threshold) == float(threshold)
    masks = np.empty(probs.shape, dtype=bool)
    # In blocks: 18000 float16 test images would need 700 MB more as one float32 copy.
    for first in range(0, len(probs), BINARIZE_BLOCK):
        block = probs[first:first + BINARIZE_BLOCK]
        # probs > threshold with the threshold taken exactly, as metric.threshold_scores decided
        # it while tuning, never rounded to the array's float16 precision
        block_masks = metric.above_threshold(block, float(threshold))
        if min_area > 0:
            decides = block_masks if same_cut else metric.above_threshold(block, float(empty_threshold))
            block_masks &= (metric.mask_areas(decides) >= int(min_area))[:, None, None]
        masks[first:first + len(block)] = block_masks
    if empty_mask is not None:
        masks[empty_mask] = False
    return masks


@dataclass(frozen=True)
class PostProcess:
    """How probabilities become the submitted masks: what `tune` chose (tune.json), or the untuned
    default PostProcess(). empty_threshold None (the default) means the threshold itself."""

    threshold: float = DEFAULT_THRESHOLD
    min_area: int = DEFAULT_MIN_AREA
    empty_threshold: float | None = None  # None: the threshold (a float after __post_init__)
    empty_blank: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "threshold", float(self.threshold))
        object.__setattr__(self, "min_area", int(self.min_area))
        empty = self.threshold if self.empty_threshold is None else float(self.empty_threshold)
        object.__setattr__(self, "empty_threshold", empty)
        object.__setattr__(self, "empty_blank", bool(self.empty_blank))

    def apply(self, probs: np.ndarray, blank: np.ndarray | None = None) -> np.ndarray:
        """Bool masks [N,H,W] from probabilities; blank [N] (blank images) is forced empty only
        when empty_blank."""
        return binarize(probs, self.threshold, self.min_area, empty_mask=blank if self.empty_blank else None,
                        empty_threshold=self.empty_threshold)

    def describe(self) -> str:
        """E.g. 'threshold 0.45, empty threshold 0.80, min area 100' (the empty threshold only when it differs)."""
        empty = f", empty threshold {self.empty_threshold:.2f}" if self.empty_threshold != self.threshold else ""
        return f"threshold {self.threshold:.2f}{empty}, min area {self.min_area}"


def read_tuned(run_dir: str | Path) -> PostProcess:
    """The post-processing in the run's tune.json, with a hint when it is missing. A tune.json
    written before the empty threshold existed decides emptiness at the mask threshold."""
    from pipeline.config import check_number
    from pipeline.fileio import read_json

    run = Path(run_dir)
    path = RunDir(run).tune
    rerun = f"run `python -m pipeline tune --run {run}`"
    if not path.exists():
        raise PipelineError(f"{path}: missing — {rerun}")
    tuned = read_json(path)
    if not isinstance(tuned, dict) or "threshold" not in tuned or "min_area" not in tuned:
        raise PipelineError(f"{path}: lacks threshold/min_area — {rerun}")
    # a hand edit (NaN, a negative threshold, min_area 1e30) is refused like the same value in a config
    try:
        threshold = check_number(f"{path}", "threshold", tuned["threshold"])
        min_area = check_number(f"{path}", "min_area", tuned["min_area"])
        empty_threshold = check_number(f"{path}", "empty_threshold", tuned.get("empty_threshold", threshold))
    except PipelineError as exc:
        raise PipelineError(f"{exc} — {rerun}") from None
    if min_area != int(min_area):
        raise PipelineError(f"{path}: 'min_area' must be a whole number of pixels, got {min_area} — {rerun}")
    threshold, min_area, empty_threshold = float(threshold), int(min_area), float(empty_threshold)
    return PostProcess(threshold, min_area, empty_threshold, bool(tuned.get("empty_blank", False)))


def read_tuned_or_default(run_dir: str | Path) -> PostProcess:
    """The post-processing in tune.json, or the untuned one (threshold 0.5, min area 0)."""
    return read_tuned(run_dir) if RunDir(Path(run_dir)).tune.exists() else PostProcess()


def write_tuned(run_dir: str | Path, post: PostProcess, report: dict) -> None:
    """tune.json: `report` (what tune measured) with the rule it chose, which read_tuned reads back."""
    from pipeline.fileio import write_json

    rule = {"threshold": round(post.threshold, 6), "empty_threshold": round(post.empty_threshold, 6),
            "min_area": post.min_area, "empty_blank": post.empty_blank}
    write_json(RunDir(Path(run_dir)).tune, {**report, **rule})  # keys already in report keep their place
