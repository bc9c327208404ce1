"""Training and inference throughput of our models vs the segmentation-models-pytorch peer.

    python -m benchmarks.speed [--models seed_unet,unet_resnet34] [--paths fp32,cl,bf16,bf16_cl,compile]
                               [--batch 32] [--size 128] [--steps 10] [--no-peer] [--data]

For every (model, path) pair, in a fresh process (so peak memory is that path's own):
warm-up steps first, then the median over repeats of steps/second; on CUDA, timed with
events after synchronisation. Paths: fp32 (plain), cl (channels_last), bf16 / fp16
(autocast; fp16 only on CUDA), bf16_cl (both), compile (torch.compile on the best
eager path). `--data` also times the augmentation + batching loader. Prints a table and
writes benchmarks/results/speed-<host>-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import os
import platform
import socket
import statistics
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _peak_rss_mb() -> float:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def build(model_name: str, peer: bool, in_chans: int = 1):
    import torch

    if peer:
        import segmentation_models_pytorch as smp

        if model_name == "seed_unet":
            return None  # smp has no equivalent of the tutorial's UNet
        encoder = model_name.removeprefix("unet_")
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


def measure(model_name: str, path: str, peer: bool, batch: int, size: int, steps: int, repeats: int,
            device: str, queue) -> None:
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    model = build(model_name, peer)
    if model is None:
        queue.put(None)
        return
    dev = torch.device(device)
    channels_last = path in ("cl", "bf16_cl", "fp16_cl", "compile")
    amp = {"bf16": torch.bfloat16, "bf16_cl": torch.bfloat16, "fp16": torch.float16, "fp16_cl": torch.float16,
           "compile": torch.bfloat16}.get(path)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(dev, memory_format=fmt)
    step_model = torch.compile(model) if path == "compile" else model
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler(dev.type, enabled=amp == torch.float16)
    x = torch.rand(batch, 1, size, size, device=dev).contiguous(memory_format=fmt)
    y = (torch.rand(batch, 1, size, size, device=dev) > 0.5).float()
    loss_fn = torch.nn.BCEWithLogitsLoss()

    def autocast():
        return torch.autocast(dev.type, dtype=amp, enabled=amp is not None)

    def train_step():
        with autocast():
            logits = step_model(x)
        loss = loss_fn(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    @torch.no_grad()
    def infer_step():
        with autocast():
            step_model(x)

    def timed(fn) -> float:
        """Median images/second over `repeats` runs of `steps` steps, after warm-up."""
        for _ in range(3):
            fn()
        rates = []
        for _ in range(repeats):
            if dev.type == "cuda":
                torch.cuda.synchronize()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(steps):
                    fn()
                end.record()
                torch.cuda.synchronize()
                seconds = start.elapsed_time(end) / 1000
            else:
                started = time.perf_counter()
                for _ in range(steps):
                    fn()
                seconds = time.perf_counter() - started
            rates.append(steps * batch / seconds)
        return statistics.median(rates)

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        step_model.train()
        train_rate = timed(train_step)
        step_model.eval()
        infer_rate = timed(infer_step)
    except Exception as exc:  # e.g. torch.compile without a compiler: report, don't crash the table
        queue.put({"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"})
        return
    peak = torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else _peak_rss_mb()
    queue.put({"train_img_s": round(train_rate, 1), "infer_img_s": round(infer_rate, 1), "peak_mb": round(peak)})


def run_isolated(*args) -> dict | None:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    process = ctx.Process(target=measure, args=(*args, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def default_paths(device: str) -> list[str]:
    if device.startswith("cuda"):
        return ["fp32", "cl", "bf16", "bf16_cl", "fp16_cl", "compile"]
    return ["fp32", "cl", "bf16", "bf16_cl", "compile"]


def model_rows(models: list[str], paths: list[str], *, peer: bool, batch: int, size: int, steps: int,
               repeats: int, device: str) -> list[dict]:
    """One row per (model, path): ours and (if `peer`) smp's, each measured in its own process."""
    rows = []
    for model_name in models:
        for path in paths:
            ours = run_isolated(model_name, path, False, batch, size, steps, repeats, device)
            theirs = run_isolated(model_name, path, True, batch, size, steps, repeats, device) if peer else None
            row = {"model": model_name, "path": path, "ours": ours, "peer": theirs}
            print(_format_row(row), flush=True)
            rows.append(row)
    return rows


def data_throughput(batch: int, size: int, seconds: float = 5.0) -> dict:
    """Images/second through augmentation + batching + padding (the CPU side of a train step)."""
    import numpy as np
    import torch

    from pipeline.augment import build_train_transform
    from pipeline.config import AugmentConfig, Config
    from pipeline.predict import to_batch
    from pipeline.runtime import resolve_runtime
    from pipeline.train import SaltDataset

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
    parser.add_argument("--paths", default=None, help="default: fp32,cl,bf16,bf16_cl,compile (+fp16 on CUDA)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default=None)
    parser.add_argument("--no-peer", action="store_true")
    parser.add_argument("--data", action="store_true", help="also time the augmentation loader")
    args = parser.parse_args(argv)

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    paths = args.paths.split(",") if args.paths else default_paths(device)
    rows = model_rows(args.models.split(","), paths, peer=not args.no_peer, batch=args.batch, size=args.size,
                      steps=args.steps, repeats=args.repeats, device=device)
    extra = data_throughput(args.batch, args.size) if args.data else {}
    if extra:
        print(f"data loader (augment + batch + pad): {extra['loader_img_s']} img/s")
    device_name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"
    result = {
        "host": socket.gethostname(), "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": device_name, "torch": torch.__version__, "threads": os.cpu_count(),
        "batch": args.batch, "size": args.size, "rows": rows, **extra,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    from pipeline.fileio import write_json

    out = RESULTS / f"speed-{socket.gethostname()}-{datetime.date.today().isoformat()}-{device}.json"
    write_json(out, result)
    print(f"wrote {out}")
    return 0


def _format_row(row: dict) -> str:
    def cell(result, key):
        if result is None:
            return "-"
        if "error" in result:
            return "error"
        return f"{result[key]:.0f}"

    ours, peer = row["ours"], row["peer"]
    ratio = ""
    if ours and peer and "error" not in ours and "error" not in peer:
        ratio = f"{ours['train_img_s'] / peer['train_img_s']:.2f}x"
    error = (ours or {}).get("error", "")
    return (f"{row['model']:<16} {row['path']:<8} train {cell(ours, 'train_img_s'):>6} img/s "
            f"infer {cell(ours, 'infer_img_s'):>6} img/s peak {cell(ours, 'peak_mb'):>6} MB | "
            f"peer train {cell(peer, 'train_img_s'):>6} infer {cell(peer, 'infer_img_s'):>6} "
            f"ratio {ratio:>6} {error}")


if __name__ == "__main__":
    sys.exit(main())
