"""Small building blocks shared by the models."""

from denseseg.layers.conv import ConvNormAct, he_normal_

__all__ = ["ConvNormAct", "he_normal_"]
