"""Running a run's folds: one after another in this process (all torchrun processes together
under DDP), or as concurrent `python -m pipeline train --folds k` processes (--parallel-folds).

One module decides which folds still need training (complete ones are skipped, under a
per-fold lock), makes the folds file, and starts the folds; pipeline/train_fold.py trains one fold
and knows nothing of the others.

In parallel: on CUDA `run.fold_workers` processes per GPU (default 1; CUDA_VISIBLE_DEVICES
picks each one's GPU, within any mask this process inherited) -- one 128x128 batch of 32 leaves
an H100-class GPU mostly idle, so several folds can share it; on CPU the cores split between
as many processes as fit. With more than one GPU and more than one fold the folds run this way
by default, one per GPU (Kaggle's T4 x2 would otherwise leave one idle); torchrun (DDP) stays
the way to train one fold on several GPUs. Each fold is seeded on its own (loader.epoch_seed), so the
weights are the same as when the folds run one after another with the same thread count.
Every fold's output goes to runs/<name>/fold<k>/train.out.
"""

from __future__ import annotations

import contextlib
import os
import queue
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from pipeline import fileio
from pipeline.config import Config, check_folds
from pipeline.distributed import DistContext, init_from_env, shutdown
from pipeline.errors import PipelineError
from pipeline.rundir import FoldDir, RunDir, fold_is_done, prepare_run_dir, read_done


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
    empty = sorted(set(range(cfg.n_folds)) - set(fold_ids.tolist()))
    if empty:  # that fold would train on everything and validate on nothing
        raise PipelineError(f"{folds_path}: fold {empty[0]} holds none of the {len(data.ids)} train images; "
                            "delete the file to make the folds again")
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
    import torch

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1 and not fold_worker and (
            parallel_folds or cfg.run.parallel_folds
            or fans_out_by_default(torch.cuda.device_count(), len(cfg.fold_list()), world_size, device)):
        return train_folds_in_parallel(cfg, resume=resume, force=force)

    from pipeline.runtime import resolve_runtime
    from pipeline.train_fold import train_fold

    dist = init_from_env()
    try:
        if dist.is_main and not fold_worker:
            prepare_run_dir(cfg, force=force)
        dist.barrier()
        todo = [k for k in cfg.fold_list() if force or not fold_is_done(cfg, k)]
        results = [read_done(cfg, k) for k in cfg.fold_list() if k not in todo]
        for done in results:
            if dist.is_main:
                print(f"fold {done['fold']}: already trained (best {done['best_score']:.4f}), skipping")
        if not todo:
            return results
        if dist.enabled and device is None and torch.cuda.is_available():
            device = f"cuda:{dist.local_rank}"
        threads = cfg.run.threads or (max(1, (os.cpu_count() or 1) // dist.world_size) if dist.enabled else 0)
        rt = resolve_runtime(cfg.train.precision, cfg.train.channels_last, device, threads, cfg.run.deterministic)
        data, fold_ids = load_training_data(cfg, dist)
        for fold in todo:
            lock = fileio.file_lock(FoldDir.of(cfg, fold).lock, blocking=False,
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


# ---------------------------------------------------------------- folds as processes


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
    one fold per GPU. torchrun stays the way to train one fold on several GPUs (DDP)."""
    return n_gpus > 1 and n_folds > 1 and world_size == 1 and device is None


def train_folds_in_parallel(cfg: Config, *, resume: bool = True, force: bool = False) -> list[dict]:
    import torch

    prepare_run_dir(cfg, force=force)
    load_training_data(cfg)  # makes the folds file once, before the workers start
    folds = [k for k in cfg.fold_list() if force or not fold_is_done(cfg, k)]
    if not folds:  # a rerun after training: nothing to start
        print(f"{cfg.name}: folds {cfg.fold_list()} already trained, skipping")
        return [read_done(cfg, k) for k in cfg.fold_list()]
    n_gpus = torch.cuda.device_count()
    gpus = visible_gpus(os.environ, n_gpus)
    workers, threads = plan_workers(len(folds), n_gpus, os.cpu_count() or 1, cfg.run.threads,
                                    cfg.run.fold_workers)
    slots: queue.Queue[int] = queue.Queue()
    for slot in range(workers):
        slots.put(slot)
    config_path = RunDir.of(cfg).config
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
                       "--folds", str(fold), "--set", f"run.threads={threads}", "--set", "run.parallel_folds=false",
                       "--set", f"runs_dir={cfg.runs_dir}", "--set", f"name={cfg.name}", "--fold-worker"]
            if not resume:
                command.append("--restart")
            if force:
                command.append("--force")
            log_path = FoldDir.of(cfg, fold).train_out
            log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(log_path, "w", encoding="utf-8") as log:
                code = run_echoing_epochs(command, env, log)
            if code != 0:
                lines = log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
                raise PipelineError(f"{log_path}: fold {fold} failed: {lines[-1] if lines else f'exit {code}'}")
            done = read_done(cfg, fold)
            print(f"fold {fold}: done, best val score {done['best_score']:.4f} ({done['seconds']:.0f}s)", flush=True)
        finally:
            slots.put(slot)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for future in [pool.submit(run_fold, fold) for fold in folds]:
            future.result()
    return [read_done(cfg, k) for k in cfg.fold_list()]


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
