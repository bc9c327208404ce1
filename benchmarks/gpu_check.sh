#!/usr/bin/env bash
# Everything the CUDA path needs proven, in one command of at most ~8 minutes on one lent GPU:
#   1. the CUDA tests (tests/test_cuda.py, marker `cuda`: AMP fp16/bf16 steps in channels_last,
#      resume vs a straight run, predict on the GPU vs the CPU);
#   2. python -m benchmarks.speed on CUDA, our ResNet34 UNet vs the smp peer (fp32, bf16+cl);
#   3. python -m benchmarks.data_path with that box's cores (1, 4, 15 loader workers);
#   4. a short gpu_best run (fold 0, 30 epochs, from scratch) on the real sample: its OOF score
#      (best val, tuned CV) and images/s.
# Each step has its own time limit, so one that hangs cannot eat the others' time.
#
# The device tool sends the checkout the session was started in (a helper's worktree does not
# travel), so prepare and call from that checkout, once this script is on its branch.
# Prepare there, once, from the repository root (both folders are git-ignored):
#   bash benchmarks/gpu_wheels.sh                  # .whl/: albumentations & co. + smp for Python 3.12 (~8 MB)
#   bash benchmarks/gpu_check.sh --stage-sample    # .tgs_sample/: train images, masks, csvs of ../shared/tgs (~30 MB)
# Then ONE device call (the device tool's `run`):
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl", ".tgs_sample"], timeout_s=560)
# What it writes to $OUT comes back under the reply's files_at; keep it with
#   cp <files_at>/*.json <files_at>/*.log benchmarks/results/
# (gpu_check-<date>.json is the summary; speed-*.json and data_path-*.json the benchmarks').
#
# On a CPU, for the plumbing: GPU_CHECK_SMOKE=1 bash benchmarks/gpu_check.sh (tiny sizes, a small
# synthetic set; the CUDA tests skip). Output goes to $OUT, else /tmp/gpu_check_out.
set -uo pipefail
cd "$(dirname "$0")/.."
export NO_ALBUMENTATIONS_UPDATE=1 PYTHONUNBUFFERED=1

if [ "${1:-}" = "--stage-sample" ]; then
  src="${TGS_SAMPLE:-../shared/tgs}"
  mkdir -p .tgs_sample
  cp -r "$src/train" "$src/train.csv" "$src/depths.csv" .tgs_sample/
  du -sh .tgs_sample
  exit 0
fi

SMOKE="${GPU_CHECK_SMOKE:-0}"
OUT="${OUT:-/tmp/gpu_check_out}"
mkdir -p "$OUT"
WORK="$(mktemp -d)"
STAMP="$(date -u +%Y-%m-%d)"
LOG="$OUT/gpu_check.log"
exec > >(tee -a "$LOG") 2>&1

