"""The fastest CPU inference path: a frozen TorchScript trace per input shape.

``torch.jit.optimize_for_inference`` freezes the traced weights, folds batch norm into the
convolutions before it, and lets oneDNN pick convolution layouts; on a CPU that is several times
faster than eager PyTorch for the mobile networks (see ``benchmarks/inference_speed.py``). A trace
records the input's shape (the models resize to it), so one trace is kept per shape.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict

import torch
from torch import Tensor, nn


class _LogitsOnly(nn.Module):
    # TorchScript traces tensors, not dicts: return the "out" entry alone.
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)["out"]


class FrozenTraces:
    """Callable ``x (N, C, H, W) -> logits`` running a frozen trace of ``model`` for x's shape.

    The weights are captured when a shape is first seen: build it from a trained model in eval
    mode, never while training. Keeps the ``max_shapes`` most recently used traces.
    """

    def __init__(self, model: nn.Module, max_shapes: int = 8) -> None:
        self.model = _LogitsOnly(model).eval()
        self.max_shapes = max_shapes
        self._traces: OrderedDict[tuple, torch.jit.ScriptModule] = OrderedDict()

    def __len__(self) -> int:
        return len(self._traces)

    def __call__(self, x: Tensor) -> Tensor:
        key = (tuple(x.shape), x.dtype, x.device)
        trace = self._traces.get(key)
        if trace is None:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")  # TorchScript's deprecation and tracer notes
                trace = torch.jit.optimize_for_inference(
                    torch.jit.trace(self.model, x, check_trace=False)
                )
            self._traces[key] = trace
            if len(self._traces) > self.max_shapes:
                self._traces.popitem(last=False)
        else:
            self._traces.move_to_end(key)
        with torch.no_grad():
            return trace(x)
