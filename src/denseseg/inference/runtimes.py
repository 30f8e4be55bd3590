"""Where a :class:`~denseseg.inference.Segmenter`'s forward pass runs.

A runtime is a callable ``x -> logits``: a normalised float32 batch ``(N, C, H, W)`` on the
Segmenter's device in, the model's logits ``(N, K, H', W')`` out. The Segmenter does everything
else (normalisation, modes, tiling, test-time augmentation, arg-max) the same way for every
runtime, so each of them works with every mode and TTA.

Backends:

* ``"torch"``: the model itself, eager (default), or a faster torch path with ``fast``
  (:mod:`denseseg.inference.fast`: ``"channels_last"``, ``"trace"``, ``"compile"``), in float32
  or bfloat16 autocast (``precision``).
* ``"onnxruntime"``, ``"openvino"``: the model exported to ONNX and run by that runtime
  (:mod:`denseseg.inference.onnx_backends`; optional extras ``denseseg[onnx]``,
  ``denseseg[openvino]``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import Tensor, nn

from denseseg.choices import BACKENDS
from denseseg.errors import ConfigError
from denseseg.inference.fast import PATHS, EagerRuntime, autocast_dtype, torch_runtime

__all__ = ["BACKENDS", "DEFAULT_FAST_PATH", "EagerRuntime", "fast_path", "make_runtime"]

log = logging.getLogger("denseseg")

DEFAULT_FAST_PATH = "trace"
"""The torch path of ``fast=True`` for a model with no measured configuration."""

Runtime = Callable[[Tensor], Tensor]


def fast_path(fast: bool | str) -> str:
    """The torch path (one of :data:`~denseseg.inference.fast.PATHS`) ``fast`` names:
    ``False`` -> ``"eager"``, ``True`` -> :data:`DEFAULT_FAST_PATH`, a path name as it is.

    Raises:
        ConfigError: an unknown path name.
    """
    if fast is False or fast is None:
        return "eager"
    if fast is True:
        return DEFAULT_FAST_PATH
    if isinstance(fast, str) and fast in PATHS:
        return fast
    raise ConfigError(f"unknown fast path {fast!r}; choose {', '.join(PATHS)} (or True/False)")


def make_runtime(
    model: nn.Module,
    device: torch.device,
    *,
    backend: str = "torch",
    fast: bool | str = False,
    amp: bool = False,
    precision: str = "fp32",
) -> Runtime:
    """The runtime running ``model`` (in eval mode, on ``device``) for a Segmenter.

    Args:
        model: the model, returning ``{"out": logits}``.
        device: the device it is on.
        backend: one of :data:`BACKENDS`.
        fast: for the torch backend, the torch path: ``False`` (eager), ``True`` (the default
            fast path, :data:`DEFAULT_FAST_PATH`; a packed model's measured one is resolved by
            the loader before) or a path name (``"eager"``, ``"channels_last"``, ``"trace"``,
            ``"compile"``).
        amp: float16 autocast on CUDA (torch backend, eager; wins over ``fast``).
        precision: ``"fp32"`` or ``"bf16"`` (torch: bfloat16 autocast, on a CPU without
            bfloat16 instructions emulated, and slow: a warning says so; OpenVINO: its bf16
            inference precision; ONNX Runtime: fp32 only).

    Raises:
        ConfigError: an unknown backend, torch path or precision, or bf16 on a device that
            lacks it.
    """
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; choose {', '.join(BACKENDS)}")
    if backend != "torch":
        from denseseg.inference.onnx_backends import check_backend_precision, onnx_runtime

        _refuse_torch_options(backend, fast)
        check_backend_precision(backend, precision)
        return onnx_runtime(model, device, backend, precision)
    path = fast_path(fast)
    if amp:
        return EagerRuntime(model, device, amp=True)
    if autocast_dtype(precision, device) is not None and device.type == "cpu":
        warn_if_bf16_emulated()
    return torch_runtime(model, device, path, precision)


def _refuse_torch_options(backend: str, fast: bool | str) -> None:
    """``fast`` chooses a torch path; another backend would ignore it."""
    if fast_path(fast) != "eager":
        raise ConfigError(
            f"fast={fast!r} (--fast) picks a torch path; backend {backend} has its own graph "
            "optimisations: leave out --fast"
        )


_warned: list[bool] = []


def warn_if_bf16_emulated() -> None:
    """Warn once per process when this CPU runs bfloat16 emulated (no AVX512-BF16 or AMX)."""
    # Imported here: denseseg.engine imports the Segmenter, which imports this module.
    from denseseg.engine.precision import cpu_has_bf16

    if _warned or cpu_has_bf16():
        return
    _warned.append(True)
    log.warning(
        "precision bf16: this CPU has no bfloat16 instructions (it has %s), so bfloat16 runs "
        "emulated, usually slower than fp32",
        torch.backends.cpu.get_cpu_capability(),
    )
