"""The CUDA path: AMP training steps in channels_last, resuming, predicting on the GPU.

Marked `cuda` and skipped where torch sees no GPU (CI and the project's machines have none);
benchmarks/gpu_check.sh runs them on a lent GPU. GPU kernels (cuDNN autotuning, atomics in
upsampling's backward) are not bit-reproducible, so resuming and CPU-vs-GPU agreement are
checked within tolerances, and every assertion message carries the measured difference.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.config import load_config
from tests.conftest import batched

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="needs a CUDA GPU: torch.cuda.is_available() is False here "
                              "(benchmarks/gpu_check.sh runs these on a lent GPU)"),
]

PRECISIONS = [
    "fp16",
    pytest.param("bf16", marks=pytest.mark.skipif(
        not (torch.cuda.is_available() and torch.cuda.is_bf16_supported()), reason="bf16 needs a CUDA GPU that supports it")),
]


def gpu_config(data, tmp_path, *overrides):
    """A small ResNet UNet with the GPU presets' decoder options, on the synthetic set."""
    return load_config(None, [
        f"data={data}", f"runs_dir={tmp_path / 'runs'}", f"folds_csv={tmp_path / 'folds.csv'}",
        "name=cuda", "n_folds=3", "folds=[0]", "model.name=unet_resnet18", "model.scse=true",
        "model.deep_supervision=true", "input.size=128", "train.batch_size=16", "train.epochs=3",
        "train.optimizer=adamw", "train.lr=0.001", "train.scheduler=none", "train.early_stop_patience=0",
        "train.channels_last=on", "run.num_workers=2", "loss.stage2_from_epoch=1",
        "loss.stage2_name=bce_lovasz", *overrides,
    ])


@pytest.mark.parametrize("precision", PRECISIONS)
def test_amp_training_steps_on_cuda_in_channels_last_lower_the_loss(precision, synth_data, tmp_path):
    from pipeline.data import load_train
    from pipeline.losses import SegLoss
    from pipeline.models import create_model
    from pipeline.geometry import to_batch
    from pipeline.runtime import resolve_runtime
    from pipeline.optim import build_optimizer
    from pipeline.train_fold import _to_float

    cfg = gpu_config(synth_data, tmp_path, f"train.precision={precision}")
    rt = resolve_runtime(cfg.train.precision, cfg.train.channels_last, "cuda")
    assert rt.amp_dtype == {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    torch.manual_seed(0)
    model = create_model(cfg.model).to(rt.device, memory_format=rt.memory_format())
    optimizer = build_optimizer(cfg, model)
    scaler = rt.grad_scaler()
    assert scaler.is_enabled() == (precision == "fp16")  # only fp16 needs loss scaling
    loss_fn = SegLoss(cfg.loss, cfg.model.deep_supervision)
    data = load_train(synth_data)
    x, target = to_batch(torch.from_numpy(data.images[:16]), torch.from_numpy(data.masks[:16]), cfg, rt)
    assert x.is_cuda and x.is_contiguous(memory_format=torch.channels_last) and x.shape == (16, 1, 128, 128)

    model.train()
    losses = []
    for _ in range(8):  # the same batch: the loss must fall
        with rt.autocast():
            outputs = model(x)
        assert outputs["mask"].dtype == rt.amp_dtype
        outputs = {k: _to_float(v) for k, v in outputs.items()}
        loss, _ = loss_fn(outputs, target, epoch=1)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        losses.append(float(loss))
    assert all(np.isfinite(losses)), losses
    assert losses[-1] < losses[0], losses
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("precision", PRECISIONS)
def test_resume_on_cuda_matches_the_straight_run_within_tolerance(precision, synth_data, tmp_path):
    from pipeline.checkpoints import load_checkpoint
    from pipeline.train_folds import train_folds
    from pipeline.rundir import read_log
    from tests.test_train import _train_epochs_then_kill

    straight = gpu_config(synth_data, tmp_path / "a", f"train.precision={precision}")
    train_folds(straight, device="cuda")
    interrupted = gpu_config(synth_data, tmp_path / "b", f"train.precision={precision}")
    interrupted.folds_csv = straight.folds_csv
    _train_epochs_then_kill(interrupted, kill_after=2)
    train_folds(interrupted, device="cuda")  # resumes at epoch 3 of 3

    a = load_checkpoint(straight.run_dir / "fold0" / "last.pt")
    b = load_checkpoint(interrupted.run_dir / "fold0" / "last.pt")
    assert a["state"]["epoch"] == b["state"]["epoch"] == 3
    if precision == "fp16":  # the GradScaler's state travels in the checkpoint
        assert b["scaler"] and b["scaler"]["scale"] == pytest.approx(a["scaler"]["scale"])
    diff = norm = 0.0
    for key, value in a["model"].items():
        if value.is_floating_point():
            diff += float((value.float() - b["model"][key].float()).pow(2).sum())
            norm += float(value.float().pow(2).sum())
    relative = (diff / norm) ** 0.5
    assert relative < 1e-2, f"resumed weights differ from the straight run's by {relative:.2e} (relative L2)"
    score_a = float(read_log(straight.run_dir / "fold0" / "log.csv")[-1]["val_score"])
    score_b = float(read_log(interrupted.run_dir / "fold0" / "log.csv")[-1]["val_score"])
    assert abs(score_a - score_b) < 0.05, (score_a, score_b)


def test_predict_on_cuda_matches_the_cpu_within_tolerance(synth_data, tmp_path):
    from pipeline.data import load_train
    from pipeline.models import create_model
    from pipeline.predict import predict_probs
    from pipeline.runtime import resolve_runtime

    cfg = gpu_config(synth_data, tmp_path)
    images = load_train(synth_data).images[:40]
    torch.manual_seed(0)
    model = create_model(cfg.model).eval()
    cpu = predict_probs(model, images, batched(cfg, 16), resolve_runtime("off", "off", "cpu"), ("none", "hflip"))
    gpu_rt = resolve_runtime("off", "on", "cuda")  # fp32 (no TF32: precision off), channels_last
    gpu32 = predict_probs(model.to(gpu_rt.device, memory_format=gpu_rt.memory_format()), images, batched(cfg, 16),
                          gpu_rt, ("none", "hflip"))
    amp_rt = resolve_runtime("auto", "on", "cuda")  # what training and predict pick on this GPU
    gpu_amp = predict_probs(model, images, batched(cfg, 16), amp_rt, ("none", "hflip"))
    assert gpu32.shape == gpu_amp.shape == cpu.shape == (40, 101, 101)
    assert np.abs(gpu32 - cpu).max() < 2e-2, np.abs(gpu32 - cpu).max()
    assert np.abs(gpu_amp - cpu).max() < 5e-2, np.abs(gpu_amp - cpu).max()
    assert ((gpu_amp > 0.5) == (cpu > 0.5)).mean() > 0.99
