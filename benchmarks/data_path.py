"""Would the training data path starve a GPU? The loader's images/s against the model's appetite.

    python -m benchmarks.data_path [--data DIR] [--presets resnet34_lovasz,gpu_best] [--workers 0,1,2]
                                   [--seconds 6] [--tflops 400] [--util 0.3,0.4]

Supply, measured here: for each GPU preset, the very DataLoader `train_fold` builds
(`pipeline.train_fold.epoch_loader` over the real train images: the preset's augmentation, batch
size, shuffling, seeded workers, a fresh loader per epoch) is iterated for `--seconds` at each worker count; images/s counts
from the first batch on, and the time to that first batch (worker start-up, paid every epoch
since the loader is rebuilt per epoch) is recorded apart. Besides the wall-clock rate, each
run divides the images by the CPU time the loader's processes used (the workers', read with
getrusage once they have exited; with 0 workers the main process's): images per CPU-second,
what one idle core makes, which holds on this shared VM where the clock rate depends on
everyone else's load (a worker's few prefetched, unconsumed batches make it a slight
underestimate). Supply on N cores is extrapolated as N x the 1-worker figure: augmentation is
per image and embarrassingly parallel (this 2-core VM can only check N = 2). The main process's own per-batch work, `to_batch` (uint8 -> float, reflect
pad to the preset's size), is timed separately on the CPU: it is serial in the training
process, so done on the CPU it would cap the rate however many workers there are; on a GPU it
now runs on the device after the uint8 copy, so it is reported, not counted against supply.

Demand, computed: FLOPs per training image (forward + backward, counted by
torch.utils.flop_counter.FlopCounterMode on the preset's model at its input size, batch 2
in train mode), against a GPU's sustained rate = peak x utilisation. Assumed (not measured
here; no GPU was lent): an H100-class GPU (H100/H200) sustains `--util` (30-40%) of
`--tflops` (400 TFLOP/s of dense bf16 taken as what convolutions of this size can reach,
well under the datasheet's ~990 and the ~790 an 8192^3 bf16 matmul measured on a lent H200);
a Kaggle T4 the same share of its 65 TFLOP/s fp16. Small convolutions with BatchNorm at
128x128 are partly memory- and launch-bound, so these demands are upper bounds, which is the
side that matters for "would it starve".

Machines compared: Kaggle's T4 x2 (4 CPU cores, one fold process per GPU, each with the
preset's num_workers) and a 16-core single-H200 box (one process). Cores left for workers =
cores - one per training process. Writes benchmarks/results/data_path-<host>-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import socket
import sys
import time
from pathlib import Path
from benchmarks import save_result

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "tgs"

# Peak dense tensor-core rates (datasheets): H100 SXM bf16 ~990, T4 fp16 65. `--tflops` is the
# H100-class figure actually used (see the module docstring).
T4_TFLOPS = 65.0
MACHINES = {
    # name: (CPU cores, GPUs, GPU TFLOP/s used with --util, training processes)
    "kaggle_t4x2": (4, 2, T4_TFLOPS, 2),
    "h200_16core": (16, 1, None, 1),  # None: --tflops
}


def load_arrays(data_dir: Path | None, synthetic: int = 2400):
    """The real train images and masks (uint8 / bool [N,101,101]), or seeded noise of the same shape."""
    import numpy as np

    if data_dir is not None and (data_dir / "train.csv").is_file():
        from pipeline.data import load_train

        data = load_train(data_dir)
        return data.images, data.masks, f"real ({data_dir}, {len(data.ids)} images)"
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (synthetic, 101, 101), dtype=np.uint8)
    masks = rng.random((synthetic, 101, 101)) > 0.5
    return images, masks, f"synthetic noise ({synthetic} images)"


def _children_cpu_s() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # workers count once they have exited
    return usage.ru_utime + usage.ru_stime


def loader_rate(cfg, images, masks, workers: int, seconds: float) -> dict:
    """Images/s of train_fold's DataLoader for `cfg` (its augmentation and batch size) at `workers`.

    Two rates: `img_s` by the wall clock (what this machine gave, under whatever else runs on
    it) and `img_per_cpu_s` by the CPU time the loader's processes spent (the workers', or the
    main process's with 0 workers): what one otherwise idle core makes, the figure to scale by
    cores and the one that survives a shared, loaded VM.
    """
    import copy

    import torch

    from pipeline.augment import build_train_transform
    from pipeline.distributed import DistContext
    from pipeline.runtime import Runtime
    from pipeline.loader import SaltDataset
    from pipeline.rundir import FoldDir
    from pipeline.train_fold import FoldContext, epoch_loader, fold_loader

    cfg = copy.deepcopy(cfg)
    cfg.run.num_workers = workers
    rt = Runtime(device=torch.device("cpu"), amp_dtype=None, channels_last=False)
    dataset = SaltDataset(images, masks, build_train_transform(cfg.augment, seed=cfg.seed))
    ctx = FoldContext(cfg, 0, rt, DistContext(), FoldDir.of(cfg, 0), "")  # nothing is written
    count, produced, epochs, first_batch_s = 0, 0, 0, []
    started = time.perf_counter()
    cpu_started, children_started = time.process_time(), _children_cpu_s()
    timed_from = None
    while True:
        # a fresh fold loader per epoch: its workers end with the epoch, so their CPU time is counted
        # (training keeps them for the fold: pipeline/loader.py; that saves the start-up, not the work)
        fold_batches = fold_loader(ctx, dataset)
        loader = epoch_loader(ctx, fold_batches, epochs)
        epoch_started = time.perf_counter()
        batches = iter(loader)
        for index, (image_batch, _) in enumerate(batches):
            now = time.perf_counter()
            produced += len(image_batch)
            if index == 0:
                first_batch_s.append(now - epoch_started)
                if timed_from is None:  # the first epoch's start-up is not throughput
                    timed_from = now
                    continue
            count += len(image_batch)
            if now - timed_from >= seconds:
                break
        del batches, loader, fold_batches  # joins the workers, so their CPU time is counted
        epochs += 1
        if timed_from is not None and time.perf_counter() - timed_from >= seconds:
            break
    elapsed = time.perf_counter() - timed_from
    loader_cpu_s = (_children_cpu_s() - children_started) if workers else (time.process_time() - cpu_started)
    return {"workers": workers, "img_s": round(count / elapsed, 1), "images": count, "epochs_started": epochs,
            "img_per_cpu_s": round(produced / loader_cpu_s, 1) if loader_cpu_s > 0 else None,
            "loader_cpu_s": round(loader_cpu_s, 2),
            "first_batch_s": round(min(first_batch_s), 3), "total_s": round(time.perf_counter() - started, 1)}


def to_batch_cost(cfg, images, masks, repeats: int = 30) -> dict:
    """CPU seconds per image of the main process's to_batch on the CPU (float, pad, target)."""
    import torch

    from pipeline.geometry import to_batch
    from pipeline.runtime import Runtime

    rt = Runtime(device=torch.device("cpu"), amp_dtype=None, channels_last=False)  # keeps 1 thread
    batch = cfg.train.batch_size
    image_batch = torch.from_numpy(images[:batch])
    mask_batch = torch.from_numpy(masks[:batch].astype("uint8"))
    to_batch(image_batch, mask_batch, cfg, rt)
    timings = []
    for _ in range(repeats):  # CPU time of this (single-thread) process: the VM may be shared
        started = time.process_time()
        to_batch(image_batch, mask_batch, cfg, rt)
        timings.append(time.process_time() - started)
    per_image = max(sorted(timings)[len(timings) // 2], 1e-6) / batch
    return {"cpu_s_per_image": per_image, "img_per_cpu_s": round(1 / per_image, 1)}


def flops_per_image(cfg) -> dict:
    """Forward and forward+backward FLOPs of one image through the preset's model, train mode."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.models import create_model

    torch.manual_seed(0)
    model = create_model(cfg.model, load_pretrained=False).train()
    batch = 2  # BatchNorm in train mode needs more than one value per channel
    x = torch.randn(batch, cfg.model.in_chans, cfg.input.size, cfg.input.size)
    with FlopCounterMode(display=False) as forward_counter:
        outputs = model(x)
    forward = forward_counter.get_total_flops() / batch

    def total(value):
        if isinstance(value, torch.Tensor):
            return value.float().sum()
        if isinstance(value, dict):
            return sum(total(v) for v in value.values())
        if isinstance(value, (list, tuple)):
            return sum(total(v) for v in value)
        return 0.0

    with FlopCounterMode(display=False) as train_counter:
        total(model(x)).backward()
    train = train_counter.get_total_flops() / batch
    params = sum(p.numel() for p in model.parameters())
    return {"forward_gflop": round(forward / 1e9, 3), "train_gflop": round(train / 1e9, 3),
            "params_m": round(params / 1e6, 2)}


def verdicts(per_core_img_s: float, train_gflop: float, num_workers: int, tflops: float,
             utils: list[float]) -> dict:
    """For each machine: loader supply (img/s) vs GPU demand (img/s) at each assumed utilisation."""
    out = {}
    for name, (cores, gpus, gpu_tflops, processes) in MACHINES.items():
        peak = gpu_tflops if gpu_tflops is not None else tflops
        worker_cores = max(cores - processes, 1)
        workers = min(processes * num_workers, worker_cores) if num_workers else 0
        if workers:
            supply = workers * per_core_img_s
        else:  # num_workers 0: the training process augments between its own steps
            supply = processes * per_core_img_s
        demand = {f"{u:.2f}": round(gpus * u * peak * 1e12 / (train_gflop * 1e9), 1) for u in utils}
        worst = max(demand.values())
        out[name] = {
            "cpu_cores": cores, "gpus": gpus, "gpu_tflops_peak_used": peak, "training_processes": processes,
            "loader_workers_on_cores": workers, "supply_img_s": round(supply, 1), "gpu_demand_img_s": demand,
            "supply_over_demand": {u: round(supply / d, 2) for u, d in demand.items()},
            "starves": supply < worst,
        }
    return out


def run(presets: list[str], data_dir: Path | None, workers: list[int], seconds: float, tflops: float,
        utils: list[float]) -> dict:
    import torch

    from pipeline.config import load_config

    torch.set_num_threads(1)  # as a DataLoader worker runs; the loader processes are what is timed
    images, masks, source = load_arrays(data_dir)
    result = {"data": source, "seconds": seconds, "tflops_h100_class": tflops, "util": utils, "presets": {}}
    for preset in presets:
        cfg = load_config(REPO / "configs" / f"{preset}.yaml")
        print(f"== {preset}: batch {cfg.train.batch_size}, num_workers {cfg.run.num_workers}, "
              f"input {cfg.input.mode} {cfg.input.size}", flush=True)
        rates = []
        for count in workers:
            rate = loader_rate(cfg, images, masks, count, seconds)
            print(f"   loader, {count} workers: {rate['img_s']} img/s by the clock, {rate['img_per_cpu_s']} per "
                  f"CPU-second of the loader's processes (first batch {rate['first_batch_s']} s)", flush=True)
            rates.append(rate)
        main_cost = to_batch_cost(cfg, images, masks)
        flops = flops_per_image(cfg)
        print(f"   to_batch on the CPU: {main_cost['img_per_cpu_s']} img per CPU-second; model: {flops['params_m']} M params, "
              f"{flops['forward_gflop']} GFLOP forward, {flops['train_gflop']} GFLOP forward+backward per image",
              flush=True)
        by_workers = {r["workers"]: r for r in rates}
        # one worker = one core's worth of augmentation (by CPU time: the machine may be shared);
        # without a 1-worker figure, the in-process one
        per_core = by_workers.get(1, by_workers.get(0, rates[0]))["img_per_cpu_s"]
        machines = verdicts(per_core, flops["train_gflop"], cfg.run.num_workers, tflops, utils)
        for name, v in machines.items():
            print(f"   {name}: {v['loader_workers_on_cores']} worker cores supply ~{v['supply_img_s']:.0f} img/s; "
                  f"GPU(s) would take {', '.join(f'{d:.0f}' for d in v['gpu_demand_img_s'].values())} img/s "
                  f"at util {', '.join(v['gpu_demand_img_s'])} -> {'STARVES' if v['starves'] else 'keeps up'}",
                  flush=True)
        result["presets"][preset] = {
            "batch_size": cfg.train.batch_size, "num_workers": cfg.run.num_workers,
            "input": f"{cfg.input.mode} {cfg.input.size}", "augment": vars(cfg.augment).copy(),
            "loader": rates, "per_core_img_s": per_core, "to_batch_cpu": main_cost, "flops": flops, "machines": machines,
        }
    return result


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="Kaggle-layout data (else synthetic)")
    parser.add_argument("--presets", default="resnet34_lovasz,gpu_best")
    parser.add_argument("--workers", default="0,1,2")
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--tflops", type=float, default=400.0, help="H100-class dense bf16 TFLOP/s assumed")
    parser.add_argument("--util", default="0.3,0.4", help="share of that peak the model sustains")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    result = run([p for p in args.presets.split(",") if p], args.data,
                 [int(w) for w in args.workers.split(",")], args.seconds, args.tflops,
                 [float(u) for u in args.util.split(",")])
    result.update({"host": socket.gethostname(), "cpu": platform.processor() or platform.machine(),
                   "cpu_count": os.cpu_count(),
                   "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")})
    import torch

    result["torch"] = torch.__version__
    save_result("data_path", result, out=args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
