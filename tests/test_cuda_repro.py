"""What is promised on a GPU about repeating a run (pipeline/runtime.py): by default a resumed run
matches an uninterrupted one within training noise (cudnn.benchmark, atomics); with run.deterministic,
bit for bit. Skipped without CUDA; the CPU's exact promise is tested everywhere else, on the
CPU explicitly (device="cpu")."""

from __future__ import annotations

import pytest
import torch

from pipeline.checkpoints import load_checkpoint
from pipeline.config import load_config
from pipeline.train_folds import train_folds
from pipeline.rundir import read_log
from tests.test_scale import free_port
from tests.test_train import _train_epochs_then_kill, fold_dir, tiny_config

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def straight_and_resumed(synth_data, tmp_path, *overrides):
    options = ("train.epochs=3", "augment.shift_scale=0.5", "train.precision=auto", "train.channels_last=auto",
               *overrides)
    straight = tiny_config(synth_data, tmp_path / "a", *options)
    train_folds(straight, device="cuda")
    resumed = tiny_config(synth_data, tmp_path / "b", *options, f"folds_csv={straight.folds_path()}")
    _train_epochs_then_kill(resumed, kill_after=2, device="cuda")
    train_folds(resumed, device="cuda")
    return (load_checkpoint(fold_dir(c) / "last.pt")["model"] for c in (straight, resumed)), \
        (float(read_log(fold_dir(c) / "log.csv")[-1]["val_score"]) for c in (straight, resumed))


def test_resume_on_cuda_matches_uninterrupted_within_training_noise(synth_data, tmp_path):
    (a, b), (score_a, score_b) = straight_and_resumed(synth_data, tmp_path)
    for key in a:
        if a[key].is_floating_point():
            scale = a[key].float().norm().clamp(min=1e-3)
            assert (a[key].float() - b[key].float()).norm() / scale < 0.05, key
    assert abs(score_a - score_b) < 0.05


def test_deterministic_resume_on_cuda_is_bit_for_bit(synth_data, tmp_path):
    (a, b), (score_a, score_b) = straight_and_resumed(synth_data, tmp_path, "run.deterministic=true")
    assert all(torch.equal(a[k], b[k]) for k in a) and score_a == score_b


def test_gpu_best_model_trains_deterministically_without_a_refused_kernel():
    from pipeline.models import create_model
    from pipeline.runtime import resolve_runtime

    cfg = load_config("configs/gpu_best.yaml", ["model.pretrained=false"])
    rt = resolve_runtime("auto", "auto", "cuda", deterministic=True)
    try:
        grads = []
        for _ in range(2):
            torch.manual_seed(0)
            model = create_model(cfg.model, load_pretrained=False).to(rt.device, memory_format=rt.memory_format())
            x = torch.rand(8, 1, 128, 128, device=rt.device).contiguous(memory_format=rt.memory_format())
            with rt.autocast():
                out = model(x)
            loss = out["mask"].float().mean() + sum(s.float().mean() for s in out["stages"])
            loss.backward()  # the hypercolumn's bilinear upsample would raise here as F.interpolate
            grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
        assert all(torch.equal(g, h) for g, h in zip(*grads))
    finally:
        resolve_runtime("auto", "auto", "cuda", deterministic=False)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_gpu_ddp_trains_over_nccl_with_host_collectives_on_gloo(synth_data, tmp_path):
    from pipeline.config import save_config
    from tests.test_scale import run_pipeline

    cfg = tiny_config(synth_data, tmp_path, "train.epochs=2")
    path = tmp_path / "ddp.yaml"
    save_config(cfg, path)
    result = run_pipeline(["-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
                           "-m", "pipeline", "train", "--config", str(path)])
    assert result.returncode == 0, result.stderr[-2000:]
