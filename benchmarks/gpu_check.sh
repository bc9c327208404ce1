#!/usr/bin/env bash
# Everything the CUDA path needs proven, in one command within the device tool's 10-minute call
# on one lent GPU (the step limits add up to ~8.5 minutes):
#   1. the CUDA tests (tests/test_cuda.py, marker `cuda`: AMP fp16/bf16 steps in channels_last,
#      resume vs a straight run, predict on the GPU vs the CPU);
#   2. tests/test_cuda_repro.py (marker `cuda`): deterministic resume bit for bit, NCCL + gloo DDP;
#   3. python -m benchmarks.speed on CUDA, our ResNet34 UNet vs the smp peer (fp32, bf16+cl);
#   4. python -m benchmarks.data_path with that box's cores;
#   5. fp16 + SGD + GradScaler: gpu_best (SGD) with train.precision=fp16 forced, even on bf16
#      hardware, a few epochs on part of the sample: finite, finished, a checkpointed scaler;
#   6. a pretrained encoder loaded from a weights file this script writes (timm's resnet34
#      layout; the box is offline): model.pretrained + model.weights_path, with
#      model.input_norm: imagenet as gpu_best sets it;
#   7. the compile path: --set run.compile=reduce-overhead (skipped, with a line saying so,
#      where this checkout's config has no run.compile key);
#   8. gpu_best's 5 folds through `all` (3 fold processes on the GPU, each predicting the test set
#      as it finishes), a few epochs each: the wall-time line, scaled to the preset's epochs.
# Each step has its own time limit, so one that hangs cannot eat the others' time.
#
# The device tool sends the checkout the session was started in (a helper's worktree does not
# travel), so prepare and call from that checkout, once this script is on its branch.
# Prepare there, once, from the repository root (both folders are git-ignored):
#   bash benchmarks/gpu_wheels.sh                  # .whl/: albumentations & co. + smp for Python 3.12 (~8 MB)
#   bash benchmarks/gpu_check.sh --stage-sample    # .tgs_sample/: train + test images, masks, csvs of ../shared/tgs (~40 MB)
# Then ONE device call (the device tool's `run`):
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl", ".tgs_sample"], timeout_s=590)
# What it writes to $OUT comes back under the reply's files_at; keep it with
#   cp <files_at>/*.json <files_at>/*.log benchmarks/results/
# (gpu_check-<date>.json is the summary; speed-*.json and data_path-*.json the benchmarks').
#
# On a CPU, for the plumbing: GPU_CHECK_SMOKE=1 bash benchmarks/gpu_check.sh (tiny sizes, a small
# synthetic set; the CUDA tests skip, fp16 runs on the CPU). Output goes to $OUT, else
# /tmp/gpu_check_out. GPU_CHECK_DRY=1 prints each step's command and limit and runs none.
set -uo pipefail
cd "$(dirname "$0")/.."
export NO_ALBUMENTATIONS_UPDATE=1 PYTHONUNBUFFERED=1

if [ "${1:-}" = "--stage-sample" ]; then
  src="${TGS_SAMPLE:-../shared/tgs}"
  mkdir -p .tgs_sample
  cp -r "$src/train" "$src/test" "$src/train.csv" "$src/depths.csv" .tgs_sample/
  du -sh .tgs_sample
  exit 0
fi

SMOKE="${GPU_CHECK_SMOKE:-0}"
DRY="${GPU_CHECK_DRY:-0}"
OUT="${OUT:-/tmp/gpu_check_out}"
mkdir -p "$OUT"
WORK="$(mktemp -d)"
STAMP="$(date -u +%Y-%m-%d)"
LOG="$OUT/gpu_check.log"
exec > >(tee -a "$LOG") 2>&1

# The device's python3 holds torch; here .venv's. Wheels go in only where albumentations is missing.
PY="${PYTHON:-python3}"
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then PY="$PWD/.venv/bin/python"; fi
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
  if [ "$DRY" = 1 ]; then return 0; fi
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
  [ "$DRY" = 1 ] || "$PY" -m pipeline synth --out "$WORK/data" --n-train 60 --n-test 10 --seed 0 >/dev/null
  DATA="$WORK/data"
  SHORT=(--set train.epochs=1 --set loss.stage2_from_epoch=-1 --set train.cycle_epochs=1 --set train.limit_train=16 --set train.batch_size=8 --set model.decoder_channels=[16,8,8,8,8]
         --set run.num_workers=0 --set predict.batch_size=16 --set "predict.tta=[none]")
  FOLDS_ARGS=(--set train.epochs=2 --set loss.stage2_from_epoch=1 --set train.cycle_epochs=1 --set train.limit_train=16
              --set train.batch_size=8 --set model.decoder_channels=[16,8,8,8,8] --set run.num_workers=0
              --set predict.batch_size=16 --set train.precision=off --set run.parallel_folds=true --set run.fold_workers=3)
  FULL_EPOCHS=2
  #       tests repro speed data fp16 weights compile folds
  LIMITS=(300   300   600   120  300  300     300     900)
