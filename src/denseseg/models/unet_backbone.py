"""U-Net with a classification network as its contracting path (``unet_resnet34`` and friends).

The paper's U-Net learns its encoder from scratch; practitioners usually swap in a backbone that
was pretrained on ImageNet (as segmentation_models_pytorch's ``Unet(encoder_name=...)``). The
expanding path keeps the paper's scheme - up-sample, concatenate the skip of the same stride, two
3x3 convolutions - on top of whatever levels the backbone reports in ``feature_info``, so no
channel count is hard-coded.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from denseseg.backbones import create_backbone
from denseseg.errors import ConfigError
from denseseg.layers.conv import ConvNormAct


class _UpBlock(nn.Module):
    """Up-sample to the skip's size, concatenate it, two 3x3 conv + BN + ReLU."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = ConvNormAct(
            in_channels + skip_channels, out_channels, 3, norm=nn.BatchNorm2d, act=nn.ReLU
        )
        self.conv2 = ConvNormAct(out_channels, out_channels, 3, norm=nn.BatchNorm2d, act=nn.ReLU)

    def forward(self, x: Tensor, skip: Tensor | None, size: Sequence[int]) -> Tensor:
        x = F.interpolate(x, size=tuple(size), mode="nearest")
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.conv2(self.conv1(x))


class BackboneUNet(nn.Module):
    """U-Net decoder on a registered backbone.

    Args:
        backbone: a backbone module (``list[Tensor]`` ordered by stride, ``feature_info``).
        num_classes: classes K.
        decoder_channels: output channels of the up-sampling blocks, deepest first; one per
            backbone level (the last block, after the shallowest skip, runs at full resolution).

    Shapes:
        ``(N, C, H, W) -> {"out": (N, K, H, W)}`` for any H, W.
    """

    classifier_prefixes = ("head.",)

    def __init__(
        self, backbone: nn.Module, num_classes: int, decoder_channels: Sequence[int]
    ) -> None:
        super().__init__()
        info = list(backbone.feature_info)
        if len(decoder_channels) != len(info):
            raise ConfigError(
                f"unet option decoder_channels has {len(decoder_channels)} values; the backbone "
                f"has {len(info)} levels (strides {[f.reduction for f in info]}), one per level"
            )
        self.backbone = backbone
        self.num_classes = num_classes
        # Skips for every level but the deepest, deepest first; the last block has no skip.
        skips = [f.channels for f in reversed(info[:-1])] + [0]
        chans = [info[-1].channels, *decoder_channels]
        self.blocks = nn.ModuleList(
            _UpBlock(chans[i], skips[i], chans[i + 1]) for i in range(len(decoder_channels))
        )
        self.head = nn.Conv2d(chans[-1], num_classes, 3, padding=1)

    @property
    def in_channels(self) -> int:
        return int(self.backbone.in_channels)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        feats = self.backbone(x)
        y = feats[-1]
        targets = [f.shape[-2:] for f in reversed(feats[:-1])] + [x.shape[-2:]]
        skips = [*reversed(feats[:-1]), None]
        for block, skip, size in zip(self.blocks, skips, targets):
            y = block(y, skip, size)
        return {"out": self.head(y)}


def backbone_unet(
    num_classes: int,
    in_channels: int,
    backbone: str,
    backbone_kwargs: dict[str, Any] | None,
    decoder_channels: Sequence[int] | None,
) -> BackboneUNet:
    """Build a :class:`BackboneUNet`; ``decoder_channels`` defaults to 256, 128, 64, 32, 16 (as
    segmentation_models_pytorch) cut to the backbone's number of levels."""
    kwargs = dict(backbone_kwargs or {})
    trunk = create_backbone(backbone, in_channels=in_channels, **kwargs)
    levels = len(trunk.feature_info)
    if decoder_channels is None:
        decoder_channels = [max(256 // 2**i, 16) for i in range(levels)]
    return BackboneUNet(trunk, num_classes, list(decoder_channels))
