"""pipeline.distributed on a faked process group: every collective's tensors sit on a device the
group's backend serves (NCCL has no CPU tensors), which the 2-process gloo test cannot see."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.distributed.distributed_c10d import Backend, BackendConfig

from pipeline import distributed
from pipeline.distributed import DistContext, backend_map, collective_device, init_from_env

PIPELINE = Path(__file__).resolve().parents[1] / "pipeline"
TENSOR_COLLECTIVES = ("all_reduce", "broadcast", "reduce", "all_gather", "all_gather_into_tensor",
                      "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "all_to_all_single")


class FakeProcessGroup:
    """torch.distributed stand-in for a world of identical ranks: records every collective and
    fails any whose tensors sit on a device the group's backends do not serve (torch's own
    BackendConfig reads the backend string, not our parser)."""

    def __init__(self, monkeypatch, *, cuda: bool, world_size: int = 2, initialized_as: str | None = None):
        self.world_size = world_size
        self.calls: list[tuple[str, tuple[str, ...]]] = []
        self.config = str(BackendConfig(Backend(initialized_as))) if initialized_as else None
        self.devices_set: list[int] = []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(torch.cuda, "set_device", self.devices_set.append)
        dist = torch.distributed
        monkeypatch.setattr(dist, "is_initialized", lambda: self.config is not None)
        monkeypatch.setattr(dist, "init_process_group", self.init_process_group)
        monkeypatch.setattr(dist, "get_backend_config", lambda group=None: self.config)
        monkeypatch.setattr(dist, "barrier", lambda *a, **k: self.calls.append(("barrier", ())))
        monkeypatch.setattr(dist, "all_gather_object", self.all_gather_object)
        for name in TENSOR_COLLECTIVES:
            monkeypatch.setattr(dist, name, self.tensor_collective(name))

    def init_process_group(self, backend=None, **kwargs):
        self.config = str(BackendConfig(Backend(backend)))

    def served(self) -> dict[str, str]:
        return {pair.split(":")[0]: pair.split(":")[1] for pair in self.config.split(",")}

    def tensor_collective(self, name):
        def collective(*args, **kwargs):
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
            for tensor in tensors:
                assert tensor.device.type in self.served(), (
                    f"{name} of a {tensor.device.type} tensor on a {self.config} group: no backend serves it")
            self.calls.append((name, tuple(t.device.type for t in tensors)))
            if name == "all_reduce":
                tensors[0].mul_(self.world_size)  # the sum over identical ranks

        return collective

    def all_gather_object(self, parts, obj, group=None):
        self.calls.append(("all_gather_object", ()))  # torch moves the pickle to the right device
        parts[:] = [obj] * self.world_size


@pytest.fixture
def torchrun_env(monkeypatch):
    for key, value in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(key, value)


def test_every_collective_on_cuda_uses_a_backend_that_serves_its_tensors(monkeypatch, torchrun_env):
    group = FakeProcessGroup(monkeypatch, cuda=True)
    ctx = init_from_env()
    # the gradients (DDP, SyncBatchNorm: CUDA tensors) still go over NCCL
    assert group.served() == {"cpu": "gloo", "cuda": "nccl"}
    assert group.devices_set == [1] and ctx.local_rank == 1 and ctx.world_size == 2
    assert ctx.mean(0.25) == pytest.approx(0.25)
    assert ctx.gather_concat(np.arange(3)).tolist() == [0, 1, 2] * 2
    ctx.barrier()
    assert [name for name, _ in group.calls] == ["all_reduce", "all_gather_object", "barrier"]


def test_the_check_catches_a_cpu_all_reduce_on_a_pure_nccl_group(monkeypatch, torchrun_env):
    # what init_from_env did before: backend="nccl", then a CPU float64 all-reduce
    FakeProcessGroup(monkeypatch, cuda=True, initialized_as="nccl")
    with pytest.raises(AssertionError, match="cpu tensor on a cuda:nccl group"):
        DistContext(rank=1, world_size=2, local_rank=1, device="cpu").mean(0.5)


def test_a_group_initialised_elsewhere_as_pure_nccl_gets_its_collectives_on_the_gpu(monkeypatch, torchrun_env):
    FakeProcessGroup(monkeypatch, cuda=True, initialized_as="nccl")
    assert init_from_env().device == "cuda:1"


def test_cpu_training_joins_a_gloo_group_and_reduces_on_the_cpu(monkeypatch, torchrun_env):
    group = FakeProcessGroup(monkeypatch, cuda=False)
    ctx = init_from_env()
    assert group.served() == {"cpu": "gloo", "cuda": "gloo"} and ctx.device == "cpu"
    assert ctx.mean(3.0) == pytest.approx(3.0)
    assert group.devices_set == []


@pytest.mark.parametrize("config, rank, expected", [
    ("cpu:gloo,cuda:nccl", 3, "cpu"), ("cuda:nccl", 3, "cuda:3"), ("cpu:gloo,cuda:gloo", 0, "cpu")])
def test_collective_device_follows_the_backend_map(config, rank, expected):
    assert collective_device(config, rank) == expected
    assert set(backend_map(config)) <= {"cpu", "cuda"}


def test_single_process_makes_no_collective_at_all(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    group = FakeProcessGroup(monkeypatch, cuda=True)
    ctx = init_from_env()
    assert ctx.mean(2.0) == 2.0 and ctx.gather_concat(np.ones(2)).tolist() == [1.0, 1.0]
    ctx.barrier()
    assert group.calls == [] and group.config is None


def test_no_pipeline_module_calls_a_collective_outside_distributed_py():
    """The pairing test above covers every collective only if they all go through DistContext
    (DDP and SyncBatchNorm run theirs on the model's device, which NCCL serves)."""
    pattern = re.compile(r"torch\.distributed\.(?!DistributedSampler)\w+|import torch\.distributed|"
                         r"from torch import distributed")
    offenders = [f"{path.name}: {match}" for path in PIPELINE.rglob("*.py") if path.name != "distributed.py"
                 for match in pattern.findall(path.read_text(encoding="utf-8"))]
    assert offenders == []
    assert distributed.process_group_backend(True) == "cpu:gloo,cuda:nccl"
