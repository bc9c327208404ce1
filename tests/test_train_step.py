"""The training step as a GPU sees it: no host sync per step, a non-finite loss still stops the
epoch before anything of it is kept, and the host-cost benchmark of a config's real step."""

from __future__ import annotations

import pytest
import torch

from benchmarks.host_step import Batches, ShapeStub, estimate, host_step, make_batches
from benchmarks.syncs import count_host_syncs
from pipeline.config import load_config
from pipeline.losses import SegLoss
from pipeline.runtime import resolve_runtime
from pipeline.optim import build_optimizer
from pipeline.train_fold import NonFiniteLoss, train_one_epoch

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
    return stub, build_optimizer(cfg, stub), rt.grad_scaler(), SegLoss(cfg.loss, True), rt


@pytest.mark.parametrize("epoch", [0, 1])
def test_a_training_epoch_reads_from_the_device_only_at_its_end(epoch):
    cfg = load_config(None, TINY_DEEP)
    model, optimizer, scaler, loss_fn, rt = stub_step_parts(cfg)
    loader = Batches(make_batches(8, 6))
    with count_host_syncs() as syncs:
        mean_loss = train_one_epoch(model, loader, optimizer, scaler, loss_fn, cfg, rt, epoch, "t",
                                    show_progress=False)
    # the finite check and the mean loss: two reads for the whole epoch, none per step
    assert dict(syncs) == {"_local_scalar_dense": 2} and mean_loss > 0


def test_a_non_finite_loss_still_stops_the_epoch_with_its_value():
    cfg = load_config(None, TINY_DEEP)
    model, optimizer, scaler, loss_fn, rt = stub_step_parts(cfg, poison_at=3)
    with pytest.raises(NonFiniteLoss, match="loss became nan"):
        train_one_epoch(model, Batches(make_batches(8, 5)), optimizer, scaler, loss_fn, cfg, rt, 0, "t",
                        show_progress=False)


def test_host_step_benchmark_measures_the_configs_real_step_and_estimates_a_gpu_run():
    cfg = load_config(None, TINY_DEEP)
    measured = host_step(cfg, steps=3, repeats=1)
    assert set(measured["stages"]) == {"bce", "lovasz"}
    for stage in measured["stages"].values():
        assert stage["syncs_per_step"] < 0.7 and stage["ops_per_step"] > 10 and stage["host_ms_per_step"] > -5
    assert measured["model_ops_per_step"] > 50 and measured["train_gflop_per_image"] > 0
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
def test_resume_checkpoint_every_two_epochs_loses_at_most_two_and_resumes_exactly(synth_data, tmp_path):
    from pipeline.checkpoints import load_checkpoint
    from pipeline.train_folds import train_folds
    from tests.test_train import _train_epochs_then_kill, fold_dir, tiny_config

    options = ("train.epochs=4", "run.checkpoint_every=2")
    straight = tiny_config(synth_data, tmp_path / "a", *options)
    train_folds(straight, device="cpu")
    assert load_checkpoint(fold_dir(straight) / "last.pt")["state"]["epoch"] == 4  # the last epoch always

    killed = tiny_config(synth_data, tmp_path / "b", *options, f"folds_csv={straight.folds_path()}")
    _train_epochs_then_kill(killed, kill_after=3)  # killed after epoch 3: its last.pt is epoch 2's
    assert load_checkpoint(fold_dir(killed) / "last.pt")["state"]["epoch"] == 2
    train_folds(killed, device="cpu")
    a = load_checkpoint(fold_dir(straight) / "last.pt")["model"]
    b = load_checkpoint(fold_dir(killed) / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_every_must_be_at_least_one():
    from pipeline.errors import PipelineError

    with pytest.raises(PipelineError, match="run.checkpoint_every"):
        load_config(None, ["run.checkpoint_every=0"])
