"""Blending runs (pipeline/blend.py) on hand-built run dirs (tests/fake_run.py) and toy OOFs."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from pipeline import blend
from pipeline.cli import main
from pipeline.config import Config
from pipeline.errors import PipelineError
from pipeline.leaderboard import read_leaderboard
from pipeline.rundir import FoldDir
from pipeline.submit import check_submission
from pipeline.tune import tune_run
from tests.fake_run import make_fake_run, refinish_fold, write_fake_predictions

# end to end (trained runs blended, tuned and submitted): the fast suite, not the quick tier (pyproject.toml markers)
pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def base_runs(synth_data, tmp_path_factory):
    """Two fake runs on the same folds file (different noise), and one on other folds."""
    root = tmp_path_factory.mktemp("blend")
    return {"a": make_fake_run(synth_data, root, "a", seed=0), "b": make_fake_run(synth_data, root, "b", seed=1),
            "k2": make_fake_run(synth_data, root, "k2", n_folds=2, seed=2)}


@pytest.fixture
def runs(base_runs, tmp_path, monkeypatch):
    """Private copies under tmp_path/runs; the cwd moves there (submissions/, the leaderboard)."""
    monkeypatch.chdir(tmp_path)
    for name, run in base_runs.items():
        shutil.copytree(run, tmp_path / "runs" / name)  # copy2 keeps the mtimes freshness is judged by
    return {name: tmp_path / "runs" / name for name in base_runs}


def blend_cli(*args: str) -> int:
    return main(["blend", *args, "--runs-dir", "runs"])


# ---------------------------------------------------------------- a run with itself


@pytest.mark.parametrize("copies", [1, 2])
def test_blend_of_a_run_with_itself_equals_the_run(runs, copies):
    a = runs["a"]
    own = tune_run(a, leaderboard_csv="own.csv")
    blend.blend_runs([a] * copies, "self", runs_dir="runs", pictures=False)
    run = runs["a"].parent / "self"
    tuned = json.loads((run / "tune.json").read_text())
    for key in ("cv_tuned", "cv_at_05", "threshold", "empty_threshold", "min_area", "empty_blank"):
        assert tuned[key] == own[key], key
    np.testing.assert_array_equal(np.load(run / "test_probs.npy"), np.load(a / "test_probs.npy"))
    assert (run / "test_ids.txt").read_text().split() == (a / "test_ids.txt").read_text().split()
    weights = [m["weight"] for m in json.loads((run / "blend.json").read_text())["members"]]
    assert weights == [1.0 / copies] * copies


# ---------------------------------------------------------------- the weight search


def toy_members(seed: int, sigmas: tuple[float, ...], n: int = 60):
    """Truth blocks (a third of the images empty) and members = truth at 0.7 / background at 0.3
    plus Gaussian noise of each sigma; a sigma of None is a useless member (uniform noise)."""
    rng = np.random.default_rng(seed)
    truth = np.zeros((n, 101, 101), bool)
    for i in range(n):
        if i % 3:
            row, col = rng.integers(10, 60, 2)
            height, width = rng.integers(15, 40, 2)
            truth[i, row:row + height, col:col + width] = True
    base = np.where(truth, 0.7, 0.3)
    members = [rng.uniform(0, 1, truth.shape) if s is None else np.clip(base + rng.normal(0, s, truth.shape), 0, 1)
               for s in sigmas]
    folds = np.arange(n) % 2
    return ({k: truth[folds == k] for k in (0, 1)},
            {k: [m[folds == k].astype(np.float16) for m in members] for k in (0, 1)})


@pytest.mark.parametrize("seed", [0, 1])
def test_weight_search_on_toy_oofs_finds_the_known_best_mix(seed):
    # independent noise of sigma 0.1 and 0.2: inverse-variance weights 0.8 / 0.2 are the best
    # linear mix; the third member is noise and must get nothing
    truth, probs = toy_members(seed, (0.1, 0.2, None))
    found = blend.search_weights(truth, probs, Config())
    np.testing.assert_allclose(found["weights"], [0.8, 0.2, 0.0])
    report = found["report"]
    assert report["kept"] == "searched" and report["cv_nested"] > report["cv_nested_equal"]
    assert report["per_fold_choice"] == [[0.8, 0.2, 0.0], [0.8, 0.2, 0.0]]


def test_weight_search_keeps_equal_weights_unless_it_wins_nested():
    truth, probs = toy_members(0, (0.15, 0.15))  # alike members: nothing to gain over 0.5 / 0.5
    found = blend.search_weights(truth, probs, Config())
    assert found["report"]["kept"].startswith("equal")
    np.testing.assert_allclose(found["weights"], [0.5, 0.5])


def test_given_weights_are_normalised_and_only_reported():
    truth, probs = toy_members(0, (0.1, 0.2))
    found = blend.search_weights(truth, probs, Config(), weights=blend.parse_weights("1,3", 2))
    np.testing.assert_allclose(found["weights"], [0.25, 0.75])
    assert found["report"]["mode"] == "given" and found["report"]["n_candidates"] == 1


@pytest.mark.parametrize("n_members, size, step", [(2, 11, 0.1), (3, 67, 0.1), (5, 71, 0.25)])
def test_simplex_grid_is_coarse_sums_to_one_and_starts_with_equal_weights(n_members, size, step):
    grid = blend.simplex_grid(n_members)
    assert grid.shape == (size, n_members)
    np.testing.assert_allclose(grid.sum(axis=1), 1.0)
    np.testing.assert_allclose(grid[0], 1.0 / n_members)
    np.testing.assert_allclose(grid[1:] / step, np.round(grid[1:] / step), atol=1e-9)


@pytest.mark.parametrize("text, problem", [("1,x", "expected 'auto'"), ("1", "1 weights for 2 runs"),
                                           ("1,-1", "non-negative"), ("0,0", "not all 0")])
def test_bad_weights_are_one_line_refusals(text, problem):
    with pytest.raises(PipelineError, match=problem):
        blend.parse_weights(text, 2)


# ---------------------------------------------------------------- the blended run


def test_blend_writes_a_run_that_submits_ranks_and_lists_its_members(runs, synth_data):
    path = blend.blend_runs([runs["a"], runs["b"]], "ab", weights="1,3", runs_dir="runs")
    run = runs["a"].parent / "ab"
    assert check_submission(path, synth_data) == len((run / "test_ids.txt").read_text().split())
    assert path.name == "ab.csv" and (run / "oof.csv").exists() and (run / "show" / "oof_worst.png").exists()
    # the OOF is the weighted mean of the members', fold by fold, whatever order they wrote ids in
    ids = FoldDir.of(run, 1).oof_ids.read_text().split()
    expected = 0.25 * blend.member_oof(blend.read_member(runs["a"]), 1, ids).astype(np.float32) \
        + 0.75 * blend.member_oof(blend.read_member(runs["b"]), 1, ids).astype(np.float32)
    np.testing.assert_allclose(np.load(FoldDir.of(run, 1).oof), expected, atol=1e-3)
    row = next(r for r in read_leaderboard("submissions/leaderboard.csv") if r["run"] == "ab")
    assert row["model"] == "blend" and row["members"] == "a:0.25 b:0.75"


def test_rerun_skips_what_is_done_and_a_changed_member_remakes_the_blend(runs, capsys):
    blend.blend_runs([runs["a"], runs["b"]], "ab", runs_dir="runs", pictures=False)
    run = runs["a"].parent / "ab"
    made = (run / "test_probs.npy").stat().st_mtime_ns
    capsys.readouterr()
    blend.blend_runs([runs["a"], runs["b"]], "ab", runs_dir="runs", pictures=False)
    out = capsys.readouterr().out
    assert "blend.json is up to date" in out and "tune.json is up to date" in out
    assert (run / "test_probs.npy").stat().st_mtime_ns == made

    probs = np.load(runs["b"] / "test_probs.npy")
    write_fake_predictions(runs["b"], (runs["b"] / "test_ids.txt").read_text().split(), probs * 0.5)  # b predicted again
    blend.blend_runs([runs["a"], runs["b"]], "ab", runs_dir="runs", pictures=False)
    out = capsys.readouterr().out
    # the test probabilities are remade; the blended OOF is unchanged, so its tune.json stays current
    assert "== blend: 2 runs" in out and "tune.json is up to date" in out
    assert (run / "test_probs.npy").stat().st_mtime_ns != made


# ---------------------------------------------------------------- refusals


def _reseal(run):
    """Re-record the run's manifests (done.json's config digest and files, predict.json) as they
    are now: a test that changes a member on purpose reaches the blend's own checks behind the
    manifests' (which would refuse the change first)."""
    from pipeline.rundir import load_run_config
    from pipeline.rundir import training_digest

    cfg = load_run_config(run)
    for fold in cfg.fold_list():
        done = FoldDir.of(run, fold).done
        info = json.loads(done.read_text())
        info["config_digest"] = training_digest(cfg)
        done.write_text(json.dumps(info))
        refinish_fold(done.parent)
    ids = (run / "test_ids.txt").read_text().split()
    write_fake_predictions(run, ids, np.load(run / "test_probs.npy"))


