"""Training and inference throughput of our models vs the segmentation-models-pytorch peer.

    python -m benchmarks.speed [--models seed_unet,unet_resnet34] [--paths fp32,cl,bf16,bf16_cl,compile]
                               [--batch 32] [--size 128] [--steps 2] [--repeats 8] [--no-peer] [--data]

Paths: fp32 (plain), cl (channels_last), bf16 / fp16 (autocast; fp16 only on CUDA), bf16_cl /
fp16_cl (both), compile (torch.compile on the best eager path: bf16 + channels_last where the
device has native bf16, else fp32 + channels_last), and on a CPU with more than one core
cl_procs (or bf16_cl_procs): that eager path in one single-thread process per core, run
concurrently, their images/s added up (`measure_procs`) -- how `run.parallel_folds` trains
k folds, and the only path on which more cores than one help small convolutions much. On a
CPU without native bf16 (no AVX-512 BF16 / AMX, e.g. an AVX2-only EPYC) autocast to bf16 is
emulated and slower than fp32 (there the seed UNet's bf16 process had not finished after twice
fp32's time), so the bf16 paths are left out of the default list there (`--paths` still runs
them).

Throughput, ours vs the peer side by side. For every (model, path), ONE fresh process builds
both models with the same path settings (memory format, autocast dtype, torch.compile), the
same seed and the very same input/target tensors, warms both up (WARMUP steps each), then
alternates them repeat by repeat in ABBA order (ours, peer, peer, ours, ours, peer, ...),
each repeat timing `steps` steps (CUDA: events after a synchronisation); first all training
repeats, then all inference repeats (model.eval(), no_grad). Each side's images/s is the
median over its repeats; the ours/peer ratio (`ratio_train`, `ratio_infer`) is the median
of the per-repeat ratios, each ratio taken between two back-to-back runs. Why: on a shared
machine throughput drifts by about +-5% from one process (or minute) to the next, so two
separately measured processes could not tell 0.95x from 1.00x for what is the same network;
runs seconds apart in one process see the same machine state, so drift cancels in the
per-repeat ratio, and ABBA order cancels a linear trend and any first/second-in-pair bias
(use an even `repeats`). `ratio_of_medians` (median ours / median peer) and every
per-repeat ratio (`ratio_runs`) are recorded too. A model without a peer (seed_unet: smp
has no equivalent) is timed alone in its process.

Peak memory cannot be told apart inside one process on CPU (VmHWM is per process), so it is
measured separately, as before in a fresh process per (model, path, ours/peer), but short:
MEMORY_TRAIN_STEPS training steps (the second one holds Adam's state and the gradients
together) and MEMORY_INFER_STEPS inference steps, then CUDA max_memory_allocated or CPU
VmHWM (which, as before, includes the interpreter and the imports).

A path that fails (e.g. compile without a C++ compiler), in either process or for either
side, becomes an error cell, not a crash; a process that dies without a result too.

The fast-path speed-up `python -m benchmarks` reports (best path's train img/s / fp32 train
img/s, same model) compares rows from different processes of the same run, so it carries the
process-to-process drift (about +-5%) that the ours/peer ratio does not.

`--data` also times the augmentation + batching loader. `--config CFG` (repeatable) also times
the pipeline's own training step for that config: its model options, `to_batch` from uint8
batches (pinned on CUDA, as the DataLoader hands them over), its loss with the deep-supervision
heads, its optimizer, GradScaler, precision and memory format, through `train_fold.run_steps`
itself; and its inference as `predict` runs it (`predict_probs`, its TTA, its batch size). The
rows above time a bare UNet with Adam/BCE on tensors already on the device: a ceiling; this row
is what a run gets from the model side (the loader's workers come on top, see --data).
Prints a table and writes benchmarks/results/speed-<host>-<date>-<device>.json.
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing as mp
import os
import platform
import queue as queue_module
import socket
import statistics
import sys
import time
from benchmarks import save_result


DEFAULT_STEPS = 2
DEFAULT_REPEATS = 8  # even, so ABBA order is balanced; 8 pairs for the median ratio
WARMUP = 2  # untimed steps per model and phase (the compile path compiles in its first)
MEMORY_TRAIN_STEPS = 2
MEMORY_INFER_STEPS = 1


def _peak_rss_mb() -> float:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _error(exc: BaseException) -> dict:
    first = (str(exc).splitlines() or [""])[0]
    return {"error": f"{type(exc).__name__}: {first[:120]}"}


def peer_encoder(model_name: str) -> str | None:
    """The smp encoder of the peer of `model_name`, or None where smp has no equivalent."""
    if model_name.startswith("unet_") and len(model_name) > len("unet_"):
        return model_name.removeprefix("unet_")
    return None  # e.g. seed_unet: smp has no equivalent of the tutorial's UNet


def build(model_name: str, peer: bool, in_chans: int = 1):
    import torch

    if peer:
        import segmentation_models_pytorch as smp

        encoder = peer_encoder(model_name)
        if encoder is None:
            return None
        return smp.Unet(encoder_name=encoder, encoder_weights=None, in_channels=in_chans, classes=1)

    from pipeline.config import ModelConfig
    from pipeline.models import create_model

    model = create_model(ModelConfig(name=model_name, in_chans=in_chans))

    class MaskOnly(torch.nn.Module):  # the same call signature as the peer
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)["mask"]

    return MaskOnly(model)


def native_bf16(device: str) -> bool:
    from pipeline.runtime import cpu_has_bf16, cuda_has_native_bf16

    return cuda_has_native_bf16() if device.startswith("cuda") else cpu_has_bf16()


PROCS_SUFFIX = "_procs"  # e.g. cl_procs: the cl path in one single-thread process per core


def best_eager_path(device: str) -> str:
    """What `compile` compiles and what a CPU's *_procs path runs: bf16 + channels_last where
    bf16 is native, else fp32 + channels_last."""
    return "bf16_cl" if native_bf16(device) else "cl"


def path_settings(path: str, device: str = "cpu"):
    """(memory format, autocast dtype or None, compile?) of a path (of its base path for *_procs)."""
    import torch

    path = path.removesuffix(PROCS_SUFFIX)
    compile_ = path == "compile"
    if compile_:
        path = best_eager_path(device)
    channels_last = path in ("cl", "bf16_cl", "fp16_cl")
    amp = {"bf16": torch.bfloat16, "bf16_cl": torch.bfloat16, "fp16": torch.float16, "fp16_cl": torch.float16}.get(path)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return fmt, amp, compile_


def _inputs(path: str, batch: int, size: int, dev):
    """The seeded input and target batch (built once per process, shared by ours and the peer)."""
    import torch

    fmt, _, _ = path_settings(path, dev.type)
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 1, size, size, generator=generator).to(dev).contiguous(memory_format=fmt)
    y = (torch.rand(batch, 1, size, size, generator=generator) > 0.5).float().to(dev)
    return x, y


class Bench:
    """One model on one path: a training step (Adam, BCE) and an inference step on given tensors."""

    def __init__(self, model, path: str, x, y, dev):
        import torch

        fmt, self.amp, compile_ = path_settings(path, dev.type)
        self.dev, self.x, self.y = dev, x, y
        self.model = model.to(dev, memory_format=fmt)
        self.step_model = torch.compile(self.model) if compile_ else self.model
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        self.scaler = torch.amp.GradScaler(dev.type, enabled=self.amp == torch.float16)
        self.loss_fn = torch.nn.BCEWithLogitsLoss()

    def _autocast(self):
        import torch

        return torch.autocast(self.dev.type, dtype=self.amp, enabled=self.amp is not None)

    def train_step(self) -> None:
        with self._autocast():
            logits = self.step_model(self.x)
        loss = self.loss_fn(logits.float(), self.y)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def infer_step(self) -> None:
        import torch

        with torch.no_grad(), self._autocast():
            self.step_model(self.x)

    def step(self, phase: str) -> None:
        self.train_step() if phase == "train" else self.infer_step()

    def mode(self, phase: str) -> None:
        self.step_model.train(phase == "train")


def _setup(device: str):
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    return torch.device(device)


def _timed(bench: Bench, phase: str, steps: int, batch: int) -> float:
    """Images/second over `steps` steps of `phase`."""
    import torch

    if bench.dev.type == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            bench.step(phase)
        end.record()
        torch.cuda.synchronize()
        seconds = start.elapsed_time(end) / 1000
    else:
        started = time.perf_counter()
        for _ in range(steps):
            bench.step(phase)
        seconds = time.perf_counter() - started
    return steps * batch / seconds


def measure_throughput(model_name: str, path: str, with_peer: bool, batch: int, size: int, steps: int,
                       repeats: int, device: str, queue) -> None:
    """Ours and (if `with_peer` and smp has one) the peer, side by side in this one process."""
    try:
        queue.put(_throughput(model_name, path, with_peer, batch, size, steps, repeats, device))
    except BaseException as exc:  # anything outside one side's steps: both cells become errors
        queue.put({"ours": _error(exc), "peer": _error(exc) if with_peer else None})


def _throughput(model_name, path, with_peer, batch, size, steps, repeats, device) -> dict:
    import torch

    dev = _setup(device)
    x, y = _inputs(path, batch, size, dev)
    sides: dict[str, Bench] = {}
    errors: dict[str, dict] = {}
    names = ["ours"] + (["peer"] if with_peer and peer_encoder(model_name) else [])
    for name in names:
        try:
            torch.manual_seed(0)
            sides[name] = Bench(build(model_name, name == "peer"), path, x, y, dev)
        except Exception as exc:
            errors[name] = _error(exc)

    rates: dict[str, dict[str, list[float]]] = {name: {"train": [], "infer": []} for name in names}
    for phase in ("train", "infer"):
        for name in [n for n in names if n not in errors]:
            try:
                sides[name].mode(phase)
                for _ in range(WARMUP):
                    sides[name].step(phase)
            except Exception as exc:  # e.g. torch.compile without a compiler
                errors[name] = _error(exc)
        for repeat in range(repeats):
            order = names if repeat % 2 == 0 else names[::-1]  # ABBA: ours peer peer ours ours peer ...
            for name in order:
                if name in errors:
                    continue
                try:
                    rates[name][phase].append(_timed(sides[name], phase, steps, batch))
                except Exception as exc:
                    errors[name] = _error(exc)

    result: dict = {}
    for name in ("ours", "peer"):
        if name not in names:
            result[name] = None
        elif name in errors:
            result[name] = errors[name]
        else:
            result[name] = {f"{phase}_img_s": round(statistics.median(rates[name][phase]), 1)
                            for phase in ("train", "infer")}
    if result["peer"] and "error" not in result["peer"] and "error" not in result["ours"]:
        runs = {phase: [o / p for o, p in zip(rates["ours"][phase], rates["peer"][phase])]
                for phase in ("train", "infer")}
        for phase in ("train", "infer"):
            result[f"ratio_{phase}"] = round(statistics.median(runs[phase]), 3)
        result["ratio_of_medians"] = {
            phase: round(statistics.median(rates["ours"][phase]) / statistics.median(rates["peer"][phase]), 3)
            for phase in ("train", "infer")}
        result["ratio_runs"] = {phase: [round(r, 3) for r in runs[phase]] for phase in ("train", "infer")}
    return result


def measure_memory(model_name: str, path: str, peer: bool, batch: int, size: int, device: str, queue) -> None:
    """Peak memory of one model on one path alone in this process: a few training and inference steps."""
    try:
        import torch

        dev = _setup(device)
        x, y = _inputs(path, batch, size, dev)
        torch.manual_seed(0)
        bench = Bench(build(model_name, peer), path, x, y, dev)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for phase, count in (("train", MEMORY_TRAIN_STEPS), ("infer", MEMORY_INFER_STEPS)):
            bench.mode(phase)
            for _ in range(count):
                bench.step(phase)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else _peak_rss_mb()
        queue.put({"peak_mb": round(peak)})
    except BaseException as exc:
        queue.put(_error(exc))


def run_isolated(target, *args):
    """`target(*args, queue)` in a fresh (spawned) process; its one result, or an error dict if it dies."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    process = ctx.Process(target=target, args=(*args, results))
    process.start()
    result = None
    while True:
        try:
            result = results.get(timeout=1.0)
            break
        except queue_module.Empty:
            if not process.is_alive():
                try:
                    result = results.get(timeout=1.0)
                except queue_module.Empty:
                    result = {"error": f"benchmark process died (exit code {process.exitcode})"}
                break
    process.join()
    return result


