"""Fault injection: SIGKILL at random moments never loses work or changes the result.

The fast variant kills a tiny training run twice; `pytest -m soak` kills it 20 times.
Every kill is followed by the same command again (what ./run.sh does after a crash),
and the final weights must equal those of a run that was never interrupted.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline.checkpoints import load_checkpoint
from pipeline.config import save_config
from pipeline.train_folds import train_folds
from tests.test_train import tiny_config

# end to end (training killed and resumed): the fast suite, not the quick tier (pyproject.toml markers)
pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
OVERRIDES = ("train.epochs=4", "train.threads=1", "augment.shift_scale=0.5")


def _train_command(config_path: Path) -> list[str]:
    return [sys.executable, "-m", "pipeline", "train", "--config", str(config_path)]


def _env():
    # exact resume is the CPU's promise (a GPU's is tests/test_cuda_repro.py's): no GPU for the processes
    return dict(os.environ, PYTHONPATH=str(REPO), NO_ALBUMENTATIONS_UPDATE="1", CUDA_VISIBLE_DEVICES="")


def _kill_at_random_moments(config_path: Path, done_json: Path, kills: int, seed: int) -> int:
    """Start training, SIGKILL it after a random delay, repeat; then let it finish. Returns kills made."""
    rng = random.Random(seed)
    made = 0
    while made < kills and not done_json.exists():
        process = subprocess.Popen(_train_command(config_path), cwd=REPO, env=_env(),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        # import + data load take ~3-4 s; an epoch of the tiny run ~1 s: aim into the epochs
        time.sleep(rng.uniform(3.0, 7.0))
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            made += 1
        process.wait()
    final = subprocess.run(_train_command(config_path), cwd=REPO, env=_env(), capture_output=True, text=True,
                           timeout=300)
    assert final.returncode == 0, final.stderr[-2000:]
    return made


def _assert_same_weights(a_dir: Path, b_dir: Path) -> None:
    for name in ("best.pt", "last.pt"):
        a, b = load_checkpoint(a_dir / name)["model"], load_checkpoint(b_dir / name)["model"]
        assert all(torch.equal(a[k], b[k]) for k in a), f"{name} differs after kills"
    assert (a_dir / "log.csv").read_text() .count("\n") == (b_dir / "log.csv").read_text().count("\n")


def _no_temp_files_left(folder: Path) -> None:
    leftovers = [p.name for p in folder.rglob(".*.tmp")]
    assert not leftovers, leftovers


def _kill_test(synth_data, tmp_path, kills: int, seed: int):
    straight = tiny_config(synth_data, tmp_path / "straight", *OVERRIDES)
    train_folds(straight, device="cpu")
    killed = tiny_config(synth_data, tmp_path / "killed", *OVERRIDES, f"folds_csv={straight.folds_path()}")
    config_path = tmp_path / "killed.yaml"
    save_config(killed, config_path)
    made = _kill_at_random_moments(config_path, killed.run_dir / "fold0" / "done.json", kills, seed)
    assert made >= 1
    _assert_same_weights(straight.run_dir / "fold0", killed.run_dir / "fold0")
    _no_temp_files_left(killed.run_dir)


def test_sigkill_during_training_resumes_to_the_same_weights(synth_data, tmp_path):
    _kill_test(synth_data, tmp_path, kills=2, seed=0)


@pytest.mark.soak
def test_soak_twenty_random_kills(synth_data, tmp_path):
    _kill_test(synth_data, tmp_path, kills=20, seed=1)
