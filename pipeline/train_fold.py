"""One fold's training: one model, reproducible, resumable, selected by the competition metric.

Read `train_fold` top to bottom: set-up, data, model, optimizer, loop (train, validate,
schedule, checkpoint, early stop), OOF. What a fold writes into `runs/<name>/fold<k>/` is
named in pipeline/rundir.py; its checkpoints are written by pipeline/checkpoints.py. The
fold's oof.npy holds the best epoch's validation probabilities while it trains and, at its
end, those of its final model(s) with the config's TTA (as the test set is predicted).

Every epoch is seeded from (seed, fold, epoch), so a run resumed from last.pt ends with
the same weights as one never interrupted.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pipeline import fileio, runlog
from pipeline.checkpoints import CheckpointSaver, first_non_finite, fold_checkpoints, load_resume_checkpoint
from pipeline.config import Config
from pipeline.distributed import DistContext
from pipeline.errors import PipelineError
from pipeline.geometry import to_batch
from pipeline.loader import SaltDataset, TrainLoader, epoch_seed
from pipeline.manifests import fold_file_digests, fold_training_data
from pipeline.optim import build_ema, build_optimizer, build_scheduler, step_scheduler
from pipeline.rundir import FoldDir, read_log, training_digest, write_log
from pipeline.runtime import Runtime


# ---------------------------------------------------------------- loop state


@dataclass
class LoopState:
    epoch: int = 0  # the next epoch to run
    best_score: float = -1.0
    best_epoch: int = -1
    epochs_without_improvement: int = 0
    seconds: float = 0.0
    cycle_best_score: float = -1.0  # snapshot ensembling: the best score within the current lr cycle

    def record(self, epoch: int, scores: "EpochScores", seconds: float, t) -> tuple[bool, int | None]:
        """Account for a finished epoch; returns (a new best score?, the lr cycle whose best
        epoch this is so far, or None): what the epoch's checkpoints will keep."""
        improved = scores.validated and scores.score > self.best_score
        if improved:
            self.best_score, self.best_epoch = scores.score, epoch
            self.epochs_without_improvement = 0
        elif scores.validated:
            self.epochs_without_improvement += 1
        snapshot = None
        if t.snapshots:
            # one snapshot per cosine cycle: the best epoch of that cycle (1st place's recipe)
            if epoch % t.cycle_epochs == 0:
                self.cycle_best_score = -1.0
            if scores.validated and scores.score > self.cycle_best_score:
                self.cycle_best_score = scores.score
                snapshot = epoch // t.cycle_epochs
        self.seconds += seconds
        self.epoch = epoch + 1
        return improved, snapshot


# ---------------------------------------------------------------- one epoch


def progress(total: int, desc: str, disable: bool = False):
    from tqdm import tqdm

    interactive = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit="img", leave=False, dynamic_ncols=True, disable=disable,
                mininterval=0.5 if interactive else 10.0, file=sys.stderr)


