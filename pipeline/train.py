"""K-fold training: one model per fold, reproducible, resumable, selected by the competition metric.

Read `train_fold` top to bottom: set-up, data, model, optimizer, loop (train, validate,
schedule, checkpoint, early stop), OOF. Everything a fold writes lives in
`runs/<name>/fold<k>/`:

    best.pt    weights of the epoch with the best validation competition score
    last.pt    model + optimizer + scheduler + loop state: enough to resume
    prev.pt    the last.pt before it (fallback when last.pt is found damaged)
    log.csv    epoch, lr, train_loss, val_loss, val_score, seconds
    oof.npy    float16 validation probabilities (101x101) of the best epoch; at the end of the
               fold, those of the fold's final model(s) with the config's TTA (as the test set)
    oof_ids.txt  their ids, one per line, in the same order
    done.json  written last: the fold is complete

Every epoch is seeded from (seed, fold, epoch), so a run resumed from last.pt ends with
the same weights as one never interrupted.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import hashlib
import json
import io
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline import fileio
from pipeline.config import Config, check_folds, dump_yaml, flatten, load_config, save_config
from pipeline.distributed import DistContext, init_from_env, shutdown
from pipeline.errors import PipelineError
from pipeline.predict import to_batch
from pipeline.runtime import Runtime, resolve_runtime

# val_score is that of the weights validated (the EMA when train.ema_decay is on); val_score_raw
# the raw weights' when they differ (empty otherwise).
LOG_COLUMNS = ["epoch", "lr", "train_loss", "val_loss", "val_score", "val_score_raw", "seconds"]
# Keys (or whole sections) that change where and how fast a run goes or how it is evaluated,
# not the weights it trains.
NON_TRAINING_KEYS = ("name", "runs_dir", "folds", "predict", "tune", "train.threads", "train.num_workers",
                     "train.parallel_folds", "train.fold_workers", "train.keep_stage1")


def is_training_key(key: str) -> bool:
    return key not in NON_TRAINING_KEYS and key.split(".")[0] not in NON_TRAINING_KEYS


# Keys added after runs were made, at the value that reproduces what those runs did: left out
# of the digest at that value, so the older runs stay reusable.
NEUTRAL_DEFAULTS = {"train.ema_decay": 0.0, "model.residual": False, "loss.image_only": False,
                    "model.global_context": False, "pseudo.teacher": "", "pseudo.max_uncertain_share": 0.05,
                    "augment.rotate_limit": 0.0, "loss.lovasz_hinge": "relu"}


def training_digest(cfg: Config) -> str:
    """Hash of everything that decides the trained weights: a fold is reused only if it matches."""
    relevant = {k: v for k, v in flatten(cfg).items()
                if is_training_key(k) and not (k in NEUTRAL_DEFAULTS and v == NEUTRAL_DEFAULTS[k])}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def epoch_seed(seed: int, fold: int, epoch: int) -> int:
    return (seed * 1_000_003 + fold * 10_007 + epoch) % 2**31


# ---------------------------------------------------------------- data


def seed_loader_worker(seed: int, worker_id: int) -> None:
    """Each DataLoader worker gets its own augmentation stream (albumentations' Compose has its
    own RNG, copied into every worker: unseeded, all workers would repeat one sequence)."""
    info = torch.utils.data.get_worker_info()
    if info is not None and info.dataset.transform is not None:
        info.dataset.transform.set_random_seed(seed * 100 + worker_id)
    torch.manual_seed(seed * 100 + worker_id)


class SaltDataset(torch.utils.data.Dataset):
    """In-memory 101x101 images and masks (the whole train set is ~40 MB), augmented per item."""

    def __init__(self, images: np.ndarray, masks: np.ndarray, transform=None):
        self.images = images
        self.masks = masks.astype(np.uint8)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        image, mask = self.images[index], self.masks[index]
        if self.transform is not None:
            out = self.transform(image=image, mask=mask)
            image, mask = out["image"], out["mask"]
        return torch.from_numpy(np.ascontiguousarray(image)), torch.from_numpy(np.ascontiguousarray(mask))


# ---------------------------------------------------------------- optimizer and schedule


def build_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    t = cfg.train
    params = [p for p in model.parameters() if p.requires_grad]
    fused = {"fused": True} if next(model.parameters()).is_cuda else {}
    if t.optimizer == "adam":
        return torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay, **fused)
    if t.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay, **fused)
    return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay, nesterov=True)


def build_scheduler(cfg: Config, optimizer: torch.optim.Optimizer):
    t = cfg.train
    if t.scheduler == "cosine_restarts":
        # Snapshot-style cycles (1st and 4th place): the lr restarts every cycle_epochs.
        return torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(optimizer, T_0=t.cycle_epochs, eta_min=t.min_lr)
    if t.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=t.epochs, eta_min=t.min_lr)
    if t.scheduler == "plateau":
        # Keras tutorial: ReduceLROnPlateau(patience=5) on the validation metric.
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max", factor=t.plateau_factor, patience=t.plateau_patience, min_lr=t.min_lr
        )
    return None


def step_scheduler(scheduler, val_score: float) -> None:
    if scheduler is None:
        return
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        scheduler.step(val_score)
    else:
        scheduler.step()


# ---------------------------------------------------------------- checkpoints


@dataclass
class LoopState:
    epoch: int = 0  # the next epoch to run
    best_score: float = -1.0
    best_epoch: int = -1
    epochs_without_improvement: int = 0
    seconds: float = 0.0
    cycle_best_score: float = -1.0  # snapshot ensembling: the best score within the current lr cycle


def save_checkpoint(path: Path, payload: dict) -> None:
    bad = first_non_finite(payload.get("model", {}))
    if bad is not None:  # never kept as "good": the loop stops before this; this is the last guard
        raise PipelineError(f"{path}: not written, weight {bad} is NaN or infinite")
    fileio.write_with(path, lambda handle: torch.save(payload, handle))


def first_non_finite(state_dict: dict) -> str | None:
    """The name of the first floating tensor of `state_dict` holding NaN or inf, else None."""
    for name, value in state_dict.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return name
    return None


def last_good_checkpoint(fold_dir: Path) -> str:
    """What a diverged fold can resume from: last.pt (only finite weights are ever saved), or none."""
    if (fold_dir / "last.pt").exists():
        return f"last good checkpoint kept at {fold_dir / 'last.pt'}"
    return "no checkpoint kept (it diverged before the end of its first epoch)"


def load_checkpoint(path: Path) -> dict:
    """torch.load with a one-line error; weights_only=True (plain tensors and Python values)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise PipelineError(f"{path}: checkpoint not found") from None
    except Exception as exc:  # a truncated/corrupt file surfaces as many exception types
        raise PipelineError(f"{path}: damaged checkpoint ({type(exc).__name__})") from None