def default_paths(device: str) -> list[str]:
    if device.startswith("cuda"):
        return ["fp32", "cl", "bf16", "bf16_cl", "fp16_cl", "compile"]
    # on CPU also the best eager path as one single-thread process per core: how
    # `run.parallel_folds` trains k folds (small convolutions scale badly across threads)
    procs = [best_eager_path(device) + PROCS_SUFFIX] if (os.cpu_count() or 1) > 1 else []
    if not native_bf16(device):  # emulated bf16: slower than fp32, not a path anyone would take
        return ["fp32", "cl", "compile", *procs]
    return ["fp32", "cl", "bf16", "bf16_cl", "compile", *procs]


def _procs_worker(model_name: str, path: str, batch: int, size: int, steps: int, device: str, barrier,
                  queue) -> None:
    """One of the concurrent single-thread processes of a *_procs path: warm up, wait for all,
    then time `steps` steps per phase by the wall clock (comparable across processes)."""
    try:
        import torch

        torch.set_num_threads(1)
        dev = torch.device(device)
        x, y = _inputs(path, batch, size, dev)
        torch.manual_seed(0)
        bench = Bench(build(model_name, False), path, x, y, dev)
        spans = {}
        for phase in ("train", "infer"):
            bench.mode(phase)
            for _ in range(WARMUP):
                bench.step(phase)
            barrier.wait(timeout=900)  # all processes start each phase together
            started = time.time()
            for _ in range(steps):
                bench.step(phase)
            spans[phase] = (started, time.time())
        queue.put({"spans": spans, "peak_mb": _peak_rss_mb()})
    except BaseException as exc:
        barrier.abort()  # the others stop waiting and report an error too
        queue.put(_error(exc))