def run_steps(step_model, loader, parts: "Training", cfg: Config, rt: Runtime, epoch: int,
              desc: str | None = None) -> float:
    """The optimizer steps of one pass over `loader` (and the EMA's update after each); the mean
    training loss. `step_model` is what the steps run through (parts.model, or it wrapped in DDP
    or torch.compile); `desc` names the progress bar (None: no bar).

    Nothing in a step reads a value back from the device (on a GPU that would stall the queue
    of kernels every step): the loss sum and the first non-finite loss are kept on the device
    and read once at the end; the progress bar's loss at most once per its refresh interval.
    A non-finite loss therefore stops the epoch at its end rather than at once: no checkpoint
    of it is written either way, and the previous epoch's last.pt stays the one to resume."""
    optimizer, scaler, loss_fn, ema = parts.optimizer, parts.scaler, parts.loss_fn, parts.ema
    step_model.train()
    total_images = 0
    total_loss = torch.zeros((), dtype=torch.float64, device=rt.device)
    first_bad_loss = torch.zeros((), device=rt.device)  # stays 0 (finite) while every loss is
    with progress(len(loader.sampler), desc or "", disable=desc is None) as bar:
        shown = time.monotonic()
        for images, masks in loader:
            x, target = to_batch(images, masks, cfg, rt)
            with rt.autocast():
                outputs = step_model(x)
            outputs = {k: _to_float(v) for k, v in outputs.items()}
            loss, _ = loss_fn(outputs, target, epoch)
            detached = loss.detach()
            first_bad_loss = torch.where(torch.isfinite(first_bad_loss) & ~torch.isfinite(detached),
                                         detached, first_bad_loss)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.train.grad_clip > 0:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(parts.model.parameters(), cfg.train.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            if ema is not None:
                ema.update_parameters(parts.model)
            total_loss += detached.double() * len(images)
            total_images += len(images)
            bar.update(len(images))
            if not bar.disable and time.monotonic() - shown >= bar.mininterval:
                shown = time.monotonic()
                bar.set_postfix(loss=f"{float(total_loss) / total_images:.4f}", refresh=False)
    if not bool(torch.isfinite(first_bad_loss)):
        raise NonFiniteLoss(float(first_bad_loss))
    return float(total_loss) / max(total_images, 1)


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
def validate(model, images: np.ndarray, masks: np.ndarray, loss_fn, cfg: Config, rt: Runtime,
             epoch: int) -> tuple[np.ndarray, float]:
    """Validation probabilities at 101x101 (predict.predict_probs: as the test set is predicted,
    without TTA) and the mean loss of the config's loss on them against the 101x101 masks."""
    from pipeline.predict import predict_probs

    probs = predict_probs(model, images, cfg, rt)
    return probs, validation_loss(probs, masks, loss_fn, epoch)


def validation_loss(probs: np.ndarray, masks: np.ndarray, loss_fn, epoch: int) -> float:
    """The epoch's mask loss (no deep-supervision heads: inference has none) of the 101x101
    probabilities, over the image itself, the logits clamped at +-13.8 (float32 sigmoids saturate)."""
    total = 0.0
    for start in range(0, len(probs), 256):
        p = torch.from_numpy(probs[start:start + 256])[:, None].clamp(1e-6, 1 - 1e-6)
        target = (torch.from_numpy(masks[start:start + 256])[:, None] > 0).float()
        loss, _ = loss_fn.mask_loss(torch.logit(p), target, loss_fn.loss_name(epoch))
        total += float(loss) * len(p)
    return total / max(len(probs), 1)


# ---------------------------------------------------------------- one fold


@dataclass(frozen=True)
class FoldContext:
    """What every step of one fold's training shares: the config, which fold, where it runs
    (device and precision; its process among DDP's), where it writes, and the digest its
    checkpoints carry."""

    cfg: Config
    fold: int
    rt: Runtime
    dist: DistContext
    folder: FoldDir
    digest: str

    def say(self, *args, **kwargs) -> None:
        """print, on the main process only."""
        if self.dist.is_main:
            print(*args, **kwargs)


def train_fold(cfg: Config, fold: int, data, fold_ids: np.ndarray, rt: Runtime, *, resume: bool = True,
               dist: DistContext = DistContext()) -> dict:
    """Train fold `fold` (its validation ids are those with fold_ids == fold); returns done.json."""
    t = cfg.train
    ctx = FoldContext(cfg, fold, rt, dist, FoldDir.of(cfg, fold), training_digest(cfg))
    ctx.folder.path.mkdir(parents=True, exist_ok=True)
    if dist.is_main:
        fileio.remove_stale_temp_files(ctx.folder.path)  # this process holds the fold's lock: no live writer

    training_data = fold_training_data(cfg, [data.ids[i] for i in np.flatnonzero(fold_ids == fold)])
    checkpoint = load_resume_checkpoint(ctx.folder, ctx.digest) if resume else None
    if checkpoint is not None and made_on_other_data(ctx, checkpoint, training_data):
        checkpoint, resume = None, False  # the fold starts afresh, as with --restart
    split = fold_data(ctx, data, fold_ids, use_cache=resume)
    parts = build_training(ctx)
    state, log_rows = resume_or_start_afresh(ctx, parts, checkpoint)
    step_model = wrap_for_steps(ctx, parts.model)
    saver = CheckpointSaver(ctx.folder, ctx.digest, training_data)
    batches = fold_loader(ctx, split.train_set)  # its workers live for the fold
    last_written = time.monotonic()

    ctx.say(f"fold {fold}: {len(split.train_set)} train / {len(split.val_index)} val images on {rt.describe()}"
            + (f" x {dist.world_size} processes" if dist.enabled else ""))
    while state.epoch < t.epochs:
        epoch, started = state.epoch, time.perf_counter()
        train_loss = train_epoch(ctx, step_model, parts, epoch_loader(ctx, batches, epoch), epoch)
        scores = validate_epoch(ctx, parts, split, epoch)
        lr = parts.optimizer.param_groups[0]["lr"]
        step_scheduler(parts.scheduler, scores.score)
        seconds = time.perf_counter() - started
        improved, snapshot = state.record(epoch, scores, seconds, t)
        stopping = bool(t.early_stop_patience) and state.epochs_without_improvement >= t.early_stop_patience
        result = EpochResult(epoch, lr, train_loss, scores, improved, seconds)
        write_last = last_checkpoint_due(cfg, state, stopping, time.monotonic() - last_written)

        if dist.is_main:
            if improved:
                keep_best_oof(ctx.folder, split, data.ids, scores.probs)
            saver.save(weights=parts.eval_model.state_dict(), resume=parts.resume_state(state, rt),
                       epoch=epoch, val_score=scores.score, best=improved, snapshot=snapshot,
                       stage1=cfg.run.keep_stage1 and state.epoch == cfg.loss.stage2_from_epoch, last=write_last)
            log_rows.append(log_row(result, with_raw=parts.ema is not None))
            write_log(ctx.folder.log, log_rows)
            runlog.tensorboard_epoch(cfg, fold, log_rows[-1])
        if write_last:
            last_written = time.monotonic()
        ctx.say(epoch_line(fold, t, result), flush=True)
        dist.barrier()

        if stopping:
            ctx.say(f"fold {fold}: early stop, no improvement for {t.early_stop_patience} epochs")
            break
    return finish_fold(ctx, split, state, training_data["train_fingerprint"])


def last_checkpoint_due(cfg: Config, state: LoopState, stopping: bool, seconds_since: float) -> bool:
    """Write last.pt after this epoch? Once run.checkpoint_seconds have passed since the last
    write (a ~200 MB fsynced file every ~1 s epoch would cost more than the epoch), and always
    at the end of a loss stage and of the fold. A kill therefore loses at most that many seconds
    of training plus the epoch under way; the resume trains them again to the same weights
    (every epoch is seeded from (seed, fold, epoch))."""
    fold_ends = stopping or state.epoch >= cfg.train.epochs
    stage_ends = state.epoch == cfg.loss.stage2_from_epoch
    return fold_ends or stage_ends or seconds_since >= cfg.run.checkpoint_seconds


# ---------------------------------------------------------------- the steps of train_fold


@dataclass
class FoldData:
    """One fold's training set (with its pseudo-labels) and its validation images (in id order)."""

    train_set: SaltDataset
    val_index: np.ndarray  # rows of the train data validated on
    val_images: np.ndarray
    val_masks: np.ndarray
    val_shard: slice  # this process's share of the validation images (all of them without DDP)


def fold_data(ctx: FoldContext, data, fold_ids: np.ndarray, *, use_cache: bool) -> FoldData:
    """In-memory arrays: validation = this fold's ids; training = the others (train.limit_train
    of them in smoke runs), plus the test images the teacher labels (pseudo.teacher)."""
    from pipeline.augment import build_train_transform

    cfg = ctx.cfg
    val_index = np.flatnonzero(fold_ids == ctx.fold)
    train_index = np.flatnonzero(fold_ids != ctx.fold)
    if cfg.train.limit_train:
        train_index = train_index[: cfg.train.limit_train]
    train_images, train_masks = data.images[train_index], data.masks[train_index]
    if cfg.pseudo.teacher:  # test images labelled by the teacher's fold-k model (pipeline/pseudo.py)
        from pipeline.pseudo import pseudo_labels

        # a fold started afresh (--restart, --force) labels afresh
        pseudo_images, pseudo_masks = pseudo_labels(cfg, ctx.fold, [data.ids[i] for i in val_index], ctx.rt,
                                                    ctx.digest, use_cache=use_cache, write_cache=ctx.dist.is_main,
                                                    say=ctx.say)
        train_images = np.concatenate([train_images, pseudo_images])
        train_masks = np.concatenate([train_masks, pseudo_masks])
    transform = build_train_transform(cfg.augment, seed=cfg.seed)
    return FoldData(train_set=SaltDataset(train_images, train_masks, transform), val_index=val_index,
                    val_images=data.images[val_index], val_masks=data.masks[val_index],
                    val_shard=ctx.dist.shard(len(val_index)))  # each rank predicts one shard, then they are gathered


@dataclass
class Training:
    """What a fold trains and carries from epoch to epoch: all of it is in last.pt."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object  # an lr scheduler, or None
    scaler: torch.amp.GradScaler
    loss_fn: nn.Module
    ema: nn.Module | None  # train.ema_decay's WeightEMA (pipeline/optim.py), or None

    @property
    def eval_model(self) -> nn.Module:
        """The weights validated and kept in best.pt: the average when there is one."""
        return self.ema.module if self.ema is not None else self.model

    def resume_state(self, state: LoopState, rt: Runtime) -> dict:
        """last.pt's payload; `precision` is the resolved one ("auto" hashes alike on every
        GPU, so a resume may run in another: see load_resume_state)."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                "scaler": self.scaler.state_dict(), "precision": rt.precision, "state": vars(state).copy(),
                **({"ema": self.ema.state_dict()} if self.ema is not None else {})}

    def load_resume_state(self, checkpoint: dict) -> LoopState:
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        if self.scheduler is not None and checkpoint.get("scheduler") is not None:
            self.scheduler.load_state_dict(checkpoint["scheduler"])
        load_scaler(self.scaler, checkpoint.get("scaler") or {})
        if self.ema is not None:
            self.ema.load_state_dict(checkpoint["ema"])
        return LoopState(**checkpoint["state"])


