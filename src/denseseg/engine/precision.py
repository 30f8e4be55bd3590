"""Mixed precision for training: which autocast type a recipe's ``train.precision`` means.

``auto`` is bfloat16 on GPUs that have it (Ampere and later), float16 with a gradient scaler on
older CUDA GPUs, and float32 elsewhere; ``bf16`` on a CPU runs the convolutions and matrix
products in bfloat16 while the weights, the optimiser and the loss stay float32, as autocast
does on CUDA; it pays only on CPUs with bfloat16 instructions (AVX512-BF16, AMX): elsewhere it
is emulated and several times slower than float32, and a warning says so. ``fp16`` needs
CUDA: its gradient scaler is what keeps small gradients from vanishing. See
``benchmarks/train_speed.md`` for what each costs and gains.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch

from denseseg.errors import ConfigError

log = logging.getLogger("denseseg")

__all__ = ["Precision", "cpu_has_bf16", "resolve_precision"]

_NAMES = {None: "float32", torch.bfloat16: "bfloat16 autocast", torch.float16: "float16 autocast"}


@dataclass(frozen=True)
class Precision:
    """What autocast runs in (``dtype`` None: plain float32) and whether a scaler is needed."""

    dtype: torch.dtype | None
    device_type: str

    @property
    def scaled(self) -> bool:
        """float16 needs a gradient scaler; bfloat16 has float32's range and does not."""
        return self.dtype is torch.float16

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def __str__(self) -> str:
        return _NAMES[self.dtype]


def resolve_precision(name: str, device: torch.device, amp: bool = True) -> Precision:
    """The :class:`Precision` of ``train.precision`` on ``device`` (``train.amp: false``, the
    old spelling, makes ``auto`` float32); a type the device cannot run is one ConfigError."""
    cuda = device.type == "cuda"
    if name == "auto":
        if not amp or not cuda:
            return Precision(None, device.type)
        bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
        return Precision(torch.bfloat16 if bf16 else torch.float16, device.type)
    if name == "fp32":
        return Precision(None, device.type)
    if name == "fp16" and not cuda:
        raise ConfigError(
            f"train.precision=fp16 needs a CUDA device (training on {device.type}); use bf16 "
            "or fp32"
        )
    if name == "bf16" and cuda and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise ConfigError(
            "train.precision=bf16: this GPU has no bfloat16 support; use fp16 or auto"
        )
    if name == "bf16" and device.type not in ("cuda", "cpu"):
        raise ConfigError(f"train.precision=bf16 is not supported on {device.type}; use fp32")
    if name not in ("bf16", "fp16"):
        raise ConfigError(f"train.precision={name!r}: use auto, fp32, bf16 or fp16")
    if name == "bf16" and device.type == "cpu" and not cpu_has_bf16():
        log.warning(
            "train.precision=bf16: this CPU has no bfloat16 instructions (AVX512-BF16 or AMX; "
            "it has %s), so bfloat16 runs emulated, several times slower than fp32",
            torch.backends.cpu.get_cpu_capability(),
        )
    return Precision(torch.bfloat16 if name == "bf16" else torch.float16, device.type)


def cpu_has_bf16() -> bool:
    """Whether oneDNN runs bfloat16 natively on this CPU (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False