def measure_procs(model_name: str, path: str, batch: int, size: int, steps: int, repeats: int, device: str,
                  procs: int | None = None) -> dict:
    """Aggregate images/s of `procs` (default: one per core) concurrent single-thread processes,
    each training (then inferring) its own copy of the model on the base path of `path`.

    All processes run steps x repeats timed steps per phase after a common start; the rate is
    all their images over the span from the first start to the last finish, so a straggler
    counts. No peer column: the kernels are the base path's, compared with smp there. Peak
    memory is the sum of the processes' (each one's VmHWM)."""
    procs = procs or os.cpu_count() or 1
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(procs), ctx.Queue()
    workers = [ctx.Process(target=_procs_worker, args=(model_name, path, batch, size, steps * repeats, device,
                                                       barrier, results)) for _ in range(procs)]
    for worker in workers:
        worker.start()
    reports = []
    while len(reports) < procs:
        try:
            reports.append(results.get(timeout=1.0))
        except queue_module.Empty:
            if not any(worker.is_alive() for worker in workers) and results.empty():
                barrier.abort()
                reports.append({"error": "a benchmark process died"})
                break
    for worker in workers:
        worker.join()
    errors = [r for r in reports if "error" in r]
    if errors:
        return errors[0]
    return add_up_procs(reports, steps * repeats * batch)