else
  DEVICE=cuda
  SPEED_ARGS=(--device cuda --models unet_resnet34 --paths fp32,bf16_cl --batch 32 --size 128 --steps 10 --repeats 3)
  DATA_PATH_ARGS=(--presets gpu_best --workers 1,4,15 --seconds 3)
  DATA="$(realpath -m "${GPU_CHECK_DATA:-.tgs_sample}")"  # absolute: step 8 runs from $WORK
  SHORT=(--set train.epochs=2 --set loss.stage2_from_epoch=1 --set train.cycle_epochs=2 --set train.limit_train=640)
  # 5 folds x 4 epochs (stage 2 and a second cycle from epoch 3), 3 fold processes on the GPU
  FOLDS_ARGS=(--set train.epochs=4 --set loss.stage2_from_epoch=2 --set train.cycle_epochs=2 --set run.parallel_folds=true --set run.fold_workers=3)
  FULL_EPOCHS=$("$PY" -c "from pipeline.config import load_config; print(load_config('configs/gpu_best.yaml').train.epochs)")
  #       tests repro speed data fp16 weights compile folds
  LIMITS=(70    60    50    30   45   45      55      170)
fi
"$PY" -c "import segmentation_models_pytorch" 2>/dev/null || SPEED_ARGS+=(--no-peer)
# every short run: its own name under $WORK, from scratch unless it says otherwise
runs() { echo --set "name=$1" --set "data=$DATA" --set "runs_dir=$WORK/runs" --set "folds_csv=$WORK/folds.csv"; }

# 1-2. CUDA tests (they skip, with their reason, where there is no GPU)
step cuda_tests "${LIMITS[0]}" "$PY" -m pytest tests/test_cuda.py -m cuda -rs -v -p no:cacheprovider -o addopts=
step cuda_repro "${LIMITS[1]}" "$PY" -m pytest tests/test_cuda_repro.py -m cuda -rs -v -p no:cacheprovider -o addopts=

# 3. speed vs the smp peer; the JSON lands in benchmarks/results/ and is copied to $OUT
touch "$WORK/marker"
step speed "${LIMITS[2]}" "$PY" -m benchmarks.speed "${SPEED_ARGS[@]}"
for f in $(find benchmarks/results -name "speed-*.json" -newer "$WORK/marker"); do
  cp "$f" "$OUT/"
  if [ "$SMOKE" = 1 ]; then git checkout -q -- "$f" 2>/dev/null || rm -f "$f"; fi  # a smoke figure is no result
done

# 4. the data path with this machine's cores
step data_path "${LIMITS[3]}" "$PY" -m benchmarks.data_path --data "$DATA" "${DATA_PATH_ARGS[@]}" \
  --out "$OUT/data_path-$DEVICE-$STAMP.json"

# 5. fp16 + SGD + GradScaler, forced (auto would pick bf16 on an A100/H100)
step fp16_sgd_scaler "${LIMITS[4]}" "$PY" -m pipeline train --config configs/gpu_best.yaml $(runs fp16) \
  --set "folds=[0]" --set model.pretrained=false --set train.optimizer=sgd --set train.precision=fp16 "${SHORT[@]}"

# 6. a pretrained encoder from a weights file written here (ImageNet layout, seeded random values:
# what is proven is the loading path, timm's one-channel adaptation and the normalisation)
[ "$DRY" = 1 ] || "$PY" - "$WORK/resnet34.safetensors" <<'PYEOF'
import sys, timm, torch
from safetensors.torch import save_file
torch.manual_seed(0)
model = timm.create_model("resnet34", pretrained=False)
save_file({k: v.contiguous() for k, v in model.state_dict().items()}, sys.argv[1])
PYEOF
step pretrained_file "${LIMITS[5]}" env HF_HUB_OFFLINE=1 "$PY" -m pipeline train --config configs/gpu_best.yaml \
  $(runs weights) --set "folds=[0]" --set model.pretrained=true --set "model.weights_path=$WORK/resnet34.safetensors" \
  "${SHORT[@]}"

