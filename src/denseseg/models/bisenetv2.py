"""BiSeNet V2: a bilateral network with guided aggregation, made to train from scratch.

Yu, Gao, Wang, Yu, Shen and Sang, "BiSeNet V2: Bilateral Network with Guided Aggregation for
Real-time Semantic Segmentation" (IJCV 2021). Table 1 of the paper:

* **Detail branch** (wide and shallow, to 1/8): three stages of 3x3 conv-BN-ReLU, 64, 64 and
  128 channels, the first conv of each with stride 2 (2, 3 and 3 convs).
* **Semantic branch** (narrow and deep, to 1/32): the *stem* (a stride-2 3x3 conv to 16
  channels, then a 1x1-then-strided-3x3 path and a max pool side by side, concatenated and
  fused by a 3x3 conv: 1/4), *gather-and-expand* layers (GE: a 3x3 conv, a depth-wise 3x3 conv
  expanding 6 times, a 1x1 projection, a residual sum; the stride-2 version has a second
  depth-wise conv and a depth-wise + 1x1 shortcut) to 32 (1/8), 64 (1/16) and 128 channels
  (1/32), and the *context embedding* block (global average pool, BN, 1x1 conv, added back,
  3x3 conv).
* **Bilateral guided aggregation** (BGA): each branch gates the other through a sigmoid at
  both resolutions (the semantic features up-sampled to 1/8 gate the detail features; the
  detail features down-sampled to 1/32 are gated by the semantic ones and up-sampled), the two
  sums fused by a 3x3 conv.
* **Segmentation head**: 3x3 conv-BN-ReLU to ``head_channels`` (1024 in the paper), dropout,
  1x1 conv to the classes, bilinear up-sampling to the input.
* **Booster**: in training, the same head (``booster_channels`` wide) on the stem and on the
  outputs of the semantic stages 3, 4 and 5 (before the context block), each loss weighted like
  the main one (``loss.aux_weight: 1.0`` in the recipe); none of it runs in eval mode, so it
  costs nothing at inference.

21.15 GFLOPs (multiply-adds) at 512x1024 in the paper (Table 8, Cityscapes, 19 classes);
checked in ``tests/test_realtime_models.py``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from denseseg.errors import ConfigError
from denseseg.layers import ConvNormAct, kaiming_init
from denseseg.models._registry import register_model
from denseseg.models.base import check_positive_ints

__all__ = ["BiSeNetV2", "bisenetv2"]

BOOSTERS = ("aux", "aux_s3", "aux_s4", "aux_s5")
"""Output keys of the booster heads in training mode (stem, semantic stages 3, 4 and 5)."""


def _dw(channels: int, out: int | None = None, stride: int = 1, act: bool = False) -> ConvNormAct:
    """Depth-wise 3x3 conv (``out`` a multiple of ``channels``: an expanding one) with BN."""
    kwargs = {} if act else {"act": None}
    return ConvNormAct(channels, out or channels, 3, stride=stride, groups=channels, **kwargs)


def _sequence(widths: tuple[int, ...], cin: int) -> nn.Sequential:
    layers = []
    for i, w in enumerate(widths):
        layers.append(ConvNormAct(cin, w, 3, stride=2 if i == 0 else 1))
        cin = w
    return nn.Sequential(*layers)


class DetailBranch(nn.Sequential):
    """``(N, C, H, W) -> (N, 128, H/8, W/8)``: 2 + 3 + 3 conv-BN-ReLU."""

    def __init__(self, in_channels: int, width: int = 64) -> None:
        super().__init__(
            _sequence((width, width), in_channels),
            _sequence((width, width, width), width),
            _sequence((2 * width, 2 * width, 2 * width), width),
        )


class StemBlock(nn.Module):
    """``(N, C, H, W) -> (N, 16, H/4, W/4)``: conv, then conv path || max pool, fused."""

    def __init__(self, in_channels: int, out: int = 16) -> None:
        super().__init__()
        self.conv = ConvNormAct(in_channels, out, 3, stride=2)
        self.left = nn.Sequential(
            ConvNormAct(out, out // 2, 1), ConvNormAct(out // 2, out, 3, stride=2)
        )
        self.right = nn.MaxPool2d(3, stride=2, padding=1)
        self.fuse = ConvNormAct(2 * out, out, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        return self.fuse(torch.cat([self.left(x), self.right(x)], 1))


class GatherExpand(nn.Module):
    """The gather-and-expand layer (Fig. 5 of the paper); ``stride`` 1 or 2."""

    def __init__(self, cin: int, cout: int, stride: int = 1, expand: int = 6) -> None:
        super().__init__()
        mid = cin * expand
        self.conv = ConvNormAct(cin, cin, 3)
        if stride == 1:
            self.dw = _dw(cin, mid)
        else:
            self.dw = nn.Sequential(_dw(cin, mid, stride=2), _dw(mid))
        self.project = ConvNormAct(mid, cout, 1, act=None)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                _dw(cin, stride=stride), ConvNormAct(cin, cout, 1, act=None)
            )

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.project(self.dw(self.conv(x))) + self.shortcut(x))


class ContextEmbedding(nn.Module):
    """Global average pool -> BN -> 1x1 conv-BN-ReLU, broadcast-added, then 3x3 conv-BN-ReLU."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(channels)
        self.gap_conv = ConvNormAct(channels, channels, 1)
        self.conv = ConvNormAct(channels, channels, 3)

    def forward(self, x: Tensor) -> Tensor:
        g = self.gap_conv(self.norm(x.mean((2, 3), keepdim=True)))
        return self.conv(x + g)


