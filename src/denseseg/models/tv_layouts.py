"""torchvision's segmentation models, rebuilt from denseseg's backbones and heads.

Registered under torchvision's names, with exactly torchvision's parameters (21 classes, auxiliary
head on):

================================  ===========  ==================================================
name                              parameters   layout
================================  ===========  ==================================================
``fcn_resnet50``                   35,322,218  ResNet-50 at output stride 8, FCN head (3x3 conv
``fcn_resnet101``                  54,314,346  to C/4, BN, ReLU, dropout 0.1, 1x1)
``deeplabv3_resnet50``             42,004,074  ResNet at output stride 8, ASPP rates 12/24/36,
``deeplabv3_resnet101``            60,996,202  dropout 0.5, an extra 3x3 conv, no multi-grid
``deeplabv3_mobilenet_v3_large``   11,029,328  MobileNetV3-Large at output stride 16, same head
``lraspp_mobilenet_v3_large``       3,221,538  MobileNetV3-Large, LR-ASPP on strides 8 and 16
================================  ===========  ==================================================

The auxiliary head (``aux_loss=True``) is torchvision's FCN head on ``layer3`` (MobileNetV3:
``features.4``, the first block at stride 8, as torchvision taps it). Given the same weights the
outputs equal torchvision's; a torchvision state_dict (e.g. its COCO_WITH_VOC_LABELS_V1 file)
converts with :meth:`TorchvisionLayoutModel.convert_torchvision_state_dict`, which
:func:`denseseg.checkpoint.load_model_weights` applies by itself. For the papers' DeepLab see
:mod:`denseseg.models.deeplab`.

The ResNet builders take ``backbone=`` (default: the one in the name) and ``backbone_kwargs=`` so
the same layout can be built on a smaller ResNet, which the shared test suite does.
"""

from __future__ import annotations

import re
from typing import Any

import torch.nn as nn
from torch import Tensor

from denseseg.backbones.mobilenet import MobileNetV3Backbone
from denseseg.backbones.resnet import ResNetBackbone
from denseseg.errors import ConfigError
from denseseg.layers import FCNHead, LRASPPHead
from denseseg.models._registry import register_model, register_variant
from denseseg.models.base import SegmentationModel
from denseseg.models.deeplab import RESNETS, DeepLabV3Head

# torchvision key -> denseseg key, first matching rule wins. torchvision's heads are Sequentials
# (conv 0, BN 1, ReLU 2, dropout 3, classifier 4); denseseg names the parts.
_FCN_HEAD = [(r"\.0\.", ".block.conv."), (r"\.1\.", ".block.norm."), (r"\.4\.", ".classifier.")]
_AUX_RULES = [(rf"^aux_classifier{a}", f"aux_head{b}") for a, b in _FCN_HEAD]
_RULES: dict[str, list[tuple[str, str]]] = {
    "fcn": [(rf"^classifier{a}", f"head{b}") for a, b in _FCN_HEAD] + _AUX_RULES,
    "deeplabv3": [
        (r"^classifier\.0\.convs\.4\.1\.", "head.aspp.branches.4.conv."),  # image pooling
        (r"^classifier\.0\.convs\.4\.2\.", "head.aspp.branches.4.norm."),
        (r"^classifier\.0\.convs\.(\d)\.0\.", r"head.aspp.branches.\1.conv."),
        (r"^classifier\.0\.convs\.(\d)\.1\.", r"head.aspp.branches.\1.norm."),
        (r"^classifier\.0\.project\.0\.", "head.aspp.project.conv."),
        (r"^classifier\.0\.project\.1\.", "head.aspp.project.norm."),
        (r"^classifier\.1\.", "head.conv.conv."),
        (r"^classifier\.2\.", "head.conv.norm."),
        (r"^classifier\.4\.", "head.classifier."),
        *_AUX_RULES,
    ],
    "lraspp": [
        (r"^classifier\.cbr\.0\.", "head.cbr.conv."),
        (r"^classifier\.cbr\.1\.", "head.cbr.norm."),
        (r"^classifier\.scale\.1\.", "head.scale."),
        (r"^classifier\.(low|high)_classifier\.", r"head.\1_classifier."),
    ],
}
# torchvision's MobileNetV3 segmentation backbone keeps the blocks as "backbone.<i>".
_MOBILENET_RULES = [(r"^backbone\.(\d+)\.", r"backbone.features.\1.")]