def load_scaler(scaler: torch.amp.GradScaler, saved: dict) -> None:
    """The saved loss scale, where there is one to take: a run that did not scale its losses
    (bf16 or fp32: a disabled scaler saves {}) leaves an fp16 resume's scaler at its start, as
    a fresh run's (GradScaler.load_state_dict raises on {}); a disabled scaler ignores any."""
    if scaler.is_enabled() and saved:
        scaler.load_state_dict(saved)


def build_training(ctx: FoldContext) -> Training:
    """Model, optimizer, schedule, loss scaler, loss and EMA: identical init for identical (seed, fold).
    Under DDP on GPUs, SyncBatchNorm (run.sync_bn): BatchNorm over the global batch, as one
    process trains it; torch has no CPU kernel for it, so CPU processes (gloo) keep their own."""
    from pipeline.losses import SegLoss
    from pipeline.models import create_model

    cfg, rt = ctx.cfg, ctx.rt
    torch.manual_seed(epoch_seed(cfg.seed, ctx.fold, -1))
    model = create_model(cfg.model)
    if ctx.dist.enabled and cfg.run.sync_bn:
        if rt.is_cuda:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:
            ctx.say(f"fold {ctx.fold}: BatchNorm per process ({cfg.train.batch_size // ctx.dist.world_size} images): "
                    "torch's SyncBatchNorm runs on GPUs only")
    model = model.to(rt.device, memory_format=rt.memory_format())
    optimizer = build_optimizer(cfg, model)
    return Training(model=model, optimizer=optimizer, scheduler=build_scheduler(cfg, optimizer),
                    scaler=rt.grad_scaler(), loss_fn=SegLoss(cfg.loss, cfg.model.deep_supervision),
                    ema=build_ema(model, cfg.train.ema_decay))