def _swap_fold_ids(runs):
    b = runs["b"]
    ids0 = FoldDir.of(b, 0).oof_ids.read_text().split()
    ids1 = FoldDir.of(b, 1).oof_ids.read_text().split()
    ids0[0], ids1[0] = ids1[0], ids0[0]
    FoldDir.of(b, 0).oof_ids.write_text("\n".join(ids0) + "\n")
    FoldDir.of(b, 1).oof_ids.write_text("\n".join(ids1) + "\n")
    _reseal(b)


def _other_folds_file(runs):
    b = runs["b"]
    config = (b / "config.yaml").read_text()
    folds_csv = next(line.split(":", 1)[1].strip() for line in config.splitlines() if line.startswith("folds_csv:"))
    lines = open(folds_csv).read().splitlines()
    image_id, fold, *rest = lines[1].split(",")
    lines[1] = ",".join([image_id, str((int(fold) + 1) % 3), *rest])  # one image moves to another fold
    (b / "folds.csv").write_text("\n".join(lines) + "\n")
    (b / "config.yaml").write_text(config.replace(f"folds_csv: {folds_csv}", f"folds_csv: {b / 'folds.csv'}"))
    _reseal(b)  # trained and predicted with that config


def _fewer_test_ids(runs):
    b = runs["b"]
    ids = (b / "test_ids.txt").read_text().split()
    np.save(b / "test_probs.npy", np.load(b / "test_probs.npy")[1:])
    (b / "test_ids.txt").write_text("\n".join(ids[1:]) + "\n")
    _reseal(b)


