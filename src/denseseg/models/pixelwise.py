"""Per-pixel classifier: the "naive method" that labels each pixel from its own colour alone.

Only 1x1 convolutions, so the receptive field is a single pixel: a baseline that shows how much a
segmentation model gains from context.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn as nn
from torch import Tensor

from denseseg.errors import ConfigError
from denseseg.layers import ConvNormAct, he_normal_
from denseseg.models._registry import register_model
from denseseg.models.base import check_positive_ints


class PixelwiseClassifier(nn.Module):
    """An MLP applied to every pixel independently (1x1 convolutions with ReLU between).

    Args:
        num_classes: output channels; 1 means binary (one logit, sigmoid at prediction).
        in_channels: input image channels.
        hidden: widths of the hidden layers; ``()`` gives a linear classifier.

    Forward:
        ``x (N, in_channels, H, W) -> {"out": logits (N, num_classes, H, W)}``.
    """

    padding = "same"

    def __init__(
        self, num_classes: int, in_channels: int = 3, hidden: Sequence[int] = (64, 64)
    ) -> None:
        super().__init__()
        hidden = tuple(hidden)
        check_positive_ints("pixelwise", num_classes=num_classes, in_channels=in_channels)
        if any(not isinstance(h, int) or h < 1 for h in hidden):
            raise ConfigError(f"pixelwise option hidden={hidden!r} must hold integers >= 1")
        self.num_classes = num_classes
        self.in_channels = in_channels
        widths = [in_channels, *hidden]
        self.body = nn.Sequential(
            *(ConvNormAct(a, b, 1, norm=None) for a, b in zip(widths[:-1], widths[1:]))
        )
        self.head = nn.Conv2d(widths[-1], num_classes, 1)
        he_normal_(self)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Classify every pixel of ``x (N, in_channels, H, W)``; returns ``{"out": logits}``."""
        return {"out": self.head(self.body(x))}


@register_model(
    "pixelwise",
    test_cfg={"hidden": (8,)},
    description="per-pixel MLP on the colour alone (no context): the naive baseline",
)
def pixelwise(
    num_classes: int, in_channels: int = 3, hidden: Sequence[int] = (64, 64)
) -> PixelwiseClassifier:
    """Per-pixel classifier of 1x1 convolutions."""
    return PixelwiseClassifier(num_classes, in_channels, hidden)
