"""Segmentation models; importing this package registers every architecture.

Build one by name with :func:`create_model` (``create_model("unet", num_classes=21)``); every
semantic model returns ``{"out": logits (N, num_classes, H, W)}`` and has the attributes
``num_classes`` and ``in_channels``. ``num_classes=1`` means binary segmentation.
"""

from denseseg.models import pixelwise, unet  # noqa: F401  (import registers the models)
from denseseg.models._registry import create_model, get_model_entry, list_models, register_model
from denseseg.models.pixelwise import PixelwiseClassifier
from denseseg.models.unet import UNet, unet_output_size, unet_valid_input_size

__all__ = [
    "PixelwiseClassifier",
    "UNet",
    "create_model",
    "get_model_entry",
    "list_models",
    "register_model",
    "unet_output_size",
    "unet_valid_input_size",
]