class SemanticBranch(nn.Module):
    """Returns the stem, stage 3, stage 4, stage 5 (before CE) and the CE output."""

    def __init__(self, in_channels: int, widths: tuple[int, ...] = (16, 32, 64, 128)) -> None:
        super().__init__()
        stem, *rest = widths
        self.stem = StemBlock(in_channels, stem)
        stages, cin = [], stem
        for i, w in enumerate(rest):
            repeats = 3 if i == len(rest) - 1 else 1  # stage 5 has three stride-1 layers
            stages.append(
                nn.Sequential(
                    GatherExpand(cin, w, stride=2), *(GatherExpand(w, w) for _ in range(repeats))
                )
            )
            cin = w
        self.stages = nn.ModuleList(stages)
        self.context = ContextEmbedding(cin)

    def forward(self, x: Tensor) -> list[Tensor]:
        feats = [self.stem(x)]
        for stage in self.stages:
            feats.append(stage(feats[-1]))
        return [*feats, self.context(feats[-1])]


class GuidedAggregation(nn.Module):
    """Bilateral guided aggregation of detail (1/8) and semantic (1/32) features."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        c = channels
        self.detail_keep = nn.Sequential(_dw(c), nn.Conv2d(c, c, 1, bias=False))
        self.detail_down = nn.Sequential(
            ConvNormAct(c, c, 3, stride=2, act=None),
            nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=False),
        )
        self.semantic_up = ConvNormAct(c, c, 3, act=None)
        self.semantic_keep = nn.Sequential(_dw(c), nn.Conv2d(c, c, 1, bias=False))
        self.fuse = ConvNormAct(c, c, 3)

    def forward(self, detail: Tensor, semantic: Tensor) -> Tensor:
        gate_up = _resize(self.semantic_up(semantic), detail.shape[-2:]).sigmoid()
        high = self.detail_keep(detail) * gate_up
        down = self.detail_down(detail)
        low = (
            _resize(semantic, down.shape[-2:])
            if down.shape[-2:] != semantic.shape[-2:]
            else semantic
        )
        low = down * self.semantic_keep(low).sigmoid()
        return self.fuse(high + _resize(low, detail.shape[-2:]))


class SegHead(nn.Module):
    """3x3 conv-BN-ReLU to ``mid``, dropout, 1x1 conv to the classes."""

    def __init__(self, cin: int, mid: int, num_classes: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.conv = ConvNormAct(cin, mid, 3)
        self.drop = nn.Dropout(dropout)
        self.classifier = nn.Conv2d(mid, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.drop(self.conv(x)))


def _resize(x: Tensor, size: tuple[int, ...] | torch.Size) -> Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class BiSeNetV2(nn.Module):
    """BiSeNet V2; see the module docstring.

    Args:
        num_classes: classes K.
        in_channels: input channels.
        head_channels: the main segmentation head's hidden width (1024).
        booster_channels: the booster heads' hidden width (128).
        boosters: build the booster heads (run in training mode only).

    Forward:
        ``(N, C, H, W) -> {"out": (N, K, H, W)}``, plus :data:`BOOSTERS` in training mode.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        head_channels: int = 1024,
        booster_channels: int = 128,
        boosters: bool = True,
        widths: tuple[int, ...] = (16, 32, 64, 128),
        detail_width: int = 64,
    ) -> None:
        super().__init__()
        self.num_classes, self.in_channels = num_classes, in_channels
        self.detail = DetailBranch(in_channels, detail_width)
        self.semantic = SemanticBranch(in_channels, widths)
        self.aggregate = GuidedAggregation(widths[-1])
        self.head = SegHead(widths[-1], head_channels, num_classes)
        self.boosters = None
        if boosters:
            self.boosters = nn.ModuleList(SegHead(w, booster_channels, num_classes) for w in widths)
        kaiming_init(self)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        size = x.shape[-2:]
        *stages, context = self.semantic(x)
        fused = self.aggregate(self.detail(x), context)
        out = {"out": _resize(self.head(fused), size)}
        if self.training and self.boosters is not None:
            for key, head, feat in zip(BOOSTERS, self.boosters, stages, strict=True):
                out[key] = _resize(head(feat), size)
        return out


@register_model(
    test_cfg={"head_channels": 8, "booster_channels": 4, "widths": (4, 8, 8, 8), "detail_width": 4}
)
def bisenetv2(
    num_classes: int = 19,
    in_channels: int = 3,
    head_channels: int = 1024,
    booster_channels: int = 128,
    boosters: bool = True,
    widths: tuple[int, ...] = (16, 32, 64, 128),
    detail_width: int = 64,
) -> BiSeNetV2:
    """BiSeNet V2: bilateral, real-time, made to train from scratch (options: BiSeNetV2)."""
    check_positive_ints(
        "BiSeNetV2",
        num_classes=num_classes,
        in_channels=in_channels,
        head_channels=head_channels,
        booster_channels=booster_channels,
        detail_width=detail_width,
    )
    ints = isinstance(widths, (list, tuple)) and all(
        isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in widths
    )
    if not ints or len(widths) != 4 or widths[-1] != 2 * detail_width:
        raise ConfigError(
            f"BiSeNetV2 option widths={widths!r}: four integers >= 1 (stem, stages 3-5), the "
            f"last twice detail_width={detail_width} (the two branches meet at that width)"
        )
    return BiSeNetV2(
        num_classes,
        in_channels,
        head_channels,
        booster_channels,
        boosters,
        tuple(widths),
        detail_width,
    )
