"""Checkpoints: writing them (one saver for every kind a fold keeps), reading them, resuming.

In the spirit of timm's CheckpointSaver: every file is written to a temporary name and moved
into place (fileio), so a kill leaves the old file or the new one, never half of one; the
metric and the training digest travel inside the checkpoint, never in its name.

    best.pt, snapshot<c>.pt   {"model", "epoch", "val_score", "config_digest", "fold"}
    last.pt, prev.pt, stage1.pt  the resume state: {"model", "optimizer", "scheduler", "scaler",
                                 "precision" (resolved: fp32/tf32/bf16/fp16), "state" (LoopState),
                                 "config_digest", "fold", "train_fingerprint", "split_digest"[, "ema"]}
                                 (the last two: the data it was made on, manifests.fold_training_data)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from pipeline import fileio
from pipeline.config import Config
from pipeline.errors import PipelineError
from pipeline.rundir import FoldDir, train_command


def save_checkpoint(path: Path, payload: dict) -> None:
    bad = first_non_finite(payload.get("model", {}))
    if bad is not None:  # never kept as "good": training stops before this, this is the last guard
        raise PipelineError(f"{path}: not written, weight {bad} is NaN or infinite")
    fileio.write_with(path, lambda handle: torch.save(payload, handle))


def first_non_finite(state_dict: dict) -> str | None:
    """The name of the first floating tensor of `state_dict` holding NaN or inf, else None."""
    for name, value in state_dict.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return name
    return None


def load_checkpoint(path: Path) -> dict:
    """torch.load with a one-line error; weights_only=True (plain tensors and Python values)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise PipelineError(f"{path}: checkpoint not found") from None
    except Exception as exc:  # a truncated/corrupt file surfaces as many exception types
        raise PipelineError(f"{path}: damaged checkpoint ({type(exc).__name__})") from None


def load_resume_checkpoint(folder: FoldDir, digest: str) -> dict | None:
    """The newest good of last.pt / prev.pt, or None; a damaged one (or one with non-finite
    weights) is reported and skipped."""
    for path in (folder.last, folder.prev):
        if not path.exists():
            continue
        try:
            checkpoint = load_checkpoint(path)
        except PipelineError as exc:
            print(f"warning: {exc}; trying the previous checkpoint", file=sys.stderr)
            continue
        bad = first_non_finite(checkpoint.get("model", {}))
        if bad is not None:  # kept by a version that saved diverged weights: never resumed from
            print(f"warning: {path}: weight {bad} is NaN or infinite; trying the previous checkpoint",
                  file=sys.stderr)
            continue
        if checkpoint.get("config_digest") != digest:
            raise PipelineError(
                f"{path}: was trained with a different config; pass --restart to start this fold afresh"
            )
        return checkpoint
    return None


def fold_checkpoints(cfg: Config, fold: int) -> list[Path]:
    """The checkpoints whose average is the fold's prediction: its cycle snapshots, or best.pt."""
    folder = FoldDir.of(cfg, fold)
    if cfg.train.snapshots and folder.snapshots():
        return folder.snapshots()
    if not folder.best.exists():
        # --restart: a finished fold's last.pt would only resume to its end, where best.pt is needed
        raise PipelineError(f"{folder.best}: missing (fold {fold} not trained, or the file was removed) — run "
                            f"`{train_command(folder.path.parent, '--folds', str(fold), '--restart')}`")
    return [folder.best]


class CheckpointSaver:
    """Writes what one fold keeps after an epoch: best.pt when the score improved, the cycle's
    snapshot when it is the cycle's best (both only when they change), last.pt when asked (by time,
    run.checkpoint_seconds, and at the end of each loss stage and of the fold: see
    train_fold.last_checkpoint_due; the one before kept as prev.pt, the fallback when last.pt is
    found damaged), and stage1.pt at the switch to the stage-2 loss."""

    def __init__(self, folder: FoldDir, digest: str, training_data: dict[str, str] | None = None):
        self.folder = folder
        self.digest = digest
        # the data the resume state is made on (manifests.fold_training_data): a resume on other
        # data or another split starts the fold afresh instead (train_fold.resume_checkpoint)
        self.training_data = dict(training_data or {})

    def _weights(self, weights: dict, epoch: int, val_score: float) -> dict:
        return {"model": weights, "epoch": epoch, "val_score": val_score, "config_digest": self.digest,
                "fold": self.folder.fold}

    def save(self, *, weights: dict, resume: dict, epoch: int, val_score: float, best: bool = False,
             snapshot: int | None = None, stage1: bool = False, last: bool = True) -> None:
        """weights: the state_dict validated (kept in best.pt and the snapshots); resume: the
        resume state without its digest, fold and training data (added here); snapshot: the cycle whose best
        epoch this is, or None; last: write the resume checkpoint (a kill before the next one
        loses the epochs since, which a resume trains again to the same weights)."""
        if best:
            save_checkpoint(self.folder.best, self._weights(weights, epoch, val_score))
        if snapshot is not None:
            save_checkpoint(self.folder.snapshot(snapshot), self._weights(weights, epoch, val_score))
        resume = {**resume, "config_digest": self.digest, "fold": self.folder.fold, **self.training_data}
        if last:
            if self.folder.last.exists():
                os.replace(self.folder.last, self.folder.prev)
            save_checkpoint(self.folder.last, resume)
        if stage1:  # `pipeline branch` starts stage-2 variants from here
            save_checkpoint(self.folder.stage1, resume)
