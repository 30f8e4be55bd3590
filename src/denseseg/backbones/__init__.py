"""Backbones (feature extractors). Each module below registers its builders on import."""

# Importing registers: mobilenet_v3_large; resnet18/34/50/101; timm; vgg16, vgg16_bn, alexnet.
from denseseg.backbones import mobilenet, resnet, timm_backbone, vgg  # noqa: F401
from denseseg.backbones._registry import (
    FeatureInfo,
    create_backbone,
    list_backbones,
    register_backbone,
)

__all__ = ["FeatureInfo", "create_backbone", "list_backbones", "register_backbone"]