def load_resume_checkpoint(fold_dir: Path, digest: str) -> dict | None:
    """The newest good of last.pt / prev.pt, or None; a damaged one is reported and skipped."""
    for name in ("last.pt", "prev.pt"):
        path = fold_dir / name
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


def write_log(path: Path, rows: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=LOG_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    fileio.write_text(path, buffer.getvalue())


def read_log(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


# ---------------------------------------------------------------- one epoch


def progress(total: int, desc: str, disable: bool = False):
    from tqdm import tqdm

    interactive = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit="img", leave=False, dynamic_ncols=True, disable=disable,
                mininterval=0.5 if interactive else 10.0, file=sys.stderr)


def train_one_epoch(model, loader, optimizer, scaler, loss_fn, cfg: Config, rt: Runtime, epoch: int,
                    desc: str, show_progress: bool = True, after_step=None) -> float:
    model.train()
    total_loss, total_images = 0.0, 0
    with progress(len(loader.sampler), desc, disable=not show_progress) as bar:
        for images, masks in loader:
            x, target = to_batch(images, masks, cfg, rt)
            with rt.autocast():
                outputs = model(x)
            outputs = {k: _to_float(v) for k, v in outputs.items()}
            loss, _ = loss_fn(outputs, target, epoch)
            if not torch.isfinite(loss):
                raise NonFiniteLoss(float(loss.detach()))
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.train.grad_clip > 0:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            if after_step is not None:
                after_step()
            total_loss += float(loss.detach()) * len(images)
            total_images += len(images)
            bar.update(len(images))
            bar.set_postfix(loss=f"{total_loss / total_images:.4f}", refresh=False)
    return total_loss / max(total_images, 1)


def _to_float(value):
    if isinstance(value, torch.Tensor):
        return value.float()
    if isinstance(value, (list, tuple)):
        return [v.float() for v in value]
    return value


class NonFiniteLoss(Exception):
    def __init__(self, value: float):
        super().__init__(f"loss became {value}")


@torch.no_grad()
def validate(model, images: np.ndarray, masks: np.ndarray, loss_fn, cfg: Config, rt: Runtime, epoch: int,
             batch_size: int) -> tuple[np.ndarray, float]:
    """Validation probabilities at 101x101 and the mean loss, from one forward pass per batch."""
    from pipeline.geometry import restore

    model.eval()
    probs = np.empty(images.shape, dtype=np.float32)
    total = 0.0
    for start in range(0, len(images), batch_size):
        x, target = to_batch(torch.from_numpy(images[start:start + batch_size]),
                             torch.from_numpy(masks[start:start + batch_size]), cfg, rt)
        with rt.autocast():
            logits = model(x)["mask"]
        logits = logits.float()
        loss, _ = loss_fn({"mask": logits}, target, epoch)
        total += float(loss) * len(x)
        probs[start:start + len(x)] = restore(torch.sigmoid(logits), cfg.input.mode)[:, 0].cpu().numpy()
    return probs, total / max(len(images), 1)


# ---------------------------------------------------------------- one fold


def train_fold(cfg: Config, fold: int, data, fold_ids: np.ndarray, rt: Runtime, *, resume: bool = True,
               dist: DistContext = DistContext()) -> dict:
    """Train fold `fold` (its validation ids are those with fold_ids == fold); returns done.json."""
    from pipeline.augment import build_train_transform
    from pipeline.losses import SegLoss
    from pipeline.metric import competition_score
    from pipeline.models import create_model

    fold_dir = cfg.run_dir / f"fold{fold}"
    fold_dir.mkdir(parents=True, exist_ok=True)
    if dist.is_main:
        fileio.remove_stale_temp_files(fold_dir)  # this process holds the fold's lock: no live writer
    digest = training_digest(cfg)
    t = cfg.train
    say = print if dist.is_main else (lambda *a, **k: None)

    # --- data: in-memory arrays, validation = this fold's ids (in id order)
    val_index = np.flatnonzero(fold_ids == fold)
    train_index = np.flatnonzero(fold_ids != fold)
    if t.limit_train:
        train_index = train_index[: t.limit_train]
    val_images, val_masks = data.images[val_index], data.masks[val_index]
    val_shard = dist.shard(len(val_index))  # each rank predicts one shard, then they are gathered
    train_images, train_masks = data.images[train_index], data.masks[train_index]
    if cfg.pseudo.teacher:  # test images labelled by the teacher's fold-k model (pipeline/pseudo.py)
        from pipeline.pseudo import pseudo_labels

        # a fold started afresh (--restart, --force) labels afresh
        pseudo_images, pseudo_masks = pseudo_labels(cfg, fold, [data.ids[i] for i in val_index], rt, digest,
                                                    use_cache=resume, write_cache=dist.is_main, say=say)
        train_images = np.concatenate([train_images, pseudo_images])
        train_masks = np.concatenate([train_masks, pseudo_masks])
    transform = build_train_transform(cfg.augment, seed=cfg.seed)
    train_set = SaltDataset(train_images, train_masks, transform)
    batch_size = max(1, t.batch_size // dist.world_size)  # train.batch_size is the global batch

    # --- model, optimizer, schedule, loss: identical init for identical (seed, fold)
    torch.manual_seed(epoch_seed(cfg.seed, fold, -1))
    model = create_model(cfg.model)
    if dist.enabled and t.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(rt.device, memory_format=rt.memory_format())
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer)
    scaler = rt.grad_scaler()
    loss_fn = SegLoss(cfg.loss, cfg.model.deep_supervision)
    ema = build_ema(model, t.ema_decay)
    eval_model = ema.module if ema is not None else model  # the weights validated and kept

    state = LoopState()
    log_rows: list[dict] = []
    checkpoint = load_resume_checkpoint(fold_dir, digest) if resume else None
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        if scheduler is not None and checkpoint.get("scheduler") is not None:
            scheduler.load_state_dict(checkpoint["scheduler"])
        scaler.load_state_dict(checkpoint["scaler"])
        if ema is not None:
            ema.load_state_dict(checkpoint["ema"])
        state = LoopState(**checkpoint["state"])
        # the log may be one epoch ahead of the checkpoint if the kill fell between the two writes
        log_rows = [row for row in read_log(fold_dir / "log.csv") if int(row["epoch"]) <= state.epoch]
        say(f"fold {fold}: resuming at epoch {state.epoch + 1}/{t.epochs} (best {state.best_score:.4f})")
    elif dist.is_main:
        # done.json first: a kill part-way through must not leave a "finished" fold without its files
        for stale in ("done.json", "best.pt", "last.pt", "prev.pt", "stage1.pt", "oof.npy", "oof_ids.txt",
                      "log.csv", *(p.name for p in snapshot_paths(fold_dir))):
            (fold_dir / stale).unlink(missing_ok=True)
    dist.barrier()

    step_model = model
    if dist.enabled:
        step_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[rt.device.index] if rt.is_cuda else None)
    if t.compile:
        step_model = torch.compile(step_model)

    say(f"fold {fold}: {len(train_set)} train / {len(val_index)} val images on {rt.describe()}"
        + (f" x {dist.world_size} processes" if dist.enabled else ""))
    def diverged(what: str):
        raise PipelineError(f"{fold_dir}: fold {fold} epoch {state.epoch + 1}: {what}; training stopped, "
                            f"{last_good_checkpoint(fold_dir)} (lower train.lr or set train.grad_clip)")

    while state.epoch < t.epochs:
        epoch = state.epoch
        started = time.perf_counter()
        # --- seed this epoch: shuffling, augmentation and dropout do not depend on history
        seed = epoch_seed(cfg.seed, fold, epoch)
        torch.manual_seed(seed + dist.rank)
        transform.set_random_seed(seed + dist.rank)
        sampler = None
        if dist.enabled:
            sampler = torch.utils.data.DistributedSampler(
                train_set, num_replicas=dist.world_size, rank=dist.rank, shuffle=True, seed=seed, drop_last=True)
        loader = torch.utils.data.DataLoader(
            train_set, batch_size=batch_size, shuffle=sampler is None, sampler=sampler,
            drop_last=len(train_set) > t.batch_size, num_workers=t.num_workers,
            generator=torch.Generator().manual_seed(seed), pin_memory=rt.is_cuda,
            worker_init_fn=functools.partial(seed_loader_worker, seed + 1000 * dist.rank) if t.num_workers else None,
        )
        desc = f"fold {fold} epoch {epoch + 1}/{t.epochs}"
        try:
            train_loss = train_one_epoch(step_model, loader, optimizer, scaler, loss_fn, cfg, rt, epoch, desc,
                                         show_progress=dist.is_main,
                                         after_step=(lambda: ema.update_parameters(model)) if ema else None)
        except NonFiniteLoss as exc:
            diverged(str(exc))
        train_loss = dist.mean(train_loss)
        # a finite loss does not make finite weights: the last step of the epoch may have overflowed
        bad = first_non_finite(model.state_dict()) or (first_non_finite(eval_model.state_dict())
                                                       if eval_model is not model else None)
        if bad is not None:
            diverged(f"weight {bad} became NaN or infinite")

        # --- validate with the competition metric at threshold 0.5 (shards gathered across ranks)
        validating = epoch + 1 >= t.validate_from
        val_score = val_loss = val_score_raw = float("nan")
        if validating:
            shard_probs, shard_loss = validate(eval_model, val_images[val_shard], val_masks[val_shard], loss_fn,
                                               cfg, rt, epoch, cfg.predict.batch_size)
            val_probs = dist.gather_concat(shard_probs)
            if not np.isfinite(val_probs).all():  # NaN > 0.5 is False: it would score as all-empty masks
                diverged("validation probabilities are NaN or infinite")
            val_score = competition_score(val_masks, val_probs > 0.5)
            val_loss = dist.mean(shard_loss)
            if ema is not None:
                raw_probs, _ = validate(model, val_images[val_shard], val_masks[val_shard], loss_fn, cfg, rt,
                                        epoch, cfg.predict.batch_size)
                val_score_raw = competition_score(val_masks, dist.gather_concat(raw_probs) > 0.5)
        lr = optimizer.param_groups[0]["lr"]
        step_scheduler(scheduler, val_score)

        improved = validating and val_score > state.best_score
        if improved:
            state.best_score, state.best_epoch = val_score, epoch
            state.epochs_without_improvement = 0
        elif validating:
            state.epochs_without_improvement += 1
        snapshot_improved = False
        if t.snapshots:
            # one snapshot per cosine cycle: the best epoch of that cycle (1st place's recipe)
            if epoch % t.cycle_epochs == 0:
                state.cycle_best_score = -1.0
            snapshot_improved = validating and val_score > state.cycle_best_score
            if snapshot_improved:
                state.cycle_best_score = val_score
        seconds = time.perf_counter() - started
        state.seconds += seconds
        state.epoch = epoch + 1

        if dist.is_main:
            if improved:
                # the fold's OOF with its best weights; ids beside them, in the same order
                fileio.write_npy(fold_dir / "oof.npy", val_probs.astype(np.float16))
                fileio.write_text(fold_dir / "oof_ids.txt", "\n".join(data.ids[i] for i in val_index) + "\n")
                save_checkpoint(fold_dir / "best.pt", {
                    "model": eval_model.state_dict(), "epoch": epoch, "val_score": val_score,
                    "config_digest": digest, "fold": fold,
                })
            if snapshot_improved:
                save_checkpoint(fold_dir / f"snapshot{epoch // t.cycle_epochs}.pt", {
                    "model": eval_model.state_dict(), "epoch": epoch, "val_score": val_score,
                    "config_digest": digest, "fold": fold,
                })
            # --- checkpoint everything needed to continue; the previous one stays as prev.pt
            if (fold_dir / "last.pt").exists():
                os.replace(fold_dir / "last.pt", fold_dir / "prev.pt")
            resume_state = {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "scaler": scaler.state_dict(), "state": vars(state).copy(), "config_digest": digest,
                "fold": fold, **({"ema": ema.state_dict()} if ema is not None else {}),
            }
            save_checkpoint(fold_dir / "last.pt", resume_state)
            if t.keep_stage1 and state.epoch == cfg.loss.stage2_from_epoch:
                # the switch to the stage-2 loss: `pipeline branch` starts variants from here
                save_checkpoint(fold_dir / "stage1.pt", resume_state)
            log_rows.append({"epoch": epoch + 1, "lr": f"{lr:.3g}", "train_loss": f"{train_loss:.5f}",
                             "val_loss": f"{val_loss:.5f}", "val_score": f"{val_score:.5f}",
                             "val_score_raw": f"{val_score_raw:.5f}" if ema is not None else "",
                             "seconds": f"{seconds:.1f}"})
            write_log(fold_dir / "log.csv", log_rows)
        validated = (f"val_loss {val_loss:.4f}  val_score {val_score:.4f}{' *' if improved else '  '}"
                     + (f"  (raw weights {val_score_raw:.4f})" if ema is not None else "")
                     if validating else f"(validation from epoch {t.validate_from})")
        say(f"fold {fold} epoch {epoch + 1:3d}/{t.epochs}  lr {lr:.2e}  train_loss {train_loss:.4f}  "
            f"{validated}  {seconds:5.1f}s", flush=True)
        dist.barrier()

        if t.early_stop_patience and state.epochs_without_improvement >= t.early_stop_patience:
            say(f"fold {fold}: early stop, no improvement for {t.early_stop_patience} epochs")
            break

    done = {"fold": fold, "best_epoch": state.best_epoch + 1, "best_score": state.best_score,
            "epochs_run": state.epoch, "seconds": round(state.seconds, 1), "finished": round(time.time(), 1),
            "config_digest": digest}
    if dist.is_main:
        from pipeline.predict import fold_checkpoints
        from pipeline.runstate import fold_file_digests

        done.update(write_final_oof(cfg, fold, val_images, val_masks, rt))
        # the fold's files as finished: tune and predict check them against this (pipeline/runstate.py)
        done["files"] = fold_file_digests(fold_dir, fold_checkpoints(cfg, fold))
        fileio.write_json(fold_dir / "done.json", done)
    dist.barrier()
    return done