# The device's python3 holds torch; here .venv's. Wheels go in only where albumentations is missing.
PY="${PYTHON:-python3}"
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
if ! "$PY" -c "import albumentations" 2>/dev/null; then
  if [ -d .whl ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      || { echo "gpu_check: installing .whl/ failed"; exit 1; }
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "gpu_check: albumentations is missing and there is no .whl/ (run benchmarks/gpu_wheels.sh here, carry .whl)"
    exit 1
  fi
fi

step() {  # step NAME SECONDS COMMAND...: run with a time limit, record its status and duration
  local name="$1" limit="$2"; shift 2
  echo; echo "== $name (limit ${limit}s): $*"
  local started=$SECONDS
  timeout --kill-after=10 "$limit" "$@"
  local status=$?
  echo "== $name: exit $status in $((SECONDS - started)) s"
  echo "$name $status $((SECONDS - started))" >> "$WORK/steps"
}

"$PY" - <<'EOF'
import platform, torch
print(f"python {platform.python_version()}, torch {torch.__version__}, cuda available {torch.cuda.is_available()}")
if torch.cuda.is_available():
    print(f"gpu {torch.cuda.get_device_name()}, capability {torch.cuda.get_device_capability()}, "
          f"bf16 {torch.cuda.is_bf16_supported()}")
import albumentations, cv2, numpy, pandas, timm
print(f"timm {timm.__version__}, albumentations {albumentations.__version__}, cv2 {cv2.__version__}, "
      f"numpy {numpy.__version__}, pandas {pandas.__version__}")
EOF
command -v nvidia-smi >/dev/null && nvidia-smi -L
echo "cpu cores: $(nproc)"

if [ "$SMOKE" = 1 ]; then
  DEVICE=cpu
  SPEED_ARGS=(--device cpu --models unet_resnet34 --paths fp32 --batch 2 --size 64 --steps 1 --repeats 2)
  DATA_PATH_ARGS=(--presets gpu_best --workers 0,1 --seconds 1)
  "$PY" -m pipeline synth --out "$WORK/data" --n-train 60 --n-test 10 --seed 0 >/dev/null
  DATA="$WORK/data"
  RUN_ARGS=(--set train.epochs=2 --set loss.stage2_from_epoch=1 --set train.cycle_epochs=1
            --set run.num_workers=1 --set predict.batch_size=16 --set train.precision=off)
  LIMITS=(300 600 120 600)
else
  DEVICE=cuda
  SPEED_ARGS=(--device cuda --models unet_resnet34 --paths fp32,bf16_cl --batch 32 --size 128 --steps 10 --repeats 6)
  DATA_PATH_ARGS=(--presets gpu_best --workers 1,4,15 --seconds 4)
  DATA="${GPU_CHECK_DATA:-.tgs_sample}"
  RUN_ARGS=(--set train.epochs=30 --set loss.stage2_from_epoch=15 --set train.cycle_epochs=15)
  LIMITS=(120 150 60 210)
fi
"$PY" -c "import segmentation_models_pytorch" 2>/dev/null || SPEED_ARGS+=(--no-peer)

# 1. CUDA tests (they skip, with their reason, where there is no GPU)
step cuda_tests "${LIMITS[0]}" "$PY" -m pytest tests/test_cuda.py -m cuda -rs -v -p no:cacheprovider -o addopts=

# 2. speed vs the smp peer; the JSON lands in benchmarks/results/ and is copied to $OUT
touch "$WORK/marker"
step speed "${LIMITS[1]}" "$PY" -m benchmarks.speed "${SPEED_ARGS[@]}"
for f in $(find benchmarks/results -name "speed-*.json" -newer "$WORK/marker"); do
  cp "$f" "$OUT/"
  if [ "$SMOKE" = 1 ]; then git checkout -q -- "$f" 2>/dev/null || rm -f "$f"; fi  # a smoke figure is no result
done

# 3. the data path with this machine's cores
step data_path "${LIMITS[2]}" "$PY" -m benchmarks.data_path --data "$DATA" "${DATA_PATH_ARGS[@]}" \
  --out "$OUT/data_path-$DEVICE-$STAMP.json"

# 4. a short gpu_best run: fold 0, then the OOF tuned. From scratch: the machine is offline, and
# ImageNet weights would have to travel as a file (model.weights_path).
RUN_SETS=(--set name=gpu_check --set "data=$DATA" --set "runs_dir=$WORK/runs" --set "folds_csv=$WORK/folds.csv"
          --set "folds=[0]" --set model.pretrained=false "${RUN_ARGS[@]}")
step gpu_best_train "${LIMITS[3]}" "$PY" -m pipeline train --config configs/gpu_best.yaml "${RUN_SETS[@]}"
step gpu_best_tune 60 "$PY" -m pipeline tune --run "$WORK/runs/gpu_check"

"$PY" - "$WORK" "$OUT/gpu_check-$DEVICE-$STAMP.json" "$DATA" "$SMOKE" <<'EOF'
import csv, json, sys
from pathlib import Path
work, out, data, smoke = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4] == "1"
steps = {}
for line in (work / "steps").read_text().splitlines():
    name, status, seconds = line.split()
    steps[name] = {"exit": int(status), "seconds": int(seconds)}
summary = {"smoke": smoke, "data": data, "steps": steps}
run = work / "runs" / "gpu_check"
log = run / "fold0" / "log.csv"
if log.is_file():
    rows = list(csv.DictReader(log.open()))
    done = json.loads((run / "fold0" / "done.json").read_text()) if (run / "fold0" / "done.json").is_file() else {}
    n_train = sum(1 for r in csv.DictReader(open(work / "folds.csv")) if r["fold"] != "0")
    seconds = sum(float(r["seconds"]) for r in rows)
    summary["gpu_best"] = {
        "epochs": len(rows), "train_images_per_epoch": n_train, "epoch_seconds": [float(r["seconds"]) for r in rows],
        # training images over whole epochs' wall time (validation included): what a run sees
        "img_s_epoch_wall": round(n_train * len(rows) / seconds, 1) if seconds else None,
        "best_val_score": done.get("best_score"),
        "fold_seconds": done.get("seconds"),
    }
    tune = run / "tune.json"
    if tune.is_file():
        t = json.loads(tune.read_text())
        summary["gpu_best"]["tune"] = {k: t[k] for k in t if not isinstance(t[k], (dict, list))}
    (Path(out).parent / "gpu_best_fold0_log.csv").write_text(log.read_text())
out = Path(out)
out.write_text(json.dumps(summary, indent=2) + "\n")
print(json.dumps(summary, indent=2))
print(f"wrote {out}")
EOF
failed=$(awk '$2 != 0 {print $1}' "$WORK/steps" | tr '\n' ' ')
rm -rf "$WORK"
echo "gpu_check: ${failed:+FAILED: $failed}${failed:-all steps passed}; results in $OUT"
[ -z "$failed" ]