def add_up_procs(reports: list[dict], images_each: int) -> dict:
    """The processes' reports ({"spans": {phase: (start, end)}, "peak_mb"}) as one row: per phase
    all their images over the span from the first start to the last finish; peak memory summed."""
    images = len(reports) * images_each
    rates = {f"{phase}_img_s": round(images / (max(r["spans"][phase][1] for r in reports)
                                               - min(r["spans"][phase][0] for r in reports)), 1)
             for phase in ("train", "infer")}
    return {**rates, "peak_mb": round(sum(r["peak_mb"] for r in reports)), "procs": len(reports)}


def model_rows(models: list[str], paths: list[str], *, peer: bool, batch: int, size: int, steps: int,
               repeats: int, device: str) -> list[dict]:
    """One row per (model, path): ours and (if `peer` and smp has one) smp's, timed side by side in
    one process, each one's peak memory from its own short process (see the module docstring)."""
    rows = []
    for model_name in models:
        with_peer = peer and peer_encoder(model_name) is not None
        for path in paths:
            if path.endswith(PROCS_SUFFIX):
                row = {"model": model_name, "path": path, "peer": None,
                       "ours": measure_procs(model_name, path, batch, size, steps, repeats, device)}
                print(_format_row(row), flush=True)
                rows.append(row)
                continue
            # memory first: on the compile path it also fills inductor's cache for the timed process
            memory = {name: run_isolated(measure_memory, model_name, path, name == "peer", batch, size, device)
                      for name in (["ours", "peer"] if with_peer else ["ours"])}
            timed = run_isolated(measure_throughput, model_name, path, with_peer, batch, size, steps, repeats,
                                 device)
            if "error" in timed:  # the process died: both sides are errors
                timed = {"ours": timed, "peer": timed if with_peer else None}
            row = {"model": model_name, "path": path}
            for name in ("ours", "peer"):
                side = timed.get(name)
                if side is not None and "error" not in side:
                    mem = memory[name]
                    side = {**side, "peak_mb": mem.get("peak_mb")}
                    if "error" in mem:
                        side["peak_error"] = mem["error"]
                row[name] = side
            for key in ("ratio_train", "ratio_infer", "ratio_of_medians", "ratio_runs"):
                if key in timed:
                    row[key] = timed[key]
            print(_format_row(row), flush=True)
            rows.append(row)
    return rows


