"""What one training step of a config costs the host, and what that makes of a GPU run.

    python -m benchmarks.host_step [--config configs/gpu_best.yaml] [--steps 30] [--set KEY=VALUE ...]

A GPU only stays busy while Python queues kernels faster than it runs them, and never waits
for it. This measures, on the CPU and for the config's real step (`train_fold.run_steps`:
`to_batch`, the config's loss with its deep-supervision heads, GradScaler, optimizer, progress
bar, on uint8 batches as the loader hands them over):

- host ms per step of everything but the model: the step with the model replaced by a stub
  that returns outputs of the real model's shapes from a handful of ops (its own time is
  subtracted: the stub alone is timed too), at the config's batch and input size, threads=1;
- host syncs per step (benchmarks/syncs.py: each one makes the CPU wait for the GPU's queue
  to drain), per kind, and ops dispatched per step (non-view aten ops: kernel launches);
- for the real model: ops per training step (forward + backward + optimizer) and FLOPs per
  image (torch.utils.flop_counter, counted on a batch of 2);

with --compile MODES, the real model's step eager and under torch.compile (`compiled_step_ms`:
host ms on the CPU at a small batch, where dispatch dominates; the build time apart);
then an estimate of the config's wall time on one GPU (`estimate`): device time from FLOPs at an
assumed fraction of peak, host time from ops x a per-op launch cost, overlapped when the step
has no sync, added up when it has. Point PYTHONPATH at another checkout to measure it the same
way (the "before" figures in the closing note came from the commit before this one).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import time
from collections import Counter

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode

H200_BF16_DENSE_TFLOPS = 989.0  # NVIDIA's H200 SXM spec sheet (dense, no sparsity)
LAUNCH_US = 5.0  # CUDA launch + PyTorch's CUDA bookkeeping per kernel, on top of the CPU dispatch


class OpCounter(TorchDispatchMode):
    """Counts aten ops that run a kernel (views only change metadata)."""

    def __init__(self):
        super().__init__()
        self.counts: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


class ShapeStub(nn.Module):
    """The real model's training outputs (shapes and keys) from a few ops on the input."""

    def __init__(self, example: dict):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.has_salt = "salt_logit" in example
        self.stage_sizes = [tuple(s.shape[-2:]) for s in example.get("stages") or []]

    def forward(self, x):
        mask = x[:, :1] * self.scale
        outputs = {"mask": mask}
        if self.has_salt:
            outputs["salt_logit"] = mask.mean(dim=(1, 2, 3))
        if self.stage_sizes:
            outputs["stages"] = [F.adaptive_avg_pool2d(mask, size) for size in self.stage_sizes]
        return outputs


class Batches:
    """A loader stand-in: the same uint8 batches every epoch (as the DataLoader yields them)."""

    def __init__(self, batches):
        self.batches = batches
        self.sampler = range(sum(len(images) for images, _ in batches))

    def __iter__(self):
        return iter(self.batches)


