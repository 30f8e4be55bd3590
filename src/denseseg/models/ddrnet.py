"""DDRNet: deep dual-resolution networks for real-time segmentation of road scenes.

Hong, Pan, Sun and Jia, "Deep Dual-resolution Networks for Real-time and Accurate Semantic
Segmentation of Road Scenes" (2021). A ResNet-like stem goes to 1/8, then two branches run side
by side: a high-resolution branch that stays at 1/8 (64 channels in DDRNet-23-slim) and a
low-resolution branch that goes down to 1/32 (then 1/64 in a bottleneck), with a *bilateral
fusion* after stages 3 and 4 (the low branch compressed by a 1x1 convolution and up-sampled into
the high one; the high branch down-sampled by strided 3x3 convolutions into the low one). The
*Deep Aggregation Pyramid Pooling Module* (DAPPM) gathers context at 1/64 (average pools of
5/2, 9/4, 17/8 and global, each refined by a 3x3 convolution on the sum with the previous
scale, hierarchically), and its output, up-sampled to 1/8, is added to the high branch before
the segmentation head (BN-ReLU-3x3 conv-BN-ReLU-1x1 conv), whose logits are up-sampled 8x.

In training an auxiliary head reads the high branch after the first fusion (the paper's deep
supervision, loss weight 0.4: ``loss.aux_weight`` in the recipe); it is left out in eval mode.

DDRNet-23-slim (``planes=32``, ``head_planes=64``): 5.7 M parameters and 36.3 GFLOPs (multiply-
adds) at 1024x2048 in the paper (Table 4, Cityscapes, 19 classes); ``ddrnet23`` doubles the
widths (20.1 M, 143.1 GFLOPs). Both are checked in ``tests/test_realtime_models.py``.

The blocks are written with :class:`~denseseg.layers.ConvNormAct`, so the fast inference path
folds their batch norms; the DAPPM and the heads are pre-activation (BN-ReLU-conv) as in the
paper and keep theirs.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from denseseg.layers import ConvNormAct, kaiming_init
from denseseg.models._registry import register_model, register_variant
from denseseg.models.base import check_positive_ints

__all__ = ["DDRNet", "ddrnet"]


def _up(x: Tensor, like: Tensor) -> Tensor:
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)


def _bn_relu_conv(cin: int, cout: int, kernel: int) -> nn.Sequential:
    return nn.Sequential(
        nn.BatchNorm2d(cin),
        nn.ReLU(inplace=True),
        nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False),
    )


class BasicBlock(nn.Module):
    """ResNet's basic block; ``relu_out=False`` leaves the sum un-rectified (the last block of
    a stage: the fusions read its raw output, the next stage rectifies it)."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1, relu_out: bool = True) -> None:
        super().__init__()
        self.conv1 = ConvNormAct(cin, planes, 3, stride=stride)
        self.conv2 = ConvNormAct(planes, planes, 3, act=None)
        self.downsample = _shortcut(cin, planes, stride)
        self.relu_out = relu_out

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv2(self.conv1(x)) + self.downsample(x)
        return F.relu(out) if self.relu_out else out


class Bottleneck(nn.Module):
    """1x1 - 3x3 - 1x1 bottleneck with expansion 2 (DDRNet's stage 5), no ReLU at the end."""

    expansion = 2

    def __init__(self, cin: int, planes: int, stride: int = 1, relu_out: bool = False) -> None:
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = ConvNormAct(cin, planes, 1)
        self.conv2 = ConvNormAct(planes, planes, 3, stride=stride)
        self.conv3 = ConvNormAct(planes, cout, 1, act=None)
        self.downsample = _shortcut(cin, cout, stride)
        self.relu_out = relu_out

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv3(self.conv2(self.conv1(x))) + self.downsample(x)
        return F.relu(out) if self.relu_out else out


def _shortcut(cin: int, cout: int, stride: int) -> nn.Module:
    if stride == 1 and cin == cout:
        return nn.Identity()
    return ConvNormAct(cin, cout, 1, stride=stride, act=None)