def build_ema(model: nn.Module, decay: float):
    """An exponential moving average of `model`'s weights and buffers (BatchNorm running
    statistics: the average is used as it is, no BN recalibration pass), or None when decay is 0.
    Why buffers too: averaged weights with the raw model's running statistics mismatch."""
    if not decay:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def snapshot_paths(fold_dir: Path) -> list[Path]:
    return sorted(fold_dir.glob("snapshot*.pt"), key=lambda p: int(p.stem.removeprefix("snapshot")))


def write_final_oof(cfg: Config, fold: int, val_images: np.ndarray, val_masks: np.ndarray,
                    rt: Runtime) -> dict:
    """Predict the fold's validation images exactly as `predict` will predict the test set (its
    checkpoints: best.pt or the cycle snapshots, averaged; with the config's TTA) and make that
    the fold's OOF, so the threshold is tuned on the same kind of probabilities it is applied to.
    Training kept the single-pass OOF of the best epoch; this replaces it only when it differs
    (TTA or snapshots), and done.json records both scores."""
    from pipeline.metric import competition_score
    from pipeline.predict import fold_checkpoints, fold_probs

    tta = list(cfg.predict.tta)
    checkpoints = fold_checkpoints(cfg, fold)
    if tta == ["none"] and checkpoints == [cfg.run_dir / f"fold{fold}" / "best.pt"]:
        return {}  # one plain pass of best.pt: the OOF training kept is already that
    n_checkpoints = len(checkpoints)
    probs = fold_probs(cfg, fold, val_images, rt, tta)
    if not np.isfinite(probs).all():
        raise PipelineError(f"{cfg.run_dir / f'fold{fold}' / 'oof.npy'}: not written, the fold's checkpoints "
                            "predict NaN or infinite probabilities")
    fileio.write_npy(cfg.run_dir / f"fold{fold}" / "oof.npy", probs.astype(np.float16))
    score = competition_score(val_masks, probs > 0.5)
    print(f"fold {fold}: OOF as predicted for the test set ({n_checkpoints} checkpoint(s) x TTA {tta}): "
          f"val_score {score:.4f}")
    return {"oof_checkpoints": n_checkpoints, "oof_tta": tta, "oof_score": score}


