"""Folds in parallel: one `python -m pipeline train --folds k` process per fold.

On CUDA, `fold_workers` processes per GPU (default 1; CUDA_VISIBLE_DEVICES picks each one's
GPU, within any mask this process inherited): one 128x128 batch of 32 leaves an H100-class GPU
mostly idle, so two or three folds can share it. On CPU the cores split between as many
processes as fit. Each fold is seeded on its own (train.epoch_seed), so the
weights are the same as when the folds run one after another with the same thread
count. Every fold's output goes to runs/<name>/fold<k>/train.out.
"""

from __future__ import annotations

import os
import queue
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from pipeline import fileio
from pipeline.config import Config
from pipeline.errors import PipelineError


def plan_workers(n_folds: int, n_gpus: int, n_cores: int, threads: int = 0, workers: int = 0) -> tuple[int, int]:
    """(concurrent processes, torch threads each).

    On GPUs `workers` is processes per GPU (0 = one). On CPU it asks for that many processes
    even beyond the core count: on 2 cores, 3 folds as 3 single-thread processes finish
    together, where 2 + 1 would leave a core idle for the last fold; 0 = the cores split evenly.
    """
    if n_gpus:
        processes = min(n_folds, n_gpus * max(workers, 1))
        return processes, threads or max(1, n_cores // processes)
    if workers:
        workers = min(n_folds, workers)
        return workers, threads or max(1, n_cores // workers)
    workers = max(1, min(n_folds, n_cores // max(threads, 1) if threads else n_cores))
    return workers, threads or max(1, n_cores // workers)


def visible_gpus(environ: dict[str, str], n_gpus: int) -> list[str]:
    """The CUDA_VISIBLE_DEVICES value that selects each of this process's GPUs: the inherited
    mask's entries ("2,3" -> "2", "3"; ids or GPU-/MIG- UUIDs), else their indices."""
    mask = environ.get("CUDA_VISIBLE_DEVICES")
    if mask is None:
        return [str(index) for index in range(n_gpus)]
    return [entry.strip() for entry in mask.split(",") if entry.strip()][:n_gpus]


def slot_gpu(slot: int, gpus: list[str]) -> str:
    """Slots go round the GPUs (0, 1, 0, 1, ...): the first folds spread over all of them."""
    return gpus[slot % len(gpus)]


def fans_out_by_default(n_gpus: int, n_folds: int, world_size: int, device: str | None) -> bool:
    """More than one GPU and more than one fold, outside torchrun and with no device pinned:
    one fold per GPU (Kaggle's T4 x2 would otherwise leave one idle). torchrun stays the way
    to train one fold on several GPUs (DDP)."""
    return n_gpus > 1 and n_folds > 1 and world_size == 1 and device is None


def train_folds_in_parallel(cfg: Config, *, resume: bool = True, force: bool = False) -> list[dict]:
    import torch

    from pipeline.train import fold_is_done, load_training_data, prepare_run_dir

    prepare_run_dir(cfg, force=force)
    load_training_data(cfg)  # makes the folds file once, before the workers start
    folds = [k for k in cfg.fold_list() if force or not fold_is_done(cfg, k)]
    if not folds:  # a rerun after training: nothing to start
        print(f"{cfg.name}: folds {cfg.fold_list()} already trained, skipping")
        return [fileio.read_json(cfg.run_dir / f"fold{k}" / "done.json") for k in cfg.fold_list()]
    n_gpus = torch.cuda.device_count()
    gpus = visible_gpus(os.environ, n_gpus)
    workers, threads = plan_workers(len(folds), n_gpus, os.cpu_count() or 1, cfg.train.threads,
                                    cfg.train.fold_workers)
    slots: queue.Queue[int] = queue.Queue()
    for slot in range(workers):
        slots.put(slot)
    config_path = cfg.run_dir / "config.yaml"
    where = (f"on GPUs {','.join(gpus)}, {-(-workers // len(gpus))} per GPU at most" if n_gpus
             else f"{threads} CPU threads each")
    print(f"{cfg.name}: training folds {folds} in {workers} parallel processes ({where})")

    def run_fold(fold: int) -> None:
        slot = slots.get()
        try:
            env = dict(os.environ, PYTHONUNBUFFERED="1")
            env.pop("WORLD_SIZE", None)
            if n_gpus:
                env["CUDA_VISIBLE_DEVICES"] = slot_gpu(slot, gpus)
            command = [sys.executable, "-m", "pipeline", "train", "--config", str(config_path),
                       "--folds", str(fold), "--set", f"train.threads={threads}", "--set", "train.parallel_folds=false",
                       "--set", f"runs_dir={cfg.runs_dir}", "--set", f"name={cfg.name}", "--fold-worker"]
            if not resume:
                command.append("--restart")
            if force:
                command.append("--force")
            log_path = cfg.run_dir / f"fold{fold}" / "train.out"
            log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(log_path, "w", encoding="utf-8") as log:
                code = run_echoing_epochs(command, env, log)
            if code != 0:
                lines = log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
                raise PipelineError(f"{log_path}: fold {fold} failed: {lines[-1] if lines else f'exit {code}'}")
            done = fileio.read_json(cfg.run_dir / f"fold{fold}" / "done.json")
            print(f"fold {fold}: done, best val score {done['best_score']:.4f} ({done['seconds']:.0f}s)", flush=True)
        finally:
            slots.put(slot)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for future in [pool.submit(run_fold, fold) for fold in folds]:
            future.result()
    return [fileio.read_json(cfg.run_dir / f"fold{k}" / "done.json") for k in cfg.fold_list()]


def run_echoing_epochs(command: list[str], env: dict[str, str], log) -> int:
    """Run one fold's process with all its output in `log`, and its per-epoch summary lines
    (and errors) echoed here too, so the parallel run shows its progress, not only its end."""
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
                          encoding="utf-8", errors="replace") as process:
        for line in process.stdout:  # universal newlines: tqdm's \r redraws arrive as lines too
            log.write(line)
            log.flush()
            text = line.strip()
            if text.startswith(("error:", "Traceback")) or (" epoch " in text and "train_loss" in text):
                print(text, flush=True)
        return process.wait()