def measure_pipeline(config_path: str, overrides: list[str], steps: int, repeats: int, device: str, queue) -> None:
    """Images/s of the config's own training step and prediction (see the module docstring)."""
    try:
        import numpy as np
        import torch

        from benchmarks.host_step import Batches, make_batches
        from pipeline.config import load_config
        from pipeline.losses import SegLoss
        from pipeline.models import create_model
        from pipeline.predict import predict_probs
        from pipeline.runtime import resolve_runtime
        from pipeline.optim import build_optimizer
        from pipeline.train_fold import Training, run_steps

        cfg = load_config(config_path, overrides)
        dev = _setup(device)
        rt = resolve_runtime(cfg.train.precision, cfg.train.channels_last, str(dev), os.cpu_count() or 1)
        torch.manual_seed(0)
        model = create_model(cfg.model, load_pretrained=False).to(rt.device, memory_format=rt.memory_format())
        optimizer = build_optimizer(cfg, model)
        parts = Training(model=model, optimizer=optimizer, scheduler=None, scaler=rt.grad_scaler(),
                         loss_fn=SegLoss(cfg.loss, cfg.model.deep_supervision), ema=None)
        batches = make_batches(cfg.train.batch_size, steps)
        if rt.is_cuda:
            batches = [(images.pin_memory(), masks.pin_memory()) for images, masks in batches]
        loader = Batches(batches)
        epochs = {"stage1": 0}
        if cfg.loss.stage2_from_epoch > 0:
            epochs["stage2"] = cfg.loss.stage2_from_epoch
        result = {"config": cfg.name, "device": rt.describe(), "batch": cfg.train.batch_size}
        for stage, epoch in epochs.items():
            run_steps(model, loader, parts, cfg, rt, epoch)  # warm-up
            rates = []
            for _ in range(repeats):
                started = time.perf_counter()  # the epoch ends by reading its loss: synchronised
                run_steps(model, loader, parts, cfg, rt, epoch)
                rates.append(steps * cfg.train.batch_size / (time.perf_counter() - started))
            result[f"train_img_s_{stage}"] = round(statistics.median(rates), 1)
        images = np.concatenate([b[0].numpy() for b in batches])
        predict_probs(model, images, cfg, rt, cfg.predict.tta)
        rates = []
        for _ in range(repeats):
            started = time.perf_counter()  # predict_probs copies every batch back: synchronised
            predict_probs(model, images, cfg, rt, cfg.predict.tta)
            rates.append(len(images) / (time.perf_counter() - started))
        result["infer_img_s"] = round(statistics.median(rates), 1)
        result["tta"] = list(cfg.predict.tta)
        queue.put(result)
    except BaseException as exc:
        queue.put(_error(exc))


