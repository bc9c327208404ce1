"""The competition's size: every stage's wall time and peak memory on 4,000 train / 18,000 test images.

    python -m benchmarks.scale [--source /work/shared/tgs] [--work data/scale] [--config configs/cpu_best.yaml]
                               [--epochs 2] [--n-train 4000] [--n-test 18000]

1. Builds a competition-size folder from a smaller one in the Kaggle layout (the 3,001-image
   sample): each train image, mask and test image is used again under new ids (a copy's id is
   a hash of the source id and the copy number, 10 hex digits like TGS's) until there are
   --n-train and --n-test of each; files are hard links where the disk allows (copies
   otherwise), train.csv and depths.csv are rewritten for the new ids. The folder lives under
   --work (data/ is git-ignored: competition data never enters the repository).
2. Runs each stage as its own `python -m pipeline` process in --work (runs/, folds/,
   submissions/ land there): folds, train, tune, predict, submit, show, leaderboard; and
   records its wall time, the peak RSS of its largest process (wait4's ru_maxrss, children
   included) and the peak of all its processes' RSS summed (/proc sampled every 0.2 s:
   train's fold processes run at once).
3. Training on 2 CPU cores takes an hour and more at the preset's epochs, so it runs
   --epochs (stage 2 from the last epoch, validated only then, as the preset validates only
   its last epochs); the preset's training time is EXTRAPOLATED from the per-epoch seconds in
   the folds' log.csv: (wall - the slowest fold's epoch seconds) + its first epoch's seconds
   x the preset's unvalidated epochs + its last epoch's seconds x the validated ones.

Prints a markdown table and writes benchmarks/results/scale-<host>-<date>.json. On a machine
shared with other work the figures are slower than idle; the load average is recorded.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import hashlib
import io
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from benchmarks import save_result

REPO = Path(__file__).resolve().parents[1]
RUN_NAME = "scale"
SAMPLE_SECONDS = 0.2


# ---------------------------------------------------------------- the folder


def copy_id(source_id: str, copy: int) -> str:
    """A new 10-hex-digit id for copy `copy` of `source_id` (copy 0 keeps the id)."""
    return source_id if copy == 0 else hashlib.sha1(f"{source_id}/{copy}".encode()).hexdigest()[:10]


def _place(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed
        shutil.copyfile(src, dst)


def _spread(ids: list[str], count: int) -> list[tuple[str, str]]:
    """(new id, source id) for `count` images cycling through `ids`."""
    return [(copy_id(ids[i % len(ids)], i // len(ids)), ids[i % len(ids)]) for i in range(count)]


def build_folder(source: Path, out: Path, n_train: int, n_test: int) -> dict:
    """The competition-size folder at `out` (rebuilt only when its counts differ)."""
    from pipeline.data import list_image_ids

    stamp = out / ".built"
    wanted = f"{source.resolve()} {n_train} {n_test}\n"
    if stamp.exists() and stamp.read_text() == wanted:
        return {"folder": str(out), "reused": True}
    if out.exists():
        shutil.rmtree(out)
    for sub in ("train/images", "train/masks", "test/images"):
        (out / sub).mkdir(parents=True)
    train = _spread(list_image_ids(source / "train" / "images"), n_train)
    test = _spread(list_image_ids(source / "test" / "images"), n_test)
    for new, old in train:
        _place(source / "train" / "images" / f"{old}.png", out / "train" / "images" / f"{new}.png")
        _place(source / "train" / "masks" / f"{old}.png", out / "train" / "masks" / f"{new}.png")
    for new, old in test:
        _place(source / "test" / "images" / f"{old}.png", out / "test" / "images" / f"{new}.png")
    with open(source / "train.csv", newline="") as handle:
        rle = {row["id"]: row["rle_mask"] for row in csv.DictReader(handle)}
    lines = ["id,rle_mask"] + [f"{new},{rle.get(old, '')}" for new, old in train]
    (out / "train.csv").write_text("\n".join(lines) + "\n")
    depths_path = source / "depths.csv"
    if depths_path.exists():
        with open(depths_path, newline="") as handle:
            z = {row["id"]: row["z"] for row in csv.DictReader(handle)}
        lines = ["id,z"] + [f"{new},{z[old]}" for new, old in train + test if old in z]
        (out / "depths.csv").write_text("\n".join(lines) + "\n")
    stamp.write_text(wanted)
    return {"folder": str(out), "reused": False}


# ---------------------------------------------------------------- measuring a stage


def _tree_rss_bytes(root: int) -> int:
    """RSS of `root` and every descendant, summed (Linux /proc)."""
    parents: dict[int, int] = {}
    rss: dict[int, int] = {}
    page = os.sysconf("SC_PAGE_SIZE")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
            parents[int(entry)] = int(fields[1])
            rss[int(entry)] = int(fields[21]) * page
        except (OSError, IndexError, ValueError):
            continue
    tree, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        for pid, ppid in parents.items():
            if ppid == parent and pid not in tree:
                tree.add(pid)
                frontier.append(pid)
    return sum(rss.get(pid, 0) for pid in tree)


def run_stage(name: str, args: list[str], cwd: Path, log) -> dict:
    """Run `python -m pipeline ARGS` in cwd: wall seconds, peak RSS (largest process, all summed)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}
    log.write(f"\n== {name}: tgs {' '.join(args)}\n")
    log.flush()
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", *args], cwd=cwd, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    peak_tree = 0
    finished = threading.Event()

    def sample() -> None:
        nonlocal peak_tree
        while not finished.is_set():
            peak_tree = max(peak_tree, _tree_rss_bytes(proc.pid))
            finished.wait(SAMPLE_SECONDS)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, usage = os.wait4(proc.pid, 0)
    finished.set()
    sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - started
    result = {"stage": name, "seconds": round(seconds, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024),
              "peak_tree_rss_mb": round(max(peak_tree, usage.ru_maxrss * 1024) / 2**20),
              "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1), "exit": proc.returncode}
    log.write(f"== {name}: {result}\n")
    log.flush()
    if proc.returncode != 0:
        raise SystemExit(f"stage {name} failed (exit {proc.returncode}); see the log")
    return result


# ---------------------------------------------------------------- extrapolating training


def fold_epoch_seconds(run: Path) -> dict[int, list[float]]:
    """Per fold, the seconds of each epoch its log.csv records."""
    out = {}
    for log in sorted(run.glob("fold*/log.csv")):
        rows = list(csv.DictReader(io.StringIO(log.read_text())))
        out[int(log.parent.name[4:])] = [float(r["seconds"]) for r in rows if r.get("seconds")]
    return out


def extrapolate_train(wall: float, epochs: dict[int, list[float]], preset_epochs: int, validated: int) -> dict:
    """The preset's training wall time from a short run (see the module docstring)."""
    slowest = max(epochs.values(), key=sum)
    overhead = wall - sum(slowest)
    plain, checked = slowest[0], slowest[-1]
    seconds = overhead + plain * (preset_epochs - validated) + checked * validated
    return {"overhead_s": round(overhead, 1), "epoch_s": round(plain, 1), "validated_epoch_s": round(checked, 1),
            "preset_epochs": preset_epochs, "validated_epochs": validated, "seconds": round(seconds, 1)}


# ---------------------------------------------------------------- report


def markdown(result: dict) -> str:
    lines = [f"{result['n_train']} train / {result['n_test']} test images (copies of {result['source']}), "
             f"`{result['config']}` with {' '.join(result['overrides'])}; {result['cores']} cores, "
             f"load average {result['load_before']:.1f} before and {result['load_after']:.1f} after; "
             f"{result['date']}", "",
             "| stage | wall | CPU time | peak RSS, largest process | peak RSS, all its processes |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for row in result["stages"]:
        lines.append(f"| {row['stage']} | {_minutes(row['seconds'])} | {_minutes(row['cpu_seconds'])} | "
                     f"{row['peak_rss_mb']:,} MB | {row['peak_tree_rss_mb']:,} MB |")
    extra = result.get("train_extrapolated")
    if extra:
        lines.append(f"| train, **extrapolated** to {extra['preset_epochs']} epochs | **{_minutes(extra['seconds'])}** "
                     f"| | | |")
        lines.append("")
        lines.append(f"Extrapolation: {extra['overhead_s']:.0f} s outside epochs + {extra['epoch_s']:.0f} s x "
                     f"{extra['preset_epochs'] - extra['validated_epochs']} unvalidated epochs + "
                     f"{extra['validated_epoch_s']:.0f} s x {extra['validated_epochs']} validated epochs "
                     f"(the slowest fold's log.csv).")
    return "\n".join(lines)


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--source", default=os.environ.get("TGS_DATA", "/work/shared/tgs"),
                        help="a dataset in the Kaggle layout to copy from")
    parser.add_argument("--work", default="data/scale", help="folder for the built dataset and the run")
    parser.add_argument("--config", default="configs/cpu_best.yaml", help="the preset to time")
    parser.add_argument("--epochs", type=int, default=2,
                        help="epochs actually trained (the last validated, with the stage-2 loss when the preset has one)")
    parser.add_argument("--n-train", type=int, default=4000, help="train images (TGS: 4,000)")
    parser.add_argument("--n-test", type=int, default=18000, help="test images (TGS: 18,000)")
    parser.add_argument("--stages", default="folds,train,tune,predict,submit,show,leaderboard",
                        help="comma list of the stages to run, in order")
    args = parser.parse_args(argv)
    from pipeline.config import load_config

    config = (REPO / args.config).resolve() if not Path(args.config).is_absolute() else Path(args.config)
    preset = load_config(config)
    work = Path(args.work).resolve()
    data = work / "tgs-scale"
    load_before = os.getloadavg()[0]
    print(f"building {data} ({args.n_train} train, {args.n_test} test) ...", flush=True)
    built = build_folder(Path(args.source), data, args.n_train, args.n_test)
    overrides = [f"data={data}", f"name={RUN_NAME}", f"folds_csv={work / 'folds.csv'}",
                 f"train.epochs={args.epochs}", f"train.validate_from={args.epochs}"]
    validated = preset.train.epochs - preset.train.validate_from + 1 if preset.train.validate_from > 0 else preset.train.epochs
    if preset.loss.stage2_from_epoch >= 0:
        overrides.append(f"loss.stage2_from_epoch={args.epochs - 1}")
    sets = [item for o in overrides for item in ("--set", o)]
    run = work / "runs" / RUN_NAME
    commands = {
        "folds": ["folds", "--data", str(data), "--k", str(preset.n_folds), "--seed", str(preset.seed),
                  "--out", str(work / "folds.csv")],
        "train": ["train", "--config", str(config), *sets, "--force"],
        "tune": ["tune", "--run", str(run)],
        "predict": ["predict", "--run", str(run)],
        "submit": ["submit", "--run", str(run)],
        "show": ["show", "--run", str(run)],
        "leaderboard": ["leaderboard"],
    }
    stages = []
    log_path = work / "scale.log"
    print(f"stages log to {log_path}", flush=True)
    with open(log_path, "a") as log:
        for name in args.stages.split(","):
            stages.append(run_stage(name, commands[name], work, log))
            print(stages[-1], flush=True)
    result = {"host": socket.gethostname(), "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "source": str(args.source), "n_train": args.n_train, "n_test": args.n_test, "built": built,
              "config": args.config, "overrides": [o for o in overrides if not o.startswith(("data=", "folds_csv="))],
              "cores": os.cpu_count(), "load_before": load_before, "load_after": os.getloadavg()[0], "stages": stages}
    train = next((s for s in stages if s["stage"] == "train"), None)
    if train is not None:
        result["train_extrapolated"] = extrapolate_train(train["seconds"], fold_epoch_seconds(run),
                                                         preset.train.epochs, validated)
    print("\n" + markdown(result) + "\n")
    save_result("scale", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