def _retrained_after_predicting(runs):
    done = FoldDir.of(runs["b"], 2).done
    info = json.loads(done.read_text())
    info["seconds"] = info["seconds"] + 1  # a new done.json: the fold finished again
    done.write_text(json.dumps(info))


def _oof_changed_after_done(runs):
    oof = FoldDir.of(runs["b"], 2).oof
    np.save(oof, (np.load(oof) * 0.5).astype(np.float16))


def _other_digest(runs):
    done = FoldDir.of(runs["b"], 0).done
    info = json.loads(done.read_text())
    info["config_digest"] = "0000000000000000"
    done.write_text(json.dumps(info))


REFUSALS = {
    "other ids in a fold": (_swap_fold_ids, "runs/b: fold 0's OOF ids differ from runs/a's in 2 ids"),
    "another folds file": (_other_folds_file, "runs/b: folds file"),
    "other test ids": (_fewer_test_ids, "runs/b: test ids differ from runs/a's in 1 ids"),
    "a fold not finished": (lambda r: FoldDir.of(r["b"], 1).done.unlink(),
                            "runs/b/fold1/done.json: missing (fold 1 not finished)"),
    "no test predictions": (lambda r: (r["b"] / "test_probs.npy").unlink(), "runs/b/test_probs.npy: missing"),
    "test predictions from an earlier training": (_retrained_after_predicting,
                                                  "runs/b/predict.json: predicted with other fold checkpoints"),
    "OOF changed after done.json": (_oof_changed_after_done, "runs/b/fold2/oof.npy: not the file done.json names"),
    "fold trained with another config": (_other_digest,
                                         "runs/b/fold0/done.json: fold 0 was trained with another config"),
}


@pytest.mark.parametrize("damage", list(REFUSALS))
def test_mismatched_or_missing_member_is_a_one_line_refusal(runs, capsys, damage):
    change, message = REFUSALS[damage]
    change(runs)
    capsys.readouterr()
    assert blend_cli("--runs", "runs/a", "runs/b", "--name", "ab") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert not (runs["a"].parent / "ab").exists()


def test_runs_on_a_different_number_of_folds_are_refused(runs, capsys):
    assert blend_cli("--runs", "runs/a", "runs/k2", "--name", "ab") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "runs/k2: folds [0, 1] of 2, but runs/a has [0, 1, 2] of 3" in err


def test_blend_never_writes_over_a_trained_run_or_another_blend(runs, capsys):
    FoldDir.of(runs["a"].parent / "trained", 0).path.mkdir(parents=True)
    FoldDir.of(runs["a"].parent / "trained", 0).best.write_bytes(b"")
    assert blend_cli("--runs", "runs/a", "runs/b", "--name", "trained") == 2
    assert "runs/trained: holds a trained run" in capsys.readouterr().err
    assert blend_cli("--runs", "runs/a", "--name", "one") == 0
    assert blend_cli("--runs", "runs/a", "runs/b", "--name", "one") == 2
    assert "runs/one: blends runs/a, not runs/a, runs/b" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["..", "../outside", "a/b"])
def test_blend_name_must_be_a_plain_folder_name(runs, capsys, name):
    assert blend_cli("--runs", "runs/a", "--name", name) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--name {name!r}" in err and "plain folder name" in err
    assert sorted(p.name for p in runs["a"].parent.iterdir()) == ["a", "b", "k2"]
