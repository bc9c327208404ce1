"""CPU inference speed of `predict` (images/s, TTA included) against its settings, on real images:

    python -m benchmarks.infer [--config configs/cpu_best.yaml] [--data /work/shared/tgs] [--images 128]

The config's model (its precision as `predict` resolves it; random weights: speed does not depend on them) predicts the first N test
images through `predict_probs`, as `predict` runs it, under each variant: gradient mode
(torch.no_grad, the old path, or torch.inference_mode), batch size, channels_last, threads.
Variants alternate round by round, so load from other processes spreads over all of them;
each figure is the median of its rounds. Prints a markdown table and writes
benchmarks/results/infer-<host>-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import statistics
import time
from pathlib import Path
from benchmarks import save_result



def variants(cores: int) -> list[dict]:
    """(gradient mode, batch, channels_last, threads): the old default first."""
    rows = [dict(grad="no_grad", batch=64, channels_last=True, threads=cores)]  # before: predict's old path
    rows += [dict(grad="inference_mode", batch=b, channels_last=True, threads=cores) for b in (16, 64, 128, 256)]
    rows += [dict(grad="inference_mode", batch=64, channels_last=False, threads=cores)]
    if cores > 1:
        rows += [dict(grad="inference_mode", batch=64, channels_last=True, threads=1)]
    return rows


def _label(v: dict) -> str:
    return f"{v['grad']}, batch {v['batch']}, {'channels_last' if v['channels_last'] else 'contiguous'}, {v['threads']} thr"


def measure(config: str, data: str, n_images: int, rounds: int) -> dict:
    import torch

    from pipeline.config import load_config
    from pipeline.data import list_image_ids, read_images
    from pipeline.models import create_model
    from pipeline.predict import predict_probs
    from pipeline.runtime import resolve_runtime

    cfg = load_config(config)
    folder = Path(data) / "test" / "images"
    ids = list_image_ids(folder)[:n_images]
    images = read_images([folder / f"{i}.png" for i in ids])
    cores = os.cpu_count() or 1
    torch.manual_seed(0)
    model = create_model(cfg.model, load_pretrained=False).eval()
    rows = variants(cores)
    rates: list[list[float]] = [[] for _ in rows]
    plain = predict_probs.__wrapped__  # the function under no decorator: the grad mode is ours
    for round_ in range(rounds + 1):  # round 0 warms every variant up
        for index, v in enumerate(rows):
            rt = resolve_runtime(cfg.train.precision, "on" if v["channels_last"] else "off", "cpu", v["threads"])
            model = model.to(memory_format=rt.memory_format())
            mode = torch.no_grad() if v["grad"] == "no_grad" else torch.inference_mode()
            started = time.perf_counter()
            with mode:
                plain(model, images, cfg, rt, v["batch"], cfg.predict.tta)
            if round_:
                rates[index].append(len(images) / (time.perf_counter() - started))
    precision = resolve_runtime(cfg.train.precision, "off", "cpu", cores).describe()
    base = statistics.median(rates[0])
    table = [{**v, "img_s": round(statistics.median(r), 1), "vs_before": round(statistics.median(r) / base, 2)}
             for v, r in zip(rows, rates)]
    return {"host": socket.gethostname(), "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "config": cfg.name, "model": cfg.model.name, "size": cfg.input.size, "tta": list(cfg.predict.tta),
            "images": len(images), "rounds": rounds, "runtime": precision, "cores": cores, "torch": torch.__version__,
            "load_average": os.getloadavg()[0], "rows": table}


def markdown(result: dict) -> str:
    lines = [f"{result['config']} ({result['model']}, {result['size']}x{result['size']}, TTA "
             f"{'+'.join(result['tta'])}), {result['images']} sample test images, median of {result['rounds']} "
             f"rounds; {result.get('runtime', '')}; {result['cores']} cores, load average {result['load_average']:.1f}; {result['date']}",
             "", "| variant | images/s (TTA included) | vs before |", "| --- | ---: | ---: |"]
    lines += [f"| {_label(r)}{' (before)' if i == 0 else ''} | {r['img_s']:.1f} | {r['vs_before']:.2f}x |"
              for i, r in enumerate(result["rows"])]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    parser = argparse.ArgumentParser(prog="python -m benchmarks.infer", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", default="configs/cpu_best.yaml", help="the model and TTA to time")
    parser.add_argument("--data", default=os.environ.get("TGS_DATA", "/work/shared/tgs"),
                        help="dataset folder with test/images")
    parser.add_argument("--images", type=int, default=128, help="test images per timed pass")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per variant")
    args = parser.parse_args(argv)
    result = measure(args.config, args.data, args.images, args.rounds)
    print(markdown(result) + "\n")
    save_result("infer", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
