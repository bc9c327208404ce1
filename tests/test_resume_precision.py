"""A last.pt written in one precision resumes in another (`precision: auto` resolves per GPU
and hashes alike): bf16/fp32 runs save a disabled GradScaler's {} state, fp16 runs a scale."""

from __future__ import annotations

import pytest
import torch

import pipeline.runtime as runtime
from pipeline.checkpoints import load_checkpoint
from pipeline.train_fold import load_scaler
from pipeline.train_folds import train_folds
from tests.test_train import _train_epochs_then_kill, fold_dir, tiny_config


def test_an_fp16_scaler_starts_afresh_from_a_run_that_did_not_scale():
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    load_scaler(scaler, torch.amp.GradScaler("cpu", enabled=False).state_dict())  # {}: torch raises on it
    assert scaler.get_scale() == 1024.0
    saved = torch.amp.GradScaler("cpu", init_scale=64.0).state_dict()
    load_scaler(scaler, saved)
    assert scaler.get_scale() == 64.0
    off = torch.amp.GradScaler("cpu", enabled=False)
    load_scaler(off, saved)  # a run that does not scale ignores a saved scale
    assert not off.is_enabled()


@pytest.mark.slow  # ~45 s each: fp16 autocast on the CPU is slow
@pytest.mark.parametrize("first, then", [(None, torch.float16), (torch.float16, None)])
def test_last_pt_resumes_across_precisions_and_says_so(synth_data, tmp_path, monkeypatch, capsys, first, then):
    names = {None: "fp32", torch.float16: "fp16"}
    cfg = tiny_config(synth_data, tmp_path, "train.precision=auto", "train.epochs=2", "model.n_filters=2",
                      "train.limit_train=32")
    monkeypatch.setattr(runtime, "amp_dtype_for", lambda precision, device_type: first)
    _train_epochs_then_kill(cfg, kill_after=1)
    last = load_checkpoint(fold_dir(cfg) / "last.pt")
    assert last["precision"] == names[first] and (last["scaler"] == {}) == (first is None)

    monkeypatch.setattr(runtime, "amp_dtype_for", lambda precision, device_type: then)
    capsys.readouterr()
    (done,) = train_folds(cfg, device="cpu")
    assert done["epochs_run"] == 2
    out = capsys.readouterr().out
    assert f"last.pt was trained in {names[first]}, resuming in {names[then]}" in out
    assert load_checkpoint(fold_dir(cfg) / "last.pt")["precision"] == names[then]