# ---------------------------------------------------------------- all folds


def prepare_run_dir(cfg: Config, *, force: bool) -> None:
    """Create runs/<name>/ with config.yaml; refuse to reuse a run made with another config.

    A run trained fold by fold (`train --folds 0`, later `train --folds 1`) is one experiment:
    the saved config lists every fold asked for so far, so `tune` and `predict` see them all."""
    path = cfg.run_dir / "config.yaml"
    saved = cfg
    if path.exists() and not force:
        previous = load_config(path)
        if training_digest(previous) != training_digest(cfg):
            old, new = flatten(previous), flatten(cfg)
            changed = [k for k in new if old.get(k) != new[k] and is_training_key(k)]
            raise PipelineError(
                f"{path}: this run was made with a different config (differs in {', '.join(changed[:5])}); "
                "use another name, or --force to retrain"
            )
        saved = dataclasses.replace(cfg, folds=merged_folds(previous, cfg))
        if dump_yaml(previous) == dump_yaml(saved):
            return
    save_config(saved, path)


def merged_folds(previous: Config, requested: Config) -> list[int]:
    """The folds of a run asked for before and now ([] = all of them)."""
    folds = sorted(set(previous.fold_list()) | set(requested.fold_list()))
    return [] if folds == list(range(requested.n_folds)) else folds


