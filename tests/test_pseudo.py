"""Pseudo-labels: the teacher's fold-k model labels the test images fold k trains on."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.errors import PipelineError
from pipeline.pseudo import pseudo_labels, select_confident, uncertain_share
from tests.test_train import tiny_config
from tests.conftest import batched

# end to end (a teacher run trained, then a student fold): the fast suite, not the quick tier (pyproject.toml markers)
pytestmark = pytest.mark.e2e


def test_uncertain_share_counts_pixels_strictly_inside_the_band():
    probs = np.zeros((3, 101, 101), np.float32)
    probs[1, :10] = 0.5  # 1010 uncertain pixels
    probs[2, :10] = 0.8  # on the band's edge: confident
    probs[2, 10:20] = 0.2
    share = uncertain_share(probs)
    assert share.tolist() == pytest.approx([0.0, 1010 / 10201, 0.0])
    assert select_confident(probs, 0.05).tolist() == [True, False, True]
    assert select_confident(probs, 0.1).all()


@pytest.fixture(scope="module")
def teacher(synth_data, tmp_path_factory):
    """A tiny trained and tuned run with fold 0 of 3."""
    from pipeline.train_folds import train_folds
    from pipeline.tune import tune_run

    tmp = tmp_path_factory.mktemp("teacher")
    cfg = tiny_config(synth_data, tmp, "name=teacher", "train.epochs=1")
    train_folds(cfg)
    tune_run(cfg.run_dir, leaderboard_csv=tmp / "leaderboard.csv")
    return cfg


def student(synth_data, tmp_path, teacher, *overrides):
    # the teacher's folds file: the same split
    return tiny_config(synth_data, tmp_path, "name=student", "train.epochs=1", f"folds_csv={teacher.folds_csv}",
                       f"pseudo.teacher={teacher.run_dir}", *overrides)


def test_fold_trains_on_the_teachers_confident_test_labels_and_caches_them(synth_data, tmp_path, teacher, capsys):
    from pipeline.runtime import resolve_runtime
    from pipeline.train_folds import load_training_data, train_folds
    from pipeline.rundir import training_digest

    cfg = student(synth_data, tmp_path, teacher, "pseudo.max_uncertain_share=1.0")  # keep every image
    (done,) = train_folds(cfg)
    assert done["fold"] == 0
    assert "30 of 30 test images pseudo-labelled" in capsys.readouterr().out
    cache = cfg.run_dir / "fold0" / "pseudo.npz"
    with np.load(cache) as saved:
        assert len(saved["ids"]) == 30 and saved["masks"].shape == (30, 101, 101)
        assert str(saved["digest"]) == training_digest(cfg)

    # the cache is what a resumed fold reads: the teacher is not asked again
    data, fold_ids = load_training_data(cfg)
    val_ids = [data.ids[i] for i in np.flatnonzero(fold_ids == 0)]
    rt = resolve_runtime("off", "off", None, 1)
    import pipeline.pseudo as pseudo

    def no_teacher(*args, **kwargs):
        raise AssertionError("the teacher was asked again")

    original = pseudo.predict_teacher_fold
    pseudo.predict_teacher_fold = no_teacher
    try:
        images, masks = pseudo_labels(cfg, 0, val_ids, rt, training_digest(cfg))
        assert images.shape == masks.shape == (30, 101, 101) and images.dtype == np.uint8
        # labelled for another config: labelled again
        with pytest.raises(AssertionError, match="asked again"):
            pseudo_labels(cfg, 0, val_ids, rt, "another digest")
    finally:
        pseudo.predict_teacher_fold = original


def test_pseudo_labels_are_the_teachers_tuned_masks_of_its_same_fold_model(synth_data, tmp_path, teacher):
    from pipeline.data import is_blank, load_test
    from pipeline.predict import load_fold_models, predict_probs
    from pipeline.runtime import resolve_runtime
    from pipeline.train_folds import load_training_data
    from pipeline.postprocess import read_tuned

    cfg = student(synth_data, tmp_path, teacher, "pseudo.max_uncertain_share=1.0")
    data, fold_ids = load_training_data(cfg)
    val_ids = [data.ids[i] for i in np.flatnonzero(fold_ids == 0)]
    rt = resolve_runtime("off", "off", None, 1)
    images, masks = pseudo_labels(cfg, 0, val_ids, rt, "d", write_cache=False)
    test = load_test(synth_data)
    (model,) = load_fold_models(teacher, 0, rt)
    probs = predict_probs(model, test.images, batched(teacher, 64), rt, teacher.predict.tta)
    assert np.array_equal(images, test.images)
    assert np.array_equal(masks, read_tuned(teacher.run_dir).apply(probs, blank=is_blank(test.images)))


def test_a_teacher_trained_on_this_folds_validation_images_is_refused(synth_data, tmp_path, teacher):
    from pipeline.train_folds import train_folds

    # another seed: another split, so the teacher's fold 0 model saw some of this fold 0's images
    cfg = student(synth_data, tmp_path, teacher, f"folds_csv={tmp_path / 'other_folds.csv'}", "seed=7")
    with pytest.raises(PipelineError, match="trained on .* of this fold's validation images"):
        train_folds(cfg)


def test_a_missing_teacher_or_an_untrained_fold_is_one_clear_error(synth_data, tmp_path, teacher):
    from pipeline.train_folds import train_folds

    with pytest.raises(PipelineError, match="not a run dir"):
        train_folds(student(synth_data, tmp_path, teacher, f"pseudo.teacher={tmp_path / 'nope'}"))
    with pytest.raises(PipelineError, match="no trained fold 1"):
        train_folds(student(synth_data, tmp_path, teacher, "folds=[1]", "name=student_fold1"))


def test_max_uncertain_share_is_validated():
    from pipeline.config import load_config

    with pytest.raises(PipelineError, match="pseudo.max_uncertain_share"):
        load_config(None, ["pseudo.max_uncertain_share=1.5"])
