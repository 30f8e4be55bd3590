"""Segmentation models; importing this package registers every architecture.

Build one by name with :func:`create_model` (``create_model("unet", num_classes=21)``); every
semantic model returns ``{"out": logits (N, num_classes, H, W)}`` and has the attributes
``num_classes`` and ``in_channels``. ``num_classes=1`` means binary segmentation.
"""

# Importing registers the models: fcn (fcn32s/16s/8s), deeplab (the papers' DeepLab v2/v3/v3+),
# tv_layouts (torchvision's names), pixelwise, unet, maskrcnn (instance segmentation).
from denseseg.models import bisenetv2, ddrnet, deeplab, fcn, maskrcnn, pixelwise, tv_layouts, unet  # noqa: F401
from denseseg.models._registry import (
    create_model,
    get_model_entry,
    list_models,
    register_model,
    register_variant,
)
from denseseg.models.base import SegmentationModel
from denseseg.models.pixelwise import PixelwiseClassifier
from denseseg.models.unet import UNet, unet_output_size, unet_valid_input_size

__all__ = [
    "PixelwiseClassifier",
    "SegmentationModel",
    "UNet",
    "create_model",
    "get_model_entry",
    "list_models",
    "register_model",
    "register_variant",
    "unet_output_size",
    "unet_valid_input_size",
]