def make_batches(batch: int, steps: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(steps):
        images = torch.from_numpy(rng.integers(0, 256, (batch, 101, 101), dtype=np.uint8))
        masks = rng.random((batch, 101, 101)) > 0.5
        masks[rng.random(batch) < 0.4] = False  # ~40% of TGS train images have no salt
        batches.append((images, torch.from_numpy(masks.astype(np.uint8))))
    return batches


def stage_epochs(cfg) -> dict[str, int]:
    """One epoch of each loss stage (name -> epoch) and how many epochs run it."""
    switch = cfg.loss.stage2_from_epoch
    if 0 <= switch < cfg.train.epochs:
        return {cfg.loss.name: 0, cfg.loss.stage2_name: switch} if switch > 0 else {cfg.loss.stage2_name: 0}
    return {cfg.loss.name: 0}


def run_epoch(run_steps, parts, loader, epoch, cfg, rt):
    with contextlib.redirect_stderr(io.StringIO()):  # the bar still draws, as in a logged run
        return run_steps(parts.model, loader, parts, cfg, rt, epoch, "bench")


def host_step(cfg, steps: int = 30, repeats: int = 5) -> dict:
    from pipeline.losses import SegLoss
    from pipeline.models import create_model
    from pipeline.runtime import resolve_runtime
    from pipeline.optim import build_optimizer
    from pipeline.train_fold import Training, run_steps

    rt = resolve_runtime("off", "off", "cpu", 1)
    torch.manual_seed(0)
    real = create_model(cfg.model, load_pretrained=False).train()
    with torch.no_grad():
        example = real(torch.zeros(2, cfg.model.in_chans, cfg.input.size, cfg.input.size))
    stub = ShapeStub(example)
    parts = Training(model=stub, optimizer=build_optimizer(cfg, stub), scheduler=None, scaler=rt.grad_scaler(),
                     loss_fn=SegLoss(cfg.loss, cfg.model.deep_supervision), ema=None)
    loader = Batches(make_batches(cfg.train.batch_size, steps))
    result: dict = {"batch": cfg.train.batch_size, "size": cfg.input.size, "stages": {}}

    # the stub's own forward/backward, to subtract: what is left is the step around the model
    def stub_alone():
        started = time.perf_counter()
        for images, _ in loader:
            x = images[:, None].float()
            out = stub(x)
            total = out["mask"].sum() + sum(s.sum() for s in out.get("stages", [])) + \
                out.get("salt_logit", torch.zeros(())).sum()
            total.backward()
        return (time.perf_counter() - started) / steps

    stub_ms = 1000 * statistics.median(stub_alone() for _ in range(repeats))
    for name, epoch in stage_epochs(cfg).items():
        run_epoch(run_steps, parts, loader, epoch, cfg, rt)  # warm-up
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            run_epoch(run_steps, parts, loader, epoch, cfg, rt)
            times.append((time.perf_counter() - started) / steps)
        from benchmarks.syncs import count_host_syncs

        with count_host_syncs() as syncs:
            run_epoch(run_steps, parts, loader, epoch, cfg, rt)
        with OpCounter() as ops:
            run_epoch(run_steps, parts, loader, epoch, cfg, rt)
        result["stages"][name] = {
            "epoch": epoch,
            "host_ms_per_step": round(1000 * statistics.median(times) - stub_ms, 3),
            "syncs_per_step": round(sum(syncs.values()) / steps, 2),
            "syncs_by_kind": {k: round(v / steps, 2) for k, v in sorted(syncs.items())},
            "ops_per_step": round(sum(ops.counts.values()) / steps, 1),
        }
    result["stub_ms_per_step"] = round(stub_ms, 3)
    from benchmarks.syncs import step_syncs

    # the fp16 path (T4-class GPUs): GradScaler on, the optimizer fused as build_optimizer makes it on CUDA
    result["fp16_scaler_syncs_per_step"] = step_syncs(cfg, steps=3, fused=True)["per_step"]
    result.update(model_cost(cfg, real))
    result["cpu_dispatch_us_per_op"] = dispatch_cost_us()
    return result


def model_cost(cfg, model) -> dict:
    """Ops per training step and training FLOPs per image of the real model (batch of 2).

    Counted as a GPU would run it: under bf16 autocast (its casts are kernels too) and with the
    optimizer's multi-tensor (foreach) kernels, torch's default for CUDA parameters, where the
    CPU default is a loop of per-parameter ops."""
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.optim import build_optimizer

    optimizer = build_optimizer(cfg, model)
    for group in optimizer.param_groups:
        if "foreach" in group:
            group["foreach"] = True
    x = torch.rand(2, cfg.model.in_chans, cfg.input.size, cfg.input.size)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        loss = out["mask"].float().mean() + sum(s.float().mean() for s in out.get("stages", [])) + \
            out.get("salt_logit", torch.zeros(())).float().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()  # momentum buffers exist from here on, as in every later step
    with OpCounter() as ops:
        step()
    with FlopCounterMode(display=False) as flops:
        out = model(x)
        (out["mask"].float().mean()).backward()
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as infer_flops:
        model(x)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), OpCounter() as infer_ops:
        model(x)
    model.train()
    return {"model_ops_per_step": sum(ops.counts.values()), "infer_ops_per_batch": sum(infer_ops.counts.values()),
            "model_params": sum(p.numel() for p in model.parameters()),
            "train_gflop_per_image": round(flops.get_total_flops() / 2 / 1e9, 2),
            "infer_gflop_per_image": round(infer_flops.get_total_flops() / 2 / 1e9, 2)}


