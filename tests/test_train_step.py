"""The training step as a GPU sees it: no host sync per step, a non-finite loss still stops the
epoch before anything of it is kept, and the host-cost benchmark of a config's real step."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.host_step import Batches, ShapeStub, estimate, host_step, make_batches
from benchmarks.syncs import count_host_syncs
from pipeline.config import load_config
from pipeline.losses import SegLoss
from pipeline.runtime import resolve_runtime
from pipeline.optim import build_optimizer
from pipeline.train_fold import NonFiniteLoss, Training, run_steps

TINY_DEEP = ["model.name=seed_unet", "model.n_filters=4", "model.deep_supervision=true", "input.size=112",
             "train.batch_size=8", "loss.name=bce", "loss.stage2_from_epoch=1", "loss.stage2_name=lovasz",
             "train.epochs=2", "train.optimizer=sgd"]


def stub_step_parts(cfg, poison_at: int | None = None):
    from pipeline.models import create_model

    with torch.no_grad():
        example = create_model(cfg.model).train()(torch.zeros(2, 1, cfg.input.size, cfg.input.size))

    class Poisoned(ShapeStub):
        calls = 0

        def forward(self, x):
            out = super().forward(x)
            Poisoned.calls += 1
            if Poisoned.calls == poison_at:
                out["mask"] = out["mask"] * float("nan")
            return out

    stub = Poisoned(example)
    rt = resolve_runtime("off", "off", "cpu", 1)
    return Training(model=stub, optimizer=build_optimizer(cfg, stub), scheduler=None, scaler=rt.grad_scaler(),
                    loss_fn=SegLoss(cfg.loss, True), ema=None), rt


@pytest.mark.parametrize("epoch", [0, 1])
def test_a_training_epoch_reads_from_the_device_only_at_its_end(epoch):
    cfg = load_config(None, TINY_DEEP)
    parts, rt = stub_step_parts(cfg)
    loader = Batches(make_batches(8, 6))
    with count_host_syncs() as syncs:
        mean_loss = run_steps(parts.model, loader, parts, cfg, rt, epoch)
    # the finite check and the mean loss: two reads for the whole epoch, none per step
    assert dict(syncs) == {"_local_scalar_dense": 2} and mean_loss > 0


def test_a_non_finite_loss_still_stops_the_epoch_with_its_value():
    cfg = load_config(None, TINY_DEEP)
    parts, rt = stub_step_parts(cfg, poison_at=3)
    with pytest.raises(NonFiniteLoss, match="loss became nan"):
        run_steps(parts.model, Batches(make_batches(8, 5)), parts, cfg, rt, 0)


def test_host_step_benchmark_measures_the_configs_real_step_and_estimates_a_gpu_run():
    cfg = load_config(None, TINY_DEEP)
    measured = host_step(cfg, steps=3, repeats=1)
    assert set(measured["stages"]) == {"bce", "lovasz"}
    for stage in measured["stages"].values():
        assert stage["syncs_per_step"] < 0.7 and stage["ops_per_step"] > 10 and stage["host_ms_per_step"] > -5
    assert measured["model_ops_per_step"] > 50 and measured["train_gflop_per_image"] > 0
    assert measured["fp16_scaler_syncs_per_step"] == 0
    one, three = (estimate(measured, cfg, fold_processes=p) for p in (1, 3))
    assert 0 < three["train_minutes"] <= one["train_minutes"]
    assert one["train_steps"] == 5 * 2 * (3200 // 8)


@pytest.mark.e2e
def test_speed_benchmark_times_the_configs_own_step_and_prediction(tmp_path):
    from benchmarks.speed import measure_pipeline
    from pipeline.config import save_config

    path = tmp_path / "tiny.yaml"
    save_config(load_config(None, [*TINY_DEEP, "train.precision=off", "predict.tta=[none,hflip]"]), path)
    results = []

    class Queue:
        put = results.append

    measure_pipeline(str(path), ["train.threads=1"], 2, 1, "cpu", Queue())
    (row,) = results
    assert "error" not in row, row
    assert row["train_img_s_stage1"] > 0 and row["train_img_s_stage2"] > 0 and row["infer_img_s"] > 0
    assert row["tta"] == ["none", "hflip"] and row["batch"] == 8


@pytest.mark.e2e
def test_last_pt_by_time_is_written_at_the_stage_and_fold_ends_and_a_resume_from_it_is_exact(synth_data, tmp_path):
    from pipeline.checkpoints import load_checkpoint
    from pipeline.train_folds import train_folds
    from tests.test_train import _train_epochs_then_kill, fold_dir, tiny_config

    # a clock that never runs out: last.pt only where it must be, at the stage switch and the end
    options = ("train.epochs=4", "run.checkpoint_seconds=1e9", "loss.stage2_from_epoch=2",
               "loss.stage2_name=lovasz")
    straight = tiny_config(synth_data, tmp_path / "a", *options)
    train_folds(straight, device="cpu")
    assert load_checkpoint(fold_dir(straight) / "last.pt")["state"]["epoch"] == 4  # the fold's end
    assert load_checkpoint(fold_dir(straight) / "prev.pt")["state"]["epoch"] == 2  # the stage's end

    killed = tiny_config(synth_data, tmp_path / "b", *options, f"folds_csv={straight.folds_path()}")
    _train_epochs_then_kill(killed, kill_after=3)  # killed after epoch 3: its last.pt is epoch 2's
    assert load_checkpoint(fold_dir(killed) / "last.pt")["state"]["epoch"] == 2
    train_folds(killed, device="cpu")
    a = load_checkpoint(fold_dir(straight) / "last.pt")["model"]
    b = load_checkpoint(fold_dir(killed) / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("epoch_done, stopping, seconds_since, due", [
    (1, False, 59.0, False),  # within the minute: not yet
    (1, False, 60.0, True),  # a minute since the last write
    (3, False, 1.0, True),  # the stage-1 loss ends (stage2_from_epoch=3)
    (5, False, 1.0, False),
    (8, False, 1.0, True),  # the fold's last epoch
    (5, True, 1.0, True),  # early stop
])
def test_last_pt_is_due_once_a_minute_and_at_every_stage_and_fold_end(epoch_done, stopping, seconds_since, due):
    from pipeline.train_fold import LoopState, last_checkpoint_due

    cfg = load_config(None, ["train.epochs=8", "loss.stage2_from_epoch=3"])
    assert cfg.run.checkpoint_seconds == 60
    assert last_checkpoint_due(cfg, LoopState(epoch=epoch_done), stopping, seconds_since) is due


def test_checkpoint_every_in_an_old_run_config_loads_and_a_new_one_is_told_its_successor(tmp_path):
    from pipeline.errors import PipelineError

    old = tmp_path / "config.yaml"
    old.write_text("run:\n  checkpoint_every: 2\n")
    assert load_config(old).run.checkpoint_seconds == 60
    with pytest.raises(PipelineError, match="replaced by run.checkpoint_seconds"):
        load_config(None, ["run.checkpoint_every=2"])
    with pytest.raises(PipelineError, match="run.checkpoint_seconds"):
        load_config(None, ["run.checkpoint_seconds=-1"])


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_the_fp16_step_with_its_scaler_on_reads_nothing_per_step_once_the_optimizer_is_fused(optimizer):
    """GradScaler.step reads found_inf on the host every step unless the optimizer takes it on
    the device (fused: what build_optimizer picks on CUDA, forced here on the CPU)."""
    from benchmarks.syncs import step_syncs

    cfg = load_config(None, [*TINY_DEEP, f"train.optimizer={optimizer}"])
    fused, unfused = step_syncs(cfg, steps=4, fused=True), step_syncs(cfg, steps=4, fused=False)
    assert fused["scaler_enabled"] and fused["per_step"] == 0, fused
    # the found_inf read per step that fused removes (unfused Adam also reads its step count here,
    # a CPU tensor on CUDA too)
    assert unfused["per_step"] >= 1, unfused


def test_the_ema_update_reads_nothing_back_per_step_and_averages_as_torchs_did():
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    from pipeline.optim import build_ema

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
    ours, torchs = build_ema(model, 0.9), AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9),
                                                        use_buffers=True)
    with count_host_syncs() as syncs:
        for step in range(3):
            with torch.no_grad():
                model[0].weight.add_(1.0)
                model[1].running_mean.add_(step)
            ours.update_parameters(model)
    assert sum(syncs.values()) == 0
    fresh = build_ema(model, 0.9)
    fresh.load_state_dict(ours.state_dict())  # AveragedModel's layout: module.*, n_averaged
    assert fresh.updates == 3 and set(ours.state_dict()) == set(torchs.state_dict())


@pytest.mark.e2e
def test_host_step_runs_as_a_command_with_its_compile_timing(tmp_path):
    """As a user runs it (`python -m benchmarks.host_step --compile ...`): the eager timing the
    compiled ones are compared with comes out beside the step's host figures. ("off" twice: the
    wiring, not torch.compile's minutes of building.)"""
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "host_step.json"
    subprocess.run([sys.executable, "-m", "benchmarks.host_step", "--config", "configs/cpu_best.yaml", "--steps", "1",
                    "--repeats", "1", "--compile", "off", "--out", str(out)], cwd=root, check=True,
                   capture_output=True, timeout=300)
    timed = json.loads(out.read_text())["compile"]
    assert [t["mode"] for t in timed] == ["off", "off"] and all(t["ms_per_step"] > 0 for t in timed)