def data_throughput(batch: int, size: int, seconds: float = 5.0) -> dict:
    """Images/second through augmentation + batching + padding (the CPU side of a train step)."""
    import numpy as np
    import torch

    from pipeline.augment import build_train_transform
    from pipeline.config import AugmentConfig, Config
    from pipeline.geometry import to_batch
    from pipeline.runtime import resolve_runtime
    from pipeline.loader import SaltDataset

    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (2000, 101, 101), dtype=np.uint8)
    masks = rng.random((2000, 101, 101)) > 0.5
    dataset = SaltDataset(images, masks, build_train_transform(AugmentConfig(), seed=0))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=0)
    cfg = Config()
    cfg.input.size = size
    rt = resolve_runtime("off", "off", "cpu")
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        for images_batch, masks_batch in loader:
            to_batch(images_batch, masks_batch, cfg, rt)
            count += len(images_batch)
            if time.perf_counter() - started >= seconds:
                break
    return {"loader_img_s": round(count / (time.perf_counter() - started), 1)}


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="seed_unet,unet_resnet34")
    parser.add_argument("--paths", default=None, help="default: see default_paths()")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="timed steps per repeat")
    parser.add_argument("--repeats", type=int, default=DEFAULT_REPEATS, help="timed repeats per model (even: ABBA)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--no-peer", action="store_true")
    parser.add_argument("--data", action="store_true", help="also time the augmentation loader")
    parser.add_argument("--config", action="append", default=[], metavar="CFG",
                        help="also time this config's own training step and prediction (repeatable)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="overrides for --config (e.g. train.epochs=1)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.repeats < 1:
        parser.error("--steps and --repeats must be at least 1")

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    paths = args.paths.split(",") if args.paths else default_paths(device)
    rows = model_rows(args.models.split(","), paths, peer=not args.no_peer, batch=args.batch, size=args.size,
                      steps=args.steps, repeats=args.repeats, device=device)
    extra = data_throughput(args.batch, args.size) if args.data else {}
    if extra:
        print(f"data loader (augment + batch + pad): {extra['loader_img_s']} img/s")
    pipeline_rows = [run_isolated(measure_pipeline, path, args.set, args.steps * 2, args.repeats // 2 or 1, device)
                     for path in args.config]
    for row in pipeline_rows:
        print(f"pipeline step {row.get('config', '?')}: " + ", ".join(f"{k} {v}" for k, v in row.items()
                                                                  if k != "config"))
    if pipeline_rows:
        extra["pipeline_rows"] = pipeline_rows
    device_name = torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "cpu"
    result = {
        "host": socket.gethostname(), "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": device_name, "torch": torch.__version__, "threads": os.cpu_count(),
        "batch": args.batch, "size": args.size, "steps": args.steps, "repeats": args.repeats, "rows": rows, **extra,
    }
    save_result("speed", result, device)
    return 0


def _format_row(row: dict) -> str:
    def cell(result, key):
        if result is None:
            return "-"
        if "error" in result:
            return "error"
        value = result.get(key)
        return "-" if value is None else f"{value:.0f}"

    def ratio(key):
        return f"{row[key]:.2f}x" if row.get(key) is not None else ""

    ours, peer = row["ours"], row["peer"]
    errors = [f"{name}: {side['error']}" for name, side in (("ours", ours), ("peer", peer)) if side and "error" in side]
    errors += [f"{name} peak: {side['peak_error']}" for name, side in (("ours", ours), ("peer", peer))
               if side and "peak_error" in side]
    return (f"{row['model']:<16} {row['path']:<8} train {cell(ours, 'train_img_s'):>6} img/s "
            f"infer {cell(ours, 'infer_img_s'):>6} img/s peak {cell(ours, 'peak_mb'):>6} MB | "
            f"peer train {cell(peer, 'train_img_s'):>6} infer {cell(peer, 'infer_img_s'):>6} "
            f"peak {cell(peer, 'peak_mb'):>6} | ratio train {ratio('ratio_train'):>6} "
            f"infer {ratio('ratio_infer'):>6} {' | '.join(errors)}".rstrip())


if __name__ == "__main__":
    sys.exit(main())
