"""The training loop on the synthetic set: learns, resumes exactly, stops on NaN, refuses stale runs."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from pipeline.checkpoints import load_checkpoint
from pipeline.config import Config, load_config
from pipeline.errors import PipelineError
from pipeline.train_folds import train_folds
from pipeline.rundir import read_log
from tests.conftest import batched

# end to end (whole folds trained, resumed, checkpointed): the fast suite, not the quick tier (pyproject.toml markers)
pytestmark = pytest.mark.e2e


def tiny_config(data, tmp_path, *overrides):
    return load_config(None, [
        f"data={data}", f"runs_dir={tmp_path / 'runs'}", f"folds_csv={tmp_path / 'folds.csv'}",
        "name=tiny", "n_folds=3", "folds=[0]", "model.n_filters=4", "train.batch_size=16",
        "train.epochs=2", "train.scheduler=none", "train.early_stop_patience=0", "train.threads=2",
        "train.precision=off", "train.channels_last=off", "augment.shift_scale=0",
        "run.checkpoint_seconds=0",  # last.pt after every epoch: the kill tests resume from any
        *overrides,
    ])


def fold_dir(cfg):
    return cfg.run_dir / "fold0"


def test_fold_writes_checkpoints_log_and_oof(synth_data, tmp_path):
    cfg = tiny_config(synth_data, tmp_path)
    (done,) = train_folds(cfg)
    out = fold_dir(cfg)
    for name in ("best.pt", "last.pt", "log.csv", "oof.npy", "oof_ids.txt", "done.json"):
        assert (out / name).is_file(), name
    assert (cfg.run_dir / "config.yaml").is_file()
    oof = np.load(out / "oof.npy")
    ids = (out / "oof_ids.txt").read_text().split()
    assert oof.dtype == np.float16 and oof.shape == (len(ids), 101, 101)
    assert ((oof >= 0) & (oof <= 1)).all()
    assert [int(r["epoch"]) for r in read_log(out / "log.csv")] == [1, 2]
    assert load_checkpoint(out / "best.pt")["val_score"] == pytest.approx(done["best_score"])


def test_validate_from_skips_early_validation_and_keeps_a_later_best(synth_data, tmp_path, capsys):
    cfg = tiny_config(synth_data, tmp_path, "train.epochs=3", "train.validate_from=3")
    (done,) = train_folds(cfg)
    rows = read_log(fold_dir(cfg) / "log.csv")
    assert [r["val_score"] for r in rows[:2]] == ["nan", "nan"] and float(rows[2]["val_score"]) >= 0
    assert done["best_epoch"] == 3 and "(validation from epoch 3)" in capsys.readouterr().out
    assert load_checkpoint(fold_dir(cfg) / "best.pt")["epoch"] == 2  # 0-based


@pytest.mark.parametrize("override, problem", [
    ("train.validate_from=5", "must be in 0..train.epochs"),
    ("train.scheduler=plateau", "does not follow the val metric"),
])
def test_validate_from_is_checked(synth_data, tmp_path, override, problem):
    with pytest.raises(PipelineError, match=problem):
        tiny_config(synth_data, tmp_path, "train.validate_from=2", override)


def test_second_call_skips_a_complete_fold(synth_data, tmp_path, capsys):
    cfg = tiny_config(synth_data, tmp_path, "train.epochs=1")
    train_folds(cfg)
    before = os.stat(fold_dir(cfg) / "best.pt").st_mtime_ns
    train_folds(cfg)
    assert "already trained" in capsys.readouterr().out
    assert os.stat(fold_dir(cfg) / "best.pt").st_mtime_ns == before


@pytest.mark.parametrize("ema_decay", [0.0, 0.9])
def test_resume_continues_to_identical_weights(synth_data, tmp_path, ema_decay):
    straight = tiny_config(synth_data, tmp_path / "a", "train.epochs=3", "augment.shift_scale=0.5",
                           f"train.ema_decay={ema_decay}")
    train_folds(straight, device="cpu")  # exact on the CPU; CUDA: tests/test_cuda_repro.py

    interrupted = tiny_config(synth_data, tmp_path / "b", "train.epochs=3", "augment.shift_scale=0.5",
                              f"train.ema_decay={ema_decay}")
    interrupted.folds_csv = straight.folds_csv
    # a kill after epoch 2 of 3, then the same command again
    _train_epochs_then_kill(interrupted, kill_after=2)
    last = load_checkpoint(fold_dir(interrupted) / "last.pt")
    assert last["state"]["epoch"] == 2
    train_folds(interrupted, device="cpu")  # resumes at epoch 3

    a = load_checkpoint(fold_dir(straight) / "last.pt")
    b = load_checkpoint(fold_dir(interrupted) / "last.pt")
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for key in a.get("ema", {}):
        assert torch.equal(torch.as_tensor(a["ema"][key]), torch.as_tensor(b["ema"][key])), key
    assert ("ema" in a) == (ema_decay > 0)
    for (ka, va), (kb, vb) in zip(a["optimizer"]["state"].items(), b["optimizer"]["state"].items()):
        for name in va:
            assert torch.equal(torch.as_tensor(va[name]), torch.as_tensor(vb[name])), name
    assert read_log(fold_dir(straight) / "log.csv") [-1]["val_score"] == \
        read_log(fold_dir(interrupted) / "log.csv")[-1]["val_score"]


def _train_epochs_then_kill(cfg, kill_after, device="cpu"):
    """Run the fold but raise out of the loop after `kill_after` epochs (what SIGKILL leaves behind)."""
    import pipeline.train_fold as train_module

    real = train_module.write_log
    calls = {"n": 0}

    def write_then_maybe_die(path, rows):
        real(path, rows)
        calls["n"] += 1
        if calls["n"] == kill_after:
            raise KeyboardInterrupt

    train_module.write_log = write_then_maybe_die
    try:
        with pytest.raises(KeyboardInterrupt):
            train_folds(cfg, device=device)
    finally:
        train_module.write_log = real
    assert not (fold_dir(cfg) / "done.json").exists()


def test_nan_loss_stops_with_one_line_and_keeps_last_good_checkpoint(synth_data, tmp_path, monkeypatch):
    import pipeline.losses

    real_call = pipeline.losses.SegLoss.__call__

    def nan_from_second_epoch(self, outputs, target, epoch):
        loss, parts = real_call(self, outputs, target, epoch)
        return (loss * float("nan") if epoch >= 1 else loss), parts

    monkeypatch.setattr(pipeline.losses.SegLoss, "__call__", nan_from_second_epoch)
    cfg = tiny_config(synth_data, tmp_path, "train.epochs=3")
    with pytest.raises(PipelineError, match="epoch 2: loss became nan") as info:
        train_folds(cfg)
    assert "\n" not in str(info.value) and "last good checkpoint kept" in str(info.value)
    kept = load_checkpoint(fold_dir(cfg) / "last.pt")
    assert kept["state"]["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in kept["model"].values() if v.is_floating_point())
    assert not (fold_dir(cfg) / "done.json").exists()


def test_run_dir_with_other_config_is_refused(synth_data, tmp_path):
    train_folds(tiny_config(synth_data, tmp_path, "train.epochs=1"))
    with pytest.raises(PipelineError, match=r"different config \(differs in train.lr"):
        train_folds(tiny_config(synth_data, tmp_path, "train.epochs=1", "train.lr=0.01"))


def test_damaged_last_checkpoint_falls_back_to_previous(synth_data, tmp_path, capsys):
    cfg = tiny_config(synth_data, tmp_path, "train.epochs=3")
    _train_epochs_then_kill(cfg, kill_after=2)
    last = fold_dir(cfg) / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])  # truncated, as a copy cut short would leave it
    train_folds(cfg)
    err = capsys.readouterr().err
    assert "damaged checkpoint" in err
    assert load_checkpoint(last)["state"]["epoch"] == 3


@pytest.fixture(scope="module")
def synth_300(tmp_path_factory):
    from pipeline.synth import generate

    out = tmp_path_factory.mktemp("synth300")
    generate(out, n_train=300, n_test=10, seed=2)
    return out


def test_short_training_beats_the_all_empty_baseline(synth_300, tmp_path):
    from pipeline.data import load_train
    from pipeline.metric import competition_score, threshold_scores

    # 16 epochs: on an AVX2 CPU (fp32, no bf16) 10 epochs ended anywhere from 0.39 to 0.47 tuned
    # depending on the thread count (float summation order), i.e. at the baseline in the worst case
    cfg = tiny_config(synth_300, tmp_path, "train.epochs=16", "model.n_filters=8", "train.lr=0.003",
                      "input.size=112", "train.precision=auto", "train.channels_last=auto",
                      "train.scheduler=cosine")
    (done,) = train_folds(cfg)
    ids = (fold_dir(cfg) / "oof_ids.txt").read_text().split()
    masks = load_train(synth_300, ids).masks
    oof = np.load(fold_dir(cfg) / "oof.npy").astype(np.float32)
    all_empty = competition_score(masks, np.zeros_like(masks))
    # what `tune` would pick on this fold: the best threshold x min-area pair
    tuned = threshold_scores(masks, oof, [0.3, 0.4, 0.5, 0.6, 0.7], [0, 20, 50, 100]).max()
    assert tuned > all_empty + 0.04, (tuned, done["best_score"], all_empty)


def test_snapshots_keep_each_cycles_best_and_average_them_into_the_oof(synth_data, tmp_path):
    from pipeline.data import load_train
    from pipeline.predict import load_fold_models, predict_probs
    from pipeline.runtime import resolve_runtime

    cfg = tiny_config(synth_data, tmp_path, "train.epochs=2", "train.scheduler=cosine_restarts",
                      "train.cycle_epochs=1", "train.snapshots=true")
    (done,) = train_folds(cfg)
    assert sorted(p.name for p in fold_dir(cfg).glob("snapshot*.pt")) == ["snapshot0.pt", "snapshot1.pt"]
    assert done["oof_checkpoints"] == 2
    ids = (fold_dir(cfg) / "oof_ids.txt").read_text().split()
    images = load_train(synth_data, ids).images
    rt = resolve_runtime("off", "off", "cpu", 2)
    models = load_fold_models(cfg, 0, rt)
    expected = np.mean([predict_probs(m, images, batched(cfg, 64), rt, cfg.predict.tta) for m in models], axis=0)
    np.testing.assert_allclose(np.load(fold_dir(cfg) / "oof.npy").astype(np.float32), expected, atol=1e-3)


def test_ema_is_the_exponential_average_of_weights_and_batchnorm_statistics():
    from pipeline.optim import build_ema

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    ema = build_ema(model, 0.75)
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[1].running_mean.fill_(4.0)
    ema.update_parameters(model)  # the first update copies
    with torch.no_grad():
        model[0].weight.fill_(3.0)
        model[1].running_mean.fill_(8.0)
    ema.update_parameters(model)
    assert torch.allclose(ema.module[0].weight, torch.full((2, 2), 0.75 * 1.0 + 0.25 * 3.0))
    assert torch.allclose(ema.module[1].running_mean, torch.full((2,), 0.75 * 4.0 + 0.25 * 8.0))
    assert build_ema(model, 0.0) is None


def test_ema_weights_are_validated_and_kept_and_the_raw_score_is_logged(synth_data, tmp_path):
    cfg = tiny_config(synth_data, tmp_path, "train.epochs=2", "train.validate_from=2", "train.ema_decay=0.9")
    (done,) = train_folds(cfg)
    (row,) = [r for r in read_log(fold_dir(cfg) / "log.csv") if r["val_score"] != "nan"]
    assert 0 <= float(row["val_score_raw"]) <= 1
    assert float(row["val_score"]) == pytest.approx(done["best_score"], abs=1e-5)
    best, last = load_checkpoint(fold_dir(cfg) / "best.pt"), load_checkpoint(fold_dir(cfg) / "last.pt")
    # best epoch = last epoch here: best.pt holds the average, last.pt the raw weights beside it
    for key, value in best["model"].items():
        assert torch.equal(value, last["ema"][f"module.{key}"]), key
    assert any(not torch.equal(value, last["model"][key])
               for key, value in best["model"].items() if value.is_floating_point())


def test_keys_added_later_keep_the_digest_of_runs_made_before_them_at_their_neutral_value(synth_data, tmp_path):
    import hashlib
    import json

    from pipeline.config import MOVED_TRAIN_KEYS, NEUTRAL_DEFAULTS, flatten, is_training_key, training_digest

    # each neutral value is a training key's default: a config that never named the key (made before
    # it existed) and one that leaves it at its default hash alike
    defaults = flatten(Config())
    assert all(is_training_key(k) and defaults[k] == v for k, v in NEUTRAL_DEFAULTS.items())
    cfg = tiny_config(synth_data, tmp_path)
    before = {k: v for k, v in flatten(cfg).items() if is_training_key(k) and k not in NEUTRAL_DEFAULTS}
    before.update({f"train.{k}": v for k, v in MOVED_TRAIN_KEYS.items()})  # hashed as before they moved to run:
    assert training_digest(cfg) == hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()[:16]
    assert training_digest(tiny_config(synth_data, tmp_path, "train.ema_decay=0.99")) != training_digest(cfg)
    assert training_digest(tiny_config(synth_data, tmp_path, "model.residual=true")) != training_digest(cfg)
    assert training_digest(tiny_config(synth_data, tmp_path, "loss.image_only=true")) != training_digest(cfg)
    assert training_digest(tiny_config(synth_data, tmp_path, "model.global_context=true")) != training_digest(cfg)
    assert training_digest(tiny_config(synth_data, tmp_path, "pseudo.teacher=runs/x")) != training_digest(cfg)
    assert training_digest(tiny_config(synth_data, tmp_path, "augment.rotate_limit=10")) != training_digest(cfg)
    unet = tiny_config(synth_data, tmp_path, "model.name=unet_resnet18")  # seed_unet has no input_norm
    assert training_digest(tiny_config(synth_data, tmp_path, "model.name=unet_resnet18", "model.input_norm=imagenet")) \
        != training_digest(unet)


def test_run_trained_fold_by_fold_records_every_fold_for_tune_and_predict(synth_data, tmp_path):
    from pipeline.config import load_config as load_saved
    from pipeline.rundir import prepare_run_dir

    saved = tmp_path / "runs" / "tiny" / "config.yaml"
    for folds, expected in (("[0]", [0]), ("[1]", [0, 1]), ("[1]", [0, 1]), ("[2]", [])):  # [] = all 3
        prepare_run_dir(tiny_config(synth_data, tmp_path, f"folds={folds}"), force=False)
        assert load_saved(saved).folds == expected, folds
    prepare_run_dir(tiny_config(synth_data, tmp_path, "folds=[0]"), force=False)  # a run of all folds stays so
    assert load_saved(saved).folds == []


def test_temp_files_a_killed_run_left_in_the_fold_are_removed_when_it_resumes(synth_data, tmp_path):
    cfg = tiny_config(synth_data, tmp_path, "train.epochs=1")
    fold = fold_dir(cfg)
    fold.mkdir(parents=True)
    stale = fold / ".last.pt.k1ll3d.tmp"  # what SIGKILL inside fileio's atomic write leaves
    stale.write_bytes(b"half a checkpoint")
    train_folds(cfg)
    assert not stale.exists() and (fold / "done.json").exists()
