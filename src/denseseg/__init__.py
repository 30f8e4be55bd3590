"""denseseg: semantic and instance segmentation with PyTorch.

Public API::

    import denseseg
    model = denseseg.create_model("unet", num_classes=5, in_channels=3)
    denseseg.list_models()
    seg = denseseg.load_model("runs/demo/unet/best.pt")   # a ready Segmenter
    labels = seg.predict(image_uint8_chw)
    metrics = denseseg.SegmentationMetrics(num_classes=5)
    denseseg.train(denseseg.load_config("unet_demo", ["train.max_steps=100"]))

The names are imported on first use (a module-level ``__getattr__``), so ``import denseseg``
and ``denseseg --help`` do not load torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# name -> the module that defines it
_LAZY = {
    "load_model": "denseseg.api",
    "Config": "denseseg.config",
    "load_config": "denseseg.config",
    "train": "denseseg.engine.trainer",
    "CheckpointError": "denseseg.errors",
    "ConfigError": "denseseg.errors",
    "DataError": "denseseg.errors",
    "DensesegError": "denseseg.errors",
    "Segmenter": "denseseg.inference.segmenter",
    "SegmentationMetrics": "denseseg.metrics",
    "create_model": "denseseg.models",
    "list_models": "denseseg.models",
}

__all__ = [
    "CheckpointError",
    "Config",
    "ConfigError",
    "DataError",
    "DensesegError",
    "SegmentationMetrics",
    "Segmenter",
    "create_model",
    "list_models",
    "load_config",
    "load_model",
    "train",
    "__version__",
]

if TYPE_CHECKING:
    from denseseg.api import load_model
    from denseseg.config import Config, load_config
    from denseseg.engine.trainer import train
    from denseseg.errors import CheckpointError, ConfigError, DataError, DensesegError
    from denseseg.inference.segmenter import Segmenter
    from denseseg.metrics import SegmentationMetrics
    from denseseg.models import create_model, list_models


def __getattr__(name: str) -> Any:
    """Import a public name on first use."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'denseseg' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next access skips this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
