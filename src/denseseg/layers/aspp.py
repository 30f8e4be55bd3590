"""Atrous spatial pyramid pooling (ASPP): DeepLab v2's summed class scores and v3's feature ASPP."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from denseseg.layers.conv import ActFactory, ConvNormAct, NormFactory


class ASPPv2(nn.Module):
    """DeepLab v2's ASPP (arXiv 1606.00915, "ASPP-L"): parallel 3x3 atrous convolutions, each
    straight to class scores, summed.

    As in the released ResNet-101 model (``fc1_voc12_c0..c3``) every branch has a bias and starts
    from N(0, 0.01) weights and zero biases.

    Args:
        in_channels: input channels C.
        num_classes: classes K.
        rates: dilation of each branch (the paper: 6, 12, 18, 24).

    Shapes:
        ``(N, C, H, W) -> (N, K, H, W)``.
    """

    def __init__(
        self, in_channels: int, num_classes: int, rates: Sequence[int] = (6, 12, 18, 24)
    ) -> None:
        super().__init__()
        self.rates = tuple(int(r) for r in rates)
        self.branches = nn.ModuleList(
            nn.Conv2d(in_channels, num_classes, 3, padding=r, dilation=r) for r in self.rates
        )
        for conv in self.branches:
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Sum of the branches' class scores."""
        out = self.branches[0](x)
        for branch in self.branches[1:]:
            out = out + branch(x)
        return out


class ASPPPooling(ConvNormAct):
    """ASPP's image-level branch: global average pooling, 1x1 conv-norm-act, broadcast back.

    Shapes:
        ``(N, C_in, H, W) -> (N, C_out, H, W)``, constant over ``H, W``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        norm: NormFactory | None = nn.BatchNorm2d,
        act: ActFactory | None = partial(nn.ReLU, inplace=True),
    ) -> None:
        super().__init__(in_channels, out_channels, 1, norm=norm, act=act)

    def forward(self, x: Tensor) -> Tensor:
        """Pool, project, and up-sample to the input's size."""
        size = x.shape[-2:]
        y = super().forward(F.adaptive_avg_pool2d(x, 1))
        # Bilinear from 1x1 is a broadcast; it is written as interpolation so that ONNX export
        # keeps a dynamic output size.
        return F.interpolate(y, size=size, mode="bilinear", align_corners=False)


class ASPP(nn.Module):
    """DeepLab v3's ASPP (arXiv 1706.05587, section 3.3): a 1x1 branch, one 3x3 branch per
    atrous rate and an image-pooling branch, each ``out_channels`` wide with batch norm,
    concatenated and projected by a 1x1 convolution.

    Args:
        in_channels: input channels C_in.
        out_channels: channels of every branch and of the output (the paper: 256).
        rates: atrous rates of the 3x3 branches (6, 12, 18 at output stride 16; doubled at 8).
        image_pooling: include the image-level branch.
        dropout: dropout after the projection (torchvision's layout: 0.5).
        norm: norm factory (``nn.BatchNorm2d``).
        act: activation factory (``nn.ReLU``).

    Submodules: ``branches`` (``[1x1, 3x3 per rate, pooling]``, each a :class:`ConvNormAct`),
    ``project``, ``dropout``.

    Shapes:
        ``(N, C_in, H, W) -> (N, out_channels, H, W)``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int = 256,
        rates: Sequence[int] = (6, 12, 18),
        *,
        image_pooling: bool = True,
        dropout: float = 0.0,
        norm: NormFactory | None = nn.BatchNorm2d,
        act: ActFactory | None = partial(nn.ReLU, inplace=True),
    ) -> None:
        super().__init__()
        self.rates = tuple(int(r) for r in rates)
        branches: list[nn.Module] = [ConvNormAct(in_channels, out_channels, 1, norm=norm, act=act)]
        branches += [
            ConvNormAct(in_channels, out_channels, 3, dilation=r, norm=norm, act=act)
            for r in self.rates
        ]
        if image_pooling:
            branches.append(ASPPPooling(in_channels, out_channels, norm=norm, act=act))
        self.branches = nn.ModuleList(branches)
        self.project = ConvNormAct(
            len(branches) * out_channels, out_channels, 1, norm=norm, act=act
        )
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        """Concatenate the branches and project."""
        return self.dropout(self.project(torch.cat([b(x) for b in self.branches], dim=1)))
