#!/usr/bin/env bash
# The Python packages benchmarks/gpu_check.sh needs that a lent GPU machine's image lacks, as
# wheels for its Python 3.12 (x86-64) in .whl/ (ignored; named in the device run's carry).
# That image already has torch, torchvision, timm, numpy, pandas, scipy, scikit-learn,
# opencv-python-headless, pyyaml, tqdm, matplotlib, pytest, hypothesis, safetensors and
# huggingface-hub. Missing: albumentations and what it needs beyond those (albucore,
# stringzilla, simsimd, pydantic with its core, annotated-types, typing-inspection; a current
# typing_extensions for that pydantic), and the benchmark's peer, segmentation-models-pytorch.
# Versions: this machine's (constraints.txt), so both sides run the same albumentations.
# Run here, from the repository root: bash benchmarks/gpu_wheels.sh   (~10 MB, once)
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="${PIP:-python3 -m pip}"
pin() { grep -i "^$1==" constraints.txt | sed 's/ .*//'; }
PURE=(albumentations==2.0.8 "$(pin albucore)" "$(pin pydantic)" "$(pin annotated-types)"
      "$(pin typing-inspection)" "$(pin typing_extensions)" segmentation-models-pytorch==0.6.0)
BINARY=("$(pin pydantic_core)" "$(pin stringzilla)" "$(pin simsimd)")
mkdir -p .whl
# pip matches each manylinux tag exactly: list the ones these wheels are built for
PLATFORMS=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
           manylinux2014_x86_64 manylinux1_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64 manylinux_2_35_x86_64; do
  PLATFORMS+=(--platform "$tag")
done
$PIP download -q --no-deps --only-binary=:all: -d .whl "${PURE[@]}"
$PIP download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]}" -d .whl "${BINARY[@]}"
ls -1 .whl
du -sh .whl
