"""pipeline.runtime: precision choice per GPU capability (patched queries: no GPU needed), what
`precision: off` and `deterministic` switch, and the deterministic bilinear upsampling."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from pipeline import runtime
from pipeline.errors import PipelineError
from pipeline.models.blocks import bilinear_resize, bilinear_weights
from pipeline.runtime import resolve_runtime, set_cuda_flags


@pytest.fixture
def cuda_flags(monkeypatch):
    """Restore the process-wide switches the tests flip."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark,
             torch.backends.cudnn.deterministic, torch.are_deterministic_algorithms_enabled())
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    yield
    (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark,
     torch.backends.cudnn.deterministic) = saved[:4]
    torch.use_deterministic_algorithms(saved[4])


# torch.cuda.get_arch_list() of a torch 2.10 CUDA 12.8 build (Kaggle's): Turing and newer
KAGGLE_TORCH_ARCHS = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]


def fake_gpu(monkeypatch, *, native_bf16: bool, capability: tuple[int, int] | None = None,
             name: str = "Tesla T4", arch_list: list[str] = KAGGLE_TORCH_ARCHS):
    """A CUDA machine whose GPU has (A100, H100) or lacks (T4, V100, P100) bf16 in hardware: torch
    reports emulated bf16 as supported unless including_emulation=False. capability: the GPU's
    compute capability (default 8.0 with native bf16, else the T4's 7.5)."""
    capability = capability or ((8, 0) if native_bf16 else (7, 5))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: native_bf16 or including_emulation)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: list(arch_list))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)


@pytest.mark.parametrize("capability, arch_list, covered", [
    ((6, 0), KAGGLE_TORCH_ARCHS, False),              # P100 under Kaggle's torch
    ((7, 5), KAGGLE_TORCH_ARCHS, True),               # T4
    ((8, 9), KAGGLE_TORCH_ARCHS, True),               # L4: sm_86 cubins run on 8.9
    ((7, 0), KAGGLE_TORCH_ARCHS, False),              # V100: no sm_70, and cubins never run on an older minor
    ((9, 0), ["sm_80", "sm_90a"], True),              # arch-specific cubin, its own GPU
    ((10, 0), ["sm_80", "sm_90a"], False),            # ... and no other; sm_80 is major 8 only
    ((10, 0), ["sm_80", "compute_90"], True),         # PTX is compiled for any newer GPU
    ((6, 1), ["sm_60", "sm_70"], True),               # a torch built for Pascal
    ((6, 0), ["sm_61"], False),
    ((12, 0), [], True),                              # unknown: let CUDA decide
])
def test_arch_covers_follows_cudas_cubin_and_ptx_rules(capability, arch_list, covered):
    assert runtime.arch_covers(capability, arch_list) is covered


def test_a_gpu_torch_has_no_kernels_for_stops_in_one_line_naming_it_and_what_to_pick(monkeypatch, cuda_flags):
    fake_gpu(monkeypatch, native_bf16=False, capability=(6, 0), name="Tesla P100-PCIE-16GB")
    with pytest.raises(PipelineError) as caught:
        resolve_runtime("auto", "auto", None)  # the default device: CUDA, as it is available
    line = str(caught.value)
    assert "\n" not in line and "Tesla P100-PCIE-16GB" in line and "sm_60" in line
    assert "T4 x2 or L4" in line and "sm_75" in line


def test_a_gpu_torch_was_built_for_passes_the_check(monkeypatch, cuda_flags):
    fake_gpu(monkeypatch, native_bf16=True, capability=(8, 9), name="NVIDIA L4")
    assert resolve_runtime("auto", "auto", "cuda:0").amp_dtype == torch.bfloat16


@pytest.mark.parametrize("native_bf16, expected", [(True, torch.bfloat16), (False, torch.float16)])
def test_auto_precision_is_bf16_only_on_gpus_with_native_bf16(monkeypatch, cuda_flags, native_bf16, expected):
    fake_gpu(monkeypatch, native_bf16=native_bf16)
    rt = resolve_runtime("auto", "auto", "cuda")
    assert rt.amp_dtype == expected and rt.channels_last


