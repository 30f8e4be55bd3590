"""DeepLab v2, v3 and v3+ as the papers describe them, on any dilatable backbone.

Which name is which
-------------------
Two layouts of DeepLab v3 exist and denseseg has both:

==============================  ==============================================================
name                            layout
==============================  ==============================================================
``deeplabv2``                   paper (arXiv 1606.00915): dilated ResNet-101, output stride 8,
``deeplabv2_resnet101``         ASPP-L = four 3x3 atrous convs (rates 6/12/18/24) straight to
                                class scores, summed
``deeplabv3``                   paper (arXiv 1706.05587): ASPP (1x1, three 3x3 at 6/12/18 at
                                output stride 16, doubled at 8, image pooling; 256 channels, BN)
                                then the 1x1 classifier; multi-grid (1, 2, 4) in ResNet-50/101's
                                layer4; ``backbone=`` picks the trunk (no shorthands: see below)
``deeplabv3plus``               paper (ECCV 2018): the v3 encoder plus the decoder (48-channel
``deeplabv3plus_resnet50``      projection of the stride-4 map, concatenation, two 3x3 convs,
``deeplabv3plus_resnet101``     4x up-sampling)
``fcn_resnet50/101``,           torchvision's layout (:mod:`denseseg.models.tv_layouts`): output
``deeplabv3_resnet50/101``,     stride 8, ASPP rates 12/24/36 plus an extra 3x3 conv after it,
``deeplabv3_mobilenet_v3_large``, no multi-grid, dropout 0.5; parameter-for-parameter and
``lraspp_mobilenet_v3_large``   output-for-output torchvision's models (weights load directly)
==============================  ==============================================================

The ``deeplabv3_<backbone>`` names belong to torchvision's layout (so a torchvision user gets the
model and the weights they expect); the paper's v3 is ``create_model("deeplabv3",
backbone="resnet50")``.

Every model here is a :class:`SegmentationModel`: backbone -> head (-> auxiliary head), logits
bilinearly up-sampled to the input size, returned as ``{"out": ..., "aux": ...}``. ``aux_loss=True``
adds torchvision's FCN head on the level before the last (``layer3`` for ResNets); its logits come
back under ``aux`` in both train and eval mode (as torchvision does). Heads read the channels
from the backbone's ``feature_info``.

Deviations, said here once: the trunks are torchvision's ResNets (v1.5: stride on the 3x3 conv;
the papers' Caffe/TF ResNets stride the 1x1), ``align_corners=False`` throughout, and the v3/v3+
ASPP ends with dropout 0.1 as the authors' TensorFlow code does (the papers do not mention it).
Image pooling uses batch norm, so training needs batches of at least two images.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from denseseg.backbones import create_backbone
from denseseg.errors import ConfigError
from denseseg.layers import ASPP, ASPPv2, ConvNormAct, FCNHead
from denseseg.models._registry import register_model, register_variant
from denseseg.models.base import SegmentationModel

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101")
PAPER_MULTI_GRID = (1, 2, 4)
# Backbones the papers' models take; "timm:<model_name>" adds any timm model.
DILATABLE = (*RESNETS, "mobilenet_v3_large")


class DeepLabV3Head(nn.Module):
    """ASPP, optionally torchvision's extra 3x3 conv-BN-ReLU, and the 1x1 classifier.

    Args:
        in_channels: channels of the last backbone level C.
        num_classes: classes K.
        channels: ASPP width (256).
        rates: ASPP atrous rates.
        dropout: dropout after the ASPP projection.
        extra_conv: torchvision's layout (a 3x3 conv between ASPP and classifier).

    Shapes:
        ``(N, C, h, w) -> (N, K, h, w)``.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        channels: int = 256,
        rates: Sequence[int] = (6, 12, 18),
        dropout: float = 0.1,
        extra_conv: bool = False,
    ) -> None:
        super().__init__()
        self.aspp = ASPP(in_channels, channels, rates, dropout=dropout)
        self.conv = ConvNormAct(channels, channels, 3) if extra_conv else nn.Identity()
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        """Class scores at the input map's resolution."""
        return self.classifier(self.conv(self.aspp(x)))