def made_on_other_data(ctx: FoldContext, checkpoint: dict, training_data: dict[str, str]) -> bool:
    """Was the resume checkpoint made on other train data (its bytes) or another split (the
    fold's validation ids) than the fold has now (`training_data`: manifests.fold_training_data)?
    Then resuming would continue on data the fold did not start on, and its done.json would
    record the new data as if trained on it throughout: the fold is trained again from the
    start, with one note (as train_folds.folds_to_train's for a finished fold). A checkpoint
    written before last.pt recorded its data (neither key) resumes as before: nothing to compare
    it with, and restarting it would cost the hours it holds. Every DDP process reads the same
    files and decides alike (resume_or_start_afresh waits for all before removing any)."""
    differs = [what for key, what in (("train_fingerprint", "other train data"), ("split_digest", "another split"))
               if key in checkpoint and checkpoint[key] != training_data[key]]
    if differs:
        ctx.say(f"note: fold {ctx.fold} is trained again from the start (its {ctx.folder.last.name} was made on "
                f"{' and '.join(differs)})", flush=True)
    return bool(differs)


def resume_or_start_afresh(ctx: FoldContext, parts: Training, checkpoint: dict | None) -> tuple[LoopState, list[dict]]:
    """(loop state, log rows so far): from `checkpoint` (the resume checkpoint train_fold chose),
    or, when None, afresh, with every file of an earlier training of the fold removed."""
    folder = ctx.folder
    ctx.dist.barrier()  # every process has read the resume checkpoint before the main one may remove it
    if checkpoint is not None:
        state = parts.load_resume_state(checkpoint)
        # the log may be one epoch ahead of the checkpoint if the kill fell between the two writes
        rows = [row for row in read_log(folder.log) if int(row["epoch"]) <= state.epoch]
        ctx.say(f"fold {folder.fold}: resuming at epoch {state.epoch + 1}/{ctx.cfg.train.epochs} "
                f"(best {state.best_score:.4f})")
        saved = checkpoint.get("precision")
        if saved is not None and saved != ctx.rt.precision:
            ctx.say(f"fold {folder.fold}: {folder.last.name} was trained in {saved}, resuming in {ctx.rt.precision}"
                    + (" (the loss scale starts afresh)" if parts.scaler.is_enabled() else ""))
    else:
        state, rows = LoopState(), []
        if ctx.dist.is_main:
            for stale in folder.training_files():
                stale.unlink(missing_ok=True)
    ctx.dist.barrier()
    return state, rows


