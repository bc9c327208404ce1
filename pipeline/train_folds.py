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
Every fold's output goes to runs/<name>/fold<k>/train.out; the parent reports each fold's
epochs from the records the fold writes (its log.csv rows, LOG_COLUMNS), never from the text it
prints, so a reworded message cannot break progress. A fold process that fails cancels the
folds not started yet; the ones running finish (their work is kept), and every failure is
reported, in one line, once they have. When the parent itself stops (Ctrl-C, SIGTERM as
errors.Terminated, any exception) it stops its fold processes first (SIGTERM, SIGKILL after
STOP_GRACE_SECONDS; RunningFolds), so none trains on alone; each keeps its last.pt and the
same command resumes. A fold process whose parent dies without that (SIGKILL) gets SIGTERM from
Linux (pipeline/stopping.py's stop_with_parent).

`predict_test` (what `all` asks for): each fold predicts the test set of `cfg.data` with its
own checkpoints right after training, in its own process and on its own GPU, into
fold<k>/test_probs.npy (pipeline/predict.py's predict_fold_test); `predict` then only averages
the folds' files that are current. `train` alone does not: its data folder need not hold the
test set the run will be submitted on.
"""

from __future__ import annotations

import contextlib
import os
import queue
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from pipeline import fileio
from pipeline.config import Config, check_folds
from pipeline.distributed import DistContext, init_from_env, shutdown
from pipeline.errors import PipelineError
from pipeline.manifests import check_trained_split, fold_problem, read_trained_split, refuse_blend_run
from pipeline.rundir import FoldDir, RunDir, blend_command, prepare_run_dir, read_done, read_log
from pipeline.stopping import PARENT_PID_ENV, stop_with_parent


def load_training_data(cfg: Config, dist: DistContext = DistContext(), *, notes: bool = True):
    """The train set and, aligned with it, each id's fold (folds file made when missing).
    `notes`: say (once, on the main process) where train.csv disagrees with the masks used; a
    fold process leaves that to its parent, which loaded the same data first."""
    from pipeline.data import fingerprint_data, load_train, masks_differing_from_train_csv
    from pipeline.folds import load_folds, make_folds_for_dir

    # the bytes as they are loaded now: each finished fold's done.json records this (cached) value
    fingerprint_data(cfg.data, "train")
    data = load_train(cfg.data)
    if notes and dist.is_main:
        differing, compared = masks_differing_from_train_csv(cfg.data, data)
        if differing:
            print(f"note: {len(differing)} of {compared} masks in {Path(cfg.data) / 'train' / 'masks'} differ from "
                  f"{Path(cfg.data) / 'train.csv'}'s rle_mask (e.g. {differing[0]}); the PNG masks are used",
                  file=sys.stderr)
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
                device: str | None = None, fold_worker: bool = False, predict_test: bool = False) -> list[dict]:
    """Train every requested fold that is not already complete (under a per-fold lock).

    Under torchrun (WORLD_SIZE > 1) every process runs this; the folds are trained one
    after another, each by all processes together. `fold_worker`: this process is one of
    `--parallel-folds`' per-fold processes, whose parent has written the run's config.yaml
    (the worker's own config differs in its fold, threads and parallel_folds: not the run's).
    `predict_test`: each fold trained here also predicts the test set (module docstring).
    """
    check_folds(cfg.folds, cfg.n_folds, f"{cfg.name}: folds")  # before config.yaml is written
    if fold_worker:
        stop_with_parent()
    refuse_blend(cfg)  # before config.yaml is written into a blend's folder
    import torch

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if not fold_worker and int(os.environ.get("RANK", "0")) == 0:
        resolve_pretrained_weights(cfg)  # once, before any fold (or fold process) starts
    if world_size == 1 and not fold_worker and (
            parallel_folds or cfg.run.parallel_folds
            or fans_out_by_default(torch.cuda.device_count(), len(cfg.fold_list()), world_size, device)):
        return train_folds_in_parallel(cfg, resume=resume, force=force, predict_test=predict_test)

    from pipeline.runtime import resolve_runtime
    from pipeline.train_fold import train_fold

    dist = init_from_env()
    try:
        if dist.is_main and not fold_worker:
            prepare_run_dir(cfg, force=force)
        dist.barrier()
        todo, afresh = folds_to_train(cfg, force=force, say=dist.is_main)
        results = [read_done(cfg, k) for k in cfg.fold_list() if k not in todo]
        # the folds kept must have been trained on the split the folds file holds now (as `tune` checks)
        kept_split = read_trained_split(cfg.run_dir, [done["fold"] for done in results])
        for done in results:
            if dist.is_main:
                print(f"fold {done['fold']}: already trained (best {done.get('best_score', float('nan')):.4f}), "
                      "skipping")
        if not todo:
            check_trained_split(cfg, cfg.run_dir, kept_split)
            return results
        if dist.enabled and device is None and torch.cuda.is_available():
            device = f"cuda:{dist.local_rank}"
        threads = cfg.run.threads or (max(1, (os.cpu_count() or 1) // dist.world_size) if dist.enabled else 0)
        rt = resolve_runtime(cfg.train.precision, cfg.train.channels_last, device, threads, cfg.run.deterministic)
        data, fold_ids = load_training_data(cfg, dist, notes=not fold_worker)
        check_trained_split(cfg, cfg.run_dir, kept_split)  # against the folds file the new folds read
        for fold in todo:
            lock = fileio.file_lock(FoldDir.of(cfg, fold).lock, blocking=False,
                                    what=f"fold {fold} of run {cfg.name}") if dist.is_main else contextlib.nullcontext()
            with lock:
                results.append(train_fold(cfg, fold, data, fold_ids, rt, resume=resume and fold not in afresh,
                                          dist=dist))
                if predict_test and not dist.enabled:  # under DDP `predict` does it, on one process
                    from pipeline.predict import predict_fold_test

                    predict_fold_test(cfg, fold, rt)
        results.sort(key=lambda d: d["fold"])
        scores = [d["best_score"] for d in results]
        if dist.is_main:
            print(f"{cfg.name}: folds {[d['fold'] for d in results]} best val scores "
                  f"{', '.join(f'{s:.4f}' for s in scores)} (mean {np.mean(scores):.4f})")
        return results
    finally:
        shutdown(dist)


# ---------------------------------------------------------------- folds as processes


def refuse_blend(cfg: Config) -> None:
    """A blend's folds are made by `blend`, not trained: one line naming its blend command. A
    blend killed by an older version left no blend.json, only folds whose done.json says "blend"."""
    refuse_blend_run(cfg.run_dir)
    for fold in cfg.fold_list():
        try:
            blended = read_done(cfg, fold).get("blend") if FoldDir.of(cfg, fold).done.is_file() else False
        except PipelineError:
            continue
        if blended:
            raise PipelineError(f"{FoldDir.of(cfg, fold).done}: {cfg.run_dir} is a blend of other runs, not "
                                f"trained — remake it with `{blend_command(cfg.run_dir)}`")


def folds_to_train(cfg: Config, *, force: bool, say: bool = True) -> tuple[list[int], set[int]]:
    """(the folds to train, those of them to start afresh). A fold with a done.json that no
    longer holds (manifests.fold_problem: a damaged or removed file, other train data) starts
    afresh, with a note saying why: resuming its last.pt would only reach the end it had."""
    todo, afresh = [], set()
    for fold in cfg.fold_list():
        problem = None if force else fold_problem(cfg, fold)
        if force or problem is not None or not FoldDir.of(cfg, fold).done.exists():
            todo.append(fold)
        if force or problem is not None:
            afresh.add(fold)
        if problem is not None and say:
            print(f"note: fold {fold} is trained again from the start ({problem})", flush=True)
    return todo, afresh


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


def fold_process_env(environ: dict[str, str]) -> dict[str, str]:
    """A fold process's environment: this one's, with the folder holding the `pipeline` this
    process runs first on PYTHONPATH. The child starts `python -m pipeline` afresh, and the
    package may be on this process's sys.path only: Kaggle's kernel unpacks it to a temporary
    folder, and a checkout can run without being installed. PARENT_PID_ENV names this process:
    the child stops when it dies (stop_with_parent)."""
    import pipeline

    home = str(Path(pipeline.__file__).resolve().parent.parent)
    paths = [home] + [p for p in environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != home]
    return dict(environ, PYTHONPATH=os.pathsep.join(paths), PYTHONUNBUFFERED="1", **{PARENT_PID_ENV: str(os.getpid())})


def resolve_pretrained_weights(cfg: Config) -> None:
    """model.pretrained: find (or download) the encoder's weights here, once. Offline without
    them that is one line now, before any fold starts, not a minute of Hugging Face retries in
    every fold process; with HF_HUB_OFFLINE set the hub answers from its cache at once."""
    if not cfg.model.pretrained:
        return
    from pipeline.models import create_model

    create_model(cfg.model)  # reads weights_path, or fills timm's hub cache the fold processes then read


def fold_command(cfg: Config, fold: int, threads: int, *, resume: bool, force: bool, predict_test: bool) -> list[str]:
    """The `python -m pipeline train` command line of one fold process."""
    command = [sys.executable, "-m", "pipeline", "train", "--config", str(RunDir.of(cfg).config),
               "--folds", str(fold), "--set", f"run.threads={threads}", "--set", "run.parallel_folds=false",
               "--set", f"runs_dir={cfg.runs_dir}", "--set", f"name={cfg.name}", "--fold-worker"]
    if not resume:
        command.append("--restart")
    if force:
        command.append("--force")
    if predict_test:
        command.append("--predict-test")
    return command


def train_folds_in_parallel(cfg: Config, *, resume: bool = True, force: bool = False,
                            predict_test: bool = False) -> list[dict]:
    import torch

    prepare_run_dir(cfg, force=force)
    load_training_data(cfg)  # makes the folds file once, before the workers start
    folds, _ = folds_to_train(cfg, force=force)  # each fold process starts afresh what this finds stale
    kept = [k for k in cfg.fold_list() if k not in folds]
    check_trained_split(cfg, cfg.run_dir, read_trained_split(cfg.run_dir, kept))  # as the sequential path does
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
    where = (f"on GPUs {','.join(gpus)}, {-(-workers // len(gpus))} per GPU at most" if n_gpus
             else f"{threads} CPU threads each")
    print(f"{cfg.name}: training folds {folds} in {workers} parallel processes ({where})")
    failed = threading.Event()  # set by the first failure: folds not started yet are not started
    running = RunningFolds()

    def run_fold(fold: int) -> str | None:
        """None when the fold finished; else why not (its failure, "cancelled", or "stopped")."""
        slot = slots.get()
        try:
            if failed.is_set() or running.stopping:
                return "cancelled"
            env = fold_process_env(dict(os.environ))
            env.pop("WORLD_SIZE", None)
            if n_gpus:
                env["CUDA_VISIBLE_DEVICES"] = slot_gpu(slot, gpus)
            if cfg.model.pretrained and not cfg.model.weights_path:
                env["HF_HUB_OFFLINE"] = "1"  # resolve_pretrained_weights filled the cache: no fold asks the network
            command = fold_command(cfg, fold, threads, resume=resume, force=force, predict_test=predict_test)
            folder = FoldDir.of(cfg, fold)
            folder.path.mkdir(parents=True, exist_ok=True)
            with open(folder.train_out, "w", encoding="utf-8") as log:
                code = run_fold_process(command, env, log, EpochReporter(folder, cfg.train.epochs), running)
            if code is None or running.stopping:
                return "stopped"  # this process is stopping: no failure to report, the fold resumes on a rerun
            if code != 0:
                failed.set()
                lines = folder.train_out.read_text(encoding="utf-8", errors="replace").strip().splitlines()
                why = f"{folder.train_out}: {lines[-1] if lines else f'exit {code}'}"
                print(f"fold {fold}: failed ({why}); folds not started yet are cancelled", flush=True)
                return why
            done = read_done(cfg, fold)
            print(f"fold {fold}: done, best val score {done['best_score']:.4f} ({done['seconds']:.0f}s)", flush=True)
            return None
        finally:
            slots.put(slot)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        try:
            outcomes = dict(zip(folds, [future.result() for future in [pool.submit(run_fold, fold) for fold in folds]]))
        except BaseException:  # Ctrl-C, SIGTERM (errors.Terminated), a bug: no fold process outlives this one
            running.stop(STOP_GRACE_SECONDS)
            raise
    check_fold_outcomes(cfg, outcomes)
    return [read_done(cfg, k) for k in cfg.fold_list()]


def check_fold_outcomes(cfg: Config, outcomes: dict[int, str | None]) -> None:
    """One line naming every failed fold (and the cancelled ones) when any failed."""
    failures = [f"fold {fold} failed: {why}" for fold, why in outcomes.items() if why not in (None, "cancelled")]
    cancelled = [fold for fold, why in outcomes.items() if why == "cancelled"]
    if failures:
        raise PipelineError("; ".join(failures) + (f"; folds {cancelled} cancelled, not started" if cancelled else "")
                            + f" — fix it and rerun: finished folds of {cfg.name} are kept")


class EpochReporter:
    """Follows a fold process through the records it writes (fold<k>/log.csv, one row per
    epoch, replaced whole) and prints each new epoch here: the protocol is the log's columns,
    not the words of the fold's printed lines. Rows already there when the process started
    (a resumed fold's earlier epochs) are not repeated."""

    def __init__(self, folder: FoldDir, epochs: int):
        self.folder, self.epochs = folder, epochs
        self.seen = {tuple(row.items()) for row in self._rows()}

    def _rows(self) -> list[dict]:
        try:
            return read_log(self.folder.log)
        except PipelineError:  # a damaged log is the fold's to report: progress just pauses
            return []

    def __call__(self) -> None:
        for row in self._rows():
            key = tuple(row.items())
            if key not in self.seen:
                self.seen.add(key)
                print(epoch_record_line(self.folder.fold, row, self.epochs), flush=True)


def epoch_record_line(fold: int, row: dict, epochs: int) -> str:
    """A log.csv row as the parent's progress line: every column the row fills, by name."""
    fields = "  ".join(f"{name} {value}" for name, value in row.items() if name != "epoch" and value not in ("", None))
    return f"fold {fold} epoch {int(row['epoch']):3d}/{epochs}  {fields}"


POLL_SECONDS = 1.0
# How long a fold process told to stop (SIGTERM) may take before it is killed: it stops at its
# next Python instruction, so this only bounds a hung one (a kill loses nothing: writes are atomic).
STOP_GRACE_SECONDS = 5.0


class RunningFolds:
    """The fold processes this parent started and has not seen end. `stop()` ends them all and
    starts no more: the parent stopping, whyever, leaves none training on alone."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._processes: set[subprocess.Popen] = set()
        self.stopping = False

    def popen(self, command: list[str], env: dict[str, str], log) -> subprocess.Popen | None:
        """The started process, or None once stop() was called (under the lock: none slips past it)."""
        with self._lock:
            if self.stopping:
                return None
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
            self._processes.add(process)
            return process

    def ended(self, process: subprocess.Popen) -> None:
        with self._lock:
            self._processes.discard(process)

    def stop(self, grace: float) -> None:
        """SIGTERM to each fold process (it stops as errors.Terminated: its line in train.out,
        exit 143, its last.pt kept), then SIGKILL to any still running after `grace` seconds."""
        with self._lock:
            self.stopping = True
            processes = list(self._processes)
        for process in processes:
            process.terminate()  # a no-op for one already ended
        deadline = time.monotonic() + grace
        for process in processes:
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def run_fold_process(command: list[str], env: dict[str, str], log, report, running: RunningFolds) -> int | None:
    """Run one fold's process with all its output in `log`; `report()` every POLL_SECONDS while
    it runs, and once after it ends, passes on its progress records. Its exit status, or None
    when `running` is stopping and it was not started. It is started from this (pool) thread,
    which lives until it ends: Linux's parent-death signal (stop_with_parent) follows the
    thread that started a process, not the whole parent."""
    process = running.popen(command, env, log)
    if process is None:
        return None
    try:
        with process:
            while True:
                try:
                    code = process.wait(timeout=POLL_SECONDS)
                    break
                except subprocess.TimeoutExpired:
                    report()
    finally:
        running.ended(process)
    report()
    return code
