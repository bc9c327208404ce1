"""The benchmark's concurrent-processes path (benchmarks/speed.py measure_procs): it reports
aggregate rates, and a failing process becomes an error cell, not a hang or a crash."""

import pytest

from benchmarks import speed


@pytest.mark.e2e
def test_procs_path_adds_up_concurrent_single_thread_processes():
    result = speed.measure_procs("seed_unet", "cl_procs", batch=2, size=32, steps=1, repeats=1, device="cpu",
                                 procs=2)
    assert result["procs"] == 2
    assert result["train_img_s"] > 0 and result["infer_img_s"] > 0 and result["peak_mb"] > 0


def test_procs_rates_are_all_images_over_the_first_start_to_the_last_finish():
    # two processes of 8 images each: training from t=0 to 2 and from 1 to 4 (a straggler),
    # inference from 5 to 6 and 5 to 6.5; memory 100 + 150 MB
    reports = [{"spans": {"train": (0.0, 2.0), "infer": (5.0, 6.0)}, "peak_mb": 100.4},
               {"spans": {"train": (1.0, 4.0), "infer": (5.0, 6.5)}, "peak_mb": 150.4}]
    assert speed.add_up_procs(reports, images_each=8) == {
        "train_img_s": 4.0, "infer_img_s": 10.7,  # 16 / 4 s; 16 / 1.5 s, to 0.1
        "peak_mb": 251, "procs": 2}


@pytest.mark.e2e
def test_procs_path_reports_a_failing_process_as_an_error():
    result = speed.measure_procs("no_such_model", "cl_procs", batch=2, size=32, steps=1, repeats=1, device="cpu",
                                 procs=2)
    assert "error" in result


def test_procs_path_uses_its_base_paths_settings():
    import torch

    assert speed.path_settings("cl_procs") == speed.path_settings("cl")
    assert speed.path_settings("cl_procs")[0] == torch.channels_last


def test_data_path_supply_is_worker_cores_times_the_per_core_rate_against_flops_demand():
    from benchmarks import data_path

    # 1000 img/s per core; 10 GFLOP per training image; 2 workers per process
    machines = data_path.verdicts(1000.0, 10.0, num_workers=2, tflops=400.0, utils=[0.3])
    kaggle, h200 = machines["kaggle_t4x2"], machines["h200_16core"]
    # Kaggle: 2 processes x 2 workers = 4, but only 4 - 2 cores are left for workers
    assert kaggle["loader_workers_on_cores"] == 2 and kaggle["supply_img_s"] == 2000.0
    assert kaggle["gpu_demand_img_s"]["0.30"] == 2 * 0.3 * 65e12 / 10e9  # two T4s
    assert h200["loader_workers_on_cores"] == 2 and h200["gpu_demand_img_s"]["0.30"] == 0.3 * 400e12 / 10e9
    assert h200["starves"] and not data_path.verdicts(1000.0, 1000.0, 2, 400.0, [0.3])["h200_16core"]["starves"]


@pytest.mark.e2e
def test_data_path_times_the_training_loader_and_counts_the_models_flops():
    import numpy as np

    from benchmarks import data_path
    from pipeline.config import load_config

    cfg = load_config(None, ["train.batch_size=4", "model.n_filters=4", "input.size=112"])
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (16, 101, 101), dtype=np.uint8)
    rate = data_path.loader_rate(cfg, images, images > 128, workers=0, seconds=0.2)
    assert rate["img_s"] > 0 and rate["images"] > 0 and rate["first_batch_s"] >= 0
    flops = data_path.flops_per_image(cfg)
    assert 0 < flops["forward_gflop"] < flops["train_gflop"] < 4 * flops["forward_gflop"]
