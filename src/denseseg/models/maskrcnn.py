"""Mask R-CNN (He et al., ICCV 2017) from torchvision's detection modules, with a choice of RoI
pooler.

``maskrcnn_resnet50_fpn`` is torchvision's model: a ResNet-50-FPN backbone, torchvision's RPN,
box head (two 1024-wide fully connected layers on 7x7 RoI features) and mask head (four 3x3
convolutions of 256 channels on 14x14 RoI features, a 2x2 deconvolution to 28x28, one sigmoid
mask per class). In its default layout (``norm="frozen_bn"``, 91 classes, ``pooler="roialign"``)
it has torchvision's 44,401,393 parameters and the same state_dict keys, so torchvision's weights
load directly (``weights="COCO_V1"`` or the local ``maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth``)
and give torchvision's outputs.

What is ours:

* ``pooler`` picks the box and mask RoI pooler (``POOLER_KINDS``): ``roipool`` (quantised RoI
  and bins, max), ``roiwarp`` (quantised RoI, bilinear samples, max), ``roialign`` (no
  quantisation, bilinear samples, average; the paper's choice) and ``roialign_max``, from
  :mod:`denseseg.ops.poolers`, to reproduce the paper's Table 2c.
* ``norm``: frozen batch norm is an identity at random initialisation, so training from scratch
  takes ``"bn"`` or ``"gn"`` (GroupNorm with 32 groups, as in He et al., "Rethinking ImageNet
  Pre-training", 2019), applied to the backbone, the FPN and the mask head.
* width options (``backbone``, ``fpn_channels``, ``representation_size``,
  ``mask_head_channels``) and ``anchor_sizes`` for small models on small objects (nuclei).

The model follows torchvision's calling convention, not the semantic models' ``{"out": ...}``:
``model(images, targets)`` takes a list of float images ``(C, H_i, W_i)`` in 0-1 (it normalises
with ``image_mean``/``image_std`` and resizes to ``min_size``/``max_size`` inside) and returns a
loss dict in training, a list of ``{"boxes", "labels", "scores", "masks"}`` dicts in eval mode.
``task = "instance"`` tells the engine to train and evaluate it as an instance model.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

import torchvision
from torch import nn
from torchvision.models.detection import MaskRCNN as _TVMaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.models.detection.faster_rcnn import FasterRCNN, FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.misc import FrozenBatchNorm2d

from denseseg.backbones.resnet import ResNetBackbone
from denseseg.checkpoint import read_weights
from denseseg.errors import CheckpointError, ConfigError
from denseseg.models._registry import register_model, register_variant
from denseseg.ops.poolers import POOLER_KINDS, MultiScaleRoIPool

__all__ = ["NORMS", "POOLER_KINDS", "MaskRCNN", "build_pooler", "maskrcnn_resnet50_fpn"]

NORMS = ("frozen_bn", "bn", "gn")
RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101")
FEATMAPS = ["0", "1", "2", "3"]  # FPN levels P2-P5 that RoIs are pooled from (P6 is RPN-only)


def build_pooler(kind: str, output_size: int, sampling_ratio: int = 2) -> nn.Module:
    """A multi-scale (FPN) RoI pooler of ``kind``, a drop-in for torchvision's
    ``MultiScaleRoIAlign``.

    Args:
        kind: one of :data:`POOLER_KINDS`.
        output_size: side of the pooled grid (7 for the box head, 14 for the mask head).
        sampling_ratio: bilinear samples per bin side (2: the paper's four points per bin).

    Returns:
        Module ``(features: dict[str, (N, C, H_l, W_l)], boxes: list[(R_i, 4)], image_sizes)
        -> (sum R_i, C, output_size, output_size)``.
    """
    if kind not in POOLER_KINDS:
        raise ConfigError(f"pooler {kind!r}: choose one of {', '.join(POOLER_KINDS)}")
    return MultiScaleRoIPool(FEATMAPS, output_size, sampling_ratio, kind=kind)


def _detection_options() -> frozenset[str]:
    # torchvision's RPN/box thresholds and sizes. Checked here because its image transform takes
    # **kwargs and silently drops names it does not know, so a typo would go unnoticed.
    params = inspect.signature(FasterRCNN.__init__).parameters
    built = {"rpn_anchor_generator", "rpn_head", "box_roi_pool", "box_head", "box_predictor"}
    names = {p for p in params if p.startswith(("rpn_", "box_", "bbox_")) and p not in built}
    return frozenset(names | {"size_divisible", "fixed_size"})


def _out_channels(stage: nn.Module) -> int:
    return [m for m in stage.modules() if isinstance(m, nn.Conv2d)][-1].out_channels


def _trunk(name: str, norm_layer: Callable[[int], nn.Module], width: float) -> nn.Module:
    """torchvision's ResNet ``name`` with ``norm_layer``; at ``width != 1`` denseseg's scaled
    ResNet (same blocks, every stage's channels times ``width``) with its norms swapped."""
    if width == 1:
        return getattr(torchvision.models, name)(weights=None, norm_layer=norm_layer)
    trunk = ResNetBackbone(int(name[len("resnet") :]), width=width)
    for parent in list(trunk.modules()):
        for child_name, child in parent.named_children():
            if isinstance(child, nn.BatchNorm2d):
                setattr(parent, child_name, norm_layer(child.num_features))
    # torchvision's FPN extractor reads the last stage's width from here.
    trunk.inplanes = _out_channels(trunk.layer4)
    return trunk


def _norm_layer(norm: str) -> Callable[[int], nn.Module] | None:
    if norm == "frozen_bn":
        return FrozenBatchNorm2d
    if norm == "bn":
        return nn.BatchNorm2d
    if norm == "gn":
        # 32 groups (Wu & He, 2018), fewer where a narrow test model has fewer channels.
        return lambda c: nn.GroupNorm(math.gcd(32, c), c)
    raise ConfigError(f"norm {norm!r}: choose one of {', '.join(NORMS)}")


class MaskRCNN(_TVMaskRCNN):
    """torchvision's Mask R-CNN with the attributes denseseg's engine and loaders read.

    Args:
        backbone: a module returning ``OrderedDict[str, (N, C, H, W)]`` with ``out_channels``.
        num_classes: classes including background (torchvision's convention: 91 for COCO ids).
        in_channels: input channels (3).
        pooler: the RoI pooler kind of both heads (:data:`POOLER_KINDS`).
        norm: the normalisation the model was built with (:data:`NORMS`).
        **kwargs: torchvision ``MaskRCNN`` arguments (heads, anchors, thresholds, sizes).

    Attributes:
        task: ``"instance"``.
        tv_name: torchvision's builder name (where named weights are looked up).
        classifier_prefixes: the class-dependent layers, left out when loading weights trained
            for another number of classes.
        optional_prefixes: see the property.
    """

    task = "instance"
    tv_name = "maskrcnn_resnet50_fpn"
    classifier_prefixes = (
        "roi_heads.box_predictor.",
        "roi_heads.mask_predictor.mask_fcn_logits.",
    )

    def __init__(
        self,
        backbone: nn.Module,
        *,
        num_classes: int,
        in_channels: int = 3,
        pooler: str = "roialign",
        norm: str = "frozen_bn",
        **kwargs: Any,
    ) -> None:
        super().__init__(backbone, num_classes=None, **kwargs)
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.pooler = pooler
        self.norm = norm

    @property
    def optional_prefixes(self) -> tuple[str, ...]:
        """Keys a weights file may hold that the model does without: the batch counters of a
        BatchNorm-trained file, which frozen batch norm has no use for."""
        return tuple(
            f"{name}.num_batches_tracked"
            for name, m in self.named_modules()
            if isinstance(m, FrozenBatchNorm2d)
        )


def _load_trunk_weights(trunk: nn.Module, source: Any, name: str) -> None:
    """Load ImageNet (classification) weights into the ResNet before the FPN is attached."""
    state, where = read_weights(source, name)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if any(k.startswith("backbone.body.") for k in state):  # a whole detection model's file
        state = {k[14:]: v for k, v in state.items() if k.startswith("backbone.body.")}
    own = {k: v for k, v in trunk.state_dict().items() if not k.startswith("fc.")}
    bad = [k for k in own if k not in state or state[k].shape != own[k].shape]
    # Batch-norm statistics with nowhere to go: BN affine weights would land in GroupNorm.
    bad += [k for k in state if k.endswith(".running_mean") and k not in own]
    if bad:
        raise CheckpointError(
            f"backbone_weights {where} do not fit {name} with this norm: {len(bad)} tensors "
            f"missing or of another shape (first: {bad[0]}); give {name} weights"
        )
    trunk.load_state_dict({k: state[k] for k in own}, strict=False)


@register_model(
    "maskrcnn_resnet50_fpn",
    test_cfg={
        "backbone": "resnet18",
        "norm": "gn",
        "fpn_channels": 32,
        "representation_size": 64,
        "mask_head_channels": 16,
        "min_size": 64,
        "max_size": 96,
    },
    description="Mask R-CNN, ResNet-50-FPN (torchvision layout), RoI pooler of choice",
    task="instance",
)
def maskrcnn_resnet50_fpn(
    num_classes: int = 91,
    in_channels: int = 3,
    *,
    pooler: str = "roialign",
    norm: str = "frozen_bn",
    backbone: str = "resnet50",
    backbone_width: float = 1.0,
    trainable_backbone_layers: int | None = None,
    backbone_weights: Any = None,
    min_size: int | Sequence[int] = 800,
    max_size: int = 1333,
    image_mean: Sequence[float] | None = None,
    image_std: Sequence[float] | None = None,
    fpn_channels: int = 256,
    representation_size: int = 1024,
    mask_head_channels: int = 256,
    anchor_sizes: Sequence[int] = (32, 64, 128, 256, 512),
    sampling_ratio: int = 2,
    **kwargs: Any,
) -> MaskRCNN:
    """Mask R-CNN with a ResNet-FPN backbone, built from torchvision's modules.

    Args:
        num_classes: classes including background (91: COCO's category ids, as torchvision).
        in_channels: must be 3 (grayscale images are expanded by the readers and predictors).
        pooler: RoI pooler of the box and mask heads: ``roipool``, ``roiwarp``, ``roialign``
            (default) or ``roialign_max``.
        norm: ``frozen_bn`` (torchvision's layout, for pretrained backbones), ``bn`` or ``gn``
            (backbone, FPN and mask head; for training from scratch).
        backbone: a torchvision ResNet (``resnet50`` default; ``resnet18`` for small models).
        backbone_width: multiplier of the ResNet's channels (1: torchvision's; 0.5 or 0.25
            make cheap models for CPUs and tests: denseseg's scaled ResNet).
        trainable_backbone_layers: ResNet stages trained, 0-5 (default 3 with ``frozen_bn``
            as torchvision, else 5).
        backbone_weights: ImageNet weights of the ResNet: a local file, a state_dict or a
            torchvision name (``IMAGENET1K_V1``).
        min_size: images are resized inside the model so the short side is ``min_size`` (a
            sequence: one is drawn per batch in training) ...
        max_size: ... and the long side at most ``max_size``; small tiles set both small.
        image_mean: normalisation mean in 0-1 units (ImageNet's by default).
        image_std: normalisation std in 0-1 units.
        fpn_channels: FPN width (256).
        representation_size: width of the box head's two fully connected layers (1024).
        mask_head_channels: width of the mask head's convolutions and deconvolution (256).
        anchor_sizes: one anchor size per FPN level P2-P6 (three aspect ratios each).
        sampling_ratio: bilinear samples per RoI bin side in the poolers (2).
        **kwargs: further torchvision ``MaskRCNN`` options (``box_score_thresh``,
            ``box_detections_per_img``, ``rpn_post_nms_top_n_train``, ...).

    Returns:
        The model (see :class:`MaskRCNN`); eval mode returns per image ``boxes (N, 4)`` XYXY,
        ``labels (N,)``, ``scores (N,)`` and ``masks (N, 1, H, W)`` probabilities.
    """
    if in_channels != 3:
        raise ConfigError(
            f"maskrcnn_resnet50_fpn takes RGB images (in_channels=3), got {in_channels}; "
            "grayscale images are expanded to 3 channels by the readers"
        )
    if backbone not in RESNETS:
        raise ConfigError(f"backbone {backbone!r}: choose one of {', '.join(RESNETS)}")
    unknown = sorted(set(kwargs) - _detection_options())
    if unknown:
        raise ConfigError(
            f"Mask R-CNN has no option {unknown[0]!r}; besides its named options it takes "
            f"torchvision's {', '.join(sorted(_detection_options()))}"
        )
    if len(anchor_sizes) != 5:
        raise ConfigError(f"anchor_sizes needs 5 sizes (P2-P6), got {list(anchor_sizes)}")
    norm_layer = _norm_layer(norm)
    head_norm = None if norm == "frozen_bn" else norm_layer
    if trainable_backbone_layers is None:
        trainable_backbone_layers = 3 if norm == "frozen_bn" else 5
    if not 0 <= trainable_backbone_layers <= 5:
        raise ConfigError(f"trainable_backbone_layers must be 0-5, got {trainable_backbone_layers}")

    trunk = _trunk(backbone, norm_layer, backbone_width)
    if backbone_weights is not None:
        _load_trunk_weights(trunk, backbone_weights, backbone)
    body = _resnet_fpn_extractor(trunk, trainable_backbone_layers, norm_layer=head_norm)
    in_list = [_out_channels(getattr(trunk, f"layer{i}")) for i in range(1, 5)]
    if fpn_channels != body.out_channels or backbone_width != 1:
        body.fpn = FeaturePyramidNetwork(
            in_list, fpn_channels, extra_blocks=LastLevelMaxPool(), norm_layer=head_norm
        )
        body.out_channels = fpn_channels

    pool = build_pooler(pooler, 7, sampling_ratio)
    anchors = AnchorGenerator(tuple((int(s),) for s in anchor_sizes), ((0.5, 1.0, 2.0),) * 5)
    model = MaskRCNN(
        body,
        num_classes=num_classes,
        in_channels=in_channels,
        pooler=pooler,
        norm=norm,
        min_size=min_size,
        max_size=max_size,
        image_mean=list(image_mean) if image_mean is not None else None,
        image_std=list(image_std) if image_std is not None else None,
        rpn_anchor_generator=anchors,
        rpn_head=RPNHead(fpn_channels, anchors.num_anchors_per_location()[0]),
        box_head=TwoMLPHead(fpn_channels * 7 * 7, representation_size),
        box_predictor=FastRCNNPredictor(representation_size, num_classes),
        mask_head=MaskRCNNHeads(fpn_channels, (mask_head_channels,) * 4, 1, norm_layer=head_norm),
        mask_predictor=MaskRCNNPredictor(mask_head_channels, mask_head_channels, num_classes),
        **kwargs,
    )
    # torchvision type-checks its poolers against MultiScaleRoIAlign, so ours go in afterwards.
    model.roi_heads.box_roi_pool = pool
    model.roi_heads.mask_roi_pool = build_pooler(pooler, 14, sampling_ratio)
    return model


maskrcnn_resnet18_fpn = register_variant(
    "maskrcnn_resnet18_fpn",
    maskrcnn_resnet50_fpn,
    defaults={"backbone": "resnet18"},
    test_cfg={
        "norm": "bn",
        "fpn_channels": 16,
        "representation_size": 32,
        "mask_head_channels": 8,
        "min_size": 64,
        "max_size": 96,
    },
    description="Mask R-CNN, ResNet-18-FPN: small images and from-scratch training",
    doc="""Mask R-CNN on a ResNet-18-FPN, for small images (tiles) and training from scratch;
    the options of :func:`maskrcnn_resnet50_fpn` (``norm="gn"`` for training from scratch,
    narrower heads, ``min_size``/``max_size`` of the tiles, ImageNet ResNet-18
    ``backbone_weights``, ...).""",
)