def _stage(block: type, cin: int, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
    """``blocks`` blocks, the first with ``stride``; the last one without its final ReLU."""
    layers = []
    for i in range(blocks):
        layers.append(block(cin, planes, stride if i == 0 else 1, relu_out=i < blocks - 1))
        cin = planes * block.expansion
    return nn.Sequential(*layers)


class DAPPM(nn.Module):
    """Deep Aggregation Pyramid Pooling Module: ``(N, cin, h, w) -> (N, cout, h, w)``."""

    # (kernel, stride) of the average pools; a final global pool follows.
    POOLS = ((5, 2), (9, 4), (17, 8))

    def __init__(self, cin: int, branch: int, cout: int) -> None:
        super().__init__()
        self.scale0 = _bn_relu_conv(cin, branch, 1)
        self.scales = nn.ModuleList(
            [
                nn.Sequential(nn.AvgPool2d(k, s, k // 2), *_bn_relu_conv(cin, branch, 1))
                for k, s in self.POOLS
            ]
            + [nn.Sequential(nn.AdaptiveAvgPool2d(1), *_bn_relu_conv(cin, branch, 1))]
        )
        self.process = nn.ModuleList(_bn_relu_conv(branch, branch, 3) for _ in range(4))
        self.compression = _bn_relu_conv(branch * 5, cout, 1)
        self.shortcut = _bn_relu_conv(cin, cout, 1)

    def forward(self, x: Tensor) -> Tensor:
        levels = [self.scale0(x)]
        for scale, process in zip(self.scales, self.process, strict=True):
            levels.append(process(_up(scale(x), x) + levels[-1]))
        return self.compression(torch.cat(levels, 1)) + self.shortcut(x)


class SegHead(nn.Module):
    """BN-ReLU-3x3 conv (``mid``) - BN-ReLU-1x1 conv to the class scores."""

    def __init__(self, cin: int, mid: int, num_classes: int) -> None:
        super().__init__()
        self.conv = _bn_relu_conv(cin, mid, 3)
        self.classifier = nn.Sequential(
            nn.BatchNorm2d(mid), nn.ReLU(inplace=True), nn.Conv2d(mid, num_classes, 1)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.conv(x))


class DDRNet(nn.Module):
    """DDRNet-23 (``planes=64``) or DDRNet-23-slim (``planes=32``); see the module docstring.

    Args:
        num_classes: classes K.
        in_channels: input channels.
        planes: the stem's width; stages 2-5 of the low branch have 2, 4, 8 and 16 times it,
            the high branch 2 times it.
        spp_planes: the DAPPM's branch width.
        head_planes: the segmentation heads' hidden width.
        aux_loss: build the auxiliary head (computed in training mode only).

    Forward:
        ``(N, C, H, W) -> {"out": (N, K, H, W)}``, plus ``"aux"`` in training mode.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        planes: int = 32,
        spp_planes: int = 128,
        head_planes: int = 64,
        aux_loss: bool = True,
    ) -> None:
        super().__init__()
        self.num_classes, self.in_channels = num_classes, in_channels
        p, high = planes, planes * 2
        self.stem = nn.Sequential(_conv_bias_bn_relu(in_channels, p), _conv_bias_bn_relu(p, p))
        self.layer1 = _stage(BasicBlock, p, p, 2)
        self.layer2 = _stage(BasicBlock, p, 2 * p, 2, stride=2)
        self.layer3 = _stage(BasicBlock, 2 * p, 4 * p, 2, stride=2)
        self.layer4 = _stage(BasicBlock, 4 * p, 8 * p, 2, stride=2)
        self.layer5 = _stage(Bottleneck, 8 * p, 8 * p, 1, stride=2)
        self.layer3_ = _stage(BasicBlock, 2 * p, high, 2)
        self.layer4_ = _stage(BasicBlock, high, high, 2)
        self.layer5_ = _stage(Bottleneck, high, high, 1)
        self.compression3 = ConvNormAct(4 * p, high, 1, act=None)
        self.compression4 = ConvNormAct(8 * p, high, 1, act=None)
        self.down3 = ConvNormAct(high, 4 * p, 3, stride=2, act=None)
        self.down4 = nn.Sequential(
            ConvNormAct(high, 4 * p, 3, stride=2), ConvNormAct(4 * p, 8 * p, 3, stride=2, act=None)
        )
        self.spp = DAPPM(16 * p, spp_planes, 4 * p)
        self.head = SegHead(4 * p, head_planes, num_classes)
        self.aux_head = SegHead(high, head_planes, num_classes) if aux_loss else None
        kaiming_init(self)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        size = x.shape[-2:]
        x2 = self.layer2(F.relu(self.layer1(self.stem(x))))  # 1/8
        low = self.layer3(F.relu(x2))  # 1/16
        high = self.layer3_(F.relu(x2))  # 1/8
        low, high = low + self.down3(F.relu(high)), high + _up(self.compression3(F.relu(low)), high)
        aux_in = high
        low = self.layer4(F.relu(low))  # 1/32
        high = self.layer4_(F.relu(high))
        low, high = low + self.down4(F.relu(high)), high + _up(self.compression4(F.relu(low)), high)
        high = self.layer5_(F.relu(high))
        context = _up(self.spp(self.layer5(F.relu(low))), high)  # from 1/64
        out = {"out": _resize(self.head(high + context), size)}
        if self.training and self.aux_head is not None:
            out["aux"] = _resize(self.aux_head(aux_in), size)
        return out


def _resize(x: Tensor, size: torch.Size) -> Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def _conv_bias_bn_relu(cin: int, cout: int) -> nn.Sequential:
    # The stem's stride-2 convolutions keep their bias in the paper's code (folded away in
    # inference like the rest).
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


_TINY = {"planes": 4, "spp_planes": 8, "head_planes": 8}


@register_model(test_cfg={**_TINY, "aux_loss": True})
def ddrnet(
    num_classes: int = 19,
    in_channels: int = 3,
    planes: int = 32,
    spp_planes: int = 128,
    head_planes: int = 64,
    aux_loss: bool = True,
) -> DDRNet:
    """DDRNet: dual-resolution, real-time (23-slim widths by default; options: DDRNet)."""
    check_positive_ints(
        "DDRNet",
        num_classes=num_classes,
        in_channels=in_channels,
        planes=planes,
        spp_planes=spp_planes,
        head_planes=head_planes,
    )
    return DDRNet(num_classes, in_channels, planes, spp_planes, head_planes, aux_loss)


register_variant(
    "ddrnet23_slim",
    ddrnet,
    fixed={"planes": 32, "head_planes": 64},
    test_cfg={"spp_planes": 8},
    description="DDRNet-23-slim: real-time dual-resolution network (5.70 M at inference)",
)
register_variant(
    "ddrnet23",
    ddrnet,
    fixed={"planes": 64, "head_planes": 128},
    test_cfg={"spp_planes": 8},
    description="DDRNet-23: dual-resolution network (20.15 M at inference)",
)
