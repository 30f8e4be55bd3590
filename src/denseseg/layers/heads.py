"""Small segmentation heads: the FCN head (also DeepLab's auxiliary head) and LR-ASPP."""

from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from denseseg.layers.conv import ConvNormAct


class FCNHead(nn.Module):
    """3x3 conv-BN-ReLU to a quarter of the channels, dropout, 1x1 class scores.

    torchvision's ``FCNHead``: the head of its ``fcn_resnet*`` models and the auxiliary head on
    ``layer3`` of its FCN and DeepLab models.

    Args:
        in_channels: input channels C.
        num_classes: classes K.
        channels: inner channels (default ``C // 4``).
        dropout: dropout before the classifier.

    Shapes:
        ``(N, C, H, W) -> (N, K, H, W)``.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        channels: int | None = None,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        channels = channels or max(1, in_channels // 4)
        self.block = ConvNormAct(in_channels, channels, 3)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        """Class scores at the input's resolution."""
        return self.classifier(self.dropout(self.block(x)))


class LRASPPHead(nn.Module):
    """Lite R-ASPP (Howard et al., "Searching for MobileNetV3", 2019), as in torchvision.

    The high-level map goes through a 1x1 conv-BN-ReLU, gated channel-wise by a sigmoid of its
    globally pooled 1x1 projection (squeeze-and-excitation style), is up-sampled to the low-level
    map's size and classified; the low-level map's own 1x1 class scores are added.

    Args:
        low_channels: channels of the low-level (stride 8) map.
        high_channels: channels of the high-level (stride 16) map.
        num_classes: classes K.
        inter_channels: width of the high-level branch (128).

    Shapes:
        ``low (N, C_low, H, W), high (N, C_high, h, w) -> (N, K, H, W)``.
    """

    def __init__(
        self, low_channels: int, high_channels: int, num_classes: int, inter_channels: int = 128
    ) -> None:
        super().__init__()
        self.cbr = ConvNormAct(high_channels, inter_channels, 1)
        self.scale = nn.Conv2d(high_channels, inter_channels, 1, bias=False)
        self.low_classifier = nn.Conv2d(low_channels, num_classes, 1)
        self.high_classifier = nn.Conv2d(inter_channels, num_classes, 1)

    def forward(self, low: Tensor, high: Tensor) -> Tensor:
        """Class scores at the low-level map's resolution."""
        x = self.cbr(high) * self.scale(F.adaptive_avg_pool2d(high, 1)).sigmoid()
        x = F.interpolate(x, size=low.shape[-2:], mode="bilinear", align_corners=False)
        return self.low_classifier(low) + self.high_classifier(x)
