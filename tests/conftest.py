"""Shared fixtures. The real TGS sample lives in ../shared/tgs beside the checkout
(competition data, never copied into the repo); tests that need it skip without it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
TGS_SAMPLE = Path(os.environ.get("TGS_SAMPLE", REPO_ROOT.parent / "shared" / "tgs"))


@pytest.fixture(scope="session")
def tgs_sample() -> Path:
    """The real TGS train/test sample, or a skip saying where it was looked for."""
    if not (TGS_SAMPLE / "train.csv").is_file() or not (TGS_SAMPLE / "train" / "masks").is_dir():
        pytest.skip(f"real TGS sample not found at {TGS_SAMPLE} (set TGS_SAMPLE or place ../shared/tgs)")
    return TGS_SAMPLE


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory) -> Path:
    """A small synthetic dataset in the competition layout, generated once per session."""
    from pipeline.synth import generate

    out = tmp_path_factory.mktemp("synth")
    generate(out, n_train=120, n_test=30, seed=1)
    return out