def fold_is_done(cfg: Config, fold: int) -> bool:
    done = cfg.run_dir / f"fold{fold}" / "done.json"
    if not done.exists():
        return False
    try:
        info = fileio.read_json(done)
        recorded = info.get("files") or {"oof.npy": ""}  # a done.json from before it recorded its files
        return info.get("config_digest") == training_digest(cfg) and \
            all((done.parent / name).exists() for name in recorded)
    except (PipelineError, AttributeError):
        return False


def load_training_data(cfg: Config, dist: DistContext = DistContext()):
    """The train set and, aligned with it, each id's fold (folds file made when missing)."""
    from pipeline.data import load_train
    from pipeline.folds import load_folds, make_folds_for_dir

    data = load_train(cfg.data)
    folds_path = cfg.folds_path()
    if not folds_path.exists() and dist.is_main:
        print(f"{folds_path}: not found, making {cfg.n_folds} stratified folds (seed {cfg.seed})")
        make_folds_for_dir(cfg.data, k=cfg.n_folds, seed=cfg.seed, out=folds_path)
    dist.barrier()
    folds = load_folds(folds_path, data.ids).set_index("id").loc[data.ids]
    fold_ids = folds["fold"].to_numpy()
    found = int(fold_ids.max()) + 1
    if found != cfg.n_folds:
        raise PipelineError(f"{folds_path}: has {found} folds but the config asks for n_folds={cfg.n_folds}")
    return data, fold_ids