@pytest.mark.parametrize("capability, setting, expected", [
    ((6, 0), "auto", False),  # P100: no fast NHWC convolutions
    ((6, 1), "auto", False),
    ((7, 0), "auto", True),  # V100
    ((7, 5), "auto", True),  # T4
    ((9, 0), "auto", True),
    ((6, 0), "on", True),  # asked for: kept
    ((9, 0), "off", False)])
def test_channels_last_auto_is_off_below_compute_capability_7(monkeypatch, cuda_flags, capability, setting, expected):
    # a torch built for these older GPUs too (Kaggle's is not: see the arch check's tests)
    fake_gpu(monkeypatch, native_bf16=capability >= (8, 0), capability=capability,
             arch_list=["sm_60", "sm_61", "sm_70", *KAGGLE_TORCH_ARCHS])
    assert resolve_runtime("fp16", setting, "cuda").channels_last is expected


def test_channels_last_auto_is_on_for_the_cpu():
    assert resolve_runtime("off", "auto", "cpu", 1).channels_last


def test_fp16_gets_an_enabled_grad_scaler_and_bf16_and_fp32_none():
    def scaler(precision):
        return resolve_runtime(precision, "off", "cpu", 1).grad_scaler().is_enabled()

    assert scaler("fp16") and not scaler("bf16") and not scaler("off")


@pytest.mark.parametrize("precision, tf32", [("off", False), ("tf32", True), ("auto", True), ("bf16", True)])
def test_precision_off_means_fp32_without_tf32(monkeypatch, cuda_flags, precision, tf32):
    fake_gpu(monkeypatch, native_bf16=True)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not tf32  # a previous run's setting
    rt = resolve_runtime(precision, "off", "cuda")
    assert torch.backends.cuda.matmul.allow_tf32 is tf32 and torch.backends.cudnn.allow_tf32 is tf32
    assert (rt.amp_dtype is None) == (precision in ("off", "tf32"))


def test_unknown_precision_is_a_one_line_error():
    with pytest.raises(PipelineError, match="train.precision 'fp8'"):
        resolve_runtime("fp8", "off", "cpu", 1)


def test_deterministic_sets_cudnn_torch_and_cublas_flags_and_default_is_fast(cuda_flags):
    set_cuda_flags("auto", deterministic=True)
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert torch.are_deterministic_algorithms_enabled()
    import os

    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == runtime.CUBLAS_DETERMINISTIC_WORKSPACE
    set_cuda_flags("auto", deterministic=False)
    assert torch.backends.cudnn.benchmark and not torch.backends.cudnn.deterministic
    assert not torch.are_deterministic_algorithms_enabled()


@pytest.mark.parametrize("source, target", [(8, 128), (16, 128), (64, 128), (101, 128), (7, 13), (128, 101)])
def test_matmul_bilinear_equals_interpolate_and_its_gradient(source, target):
    torch.manual_seed(0)
    x = torch.randn(2, 3, source, source + 1, dtype=torch.float64, requires_grad=True)
    size = (target, target + 2)
    reference = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    rows, cols = bilinear_weights(source, size[0]), bilinear_weights(source + 1, size[1])
    by_matmul = rows @ x @ cols.T
    assert torch.allclose(by_matmul, reference, atol=1e-12)
    weight = torch.randn_like(reference)
    (grad_reference,) = torch.autograd.grad((reference * weight).sum(), x)
    (grad_matmul,) = torch.autograd.grad((by_matmul * weight).sum(), x)
    assert torch.allclose(grad_matmul, grad_reference, atol=1e-12)


def test_bilinear_resize_on_cpu_is_interpolate_bit_for_bit():
    x = torch.randn(1, 2, 16, 16)
    assert torch.equal(bilinear_resize(x, (128, 128)),
                       F.interpolate(x, size=(128, 128), mode="bilinear", align_corners=False))
