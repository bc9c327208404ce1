"""Where and how tensors run: device, autocast precision, memory format, threads.

One place decides the fast path so train, predict and the benchmarks agree:
- CUDA: AMP, channels_last, cudnn.benchmark. `precision: auto` is bf16 only where the GPU
  computes bf16 natively (Ampere and later: A100, L4, H100/H200); elsewhere (Kaggle's T4,
  P100, V100, whose bf16 is emulated and slower than fp32) fp16 with a GradScaler, whose
  state last.pt carries so a resumed run scales its losses as the uninterrupted one would.
- CPU: bf16 autocast when the CPU has native bf16 (AVX-512 BF16 / AMX; measured
  ~2.5x fp32 training speed on a small UNet here) and channels_last (~1.5x).

Precision names (set_cuda_flags): "off" is fp32 throughout with TF32 disabled, so matmuls and
convolutions keep fp32's 23 mantissa bits; "tf32" is fp32 storage with TF32 tensor-core maths
(10 mantissa bits); "bf16" / "fp16" autocast (the ops left in fp32 may use TF32).

channels_last "auto" is on for the CPU and for GPUs of compute capability 7.0 and later (tensor
cores: V100, T4, A100, H100); below that (P100, 6.0) NHWC convolutions have no fast cuDNN
kernels, so "auto" keeps NCHW there.

What is promised on CUDA (the CPU is exact: resumed == uninterrupted, bit for bit):
by default cudnn.benchmark picks the fastest convolution algorithms per run and several
backward kernels accumulate with atomics, so two runs, or a resumed and an uninterrupted
one, agree only to within training noise. `deterministic=True` (the config's
`deterministic`) makes them repeat bit for bit on the same GPU model and software:
deterministic cuDNN algorithms without benchmarking, torch.use_deterministic_algorithms
(an op without a deterministic kernel raises, naming itself), a fixed cuBLAS workspace
(CUBLAS_WORKSPACE_CONFIG), and the hypercolumn's bilinear upsampling done as two matmuls
(pipeline/models/blocks.py) because its CUDA backward has no deterministic kernel. Slower:
measure before using it for a long run.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from typing import Sequence

import torch

from pipeline.config import PRECISIONS
from pipeline.errors import PipelineError


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    amp_dtype: torch.dtype | None  # None = fp32
    channels_last: bool

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def to_input(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=self.memory_format())

    def grad_scaler(self) -> torch.amp.GradScaler:
        # Only fp16 needs loss scaling; bf16 has fp32's exponent range.
        return torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)

    @property
    def precision(self) -> str:
        """The resolved precision ("auto" no more): fp32, tf32, bf16 or fp16."""
        precision = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.amp_dtype]
        if self.is_cuda and self.amp_dtype is None and torch.backends.cuda.matmul.allow_tf32:
            precision = "tf32"
        return precision

    def describe(self) -> str:
        precision = self.precision
        name = torch.cuda.get_device_name(self.device) if self.is_cuda else "cpu"
        threads = "" if self.is_cuda else f", {torch.get_num_threads()} threads"
        return f"{name} ({precision}{', channels_last' if self.channels_last else ''}{threads})"


def cpu_has_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def cuda_has_native_bf16() -> bool:
    """bf16 in hardware (compute capability 8.0+), not the emulation torch also accepts."""
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # torch < 2.3 has no including_emulation (and counted only native bf16)
        return bool(torch.cuda.is_bf16_supported())


# cuBLAS's documented setting for reproducible results (its default workspace is per stream
# and makes split-K reductions depend on scheduling); must be set before cuBLAS starts
CUBLAS_DETERMINISTIC_WORKSPACE = ":4096:8"


def amp_dtype_for(precision: str, device_type: str) -> torch.dtype | None:
    if precision not in PRECISIONS:
        raise PipelineError(f"train.precision {precision!r}: choose one of {list(PRECISIONS)}")
    if precision in ("off", "tf32"):
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if device_type == "cuda":
        return torch.bfloat16 if cuda_has_native_bf16() else torch.float16
    return torch.bfloat16 if cpu_has_bf16() else None


def set_cuda_flags(precision: str, deterministic: bool) -> None:
    """The process-wide CUDA switches: TF32 (never for "off") and the reproducibility flags."""
    tf32 = precision != "off"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_DETERMINISTIC_WORKSPACE)
    torch.use_deterministic_algorithms(deterministic)


def arch_covers(capability: tuple[int, int], arch_list: Sequence[str]) -> bool:
    """Whether a torch build for `arch_list` (torch.cuda.get_arch_list(): "sm_75", "sm_90a",
    "compute_120") has kernels a GPU of this compute capability runs. A cubin (sm_XY) runs on
    major X at minor >= Y; PTX (compute_XY) is compiled on the fly for any capability >= X.Y;
    an arch-specific one ("sm_90a") only on X.Y itself. An empty list (unknown) covers all."""
    if not arch_list:
        return True
    for arch in arch_list:
        match = re.fullmatch(r"(sm|compute)_(\d+)(\d)([a-z]?)", arch)
        if not match:
            continue
        kind, built = match.group(1), (int(match.group(2)), int(match.group(3)))
        if match.group(4) == "a":
            covered = capability == built
        elif kind == "compute":
            covered = capability >= built
        else:
            covered = capability[0] == built[0] and capability[1] >= built[1]
        if covered:
            return True
    return False


def check_gpu_supported(dev: torch.device) -> None:
    """Stop in one line on a GPU this torch has no kernels for (Kaggle's P100 under its
    torch): torch.cuda.is_available() is True there, and the first kernel launch fails."""
    arch_list = torch.cuda.get_arch_list()
    if not arch_list:  # a build without CUDA: nothing to compare (tests patch CUDA in)
        return
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    capability = tuple(torch.cuda.get_device_capability(index))
    if arch_covers(capability, arch_list):
        return
    from pipeline.kaggle import PICK_A_GPU

    name = torch.cuda.get_device_name(index)
    raise PipelineError(f"GPU {index} ({name}, compute capability {capability[0]}.{capability[1]}, "
                        f"sm_{capability[0]}{capability[1]}): this torch {torch.__version__} has no kernels for it "
                        f"(built for {' '.join(arch_list)}); on Kaggle {PICK_A_GPU}, elsewhere a newer GPU "
                        "or a torch built for it")


# NHWC convolutions run on tensor cores (Volta, 7.0, and later); older GPUs have no fast kernels for them
CHANNELS_LAST_MIN_CAPABILITY = (7, 0)


def channels_last_for(setting: str, device: torch.device) -> bool:
    """train.channels_last: "on", "off", or "auto" (the CPU, and GPUs of CHANNELS_LAST_MIN_CAPABILITY+)."""
    if setting != "auto":
        return setting == "on"
    if device.type != "cuda":
        return True
    return tuple(torch.cuda.get_device_capability(device)) >= CHANNELS_LAST_MIN_CAPABILITY


def resolve_runtime(precision: str = "auto", channels_last: str = "auto", device: str | None = None,
                    threads: int = 0, deterministic: bool = False) -> Runtime:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise PipelineError(f"device {device!r} requested but CUDA is not available on this machine")
    try:
        dev = torch.device(device)
    except RuntimeError:  # "Expected one of cpu, cuda, ... device type at start of device string"
        raise PipelineError(f"device {device!r}: expected cpu, cuda or cuda:<index>") from None
    if dev.type not in ("cpu", "cuda"):
        raise PipelineError(f"device {device!r}: expected cpu, cuda or cuda:<index>")
    if dev.type == "cuda":
        check_gpu_supported(dev)
    amp_dtype = amp_dtype_for(precision, dev.type)
    if dev.type == "cpu":
        torch.set_num_threads(threads or os.cpu_count() or 1)
    else:
        set_cuda_flags(precision, deterministic)

    use_channels_last = channels_last_for(channels_last, dev)
    return Runtime(device=dev, amp_dtype=amp_dtype, channels_last=use_channels_last)