def train_folds(cfg: Config, *, resume: bool = True, force: bool = False, parallel_folds: bool = False,
                device: str | None = None, fold_worker: bool = False) -> list[dict]:
    """Train every requested fold that is not already complete (under a per-fold lock).

    Under torchrun (WORLD_SIZE > 1) every process runs this; the folds are trained one
    after another, each by all processes together. `fold_worker`: this process is one of
    `--parallel-folds`' per-fold processes, whose parent has written the run's config.yaml
    (the worker's own config differs in its fold, threads and parallel_folds: not the run's).
    """
    check_folds(cfg.folds, cfg.n_folds, f"{cfg.name}: folds")  # before config.yaml is written
    if (parallel_folds or cfg.train.parallel_folds) and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        from pipeline.parallel import train_folds_in_parallel

        return train_folds_in_parallel(cfg, resume=resume, force=force)
    dist = init_from_env()
    try:
        if dist.is_main and not fold_worker:
            prepare_run_dir(cfg, force=force)
        dist.barrier()
        todo = [k for k in cfg.fold_list() if force or not fold_is_done(cfg, k)]
        results = [fileio.read_json(cfg.run_dir / f"fold{k}" / "done.json")
                   for k in cfg.fold_list() if k not in todo]
        for done in results:
            if dist.is_main:
                print(f"fold {done['fold']}: already trained (best {done['best_score']:.4f}), skipping")
        if not todo:
            return results
        if dist.enabled and device is None and torch.cuda.is_available():
            device = f"cuda:{dist.local_rank}"
        threads = cfg.train.threads or (max(1, (os.cpu_count() or 1) // dist.world_size) if dist.enabled else 0)
        rt = resolve_runtime(cfg.train.precision, cfg.train.channels_last, device, threads)
        data, fold_ids = load_training_data(cfg, dist)
        for fold in todo:
            lock = fileio.file_lock(cfg.run_dir / f"fold{fold}" / "train.lock", blocking=False,
                                    what=f"fold {fold} of run {cfg.name}") if dist.is_main else contextlib.nullcontext()
            with lock:
                results.append(train_fold(cfg, fold, data, fold_ids, rt, resume=resume and not force, dist=dist))
        results.sort(key=lambda d: d["fold"])
        scores = [d["best_score"] for d in results]
        if dist.is_main:
            print(f"{cfg.name}: folds {[d['fold'] for d in results]} best val scores "
                  f"{', '.join(f'{s:.4f}' for s in scores)} (mean {np.mean(scores):.4f})")
        return results
    finally:
        shutdown(dist)
