"""How the training step computes on its device: autocast precision and memory format.

Measured on a 2-core AVX512-BF16 CPU: for the small CNN with the 1024³ projector, forward +
backward of 512 views takes 635 ms in fp32, 463 ms channels_last, 288 ms channels_last + bf16
autocast; ResNet-18 at 32 px (128 views) 3216 → 1449 ms. The same habits are the standard ones on
a GPU. Losses compute in float32 whatever the autocast (``barlow.losses``). Whole steps against a
plain loop: bench/results/step_cpu.md.
"""

from __future__ import annotations

import contextlib
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from barlow.config import PrecisionName

PRECISIONS: tuple[str, ...] = typing.get_args(PrecisionName)


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bf16 natively on this CPU (AVX512-BF16 or AMX).

    Without it bf16 is emulated and slower than fp32, so ``auto`` stays fp32 there.
    """
    try:
        return bool(
            torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
        )
    except (AttributeError, RuntimeError):  # a build without oneDNN's probe
        return False


@dataclass(frozen=True)
class Precision:
    """Autocast dtype for the forward pass (None: plain fp32); fp16 also needs loss scaling.

    ``auto`` is bf16 where the device computes it natively — a GPU with bf16, a CPU with
    AVX512-BF16/AMX — and fp32 elsewhere.
    """

    dtype: torch.dtype | None

    @classmethod
    def resolve(cls, name: str, device: torch.device) -> Precision:
        if name not in PRECISIONS:
            raise ValueError(
                f"train.precision must be one of {', '.join(PRECISIONS)}, got {name!r}"
            )
        if name == "fp32":
            return cls(None)
        if device.type == "cuda":
            if name == "auto":
                return cls(torch.bfloat16 if torch.cuda.is_bf16_supported() else None)
            return cls(torch.bfloat16 if name == "bf16" else torch.float16)
        if device.type == "cpu":
            native = cpu_has_native_bf16()
            if name == "auto":
                return cls(torch.bfloat16 if native else None)
            if name == "bf16" and native:
                return cls(torch.bfloat16)
            if name == "bf16":
                raise ValueError(
                    "train.precision=bf16: this CPU has no native bf16 (AVX512-BF16 or AMX), so "
                    "bf16 would run emulated and slower than fp32; use train.precision=fp32 or auto"
                )
            raise ValueError(
                "train.precision=fp16 needs a GPU (fp16 autocast on a CPU is emulated); "
                "use train.precision=auto, bf16 or fp32"
            )
        if name == "auto":
            return cls(None)
        raise ValueError(f"train.precision={name} needs a GPU; on {device.type} use fp32 or auto")

    @property
    def name(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager[Any]:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.dtype)


def uses_channels_last(enabled: bool, device: torch.device) -> bool:
    """channels_last pays on CUDA (tensor cores) and on CPU (oneDNN's native layout)."""
    return enabled and device.type in ("cuda", "cpu")


def to_channels_last(model: nn.Module) -> nn.Module:
    """Store 4-d weights (convolutions) as NHWC; other parameters are unchanged."""
    return model.to(memory_format=torch.channels_last)


def images_channels_last(views: list[Tensor]) -> list[Tensor]:
    """Batches of images (N, C, H, W) laid out NHWC; other tensors pass through."""
    return [v.contiguous(memory_format=torch.channels_last) if v.dim() == 4 else v for v in views]


@contextlib.contextmanager
def flush_denormals(device: torch.device) -> Iterator[None]:
    """Flush denormal floats (|x| < 1.2e-38) to zero while training on a CPU.

    Trained weights, gradients and optimizer state come to hold denormals, and x86 handles each
    one in slow microcode: the Fashion-MNIST recipe's step after 3 epochs took 342 ms with them and
    229 ms flushed (254 ms at initialisation). Zeroing values this small changes no result that
    matters. The flag is per thread: this sets it in the calling thread (and in intra-op threads
    created later), which is why the CLI sets it before any tensor work; PyTorch cannot read it
    back, so it is switched off again on exit (its default).
    """
    enabled = device.type == "cpu" and torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if enabled:
            torch.set_flush_denormal(False)
