"""OOF assembly and threshold/empty-threshold/min-area tuning on hand-built run dirs (see tests/fake_run.py)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from pipeline.config import Config
from pipeline.errors import PipelineError
from pipeline.postprocess import PostProcess, binarize, read_tuned
from pipeline.tune import assemble_oof, search_grid, tune_oof, tune_run
from tests.fake_run import fake_probs, make_fake_run, private_copy, refinish_fold

TUNE_KEYS = {"threshold", "empty_threshold", "min_area", "cv_at_05", "cv_tuned", "cv_plain_rule", "per_class",
             "per_fold", "n_images", "empty_blank", "empty_decision"}


@pytest.fixture(scope="module")
def base_run(synth_data, tmp_path_factory):
    return make_fake_run(synth_data, tmp_path_factory.mktemp("tune"), with_test=False)


@pytest.fixture
def run(base_run, tmp_path, monkeypatch):
    return private_copy(base_run, tmp_path, monkeypatch)


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------- assembly


def test_assembled_oof_covers_every_train_id_once_in_id_order(run, synth_data):
    from pipeline.data import list_image_ids

    ids, probs = assemble_oof(run)
    assert ids == sorted(list_image_ids(synth_data / "train" / "images"))
    assert probs.dtype == np.float32 and probs.shape == (len(ids), 101, 101)
    # each id carries the probabilities its fold wrote for it
    fold_ids = (run / "fold1" / "oof_ids.txt").read_text().split()
    fold_probs = np.load(run / "fold1" / "oof.npy")
    position = {image_id: i for i, image_id in enumerate(ids)}
    for k in (0, len(fold_ids) - 1):
        np.testing.assert_array_equal(probs[position[fold_ids[k]]], fold_probs[k].astype(np.float32))


def test_missing_fold_is_refused_naming_the_file(run):
    shutil.rmtree(run / "fold2")
    with pytest.raises(PipelineError) as exc:
        assemble_oof(run)
    # the hint trains the run where it is now (a copy: its config.yaml names the original's place)
    assert one_line(exc) == (f"{run / 'fold2' / 'oof.npy'}: missing (fold 2 not trained) — run `python -m pipeline "
                             f"train --config {run / 'config.yaml'} --set runs_dir={run.parent} --set name=fake`")


def test_unfinished_fold_without_done_json_is_refused(run):
    (run / "fold0" / "done.json").unlink()
    with pytest.raises(PipelineError) as exc:
        assemble_oof(run)
    assert one_line(exc).startswith(f"{run / 'fold0' / 'done.json'}: missing (fold 0 not finished) — run "
                                    f"`python -m pipeline train --config {run / 'config.yaml'}")


def test_id_in_two_folds_is_refused(run):
    stolen = (run / "fold0" / "oof_ids.txt").read_text().split()[0]
    ids = (run / "fold1" / "oof_ids.txt").read_text().split() + [stolen]
    probs = np.load(run / "fold1" / "oof.npy")
    np.save(run / "fold1" / "oof.npy", np.concatenate([probs, probs[:1]]))
    (run / "fold1" / "oof_ids.txt").write_text("\n".join(ids) + "\n")
    refinish_fold(run / "fold1")
    with pytest.raises(PipelineError) as exc:
        assemble_oof(run)
    message = one_line(exc)
    assert message.startswith(f"{run / 'fold1' / 'oof_ids.txt'}: id {stolen} appears in fold 0 and fold 1")


def test_id_not_in_the_folds_file_is_refused(run):
    ids = (run / "fold2" / "oof_ids.txt").read_text().split()
    ids[0] = "notatrainid"
    (run / "fold2" / "oof_ids.txt").write_text("\n".join(ids) + "\n")
    refinish_fold(run / "fold2")
    with pytest.raises(PipelineError) as exc:
        assemble_oof(run)
    assert "fold2" in one_line(exc) and "1 ids not in" in str(exc.value) and "notatrainid" in str(exc.value)


def test_run_without_its_folds_file_still_assembles_with_a_warning(run, capsys):
    from pipeline.config import save_config
    from pipeline.rundir import load_run_config

    cfg = load_run_config(run)
    cfg.folds_csv = str(run / "gone.csv")  # e.g. a run dir fetched from a Kaggle kernel
    save_config(cfg, run / "config.yaml")
    ids, _ = assemble_oof(run)
    assert len(ids) == 120
    assert "gone.csv: not found" in capsys.readouterr().err


def test_oof_and_ids_of_different_lengths_are_refused(run):
    ids = (run / "fold0" / "oof_ids.txt").read_text().split()
    (run / "fold0" / "oof_ids.txt").write_text("\n".join(ids[:-1]) + "\n")
    refinish_fold(run / "fold0")
    with pytest.raises(PipelineError) as exc:
        assemble_oof(run)
    assert "oof_ids.txt" in one_line(exc) and "oof.npy holds" in str(exc.value)


# ---------------------------------------------------------------- search


def small_config() -> Config:
    cfg = Config()
    cfg.tune.thresholds = [0.2, 0.3, 0.4, 0.6, 0.7]  # 0.5 deliberately absent: tuning adds it
    cfg.tune.min_areas = [5, 50]  # and 0 too
    return cfg


@pytest.mark.parametrize("case", ["under_confident", "perfect", "pure_noise", "over_confident"])
def test_tuned_score_is_never_below_the_score_at_05(synth_data, case):
    from pipeline.data import load_train
    from pipeline.metric import competition_score

    truth = np.asarray(load_train(synth_data).masks, bool)
    rng = np.random.default_rng(3)
    probs = {
        "under_confident": fake_probs(truth, rng, salt=0.3),
        "perfect": truth.astype(np.float32),
        "pure_noise": rng.random(truth.shape, dtype=np.float32),
        "over_confident": np.clip(fake_probs(truth, rng, salt=0.9) + 0.5 * (rng.random(truth.shape) < 0.01), 0, 1),
    }[case]
    found = tune_oof(truth, probs, np.zeros(len(truth), bool), small_config())
    at_05 = competition_score(truth, probs > 0.5)
    assert found["cv_at_05"] == pytest.approx(at_05)
    assert found["image_scores"].mean() >= at_05 - 1e-12
    # nor below the best of the plain rule (emptiness decided at the mask threshold) on the same grid
    plain = plain_rule_best(truth, probs, small_config())
    assert found["cv_plain_rule"] == pytest.approx(plain, abs=1e-12)
    assert found["image_scores"].mean() >= plain - 1e-12
    if case == "perfect":  # nothing to gain: keep the untuned choice rather than an arbitrary tie
        assert (found["threshold"], found["empty_threshold"], found["min_area"]) == (0.5, 0.5, 0)


def plain_rule_best(truth, probs, cfg) -> float:
    from pipeline.metric import threshold_scores

    thresholds, _, min_areas = search_grid(cfg)
    return float(threshold_scores(truth, probs, thresholds, min_areas).max())


def stricter_empty_probs(truth: np.ndarray) -> np.ndarray:
    """A model whose "any salt?" needs a stricter threshold than its masks: salt at 0.65 with every
    other column at 0.95, and a 15x15 false-positive blob at 0.65 on every empty image. A mask
    threshold at or above 0.65 halves the masks; one below keeps the blobs, which no min area up
    to 200 removes; a mask at 0.5 kept only where 5 pixels exceed 0.7 is right nearly everywhere."""
    probs = np.full(truth.shape, 0.05, np.float32)
    probs[truth] = 0.65
    core = truth.copy()
    core[:, :, 1::2] = False
    probs[core] = 0.95
    probs[~truth.any(axis=(1, 2)), 40:55, 40:55] = 0.65
    return probs


def test_a_stricter_empty_threshold_is_chosen_where_it_helps(synth_data):
    from pipeline.data import load_train
    from pipeline.metric import competition_score

    truth = np.asarray(load_train(synth_data).masks, bool)
    probs = stricter_empty_probs(truth)
    found = tune_oof(truth, probs, np.zeros(len(truth), bool), small_config())
    assert (found["threshold"], found["empty_threshold"], found["min_area"]) == (0.5, 0.7, 5)
    assert found["post"] == PostProcess(0.5, 5, 0.7, False)
    plain = plain_rule_best(truth, probs, small_config())
    assert found["image_scores"].mean() > plain + 0.05
    # the reported score is the score of the masks submit would write
    masks = binarize(probs, 0.5, 5, empty_threshold=0.7)
    assert found["image_scores"].mean() == pytest.approx(competition_score(truth, masks), abs=1e-12)

    # empty_thresholds: [] searches the plain rule only
    cfg = small_config()
    cfg.tune.empty_thresholds = []
    found = tune_oof(truth, probs, np.zeros(len(truth), bool), cfg)
    assert found["empty_threshold"] == found["threshold"]
    assert found["image_scores"].mean() == pytest.approx(plain, abs=1e-12)


def test_empty_thresholds_outside_0_1_are_refused():
    cfg = small_config()
    cfg.tune.empty_thresholds = [0.8, 1.2]
    with pytest.raises(PipelineError, match=r"tune.empty_thresholds: 1.2 is outside \[0, 1\)"):
        search_grid(cfg)


def test_blank_images_are_forced_empty_only_when_it_helps():
    truth = np.zeros((4, 101, 101), bool)
    truth[0, 10:40, 10:40] = True
    probs = np.zeros(truth.shape, np.float32)
    probs[0, 10:40, 10:40] = 0.9
    probs[1, 50:60, 50:60] = 0.9  # a false positive on a blank image
    blank = np.array([False, True, False, False])
    found = tune_oof(truth, probs, blank, small_config())
    assert found["empty_blank"] and found["image_scores"].mean() == 1.0

    truth[1, 50:60, 50:60] = True  # now the "blank" image really has that salt
    found = tune_oof(truth, probs, blank, small_config())
    assert not found["empty_blank"] and found["image_scores"].mean() == 1.0


# ---------------------------------------------------------------- the command


def test_tune_run_writes_tune_json_with_the_documented_fields(run, capsys):
    result = tune_run(run)
    saved = json.loads((run / "tune.json").read_text())
    assert TUNE_KEYS <= set(saved) and saved == json.loads(json.dumps(result))
    assert saved["n_images"] == 120
    assert saved["threshold"] < 0.5  # the fake model is under-confident by construction
    assert saved["cv_tuned"] > saved["cv_at_05"] + 0.2
    assert set(saved["per_fold"]) == {"0", "1", "2"}
    assert sum(v["n"] for v in saved["per_fold"].values()) == 120
    assert sum(v["n"] for v in saved["per_class"].values()) == 120
    weighted = sum(v["n"] * v["score"] for v in saved["per_class"].values()) / 120
    assert weighted == pytest.approx(saved["cv_tuned"], abs=1e-4)
    # what each class costs adds up to everything the CV lacks
    assert sum(v["cv_lost"] for v in saved["per_class"].values()) == pytest.approx(1 - saved["cv_tuned"], abs=1e-4)
    decision = saved["empty_decision"]
    assert decision["n_salt"] + decision["n_empty"] == 120
    assert decision["cv_empty_oracle"] >= saved["cv_tuned"] - 1e-9
    out = capsys.readouterr().out
    assert "CV tuned" in out and "costs the CV" in out and "empty decision:" in out
    assert (run.parent.parent / "submissions" / "leaderboard.csv").is_file()


def test_empty_decision_report_counts_wrong_decisions_and_scores_the_oracle():
    from pipeline.tune import empty_decision_report

    truth = np.zeros((4, 101, 101), bool)
    truth[0, :50] = True  # salt, submitted empty; its threshold mask is the truth exactly
    truth[1, :50] = True  # salt, submitted right
    # image 2: empty, given a mask; image 3: empty, submitted empty
    masks = np.zeros_like(truth)
    masks[1, :50] = True
    masks[2, :5] = True
    threshold_masks = masks.copy()
    threshold_masks[0, :50] = True
    scores = np.array([0.0, 1.0, 0.0, 1.0])
    report = empty_decision_report(truth, masks, scores, threshold_masks)
    assert report == {"salt_called_empty": 1, "empty_called_salt": 1, "n_salt": 2, "n_empty": 2,
                      "cv_lost_salt_called_empty": 0.25, "cv_lost_empty_called_salt": 0.25,
                      "cv_empty_oracle": 1.0}
    threshold_masks[0] = False  # the model saw nothing there: no decision rescues it
    assert empty_decision_report(truth, masks, scores, threshold_masks)["cv_empty_oracle"] == 0.75


def test_oof_csv_scores_exactly_cv_tuned(run, synth_data):
    from pipeline.metric import score_csvs

    result = tune_run(run)
    score, count = score_csvs(synth_data / "train.csv", run / "oof.csv")
    assert count == result["n_images"] == 120
    assert score == pytest.approx(result["cv_tuned"], abs=1e-6)


def test_tune_run_with_a_stricter_empty_threshold_agrees_with_oof_csv(run, synth_data, capsys):
    from pipeline.data import load_train
    from pipeline.leaderboard import read_leaderboard
    from pipeline.metric import score_csvs

    for fold_dir in sorted(run.glob("fold*")):
        ids = (fold_dir / "oof_ids.txt").read_text().split()
        truth = np.asarray(load_train(synth_data, ids).masks, bool)
        np.save(fold_dir / "oof.npy", stricter_empty_probs(truth).astype(np.float16))
        refinish_fold(fold_dir)
    result = tune_run(run)
    saved = json.loads((run / "tune.json").read_text())
    assert saved["empty_threshold"] > saved["threshold"]
    assert saved["cv_tuned"] > saved["cv_plain_rule"] + 0.05
    assert read_tuned(run) == PostProcess(saved["threshold"], saved["min_area"], saved["empty_threshold"],
                                          saved["empty_blank"])
    score, _ = score_csvs(synth_data / "train.csv", run / "oof.csv")
    assert score == pytest.approx(result["cv_tuned"], abs=1e-6)
    out = capsys.readouterr().out
    assert f"empty threshold {saved['empty_threshold']:.2f}" in out and "empty decision at" in out
    (row,) = read_leaderboard(run.parent.parent / "submissions" / "leaderboard.csv")
    assert row["empty_threshold"] == f"{saved['empty_threshold']:.2f}"


def test_a_tune_json_without_empty_threshold_decides_emptiness_at_the_threshold(tmp_path):
    (tmp_path / "tune.json").write_text(json.dumps({"threshold": 0.42, "min_area": 30, "empty_blank": True,
                                                    "cv_at_05": 0.7, "cv_tuned": 0.72}))
    post = read_tuned(tmp_path)
    assert post == PostProcess(0.42, 30, 0.42, True) and post.empty_threshold == 0.42
    assert post.describe() == "threshold 0.42, min area 30"
    (tmp_path / "tune.json").write_text(json.dumps({"threshold": 0.42, "min_area": 30, "empty_threshold": "x"}))
    with pytest.raises(PipelineError, match="'empty_threshold' must be a number, got 'x'"):
        read_tuned(tmp_path)


def test_cli_tune_exits_0_and_missing_fold_exits_2_with_one_line(run, capsys):
    from pipeline.cli import main

    assert main(["tune", "--run", str(run)]) == 0
    assert (run / "tune.json").is_file() and (run / "oof.csv").is_file()
    capsys.readouterr()
    shutil.rmtree(run / "fold1")
    assert main(["tune", "--run", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "fold1" in err and "not trained" in err


@pytest.mark.e2e
def test_oof_csv_reproduces_cv_tuned_with_the_score_command_on_the_real_sample(tgs_sample, tmp_path, monkeypatch,
                                                                                 capsys):
    from pipeline.cli import main

    monkeypatch.chdir(tmp_path)
    real_run = make_fake_run(tgs_sample, tmp_path, name="real", n_folds=5, with_test=False)
    result = tune_run(real_run)
    capsys.readouterr()
    assert main(["score", "--truth", str(tgs_sample / "train.csv"), "--pred", str(real_run / "oof.csv")]) == 0
    assert f"score {result['cv_tuned']:.4f} over {result['n_images']} images" in capsys.readouterr().out
