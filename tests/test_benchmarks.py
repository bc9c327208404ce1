"""The benchmark's concurrent-processes path (benchmarks/speed.py measure_procs): it reports
aggregate rates, and a failing process becomes an error cell, not a hang or a crash."""

from benchmarks import speed


def test_procs_path_adds_up_concurrent_single_thread_processes():
    result = speed.measure_procs("seed_unet", "cl_procs", batch=2, size=32, steps=1, repeats=1, device="cpu",
                                 procs=2)
    assert result["procs"] == 2
    assert result["train_img_s"] > 0 and result["infer_img_s"] > 0 and result["peak_mb"] > 0


def test_procs_path_reports_a_failing_process_as_an_error():
    result = speed.measure_procs("no_such_model", "cl_procs", batch=2, size=32, steps=1, repeats=1, device="cpu",
                                 procs=2)
    assert "error" in result


def test_procs_path_uses_its_base_paths_settings():
    import torch

    assert speed.path_settings("cl_procs") == speed.path_settings("cl")
    assert speed.path_settings("cl_procs")[0] == torch.channels_last
