"""Count the host syncs a piece of code would make on a GPU, by running it on the CPU.

A host sync is any point where Python needs a value that the GPU computes: the CPU waits for
every queued kernel to finish, so the GPU then idles while Python queues the next ones. On a
CPU nothing waits, so they cost nothing here and are easy to miss; this records them:

- `_local_scalar_dense`: `.item()`, `float(t)`, `int(t)`, `bool(t)` (an `if` on a tensor),
  `torch.isfinite(loss)` used as a condition
- `nonzero`, `masked_select`, `unique`, and `index` / `index_put` with a boolean mask: their
  output size depends on the data, so the host must read it before allocating
- `Tensor.tolist()` / `.numpy()` / `.cpu()`: device-to-host copies (Python-level calls, which
  do not reach the dispatcher on a CPU tensor)

`torch.cuda.set_sync_debug_mode("warn")` says the same on a GPU; this is the CPU stand-in.
"""

from __future__ import annotations

import contextlib
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SYNCING_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "_unique", "_unique2", "unique_dim",
               "unique_consecutive", "masked_scatter", "repeat_interleave"}
BOOL_INDEXED_OPS = {"index", "index_put", "index_put_", "_index_put_impl_"}
HOST_READS = ("tolist", "numpy", "cpu")


def _is_bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())


class _SyncMode(TorchDispatchMode):
    def __init__(self, counts: Counter):
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in SYNCING_OPS or (name in BOOL_INDEXED_OPS and _is_bool_index(args)):
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def count_host_syncs():
    """`with count_host_syncs() as counts:` ... then `sum(counts.values())` and what made them."""
    counts: Counter = Counter()
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def counting(name):
        original = originals[name]

        def read(self, *args, **kwargs):
            counts[name] += 1
            return original(self, *args, **kwargs)

        return read

    for name in HOST_READS:
        setattr(torch.Tensor, name, counting(name))
    try:
        with _SyncMode(counts):
            yield counts
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def step_syncs(cfg, steps: int = 5, *, fused: bool) -> dict:
    """Host syncs per training step of `cfg`'s real step (train_fold.run_steps, the model a
    ShapeStub) on the fp16 path, GradScaler enabled, as on a GPU without native bf16 (T4):
    `fused` chooses the optimizer build_optimizer takes on CUDA (True) or the unfused one."""
    from benchmarks.host_step import Batches, ShapeStub, make_batches
    from pipeline.losses import SegLoss
    from pipeline.models import create_model
    from pipeline.optim import build_optimizer
    from pipeline.runtime import resolve_runtime
    from pipeline.train_fold import Training, run_steps

    rt = resolve_runtime("fp16", "off", "cpu", 1)
    with torch.no_grad():
        example = create_model(cfg.model, load_pretrained=False).train()(
            torch.zeros(2, cfg.model.in_chans, cfg.input.size, cfg.input.size))
    stub = ShapeStub(example)
    parts = Training(model=stub, optimizer=build_optimizer(cfg, stub, fused=fused), scheduler=None,
                     scaler=rt.grad_scaler(), loss_fn=SegLoss(cfg.loss, cfg.model.deep_supervision), ema=None)
    loader = Batches(make_batches(cfg.train.batch_size, steps))
    with count_host_syncs() as counts:
        run_steps(stub, loader, parts, cfg, rt, 0)
    ends = 2  # the epoch's own two reads at its end: the finite check and the mean loss
    return {"scaler_enabled": parts.scaler.is_enabled(), "fused": fused,
            "per_step": (sum(counts.values()) - ends) / steps, "by_kind": dict(counts)}
