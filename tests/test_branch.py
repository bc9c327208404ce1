"""`pipeline branch`: a stage-2 variant started from another run's stage-1 checkpoint trains the
weights that the variant's config trains from nothing, and refuses what would not."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from pipeline.branch import branch_run, stage1_differences
from pipeline.checkpoints import load_checkpoint
from pipeline.config import load_config
from pipeline.errors import PipelineError
from pipeline.train_folds import train_folds
from pipeline.rundir import read_log

# end to end (runs trained and branched): the fast suite, not the quick tier (pyproject.toml markers)
pytestmark = pytest.mark.e2e

# 3 epochs: BCE for 2, then the stage-2 loss; no validation before the switch
STAGED = ("train.epochs=3", "loss.stage2_from_epoch=2", "loss.stage2_name=bce_lovasz", "loss.bce_weight=0.5",
          "train.scheduler=cosine", "train.validate_from=3", "augment.shift_scale=0.5")


def staged_config(data, tmp_path, name, *overrides):
    return load_config(None, [
        f"data={data}", f"runs_dir={tmp_path / 'runs'}", f"folds_csv={tmp_path / 'folds.csv'}", f"name={name}",
        "n_folds=3", "folds=[0]", "model.n_filters=4", "train.batch_size=16", "train.early_stop_patience=0",
        "train.threads=1", "train.precision=off", "train.channels_last=off", *STAGED, *overrides,
    ])


def test_branched_run_ends_with_the_weights_of_the_same_config_trained_from_nothing(synth_data, tmp_path):
    source = staged_config(synth_data, tmp_path, "source", "train.keep_stage1=true")
    train_folds(source, device="cpu")  # exact on the CPU
    stage1 = load_checkpoint(source.run_dir / "fold0" / "stage1.pt")
    assert stage1["state"]["epoch"] == 2  # saved at the switch, not overwritten after it

    variant = ("loss.stage2_name=lovasz", "loss.symmetric_lovasz=true", "loss.lovasz_hinge=elu")
    branched = staged_config(synth_data, tmp_path, "branched", *variant)
    (last,) = branch_run(branched, source.run_dir)
    assert load_checkpoint(last)["state"]["epoch"] == 2
    assert [r["epoch"] for r in read_log(last.parent / "log.csv")] == ["1", "2"]
    train_folds(branched, device="cpu")
    straight = staged_config(synth_data, tmp_path, "straight", *variant)
    train_folds(straight, device="cpu")

    a = load_checkpoint(straight.run_dir / "fold0" / "last.pt")["model"]
    b = load_checkpoint(branched.run_dir / "fold0" / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)

    def logged(run):  # everything but the seconds each epoch took
        return [{k: v for k, v in row.items() if k != "seconds"} for row in read_log(run.run_dir / "fold0" / "log.csv")]

    assert logged(straight) == logged(branched)


def test_only_keys_acting_after_the_switch_may_differ(synth_data, tmp_path):
    source = staged_config(synth_data, tmp_path, "a")
    same_stage1 = staged_config(synth_data, tmp_path, "b", "loss.stage2_name=lovasz", "loss.lovasz_weight=2",
                                "loss.lovasz_hinge=elu", "train.validate_from=3",
                                "train.threads=2")
    assert stage1_differences(source, same_stage1) == []
    assert stage1_differences(source, staged_config(synth_data, tmp_path, "c", "train.lr=0.01")) == ["train.lr"]
    # the cosine's length shapes the lr of stage 1 too
    assert stage1_differences(source, staged_config(synth_data, tmp_path, "d", "train.epochs=4")) == \
        ["train.epochs"]
    # a stage 1 that already uses Lovasz: its weights matter before the switch
    lovasz_first = staged_config(synth_data, tmp_path, "e", "loss.name=bce_lovasz")
    assert "loss.bce_weight" in stage1_differences(lovasz_first, staged_config(
        synth_data, tmp_path, "f", "loss.name=bce_lovasz", "loss.bce_weight=1.0"))
    # validating inside stage 1 changes what the checkpoint at the switch holds
    assert stage1_differences(source, staged_config(synth_data, tmp_path, "g", "train.validate_from=1")) == \
        ["train.validate_from"]


def test_branch_refuses_a_source_without_stage1_checkpoints_or_with_another_stage1(synth_data, tmp_path):
    source = staged_config(synth_data, tmp_path, "plain")  # keep_stage1 off
    train_folds(source)
    with pytest.raises(PipelineError, match=r"stage1.pt: not found; train the source run with run.keep_stage1"):
        branch_run(staged_config(synth_data, tmp_path, "x", "loss.stage2_name=lovasz"), source.run_dir)
    with pytest.raises(PipelineError, match="stage 1 differs from this config in train.lr"):
        branch_run(staged_config(synth_data, tmp_path, "y", "train.lr=0.01"), source.run_dir)
    with pytest.raises(PipelineError, match="a run name of its own"):
        branch_run(staged_config(synth_data, tmp_path, "plain"), source.run_dir)


def test_branch_refuses_a_source_without_a_stage2(synth_data, tmp_path):
    from pipeline.config import save_config

    source = staged_config(synth_data, tmp_path, "one_stage", "loss.stage2_from_epoch=-1")
    source.run_dir.mkdir(parents=True)
    save_config(source, source.run_dir / "config.yaml")
    with pytest.raises(PipelineError, match="has no stage 2"):
        branch_run(staged_config(synth_data, tmp_path, "z"), source.run_dir)


def test_branch_command_reports_a_missing_source_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pipeline", "branch", "--from", str(tmp_path / "nope"),
                             "--config", "configs/cpu_best.yaml", "--set", f"runs_dir={tmp_path}"],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "config file not found" in result.stderr


def test_a_refused_branch_writes_nothing(synth_data, tmp_path):
    source = staged_config(synth_data, tmp_path, "kept", "train.keep_stage1=true")
    train_folds(source)
    # fold 1's checkpoint holds another epoch: found only after fold 0's was accepted
    bad = load_checkpoint(source.run_dir / "fold0" / "stage1.pt")
    bad["state"]["epoch"] = 1
    (source.run_dir / "fold1").mkdir()
    torch.save(bad, source.run_dir / "fold1" / "stage1.pt")
    branched = staged_config(synth_data, tmp_path, "half", "folds=[0,1]", "loss.stage2_name=lovasz")
    with pytest.raises(PipelineError, match="holds epoch 1, not the switch at 2"):
        branch_run(branched, source.run_dir)
    assert not branched.run_dir.exists()
