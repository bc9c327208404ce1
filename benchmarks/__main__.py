"""Every benchmark in one run, one table: `python -m benchmarks`.

    python -m benchmarks [--quick] [--no-peer] [--no-e2e] [--device cuda] [--models seed_unet,unet_resnet34]

In order, on this machine:
  1. model throughput (benchmarks/speed.py): train and inference images/s and peak memory of
     each model on each path (fp32, channels_last, bf16/fp16 autocast, both, torch.compile),
     against the same model from segmentation-models-pytorch where smp has one (the peer,
     `pip install -e '.[bench]'`). Ours and the peer are timed side by side in ONE fresh
     process per (model, path): both warmed up, then alternated repeat by repeat in ABBA
     order (CUDA: events after a sync); each one's img/s is the median of its repeats, and
     "ours/smp" is the median of the per-repeat ratios, so the machine's process-to-process
     drift (about +-5% here) cancels in it. Peak memory comes from a short separate process
     per (model, path, side). The fast-path speed-up (best path / fp32 training img/s, same
     model) is measured in this same run, but its paths ran in different processes, so it
     carries that drift;
  2. the training data path: images/s through augmentation + batching + padding;
  3. metric, tune-grid search and RLE against the naive per-image code (benchmarks/metric_rle.py);
  4. the end-to-end wall time of `./run.sh` with no arguments (the demo: configs/demo.yaml on a
     small synthetic set), in a temporary copy of the tracked files (this .venv linked in, so
     set-up is not timed), and the lines it ends with.
Prints markdown tables (README's "Benchmarks" section is one such print) and writes
benchmarks/results/<host>-<date>-<device>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import metric_rle, save_result, speed

REPO = Path(__file__).resolve().parents[1]
E2E_TAIL_LINES = 30  # what the demo ends with: the leaderboard, where things are, the next commands


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def peer_available() -> bool:
    try:
        import segmentation_models_pytorch  # noqa: F401
    except ImportError:
        return False
    return True


def fast_path_speedups(rows: list[dict]) -> dict[str, dict]:
    """Per model: the fastest training path and its speed-up over plain fp32, measured in this run.

    Each path's figure comes from its own process (see benchmarks/speed.py), so unlike the
    side-by-side ours/smp ratio this speed-up carries the process-to-process drift (about +-5%)."""
    out = {}
    for model_name in dict.fromkeys(row["model"] for row in rows):
        ok = {row["path"]: row["ours"] for row in rows
              if row["model"] == model_name and row["ours"] and "error" not in row["ours"]}
        if "fp32" not in ok:
            continue
        best = max(ok, key=lambda p: ok[p]["train_img_s"])
        out[model_name] = {"path": best, "train_speedup": round(ok[best]["train_img_s"] / ok["fp32"]["train_img_s"], 2),
                           "infer_speedup": round(ok[best]["infer_img_s"] / ok["fp32"]["infer_img_s"], 2)}
    return out


def end_to_end(timeout: float) -> dict:
    """Wall time of `./run.sh` (no arguments: the demo) in a fresh copy of the tracked files."""
    stamp = REPO / ".venv" / ".installed"
    if not stamp.exists() or stamp.stat().st_mtime <= (REPO / "pyproject.toml").stat().st_mtime:
        # run.sh would reinstall into the linked .venv, pointing it at the temporary copy
        return {"error": f"{stamp}: missing or older than pyproject.toml; run ./run.sh setup first"}
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    with tempfile.TemporaryDirectory(prefix="tgs-e2e-") as tmp:
        copy = Path(tmp) / "repo"
        for name in filter(None, files.decode().split("\0")):
            target = copy / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if (REPO / name).exists():
                shutil.copy2(REPO / name, target)  # keeps mtimes: run.sh then sees .venv as up to date
        os.symlink(REPO / ".venv", copy / ".venv")
        started, cpu_before = time.perf_counter(), _children_cpu_seconds()
        done = subprocess.run(["./run.sh"], cwd=copy, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
        seconds = time.perf_counter() - started
        cpu_seconds = _children_cpu_seconds() - cpu_before
        if done.returncode != 0:
            tail = (done.stdout + done.stderr).strip().splitlines()[-3:]
            return {"error": f"./run.sh exited {done.returncode}: {' | '.join(tail)}", "seconds": round(seconds, 1)}
        tuned = [json.loads(p.read_text()) for p in (copy / "runs").glob("*/tune.json")]
        return {"seconds": round(seconds, 1), "cpu_seconds": round(cpu_seconds, 1), "cv_tuned": tuned[0]["cv_tuned"] if tuned else None,
                "cv_at_05": tuned[0]["cv_at_05"] if tuned else None,
                "submission": sorted(p.name for p in (copy / "submissions").glob("*.csv")),
                "printed_last": done.stdout.rstrip().splitlines()[-E2E_TAIL_LINES:]}


def _children_cpu_seconds() -> float:
    """CPU time (user + system) of the finished child processes and theirs: on a CPU shared with
    other work, CPU seconds / cores bounds what the wall time would be on an idle machine."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def markdown(result: dict) -> str:
    native = result.get("native_bf16", True)  # results from before the key: bf16 hardware
    compiled = "bf16 + channels_last" if native else "fp32 + channels_last"
    lines = [f"Device: {result['device']} ({result['threads']} threads), torch {result['torch']}, "
             f"batch {result['batch']}, {result['size']}x{result['size']}; {result['date']}; "
             f"native bf16: {'yes' if native else 'no'}; compile = torch.compile on {compiled}",
             "",
             "| model | path | train img/s | infer img/s | peak MB | smp train img/s | smp infer img/s | ours/smp train | ours/smp infer |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]

    def cell(res, key):
        if not res:
            return "–"
        if "error" in res:
            return "error"
        return "–" if res.get(key) is None else f"{res[key]:.0f}"

    for row in result["models"]:
        ours, peer = row["ours"], row["peer"]
        ratios = ["–", "–"]
        if row.get("ratio_train") is not None:  # median of side-by-side per-repeat ratios
            ratios = [f"{row[k]:.2f}x" for k in ("ratio_train", "ratio_infer")]
        elif ours and peer and "error" not in ours and "error" not in peer:  # results from before those
            ratios = [f"{ours[k] / peer[k]:.2f}x" for k in ("train_img_s", "infer_img_s")]
        lines.append(f"| {row['model']} | {row['path']} | {cell(ours, 'train_img_s')} | {cell(ours, 'infer_img_s')} | "
                     f"{cell(ours, 'peak_mb')} | {cell(peer, 'train_img_s')} | {cell(peer, 'infer_img_s')} | "
                     f"{ratios[0]} | {ratios[1]} |")
    procs = {row["ours"]["procs"] for row in result["models"] if row["ours"] and "procs" in row["ours"]}
    if procs:
        lines.append(f"\n`*_procs`: {'/'.join(map(str, sorted(procs)))} single-thread processes at once (as "
                     f"`run.parallel_folds` trains folds), their images/s added up and peak MB summed.")
    for model_name, best in result["fast_path"].items():
        lines.append(f"\nFastest training path of {model_name}: {best['path']}, {best['train_speedup']}x fp32 "
                     f"training and {best['infer_speedup']}x fp32 inference.")
    if "loader_img_s" in result:
        lines.append(f"\nTraining data path (augment + batch + pad, one process): {result['loader_img_s']:.0f} img/s.")
    lines += ["", "| task | method | seconds | vs best |", "| --- | --- | ---: | ---: |"]
    for row in result["metric_rle"]["rows"]:
        note = f" ({row['note']})" if row["note"] else ""
        lines.append(f"| {row['task']} | {row['method']}{note} | {row['seconds']:.3f} | {row['x_slower_than_fastest']:.1f}x |")
    e2e = result.get("end_to_end")
    if e2e:
        if "error" in e2e:
            lines.append(f"\n`./run.sh` end to end: {e2e['error']}")
        else:
            lines.append(f"\n`./run.sh` end to end, the demo (set-up excluded): {e2e['seconds'] / 60:.1f} min "
                         f"({e2e.get('cpu_seconds', 0) / 60:.1f} CPU min), "
                         f"CV {e2e['cv_at_05']} at 0.5, {e2e['cv_tuned']} tuned.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="seed_unet,unet_resnet34")
    parser.add_argument("--paths", default=None, help="default: fp32,cl,bf16,bf16_cl,compile,bf16_cl_procs (CUDA: fp16_cl instead of *_procs; CPU without native bf16: fp32,cl,compile,cl_procs)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=128, help="model input size (the presets pad 101 -> 128)")
    parser.add_argument("--steps", type=int, default=speed.DEFAULT_STEPS, help="timed steps per repeat")
    parser.add_argument("--repeats", type=int, default=speed.DEFAULT_REPEATS,
                        help="timed repeats per model and path (even: balanced ABBA order)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--no-peer", action="store_true", help="skip segmentation-models-pytorch")
    parser.add_argument("--no-e2e", action="store_true", help="skip the ./run.sh wall time")
    parser.add_argument("--only-e2e", action="store_true", help="only the ./run.sh wall time (the demo)")
    parser.add_argument("--quick", action="store_true", help="2 repeats of 1 step, 1000 images for the metric")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.repeats = 1, 2
    if args.steps < 1 or args.repeats < 1:
        parser.error("--steps and --repeats must be at least 1")
    if args.only_e2e:
        print("== ./run.sh end to end (the demo)", flush=True)
        e2e = end_to_end(timeout=3600)
        print("\n".join(e2e.pop("printed_last", [])), flush=True)
        print(json.dumps(e2e))
        return 1 if "error" in e2e else 0

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    paths = args.paths.split(",") if args.paths else speed.default_paths(device)
    peer = not args.no_peer and peer_available()
    if not args.no_peer and not peer:
        print("segmentation-models-pytorch not installed: no peer column (pip install -e '.[bench]')", file=sys.stderr)

    print("== 1. models", flush=True)
    rows = speed.model_rows(args.models.split(","), paths, peer=peer, batch=args.batch, size=args.size,
                      steps=args.steps, repeats=args.repeats, device=device)
    print("== 2. training data path", flush=True)
    loader = speed.data_throughput(args.batch, args.size, seconds=2.0 if args.quick else 5.0)
    print(f"augment + batch + pad: {loader['loader_img_s']} img/s", flush=True)
    print("== 3. metric, tune grid, RLE", flush=True)
    count = 1000 if args.quick else 4000
    metric = metric_rle.run(count, 25, 1 if args.quick else 5, 1 if args.quick else 3, 50 if args.quick else 200)
    print(metric_rle.format_table(metric), flush=True)
    e2e = None
    if not args.no_e2e:
        print("== 4. ./run.sh end to end (the demo)", flush=True)
        e2e = end_to_end(timeout=3600)
        print(e2e, flush=True)

    result = {
        "host": socket.gethostname(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else cpu_name(),
        "torch": torch.__version__, "threads": torch.get_num_threads() if device == "cpu" else os.cpu_count(),
        "native_bf16": speed.native_bf16(device),
        "batch": args.batch, "size": args.size, "steps": args.steps, "repeats": args.repeats,
        "models": rows, "fast_path": fast_path_speedups(rows),
        **loader, "metric_rle": metric, "end_to_end": e2e,
    }
    print("\n" + markdown(result) + "\n")
    save_result("", result, device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
