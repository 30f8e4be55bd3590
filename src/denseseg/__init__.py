"""denseseg: semantic and instance segmentation with PyTorch.

Public API::

    import denseseg
    model = denseseg.create_model("unet", num_classes=5, in_channels=3)
    denseseg.list_models()
    seg = denseseg.load_model("runs/demo/unet/best.pt")   # a ready Segmenter
    labels = seg.predict(image_uint8_chw)
    metrics = denseseg.SegmentationMetrics(num_classes=5)
    denseseg.train(denseseg.load_config("unet_demo", ["train.max_steps=100"]))
"""

from denseseg.api import load_model
from denseseg.config import Config, load_config
from denseseg.engine.trainer import train
from denseseg.errors import CheckpointError, ConfigError, DataError, DensesegError
from denseseg.inference.segmenter import Segmenter
from denseseg.metrics import SegmentationMetrics
from denseseg.models import create_model, list_models

__version__ = "0.1.0"

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
