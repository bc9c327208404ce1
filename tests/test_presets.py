"""Every shipped preset runs the whole pipeline (folds -> train -> tune -> predict -> submit)
on CPU with a tiny override, so a config that only a GPU would exercise cannot rot."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.config import load_config
from pipeline.run_all import run_all
from pipeline.submit import check_submission

# end to end (every shipped config trained end to end): the fast suite, not the quick tier (pyproject.toml markers)
pytestmark = pytest.mark.e2e

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
TINY = ("n_folds=2", "train.epochs=1", "train.limit_train=16", "train.batch_size=8", "train.num_workers=0",
        "train.threads=2", "predict.batch_size=32", "loss.stage2_from_epoch=0", "train.validate_from=0",
        "tune.thresholds=[0.4,0.5]", "tune.min_areas=[0,20]")
# The GPU presets default to ImageNet weights and the CPU presets train from scratch.
PRETRAINED = {"gpu_best": True, "resnet34_lovasz": True, "cpu_best": False, "cpu_quick": False, "demo": False, "seed_unet": False}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_preset_runs_end_to_end_on_cpu_with_a_tiny_override(path, synth_data, tmp_path, monkeypatch, fake_timm_hub):
    """The GPU presets start from ImageNet weights: timm's download is served by fake_timm_hub,
    so they take the pretrained path with no network."""
    monkeypatch.chdir(tmp_path)  # submissions/ and folds/ are relative to the working folder
    cfg = load_config(path, [*TINY, f"runs_dir={tmp_path / 'runs'}"])
    submission = run_all(cfg, str(synth_data))
    assert bool(fake_timm_hub.requests) == cfg.model.pretrained
    assert check_submission(submission, synth_data) == 30
    probs = np.load(cfg.run_dir / "test_probs.npy")
    assert probs.shape == (30, 101, 101) and np.isfinite(probs.astype(np.float32)).all()
    board = pd.read_csv(tmp_path / "submissions" / "leaderboard.csv")
    assert board["run"].tolist() == [cfg.name]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_gpu_presets_start_from_imagenet_weights_and_cpu_presets_from_scratch(path):
    cfg = load_config(path)
    assert cfg.model.pretrained is PRETRAINED[path.stem] and cfg.model.weights_path == ""
