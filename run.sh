#!/usr/bin/env bash
# One command, end to end. On a fresh machine it first creates .venv and installs the project.
#
#   ./run.sh                                   synthetic data -> cpu_quick (GPU preset on CUDA) -> submission
#   ./run.sh --data DIR --config CFG [--set k=v ...] [--force]   the same on real data (Kaggle layout)
#   ./run.sh test [pytest args]                run the test suite (fast set; -m slow for the rest)
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
  test-kaggle) shift; setup .venv-kaggle constraints-kaggle.txt; exec .venv-kaggle/bin/python -m pytest "$@" ;;
esac

DATA=""
CONFIG=""
ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --data) DATA="$2"; shift 2 ;;
    --config) CONFIG="$2"; shift 2 ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) ARGS+=("$1"); shift ;;
  esac
done
setup

if [ -z "$DATA" ]; then
  DATA=data/synth
  if [ ! -f "$DATA/train.csv" ]; then
    echo "== data: generating the synthetic dataset in $DATA"
    "$PY" -m pipeline synth --out "$DATA" --n-train 800 --n-test 200 --seed 0
  fi
fi
if [ -z "$CONFIG" ]; then
  if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    CONFIG=configs/resnet34_lovasz.yaml
  else
    CONFIG=configs/cpu_quick.yaml
  fi
fi
exec "$PY" -m pipeline all --config "$CONFIG" --data "$DATA" ${ARGS[@]+"${ARGS[@]}"}
