#!/usr/bin/env bash
# One command, end to end. On a fresh machine it first creates .venv and installs the project.
#
#   ./run.sh                                   the demo: small synthetic set -> configs/demo.yaml -> submission, pictures (~3 min)
#   ./run.sh --config CFG                      a config on the 800-image synthetic set (configs/cpu_quick.yaml: ~15 min)
#   ./run.sh --data DIR --config CFG [--set k=v ...] [--force]   real data (Kaggle layout)
#   ./run.sh test [pytest args]                run the test suite (fast set: quick + e2e; -m slow for the rest)
#   ./run.sh test-quick [pytest args]          the quick tier: unit tests, no end-to-end training (~1 min on 2 cores)
#   ./run.sh setup                             only create/update .venv (versions: constraints.txt)
#   ./run.sh test-kaggle [pytest args]         the same suite in .venv-kaggle, Kaggle's versions (constraints-kaggle.txt)
set -euo pipefail
cd "$(dirname "$0")"
export NO_ALBUMENTATIONS_UPDATE=1
VENV=.venv
PY="$VENV/bin/python"

setup() {
  # setup [VENV CONSTRAINTS]: the project with its test extra, every version pinned by the
  # constraints file (torch and its CUDA wheels from this machine's disk)
  local venv="${1:-$VENV}" constraints="${2:-constraints.txt}"
  local py="$venv/bin/python" stamp="$venv/.installed"
  if [ -x "$py" ] && [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && [ "$stamp" -nt "$constraints" ]; then return 0; fi
  echo "== setup: installing into $venv with $constraints (torch 2.14.1 comes from this machine's disk; a few minutes once)"
  [ -x "$py" ] || python3 -m venv "$venv"
  "$py" -m pip install -q --upgrade pip
  "$py" -m pip install -q -c "$constraints" -e ".[test]"
  touch "$stamp"
}

case "${1:-}" in
  setup) setup; exit 0 ;;
  test) shift; setup; exec "$PY" -m pytest "$@" ;;
  test-quick) shift; setup; exec "$PY" -m pytest -m "not slow and not soak and not e2e" "$@" ;;
  test-kaggle) shift; setup .venv-kaggle constraints-kaggle.txt; exec .venv-kaggle/bin/python -m pytest "$@" ;;
esac

DATA=""
CONFIG=""
ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --data) DATA="$2"; shift 2 ;;
    --config) CONFIG="$2"; shift 2 ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) ARGS+=("$1"); shift ;;
  esac
done
setup

DEMO=""
if [ -z "$CONFIG" ] && [ -z "$DATA" ]; then
  DEMO=1
  CONFIG=configs/demo.yaml
fi
if [ -z "$CONFIG" ]; then  # --data without --config: the quick CPU preset, or the GPU one on CUDA
  if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    CONFIG=configs/resnet34_lovasz.yaml
  else
    CONFIG=configs/cpu_quick.yaml
  fi
fi
if [ -z "$DATA" ]; then
  if [ -n "$DEMO" ]; then DATA=data/demo; N_TRAIN=300; N_TEST=100; else DATA=data/synth; N_TRAIN=800; N_TEST=200; fi
  if [ ! -f "$DATA/train.csv" ]; then
    echo "== data: generating a synthetic dataset in $DATA ($N_TRAIN train, $N_TEST test images)"
    "$PY" -m pipeline synth --out "$DATA" --n-train "$N_TRAIN" --n-test "$N_TEST" --seed 0
  fi
fi
"$PY" -m pipeline all --config "$CONFIG" --data "$DATA" ${ARGS[@]+"${ARGS[@]}"}
if [ -n "$DEMO" ]; then
  cat <<'NEXT'

That was the demo on synthetic data: its score says nothing about TGS. Next, the real data
(a Kaggle account and its API token: README, "Train on Kaggle"):
  source .venv/bin/activate                                   # puts tgs on PATH
  tgs kaggle download --out data/tgs
  ./run.sh --data data/tgs --config configs/cpu_best.yaml     # ~1 hour on 2 CPU cores
  ./run.sh --data data/tgs --config configs/resnet34_lovasz.yaml   # on a GPU
NEXT
fi