def dispatch_cost_us(count: int = 20000) -> float:
    """CPU time of one small op through PyTorch's dispatcher here (the host side of a launch)."""
    a, b = torch.ones(4), torch.ones(4)
    for _ in range(1000):
        torch.add(a, b, out=a)
    started = time.perf_counter()
    for _ in range(count):
        torch.add(a, b, out=a)
    return round(1e6 * (time.perf_counter() - started) / count, 2)


def estimate(measured: dict, cfg, *, n_train_images: int = 4000, n_test_images: int = 18000,
             mfu: float = 0.25, peak_tflops: float = H200_BF16_DENSE_TFLOPS, launch_us: float = LAUNCH_US,
             host_speedup: float = 1.5, fold_processes: int = 1) -> dict:
    """Minutes for the config on one GPU from the measured host costs and the FLOPs.

    Assumptions (all arguments): the GPU runs the model at `mfu` of its dense bf16 peak; a
    kernel costs the host this machine's dispatch time / `host_speedup` (a GPU server's cores
    vs this shared VM's) + `launch_us`; a step without host syncs overlaps host and device
    (time = the larger), a step with syncs drains the queue each time (time = host + device);
    `fold_processes` folds train at once on the GPU (their host work on separate cores, their
    kernels taking turns on the device: a step takes at least their summed device time), in
    rounds (5 folds in 2 processes: 2, 2, then 1 alone). Inference (validation every epoch,
    each fold's final OOF, the test set: every snapshot x TTA) is host- or device-bound the
    same way, batch by batch, one process."""
    folds, epochs, batch = cfg.n_folds, cfg.train.epochs, cfg.train.batch_size
    val_per_fold = n_train_images // folds
    steps_per_epoch = (n_train_images - val_per_fold) // batch
    per_op_ms = (measured["cpu_dispatch_us_per_op"] / host_speedup + launch_us) / 1000
    flops_per_s = mfu * peak_tflops * 1e12
    device_step_ms = 1000 * batch * measured["train_gflop_per_image"] * 1e9 / flops_per_s
    stages = measured["stages"]
    switch = cfg.loss.stage2_from_epoch if 0 < cfg.loss.stage2_from_epoch < epochs else 0
    epochs_of = {name: (switch if stage["epoch"] == 0 else epochs - switch) if len(stages) > 1 else epochs
                 for name, stage in stages.items()}
    rounds, left = [], folds
    while left > 0:
        rounds.append(min(fold_processes, left))
        left -= rounds[-1]
    per_stage, train_minutes = {}, 0.0
    for name, stage in stages.items():
        host_ms = (stage["ops_per_step"] + measured["model_ops_per_step"]) * per_op_ms
        alone_ms = host_ms + device_step_ms if stage["syncs_per_step"] >= 0.5 else max(host_ms, device_step_ms)
        per_stage[name] = {"host_ms": round(host_ms, 2), "device_ms": round(device_step_ms, 2),
                           "step_ms_alone": round(alone_ms, 2), "syncs_per_step": stage["syncs_per_step"]}
        for together in rounds:  # each process's step: its own, or its turn among the others' kernels
            step_ms = max(alone_ms, device_step_ms * together)
            train_minutes += steps_per_epoch * epochs_of[name] * step_ms / 1000 / 60
    snapshots = epochs // cfg.train.cycle_epochs if cfg.train.snapshots else 1
    tta, infer_batch = len(cfg.predict.tta), cfg.predict.batch_size
    batches = (folds * epochs * -(-val_per_fold // infer_batch)  # validation every epoch
               + folds * snapshots * tta * -(-val_per_fold // infer_batch)  # the final OOF
               + folds * snapshots * tta * -(-n_test_images // infer_batch))  # the test set
    infer_batch_ms = max(measured["infer_ops_per_batch"] * per_op_ms,
                         1000 * infer_batch * measured["infer_gflop_per_image"] * 1e9 / flops_per_s)
    infer_minutes = batches * infer_batch_ms / 1000 / 60
    return {"train_steps": folds * epochs * steps_per_epoch, "per_stage": per_stage,
            "train_minutes": round(train_minutes, 1), "inference_minutes": round(infer_minutes, 1),
            "total_minutes": round(train_minutes + infer_minutes, 1),
            "assumptions": {"mfu": mfu, "peak_tflops": peak_tflops, "launch_us": launch_us,
                            "host_speedup": host_speedup, "fold_processes": fold_processes,
                            "n_train_images": n_train_images, "n_test_images": n_test_images}}


def compiled_step_ms(cfg, mode: str, steps: int = 5, size: int | None = None, batch: int = 2) -> dict:
    """CPU ms per real training step (forward, loss, backward, optimizer) of the config's model,
    eager or torch.compile(mode=...), at a small batch and input so that the host's share
    (dispatch, Python) dominates: host time, not a GPU figure. The build time is reported apart."""
    from pipeline.losses import SegLoss
    from pipeline.models import create_model
    from pipeline.optim import build_optimizer

    size = size or (32 if cfg.model.name != "seed_unet" else 16)
    torch.manual_seed(0)
    model = create_model(cfg.model, load_pretrained=False).train()
    optimizer = build_optimizer(cfg, model)
    loss_fn = SegLoss(cfg.loss, cfg.model.deep_supervision)
    step_model = model if mode == "off" else torch.compile(model, mode=mode)
    x = torch.rand(batch, cfg.model.in_chans, size, size)
    target = (torch.rand(batch, 1, size, size) > 0.5).float()

    def step():
        out = step_model(x)
        loss, _ = loss_fn({k: v for k, v in out.items()}, target, 0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    started = time.perf_counter()
    step()
    build_s = time.perf_counter() - started
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return {"mode": mode, "ms_per_step": round(1000 * statistics.median(times), 2), "first_step_s": round(build_s, 1),
            "batch": batch, "size": size}


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/gpu_best.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--mfu", type=float, default=0.25)
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    parser.add_argument("--compile", default="", metavar="MODES",
                        help="also time the real model's step eager and with torch.compile in these modes "
                             "(e.g. default,reduce-overhead): CPU host ms, small batch; building takes minutes")
    args = parser.parse_args(argv)
    from pipeline.config import load_config

    torch.set_num_threads(1)
    cfg = load_config(args.config, args.set)
    measured = host_step(cfg, args.steps, args.repeats)
    if args.compile:
        measured["compile"] = [compiled_step_ms(cfg, mode) for mode in ["off", *args.compile.split(",")]]
    measured["estimate"] = {f"{p}_processes": {f"mfu_{m}": estimate(measured, cfg, mfu=m, fold_processes=p)
                                               for m in (0.15, args.mfu, 0.4)} for p in (1, 3, 5)}
    text = json.dumps(measured, indent=1)
    print(text)
    for processes, by_mfu in measured["estimate"].items():
        print(f"{cfg.name} on one H200, {processes.replace('_', ' ')} per GPU: "
              + ", ".join(f"{k} {v['total_minutes']} min" for k, v in by_mfu.items()), file=sys.stderr)
    if args.out:
        from pipeline.fileio import write_text

        write_text(args.out, text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