class DeepLabV3PlusHead(nn.Module):
    """DeepLabv3+ encoder head and decoder (Chen et al. 2018, section 3.1, Fig. 2).

    ASPP on the last level; its output is bilinearly up-sampled to the stride-4 level, concatenated
    with that level projected to ``low_level_channels`` (48) by a 1x1 conv-BN-ReLU, refined by two
    3x3 conv-BN-ReLU (256) and classified; the model then up-samples 4x to the input.

    Args:
        low_channels: channels of the stride-4 level.
        high_channels: channels of the last level.
        num_classes: classes K.
        channels: ASPP width (256).
        low_level_channels: width of the low-level projection (48).
        decoder_channels: width of the two 3x3 convs (256).
        rates: ASPP atrous rates.
        dropout: dropout after the ASPP projection.

    Shapes:
        ``low (N, C_low, H/4, W/4), high (N, C_high, h, w) -> (N, K, H/4, W/4)``.
    """

    def __init__(
        self,
        low_channels: int,
        high_channels: int,
        num_classes: int,
        *,
        channels: int = 256,
        low_level_channels: int = 48,
        decoder_channels: int = 256,
        rates: Sequence[int] = (6, 12, 18),
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.aspp = ASPP(high_channels, channels, rates, dropout=dropout)
        self.low_proj = ConvNormAct(low_channels, low_level_channels, 1)
        self.fuse = nn.Sequential(
            ConvNormAct(channels + low_level_channels, decoder_channels, 3),
            ConvNormAct(decoder_channels, decoder_channels, 3),
        )
        self.classifier = nn.Conv2d(decoder_channels, num_classes, 1)

    def forward(self, low: Tensor, high: Tensor) -> Tensor:
        """Class scores at the low-level map's resolution."""
        x = self.aspp(high)
        x = F.interpolate(x, size=low.shape[-2:], mode="bilinear", align_corners=False)
        return self.classifier(self.fuse(torch.cat([x, self.low_proj(low)], dim=1)))


def make_backbone(
    name: str,
    *,
    in_channels: int = 3,
    output_stride: int = 32,
    multi_grid: Sequence[int] | str | None = "auto",
    **kwargs: Any,
) -> nn.Module:
    """Build a dilatable backbone for DeepLab.

    Args:
        name: ``resnet18/34/50/101``, ``mobilenet_v3_large`` or ``"timm:<model_name>"``.
        in_channels: input channels.
        output_stride: 32, 16 or 8.
        multi_grid: ResNet layer4 unit rates; ``"auto"`` is the paper's (1, 2, 4) on
            ResNet-50/101 (three units) and none elsewhere; ``None`` is none.
        **kwargs: further backbone options (e.g. ``width_mult`` for MobileNetV3).

    Returns:
        The backbone.
    """
    kw = dict(kwargs, in_channels=in_channels, output_stride=output_stride)
    if name in RESNETS:
        if isinstance(multi_grid, str):
            if multi_grid != "auto":
                raise ConfigError(
                    f"multi_grid={multi_grid!r}: give rates such as [1, 2, 4], 'auto' or null"
                )
            multi_grid = PAPER_MULTI_GRID if name in ("resnet50", "resnet101") else None
        kw["multi_grid"] = multi_grid
    elif multi_grid not in ("auto", None):
        raise ConfigError(f"multi_grid applies to ResNet backbones, not {name!r}; drop the option")
    if name.startswith("timm:"):
        return create_backbone("timm", model_name=name[len("timm:") :], **kw)
    if name not in DILATABLE:
        raise ConfigError(
            f"backbone {name!r} cannot be dilated; DeepLab takes one of {', '.join(DILATABLE)} "
            "or 'timm:<model_name>'"
        )
    return create_backbone(name, **kw)


def _trunk(
    arch: str,
    backbone: str,
    in_channels: int,
    output_stride: int,
    multi_grid: Sequence[int] | str | None,
    backbone_kwargs: dict[str, Any] | None,
) -> nn.Module:
    """The dilated backbone of DeepLab ``arch``, at output stride 16 or 8."""
    if output_stride not in (8, 16):
        raise ConfigError(f"{arch}: output_stride={output_stride!r} must be 16 or 8")
    return make_backbone(
        backbone,
        in_channels=in_channels,
        output_stride=output_stride,
        multi_grid=multi_grid,
        **(backbone_kwargs or {}),
    )


def _v3_rates(rates: Sequence[int] | None, output_stride: int) -> tuple[int, ...]:
    # The paper's rates are for output stride 16; at 8 the map is twice as fine, so they double.
    return (
        tuple(rates) if rates is not None else tuple(r * 16 // output_stride for r in (6, 12, 18))
    )


def _aux(backbone: nn.Module, num_classes: int, aux_loss: bool) -> FCNHead | None:
    return FCNHead(backbone.feature_info[-2].channels, num_classes) if aux_loss else None


@register_model(
    "deeplabv2",
    test_cfg={"backbone": "resnet18", "backbone_kwargs": {"width": 0.25}},
    description="DeepLab v2 (Chen et al. 2016): ASPP-L, scores of four atrous convs summed",
)
def deeplabv2(
    num_classes: int = 21,
    in_channels: int = 3,
    *,
    backbone: str = "resnet101",
    output_stride: int = 8,
    rates: Sequence[int] = (6, 12, 18, 24),
    aux_loss: bool = False,
    backbone_kwargs: dict[str, Any] | None = None,
) -> SegmentationModel:
    """DeepLab v2 with ASPP-L on a dilated backbone (the paper: ResNet-101, output stride 8).

    Args:
        num_classes: classes K.
        in_channels: input channels.
        backbone: a dilatable backbone (see :func:`make_backbone`).
        output_stride: 8 (the paper) or 16.
        rates: ASPP-L rates.
        aux_loss: add the FCN auxiliary head (logits under ``aux``).
        backbone_kwargs: further backbone options.

    Returns:
        The model; ``{"out": (N, K, H, W)}``.
    """
    trunk = _trunk("deeplabv2", backbone, in_channels, output_stride, None, backbone_kwargs)
    head = ASPPv2(trunk.feature_info[-1].channels, num_classes, rates)
    return SegmentationModel(
        trunk,
        head,
        num_classes=num_classes,
        aux_head=_aux(trunk, num_classes, aux_loss),
        classifier_prefixes=("head.branches.", "aux_head.classifier."),
    )


@register_model(
    "deeplabv3",
    test_cfg={
        "backbone": "resnet18",
        "backbone_kwargs": {"width": 0.25},
        "aspp_channels": 16,
        "multi_grid": (1, 2),
    },
    description="DeepLab v3 as in the paper (Chen et al. 2017): ASPP + image pooling, multi-grid",
)
def deeplabv3(
    num_classes: int = 21,
    in_channels: int = 3,
    *,
    backbone: str = "resnet101",
    output_stride: int = 16,
    multi_grid: Sequence[int] | str | None = "auto",
    rates: Sequence[int] | None = None,
    aspp_channels: int = 256,
    dropout: float = 0.1,
    aux_loss: bool = False,
    backbone_kwargs: dict[str, Any] | None = None,
) -> SegmentationModel:
    """DeepLab v3 in the paper's layout (for torchvision's, use ``deeplabv3_resnet50`` etc.).

    Args:
        num_classes: classes K.
        in_channels: input channels.
        backbone: a dilatable backbone (see :func:`make_backbone`); the paper: ResNet-101.
        output_stride: 16 (training in the paper) or 8 (evaluation).
        multi_grid: layer4 unit rates; ``"auto"``: (1, 2, 4) on ResNet-50/101.
        rates: ASPP rates; default (6, 12, 18) at output stride 16, (12, 24, 36) at 8.
        aspp_channels: ASPP width (256).
        dropout: dropout after the ASPP projection.
        aux_loss: add the FCN auxiliary head (logits under ``aux``).
        backbone_kwargs: further backbone options.

    Returns:
        The model; ``{"out": (N, K, H, W)}``.
    """
    trunk = _trunk("deeplabv3", backbone, in_channels, output_stride, multi_grid, backbone_kwargs)
    head = DeepLabV3Head(
        trunk.feature_info[-1].channels,
        num_classes,
        channels=aspp_channels,
        rates=_v3_rates(rates, output_stride),
        dropout=dropout,
    )
    return SegmentationModel(
        trunk, head, num_classes=num_classes, aux_head=_aux(trunk, num_classes, aux_loss)
    )


@register_model(
    "deeplabv3plus",
    test_cfg={
        "backbone": "resnet18",
        "backbone_kwargs": {"width": 0.25},
        "aspp_channels": 16,
        "low_level_channels": 8,
        "decoder_channels": 16,
        "aux_loss": True,
    },
    description="DeepLab v3+ (Chen et al. 2018): v3 encoder + 48-channel stride-4 decoder",
)
def deeplabv3plus(
    num_classes: int = 21,
    in_channels: int = 3,
    *,
    backbone: str = "resnet101",
    output_stride: int = 16,
    multi_grid: Sequence[int] | str | None = "auto",
    rates: Sequence[int] | None = None,
    aspp_channels: int = 256,
    low_level_channels: int = 48,
    decoder_channels: int = 256,
    dropout: float = 0.1,
    aux_loss: bool = False,
    backbone_kwargs: dict[str, Any] | None = None,
) -> SegmentationModel:
    """DeepLab v3+: the v3 encoder and the decoder on the stride-4 level.

    Args:
        low_level_channels: width of the stride-4 projection (48).
        decoder_channels: width of the decoder's two 3x3 convs (256).
        others: as :func:`deeplabv3`; the backbone needs a stride-4 level.

    Returns:
        The model; ``{"out": (N, K, H, W)}``.
    """
    arch = "deeplabv3plus"
    trunk = _trunk(arch, backbone, in_channels, output_stride, multi_grid, backbone_kwargs)
    info = trunk.feature_info
    low = [i for i, f in enumerate(info) if f.reduction == 4]
    if not low:
        raise ConfigError(f"deeplabv3plus: backbone {backbone!r} has no stride-4 level")
    head = DeepLabV3PlusHead(
        info[low[-1]].channels,
        info[-1].channels,
        num_classes,
        channels=aspp_channels,
        low_level_channels=low_level_channels,
        decoder_channels=decoder_channels,
        rates=_v3_rates(rates, output_stride),
        dropout=dropout,
    )
    return SegmentationModel(
        trunk,
        head,
        num_classes=num_classes,
        head_levels=(low[-1], -1),
        aux_head=_aux(trunk, num_classes, aux_loss),
    )


# The shorthands <arch>_<backbone>. Their test configurations swap in small trunks (the suite
# runs on two CPU cores) and vary the options so that every registration exercises something of
# its own.
_TINY = {"backbone": "resnet18", "backbone_kwargs": {"width": 0.25}}
register_variant(
    "deeplabv2_resnet101",
    deeplabv2,
    defaults={"backbone": "resnet101"},
    test_cfg={**_TINY, "output_stride": 16, "aux_loss": True},
    description="deeplabv2 (paper layout), resnet101",
)
register_variant(
    "deeplabv3plus_resnet50",
    deeplabv3plus,
    defaults={"backbone": "resnet50"},
    test_cfg={**_TINY, "output_stride": 8, "aspp_channels": 16},
    description="deeplabv3plus (paper layout), resnet50",
)
register_variant(
    "deeplabv3plus_resnet101",
    deeplabv3plus,
    defaults={"backbone": "resnet101"},
    test_cfg={
        "backbone": "mobilenet_v3_large",
        "backbone_kwargs": {"width_mult": 0.5},
        "aspp_channels": 16,
        "decoder_channels": 16,
    },
    description="deeplabv3plus (paper layout), resnet101",
)