def wrap_for_steps(ctx: FoldContext, model: nn.Module) -> nn.Module:
    """The module the optimizer steps through: DDP across processes, compiled when asked
    (run.compile: a fixed-shape step, so "reduce-overhead" can replay it as CUDA graphs)."""
    if ctx.dist.enabled:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[ctx.rt.device.index] if ctx.rt.is_cuda else None)
    if ctx.cfg.run.compile != "off":
        model = torch.compile(model, mode=ctx.cfg.run.compile)
    return model


def fold_loader(ctx: FoldContext, train_set: SaltDataset) -> TrainLoader:
    """The fold's batches (pipeline/loader.py): with run.num_workers, workers that live for the
    fold (persistent) and are re-seeded every epoch through the sampler."""
    t, dist = ctx.cfg.train, ctx.dist
    return TrainLoader(train_set, batch_size=max(1, t.batch_size // dist.world_size),  # the global batch
                       num_workers=ctx.cfg.run.num_workers, drop_last=len(train_set) > t.batch_size,
                       pin_memory=ctx.rt.is_cuda, world_size=dist.world_size, rank=dist.rank)


def epoch_loader(ctx: FoldContext, batches: TrainLoader, epoch: int):
    """The epoch's batches, seeded from (seed, fold, epoch): shuffling, augmentation and dropout
    do not depend on history, so a resumed fold ends with the weights of an uninterrupted one."""
    seed = epoch_seed(ctx.cfg.seed, ctx.fold, epoch)
    torch.manual_seed(seed + ctx.dist.rank)
    batches.dataset.transform.set_random_seed(seed + ctx.dist.rank)
    return batches.epoch(seed)


def train_epoch(ctx: FoldContext, step_model: nn.Module, parts: Training, loader, epoch: int) -> float:
    """run_steps plus what an epoch adds: the progress bar, the non-finite checks (loss and
    weights: training stops with one line, last.pt, if any, still holds the last good epoch)
    and the mean loss over every process."""
    model = parts.model
    try:
        loss = run_steps(step_model, loader, parts, ctx.cfg, ctx.rt, epoch,
                         f"fold {ctx.fold} epoch {epoch + 1}/{ctx.cfg.train.epochs}" if ctx.dist.is_main else None)
    except NonFiniteLoss as exc:
        diverged(ctx.folder, epoch, str(exc))
    # a finite loss does not make finite weights: the epoch's last step may have overflowed
    bad = first_non_finite(model.state_dict())
    if bad is None and parts.eval_model is not model:
        bad = first_non_finite(parts.eval_model.state_dict())
    if bad is not None:
        diverged(ctx.folder, epoch, f"weight {bad} became NaN or infinite")
    return ctx.dist.mean(loss)


def diverged(folder: FoldDir, epoch: int, what: str):
    """Stop the fold in one line naming what it can resume from: last.pt holds finite weights
    (CheckpointSaver never writes others), or there is none yet."""
    kept = (f"last good checkpoint kept at {folder.last}" if folder.last.exists()
            else "no checkpoint kept (it diverged in its first epoch)")
    raise PipelineError(f"{folder.path}: fold {folder.fold} epoch {epoch + 1}: {what}; training stopped, {kept} "
                        "(lower train.lr or set train.grad_clip)")


@dataclass
class EpochScores:
    """An epoch's validation (NaN before train.validate_from): the competition metric at threshold 0.5."""

    validated: bool
    score: float = float("nan")
    loss: float = float("nan")
    score_raw: float = float("nan")  # the raw weights' score when an EMA is validated
    probs: np.ndarray | None = None  # every validation image's probabilities, gathered


def validate_epoch(ctx: FoldContext, parts: Training, split: FoldData, epoch: int) -> EpochScores:
    """The validated weights' scores (shards gathered across processes, so every process takes
    the same decisions), and the raw weights' score beside an EMA's. Under DDP every process
    first takes rank 0's BatchNorm statistics: each updated its own in the epoch's last step
    (and the EMA averaged them), and rank 0's are the ones best.pt keeps."""
    from pipeline.metric import competition_score

    cfg, dist = ctx.cfg, ctx.dist
    if epoch + 1 < cfg.train.validate_from:
        return EpochScores(validated=False)
    dist.broadcast_buffers(parts.model)
    if parts.ema is not None:
        dist.broadcast_buffers(parts.ema.module)
    images, masks, shard = split.val_images, split.val_masks, split.val_shard
    shard_probs, shard_loss = validate(parts.eval_model, images[shard], masks[shard], parts.loss_fn, cfg, ctx.rt,
                                       epoch)
    probs = dist.gather_concat(shard_probs)
    if not np.isfinite(probs).all():  # NaN > 0.5 is False: it would score as all-empty masks (0.4)
        diverged(ctx.folder, epoch, "validation probabilities are NaN or infinite")
    # each shard's mean loss weighs by its size
    loss = dist.mean(shard_loss * len(shard_probs) * dist.world_size / max(len(probs), 1))
    scores = EpochScores(validated=True, score=competition_score(masks, probs > 0.5), loss=loss, probs=probs)
    if parts.ema is not None:
        raw_probs, _ = validate(parts.model, images[shard], masks[shard], parts.loss_fn, cfg, ctx.rt, epoch)
        scores.score_raw = competition_score(masks, dist.gather_concat(raw_probs) > 0.5)
    return scores


def keep_best_oof(folder: FoldDir, split: FoldData, ids, probs: np.ndarray) -> None:
    """The fold's OOF with its best weights; ids beside them, in the same order."""
    fileio.write_npy(folder.oof, probs.astype(np.float16))
    fileio.write_text(folder.oof_ids, "\n".join(ids[i] for i in split.val_index) + "\n")


@dataclass(frozen=True)
class EpochResult:
    """What one epoch did: its log row and printed line say it."""

    epoch: int  # 0-based
    lr: float
    train_loss: float
    scores: EpochScores
    improved: bool
    seconds: float


def log_row(result: EpochResult, *, with_raw: bool) -> dict:
    scores = result.scores
    return {"epoch": result.epoch + 1, "lr": f"{result.lr:.3g}", "train_loss": f"{result.train_loss:.5f}",
            "val_loss": f"{scores.loss:.5f}", "val_score": f"{scores.score:.5f}",
            "val_score_raw": f"{scores.score_raw:.5f}" if with_raw else "", "seconds": f"{result.seconds:.1f}"}


def epoch_line(fold: int, t, result: EpochResult) -> str:
    """The epoch's one printed line (the parallel runner echoes these: ' epoch ' and 'train_loss')."""
    scores = result.scores
    if scores.validated:
        validated = (f"val_loss {scores.loss:.4f}  val_score {scores.score:.4f}{' *' if result.improved else '  '}"
                     + (f"  (raw weights {scores.score_raw:.4f})" if t.ema_decay else ""))
    else:
        validated = f"(validation from epoch {t.validate_from})"
    return (f"fold {fold} epoch {result.epoch + 1:3d}/{t.epochs}  lr {result.lr:.2e}  "
            f"train_loss {result.train_loss:.4f}  {validated}  {result.seconds:5.1f}s")


def finish_fold(ctx: FoldContext, split: FoldData, state: LoopState, train_fingerprint: str) -> dict:
    """The fold's end, in one place: its final OOF (as the test set will be predicted), then
    done.json, written last. `train_fingerprint`: the train data's content the fold started on,
    as its last.pt records it (manifests.fold_training_data)."""
    done = {"fold": ctx.fold, "best_epoch": state.best_epoch + 1, "best_score": state.best_score,
            "epochs_run": state.epoch, "seconds": round(state.seconds, 1), "finished": round(time.time(), 1),
            "config_digest": ctx.digest}
    if ctx.dist.is_main:
        # the train data's content: a fold trained on other masks is not done
        # (manifests.fold_problem), `train`/`all` train it again
        done["train_fingerprint"] = train_fingerprint
        done.update(write_final_oof(ctx.cfg, ctx.fold, split.val_images, split.val_masks, ctx.rt))
        # the fold's files as finished: tune and predict check them against this (manifests.py)
        done["files"] = fold_file_digests(ctx.folder.path, fold_checkpoints(ctx.cfg, ctx.fold))
        fileio.write_json(ctx.folder.done, done)
    ctx.dist.barrier()
    return done


def write_final_oof(cfg: Config, fold: int, val_images: np.ndarray, val_masks: np.ndarray,
                    rt: Runtime) -> dict:
    """Predict the fold's validation images exactly as `predict` will predict the test set (its
    checkpoints: best.pt or the cycle snapshots, averaged; with the config's TTA) and make that
    the fold's OOF, so the threshold is tuned on the same kind of probabilities it is applied to.
    Training kept the single-pass OOF of the best epoch; this replaces it only when it differs
    (TTA or snapshots), and done.json records both scores."""
    from pipeline.metric import competition_score
    from pipeline.predict import fold_probs

    tta = list(cfg.predict.tta)
    checkpoints = fold_checkpoints(cfg, fold)
    folder = FoldDir.of(cfg, fold)
    if tta == ["none"] and checkpoints == [folder.best]:
        return {}  # one plain pass of best.pt: the OOF training kept is already that
    n_checkpoints = len(checkpoints)
    probs = fold_probs(cfg, fold, val_images, rt, tta)
    if not np.isfinite(probs).all():
        raise PipelineError(f"{folder.oof}: not written, the fold's checkpoints predict NaN or infinite probabilities")
    fileio.write_npy(folder.oof, probs.astype(np.float16))
    score = competition_score(val_masks, probs > 0.5)
    print(f"fold {fold}: OOF as predicted for the test set ({n_checkpoints} checkpoint(s) x TTA {tta}): "
          f"val_score {score:.4f}")
    return {"oof_checkpoints": n_checkpoints, "oof_tta": tta, "oof_score": score}

