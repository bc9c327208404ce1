"""K-fold training: one model per fold, reproducible, resumable, selected by the competition metric.

Read `train_fold` top to bottom: set-up, data, model, optimizer, loop (train, validate,
schedule, checkpoint, early stop), OOF. What a fold writes into `runs/<name>/fold<k>/` is
named in pipeline/rundir.py; its checkpoints are written by pipeline/checkpoints.py. The
fold's oof.npy holds the best epoch's validation probabilities while it trains and, at its
end, those of its final model(s) with the config's TTA (as the test set is predicted).

Every epoch is seeded from (seed, fold, epoch), so a run resumed from last.pt ends with
the same weights as one never interrupted.
"""

from __future__ import annotations

import functools
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pipeline import fileio
from pipeline.checkpoints import CheckpointSaver, fold_checkpoints, load_resume_checkpoint
from pipeline.config import Config
from pipeline.distributed import DistContext
from pipeline.errors import PipelineError
from pipeline.predict import to_batch
from pipeline.rundir import FoldDir, read_log, training_digest, write_log
from pipeline.runtime import Runtime


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

    folder = FoldDir.of(cfg, fold)
    fold_dir = folder.path
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
    checkpoint = load_resume_checkpoint(folder, digest) if resume else None
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
        log_rows = [row for row in read_log(folder.log) if int(row["epoch"]) <= state.epoch]
        say(f"fold {fold}: resuming at epoch {state.epoch + 1}/{t.epochs} (best {state.best_score:.4f})")
    elif dist.is_main:
        for stale in folder.training_files():
            stale.unlink(missing_ok=True)
    dist.barrier()

    saver = CheckpointSaver(folder, digest)
    step_model = model
    if dist.enabled:
        step_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[rt.device.index] if rt.is_cuda else None)
    if t.compile:
        step_model = torch.compile(step_model)

    say(f"fold {fold}: {len(train_set)} train / {len(val_index)} val images on {rt.describe()}"
        + (f" x {dist.world_size} processes" if dist.enabled else ""))
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
            raise PipelineError(
                f"{fold_dir}: fold {fold} epoch {epoch + 1}: {exc}; training stopped, "
                f"last good checkpoint kept at {folder.last} (lower train.lr or set train.grad_clip)"
            ) from None
        train_loss = dist.mean(train_loss)

        # --- validate with the competition metric at threshold 0.5 (shards gathered across ranks)
        validating = epoch + 1 >= t.validate_from
        val_score = val_loss = val_score_raw = float("nan")
        if validating:
            shard_probs, shard_loss = validate(eval_model, val_images[val_shard], val_masks[val_shard], loss_fn,
                                               cfg, rt, epoch, cfg.predict.batch_size)
            val_probs = dist.gather_concat(shard_probs)
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
                fileio.write_npy(folder.oof, val_probs.astype(np.float16))
                fileio.write_text(folder.oof_ids, "\n".join(data.ids[i] for i in val_index) + "\n")
            resume_state = {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "scaler": scaler.state_dict(), "state": vars(state).copy(),
                **({"ema": ema.state_dict()} if ema is not None else {}),
            }
            saver.save(weights=eval_model.state_dict(), resume=resume_state, epoch=epoch, val_score=val_score,
                       best=improved, snapshot=epoch // t.cycle_epochs if snapshot_improved else None,
                       stage1=t.keep_stage1 and state.epoch == cfg.loss.stage2_from_epoch)
            log_rows.append({"epoch": epoch + 1, "lr": f"{lr:.3g}", "train_loss": f"{train_loss:.5f}",
                             "val_loss": f"{val_loss:.5f}", "val_score": f"{val_score:.5f}",
                             "val_score_raw": f"{val_score_raw:.5f}" if ema is not None else "",
                             "seconds": f"{seconds:.1f}"})
            write_log(folder.log, log_rows)
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
        done.update(write_final_oof(cfg, fold, val_images, val_masks, rt))
        fileio.write_json(folder.done, done)
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
    fileio.write_npy(folder.oof, probs.astype(np.float16))
    score = competition_score(val_masks, probs > 0.5)
    print(f"fold {fold}: OOF as predicted for the test set ({n_checkpoints} checkpoint(s) x TTA {tta}): "
          f"val_score {score:.4f}")
    return {"oof_checkpoints": n_checkpoints, "oof_tta": tta, "oof_score": score}

