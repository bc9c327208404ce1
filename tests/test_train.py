"""The training loop on the synthetic set: learns, resumes exactly, stops on NaN, refuses stale runs."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from pipeline.config import load_config
from pipeline.errors import PipelineError
from pipeline.train import load_checkpoint, read_log, train_folds


def tiny_config(data, tmp_path, *overrides):
    return load_config(None, [
        f"data={data}", f"runs_dir={tmp_path / 'runs'}", f"folds_csv={tmp_path / 'folds.csv'}",
        "name=tiny", "n_folds=3", "folds=[0]", "model.n_filters=4", "train.batch_size=16",
        "train.epochs=2", "train.scheduler=none", "train.early_stop_patience=0", "train.threads=2",
        "train.precision=off", "train.channels_last=off", "augment.shift_scale=0",
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


def test_resume_continues_to_identical_weights(synth_data, tmp_path):
    straight = tiny_config(synth_data, tmp_path / "a", "train.epochs=3", "augment.shift_scale=0.5")
    train_folds(straight)

    interrupted = tiny_config(synth_data, tmp_path / "b", "train.epochs=3", "augment.shift_scale=0.5")
    interrupted.folds_csv = straight.folds_csv
    # a kill after epoch 2 of 3, then the same command again
    _train_epochs_then_kill(interrupted, kill_after=2)
    last = load_checkpoint(fold_dir(interrupted) / "last.pt")
    assert last["state"]["epoch"] == 2
    train_folds(interrupted)  # resumes at epoch 3

    a = load_checkpoint(fold_dir(straight) / "last.pt")
    b = load_checkpoint(fold_dir(interrupted) / "last.pt")
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for (ka, va), (kb, vb) in zip(a["optimizer"]["state"].items(), b["optimizer"]["state"].items()):
        for name in va:
            assert torch.equal(torch.as_tensor(va[name]), torch.as_tensor(vb[name])), name
    assert read_log(fold_dir(straight) / "log.csv") [-1]["val_score"] == \
        read_log(fold_dir(interrupted) / "log.csv")[-1]["val_score"]


def _train_epochs_then_kill(cfg, kill_after):
    """Run the fold but raise out of the loop after `kill_after` epochs (what SIGKILL leaves behind)."""
    import pipeline.train as train_module

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
            train_folds(cfg)
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

    cfg = tiny_config(synth_300, tmp_path, "train.epochs=10", "model.n_filters=8", "train.lr=0.003",
                      "input.size=112", "train.precision=auto", "train.channels_last=auto",
                      "train.scheduler=cosine")
    (done,) = train_folds(cfg)
    ids = (fold_dir(cfg) / "oof_ids.txt").read_text().split()
    masks = load_train(synth_300, ids).masks
    oof = np.load(fold_dir(cfg) / "oof.npy").astype(np.float32)
    all_empty = competition_score(masks, np.zeros_like(masks))
    # what `tune` would pick on this fold: the best threshold x min-area pair
    tuned = threshold_scores(masks, oof, [0.3, 0.4, 0.5, 0.6, 0.7], [0, 20, 50, 100]).max()
    assert tuned > all_empty + 0.05, (tuned, done["best_score"], all_empty)


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
    expected = np.mean([predict_probs(m, images, cfg, rt, 64, cfg.predict.tta) for m in models], axis=0)
    np.testing.assert_allclose(np.load(fold_dir(cfg) / "oof.npy").astype(np.float32), expected, atol=1e-3)
