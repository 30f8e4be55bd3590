"""Small building blocks shared by the models."""

from denseseg.layers.aspp import ASPP, ASPPPooling, ASPPv2
from denseseg.layers.conv import ConvNormAct, he_normal_, kaiming_init
from denseseg.layers.heads import FCNHead, LRASPPHead

__all__ = [
    "ASPP",
    "ASPPPooling",
    "ASPPv2",
    "ConvNormAct",
    "FCNHead",
    "LRASPPHead",
    "he_normal_",
    "kaiming_init",
]