# 7. the compile path (torch.compile, CUDA graphs)
if [ "$DRY" = 1 ] || "$PY" -c "import sys; from pipeline.config import RunConfig; sys.exit(0 if hasattr(RunConfig(), 'compile') else 1)"; then
  step compile "${LIMITS[6]}" "$PY" -m pipeline train --config configs/gpu_best.yaml $(runs compiled) \
    --set "folds=[0]" --set model.pretrained=false --set run.compile=reduce-overhead "${SHORT[@]}"
else
  echo; echo "== compile: SKIPPED, this checkout's config has no run.compile key (nothing to prove yet)"
fi

# 8. gpu_best's 5 folds end to end (`all`: folds in parallel processes, each predicting the test
# set on its GPU, then tune, the averaged predict, submit), timed
# (run from $WORK: `all` records into ./submissions/leaderboard.csv, which is not this check's)
REPO="$PWD"
(cd "$WORK" && PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" \
  step gpu_best_5folds "${LIMITS[7]}" "$PY" -m pipeline all --config "$REPO/configs/gpu_best.yaml" $(runs gpu_check) \
  --set model.pretrained=false "${FOLDS_ARGS[@]}" --submission "$WORK/submission.csv")

if [ "$DRY" = 1 ]; then echo "gpu_check: dry run, nothing ran"; rm -rf "$WORK"; exit 0; fi
"$PY" - "$WORK" "$OUT/gpu_check-$DEVICE-$STAMP.json" "$DATA" "$SMOKE" "$FULL_EPOCHS" <<'EOF'
import csv, json, sys
from pathlib import Path
work, out, data, smoke = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4] == "1"
full_epochs = int(sys.argv[5])
steps = {}
for line in (work / "steps").read_text().splitlines():
    name, status, seconds = line.split()
    steps[name] = {"exit": int(status), "seconds": int(seconds)}
summary = {"smoke": smoke, "data": data, "steps": steps}
run = work / "runs" / "gpu_check"
folds = sorted(run.glob("fold*/log.csv"))
if folds:
    n_train = {}
    for r in csv.DictReader(open(work / "folds.csv")):
        n_train[r["fold"]] = n_train.get(r["fold"], 0) + 1
    total = sum(n_train.values())
    per_fold = {}
    for log in folds:
        fold = log.parent.name.removeprefix("fold")
        rows = list(csv.DictReader(log.open()))
        done_path = log.parent / "done.json"
        done = json.loads(done_path.read_text()) if done_path.is_file() else {}
        seconds = sum(float(r["seconds"]) for r in rows)
        per_fold[fold] = {"epochs": len(rows), "epoch_seconds": [float(r["seconds"]) for r in rows],
                          "img_s_epoch_wall": round((total - n_train.get(fold, 0)) * len(rows) / seconds, 1) if seconds else None,
                          "best_val_score": done.get("best_score"),
                          "test_predicted_in_fold": (log.parent / "test_predict.json").is_file()}
    epochs = max(f["epochs"] for f in per_fold.values())
    wall = steps.get("gpu_best_5folds", {}).get("seconds")
    summary["gpu_best_5folds"] = {"folds": per_fold, "epochs": epochs, "wall_seconds": wall,
                                  "full_epochs": full_epochs,
                                  # scaled by epochs: the fixed costs (start-up, predict, tune) scale too, so an upper bound
                                  "full_run_minutes_estimated": round(wall * full_epochs / epochs / 60, 1) if wall and epochs else None}
    for name in ("tune.json", "predict.json"):
        if (run / name).is_file():
            meta = json.loads((run / name).read_text())
            summary["gpu_best_5folds"][name] = {k: meta[k] for k in meta if not isinstance(meta[k], (dict, list))
                                                or k == "from_fold_files"}
    g = summary["gpu_best_5folds"]
    print(f"gpu_best 5 folds x {epochs} epochs (`all`, 3 fold processes per GPU): {wall} s wall; "
          f"the preset's {full_epochs} epochs: <= {g['full_run_minutes_estimated']} min estimated")
out = Path(out)
out.write_text(json.dumps(summary, indent=2) + "\n")
print(json.dumps(summary, indent=2))
print(f"wrote {out}")
EOF
failed=$(awk '$2 != 0 {print $1}' "$WORK/steps" | tr '\n' ' ')
rm -rf "$WORK"
echo "gpu_check: ${failed:+FAILED: $failed}${failed:-all steps passed}; results in $OUT"
[ -z "$failed" ]
