"""Where a :class:`~denseseg.inference.Segmenter`'s forward pass runs.

A runtime is a callable ``x -> logits``: a normalised float32 batch ``(N, C, H, W)`` on the
Segmenter's device in, the model's logits ``(N, K, H', W')`` out. The Segmenter does everything
else (normalisation, modes, tiling, test-time augmentation, arg-max) the same way for every
runtime, so each of them works with every mode and TTA.

Backends:

* ``"torch"``: the model itself, eager (default), or a faster torch path with ``fast``
  (:mod:`denseseg.inference.fast`).
* ``"onnxruntime"``, ``"openvino"``: the model exported to ONNX and run by that runtime
  (:mod:`denseseg.inference.onnx_backends`; optional extras ``denseseg[onnx]``,
  ``denseseg[openvino]``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from denseseg.errors import ConfigError
from denseseg.inference.fast import FrozenTraces

BACKENDS = ("torch", "onnxruntime", "openvino")

Runtime = Callable[[Tensor], Tensor]


class EagerRuntime:
    """The model called as it is, under float16 autocast on CUDA when ``amp``."""

    def __init__(self, model: nn.Module, device: torch.device, amp: bool = False) -> None:
        self.model = model
        self.device = device
        self.amp = amp

    def __call__(self, x: Tensor) -> Tensor:
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
            return self.model(x)["out"]


def make_runtime(
    model: nn.Module,
    device: torch.device,
    *,
    backend: str = "torch",
    fast: bool = False,
    amp: bool = False,
    precision: str = "fp32",
) -> Runtime:
    """The runtime running ``model`` (in eval mode, on ``device``) for a Segmenter.

    Args:
        model: the model, returning ``{"out": logits}``.
        device: the device it is on.
        backend: one of :data:`BACKENDS`.
        fast: for the torch backend, the fastest torch path instead of eager.
        amp: float16 autocast on CUDA (torch backend, eager).
        precision: ``"fp32"`` or ``"bf16"``.

    Raises:
        ConfigError: an unknown backend.
    """
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; choose {', '.join(BACKENDS)}")
    if backend != "torch":
        from denseseg.inference.onnx_backends import onnx_runtime

        return onnx_runtime(model, device, backend)
    if fast and not amp:
        return FrozenTraces(model)
    return EagerRuntime(model, device, amp)