class TorchvisionLayoutModel(SegmentationModel):
    """A :class:`SegmentationModel` in torchvision's layout, which knows its torchvision name.

    Args:
        tv_name: torchvision's builder name, e.g. ``"deeplabv3_resnet50"`` (also where its
            pretrained weights are looked up).
        family: ``"fcn"``, ``"deeplabv3"`` or ``"lraspp"`` (selects the key conversion).
        *args, **kwargs: as :class:`SegmentationModel`.
    """

    def __init__(self, tv_name: str, family: str, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tv_name = tv_name
        self.family = family

    def convert_torchvision_state_dict(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """Rename the keys of a torchvision state_dict of this model to denseseg's.

        Args:
            state: ``torchvision.models.segmentation.<tv_name>(...).state_dict()`` or its file.

        Returns:
            The same tensors under denseseg's keys (keys no rule knows are kept as they are, so
            the loader can name them).
        """
        rules = _RULES[self.family]
        if isinstance(self.backbone, MobileNetV3Backbone):
            rules = _MOBILENET_RULES + rules
        out = {}
        for key, value in state.items():
            for pattern, repl in rules:
                new, n = re.subn(pattern, repl, key, count=1)
                if n:
                    key = new
                    break
            out[key] = value
        return out


def _resnet(backbone: str, in_channels: int, kwargs: dict[str, Any] | None) -> ResNetBackbone:
    if backbone not in RESNETS:
        raise ConfigError(f"backbone {backbone!r}: this layout takes one of {', '.join(RESNETS)}")
    # torchvision: replace_stride_with_dilation=[False, True, True], i.e. output stride 8.
    depth = int(backbone[len("resnet") :])
    return ResNetBackbone(depth, output_stride=8, in_channels=in_channels, **(kwargs or {}))


def _mobilenet(in_channels: int, width_mult: float) -> MobileNetV3Backbone:
    # dilated=True in torchvision: the last stage at stride 16.
    trunk = MobileNetV3Backbone(output_stride=16, width_mult=width_mult, in_channels=in_channels)
    # torchvision taps the first block of the stride-8 stage ("C2", stage_indices[-4]) and the
    # last layer, not the ends of the stages.
    starts = trunk.stage_starts()
    trunk.set_out_indices((starts[-4], starts[-1]))
    return trunk


def _build(
    tv_name: str,
    family: str,
    trunk: nn.Module,
    head: nn.Module,
    num_classes: int,
    aux_loss: bool,
    **kwargs: Any,
) -> TorchvisionLayoutModel:
    aux = FCNHead(trunk.feature_info[-2].channels, num_classes) if aux_loss else None
    return TorchvisionLayoutModel(
        tv_name, family, trunk, head, num_classes=num_classes, aux_head=aux, **kwargs
    )


def _tv_deeplab_head(in_channels: int, num_classes: int) -> DeepLabV3Head:
    return DeepLabV3Head(
        in_channels, num_classes, channels=256, rates=(12, 24, 36), dropout=0.5, extra_conv=True
    )


def build_tv_resnet_model(
    num_classes: int = 21,
    in_channels: int = 3,
    *,
    tv_name: str,
    backbone: str,
    aux_loss: bool = False,
    backbone_kwargs: dict[str, Any] | None = None,
) -> TorchvisionLayoutModel:
    """torchvision's ``fcn_resnet*`` or ``deeplabv3_resnet*`` (not the paper's v3: see
    ``deeplabv3``): its FCN or DeepLab head on a ResNet at output stride 8.

    Args:
        num_classes: classes K.
        in_channels: input channels.
        tv_name: torchvision's name, e.g. ``"fcn_resnet50"``; its first word picks the head.
        backbone: the ResNet (the one in ``tv_name`` for torchvision's model).
        aux_loss: add the auxiliary FCN head on layer3 (logits under ``aux``).
        backbone_kwargs: further ResNet options (``width`` makes a cheap test model).

    Returns:
        The model; ``{"out": (N, K, H, W)}``.
    """
    family = tv_name.split("_")[0]
    trunk = _resnet(backbone, in_channels, backbone_kwargs)
    channels = trunk.feature_info[-1].channels
    head = (
        FCNHead(channels, num_classes)
        if family == "fcn"
        else _tv_deeplab_head(channels, num_classes)
    )
    return _build(tv_name, family, trunk, head, num_classes, aux_loss)


# Test configurations: a quarter-width ResNet-18 (the suite runs on two CPU cores).
_TINY = {"backbone": "resnet18", "backbone_kwargs": {"width": 0.25}}
for _name, _test_cfg in (
    ("fcn_resnet50", _TINY),
    ("fcn_resnet101", {**_TINY, "aux_loss": True}),
    ("deeplabv3_resnet50", {**_TINY, "aux_loss": True}),
    ("deeplabv3_resnet101", _TINY),
):
    register_variant(
        _name,
        build_tv_resnet_model,
        fixed={"tv_name": _name},
        defaults={"backbone": _name.split("_")[1]},
        test_cfg=_test_cfg,
        description=f"torchvision layout: {_name}",
    )


@register_model(
    "deeplabv3_mobilenet_v3_large",
    test_cfg={"width_mult": 0.5, "aux_loss": True},
    description="torchvision layout: deeplabv3_mobilenet_v3_large",
)
def deeplabv3_mobilenet_v3_large(
    num_classes: int = 21, in_channels: int = 3, *, aux_loss: bool = False, width_mult: float = 1.0
) -> TorchvisionLayoutModel:
    """torchvision's ``deeplabv3_mobilenet_v3_large``: its DeepLab head on MobileNetV3-Large.

    Args:
        num_classes: classes K.
        in_channels: input channels.
        aux_loss: add the auxiliary FCN head on features.4 (logits under ``aux``).
        width_mult: MobileNetV3 channel multiplier (1.0: torchvision's model).

    Returns:
        The model; ``{"out": (N, K, H, W)}``.
    """
    trunk = _mobilenet(in_channels, width_mult)
    head = _tv_deeplab_head(trunk.feature_info[-1].channels, num_classes)
    return _build("deeplabv3_mobilenet_v3_large", "deeplabv3", trunk, head, num_classes, aux_loss)


@register_model(
    "lraspp_mobilenet_v3_large",
    test_cfg={"width_mult": 0.5},
    description="torchvision layout: LR-ASPP on MobileNetV3-Large (Howard et al. 2019)",
)
def lraspp_mobilenet_v3_large(
    num_classes: int = 21,
    in_channels: int = 3,
    *,
    inter_channels: int = 128,
    width_mult: float = 1.0,
    aux_loss: bool = False,
) -> TorchvisionLayoutModel:
    """torchvision's ``lraspp_mobilenet_v3_large``: LR-ASPP on features 4 and 16.

    Args:
        num_classes: classes K.
        in_channels: input channels.
        inter_channels: width of LR-ASPP's high-level branch (128).
        width_mult: MobileNetV3 channel multiplier (1.0: torchvision's model).
        aux_loss: must stay False (LR-ASPP has no auxiliary head, as in torchvision).

    Returns:
        The model; ``{"out": (N, K, H, W)}``.
    """
    if aux_loss:
        raise ConfigError("lraspp_mobilenet_v3_large has no auxiliary head; drop aux_loss")
    trunk = _mobilenet(in_channels, width_mult)
    info = trunk.feature_info
    head = LRASPPHead(info[0].channels, info[1].channels, num_classes, inter_channels)
    return TorchvisionLayoutModel(
        "lraspp_mobilenet_v3_large",
        "lraspp",
        trunk,
        head,
        num_classes=num_classes,
        head_levels=(0, 1),
        classifier_prefixes=("head.low_classifier.", "head.high_classifier."),
    )
