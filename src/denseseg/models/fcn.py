"""FCN-32s, FCN-16s and FCN-8s (Long, Shelhamer & Darrell, CVPR 2015), as the reference Caffe nets.

Layout (``fcn.berkeleyvision.org``, ``voc-fcn{32,16,8}s/net.py``):

* VGG-16 conv1_1..pool5 with conv1_1 padded by 100 pixels and max-pooling rounding up (Caffe), so
  that any input from 1 pixel up survives the five poolings and the 7x7 fc6;
* fc6 as a 7x7 convolution and fc7 as a 1x1 convolution (4096 channels, ReLU, dropout 0.5), then
  ``score_fr``, a 1x1 convolution to the classes;
* up-sampling by bias-free transposed convolutions set to bilinear interpolation and frozen, as in
  the released models (``learnable_upsampling=True`` lets them learn, as the paper's first
  experiments did): 64x64/32 for FCN-32s; 4x4/2 then 32x32/16 for FCN-16s; 4x4/2, 4x4/2 then
  16x16/8 for FCN-8s;
* skips: ``score_pool4`` / ``score_pool3`` (1x1 convolutions on pool4 / pool3), cropped into
  alignment and summed with the 2x up-sampled coarser scores;
* crops at the reference offsets (FCN-32s: output at 19; FCN-16s: score_pool4 at 5, output at 27;
  FCN-8s: score_pool4 at 5, score_pool3 at 9, output at 31), which the reference's ``crop`` layer
  derives from the layer geometry; the output is aligned with the input for every input size.

Score layers start at zero (the paper: "zero initialization of the class scoring layer"; the skip
layers so that a net refined from a coarser one starts with that net's predictions).

FCN-8s trained in stages (32s -> 16s -> 8s, the paper's 62.7 mean IU) is the default. The released
"at-once" FCN-8s, trained from VGG-16 in one go, scales pool4 by 0.01 and pool3 by 0.0001 before
their score layers ("scale pool4 skip for compatibility"): ``fcn8s(at_once=True)``. Use it when
training FCN-8s directly from ImageNet weights. The released net scales the pooled features
that feed the score layers (so the score layers' weights, not their biases, are scaled), not the
scores themselves; so does this one. The scales are fixed numbers here; Caffe stored them as
frozen per-channel blobs, which add no parameters here.

Deviations for tests and experiments (defaults are the paper's): ``width`` scales the VGG
channels, ``fc_channels`` replaces fc6/fc7's 4096, ``zero_init_scores=False`` draws the score
layers from N(0, 0.01^2).

Input: the reference models took BGR images in 0-255 minus the mean (104.00699, 116.66877,
122.67892). denseseg feeds RGB scaled to [0, 1] and normalised with the recipe's ``data.mean`` /
``data.std`` (ImageNet's for torchvision weights). To run weights converted from Caffe, reverse
conv1_1's input channels and set ``mean = (122.67892, 116.66877, 104.00699) / 255``,
``std = (1 / 255,) * 3``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch.nn as nn
from torch import Tensor

from denseseg.backbones import create_backbone
from denseseg.backbones.vgg import CLASSIFIER_LAYOUT
from denseseg.checkpoint import read_weights
from denseseg.errors import CheckpointError, ConfigError
from denseseg.layers.upsample import bilinear_upsampler
from denseseg.models._registry import register_variant
from denseseg.models.base import check_positive_ints

log = logging.getLogger(__name__)

CAFFE_FIRST_PADDING = 100
# Reference crop offsets: (score_pool4, score_pool3, output) as far as each net has them.
CROP_OFFSETS: dict[int, tuple[int, ...]] = {32: (19,), 16: (5, 27), 8: (5, 9, 31)}
AT_ONCE_SCALES = (0.01, 0.0001)  # pool4, pool3
FCN_BACKBONES = ("vgg16", "vgg16_bn")

TEST_CFG: dict[str, Any] = {"width": 1 / 32, "fc_channels": 8, "zero_init_scores": False}


def crop_like(x: Tensor, offset: int, size: tuple[int, int]) -> Tensor:
    """``x[..., offset:offset + h, offset:offset + w]`` for ``size = (h, w)``; Caffe's ``Crop``.

    Raises:
        RuntimeError: ``x`` is too small (a layout error, not a user error).
    """
    h, w = size
    if x.shape[-2] < offset + h or x.shape[-1] < offset + w:
        raise RuntimeError(
            f"cannot crop {tuple(x.shape[-2:])} at offset {offset} to {(h, w)}: layout error"
        )
    return x[..., offset : offset + h, offset : offset + w]


class _Trunk(nn.Module):
    """Backbone, fc6, fc7 and class scores, shared by :class:`FCNTrunk` and :class:`FCN` (so
    their state-dict keys agree: ``backbone.features.N.*``, ``fc6.*``, ``fc7.*``, ``score_fr.*``).

    Args:
        num_classes: score channels (1000 for an ImageNet classifier).
        backbone: ``"vgg16"``, ``"vgg16_bn"`` or ``"alexnet"``.
        in_channels: input channels.
        width: backbone channel multiplier (tests/experiments; 1 is the paper's).
        fc_channels: channels of fc6 and fc7 (4096 in the paper).
        dropout: dropout after fc6 and fc7.
        first_padding: padding of the first convolution (``None``: torchvision's; 100: Caffe FCN).
        ceil_mode: pooling rounds up (Caffe FCN).
        zero_init_scores: start the score layer(s) at zero (the paper); else N(0, 0.01^2).
    """

    def __init__(
        self,
        num_classes: int,
        backbone: str = "vgg16",
        *,
        in_channels: int = 3,
        width: float = 1.0,
        fc_channels: int = 4096,
        dropout: float = 0.5,
        first_padding: int | None = None,
        ceil_mode: bool = False,
        zero_init_scores: bool = True,
    ) -> None:
        super().__init__()
        if backbone not in CLASSIFIER_LAYOUT:
            raise ConfigError(
                f"FCN option backbone={backbone!r}; choose one of {', '.join(CLASSIFIER_LAYOUT)}"
            )
        check_positive_ints(
            "FCN", num_classes=num_classes, in_channels=in_channels, fc_channels=fc_channels
        )
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"FCN option dropout={dropout!r} must lie in [0, 1)")
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.backbone_name = backbone
        self.backbone = create_backbone(
            backbone,
            in_channels=in_channels,
            width=width,
            first_padding=first_padding,
            ceil_mode=ceil_mode,
        )
        c5 = self.backbone.feature_info[-1].channels
        self.fc6 = nn.Conv2d(c5, fc_channels, CLASSIFIER_LAYOUT[backbone].pool5_side)
        self.relu6 = nn.ReLU(inplace=True)
        self.drop6 = nn.Dropout(dropout)
        self.fc7 = nn.Conv2d(fc_channels, fc_channels, 1)
        self.relu7 = nn.ReLU(inplace=True)
        self.drop7 = nn.Dropout(dropout)
        self.score_fr = nn.Conv2d(fc_channels, num_classes, 1)
        for fc in (self.fc6, self.fc7):
            # torchvision's initialisation of the Linear layers these convolutions replace.
            nn.init.normal_(fc.weight, 0.0, 0.01)
            nn.init.zeros_(fc.bias)
        self._init_score(self.score_fr, zero_init_scores)

    @staticmethod
    def _init_score(conv: nn.Conv2d, zero: bool) -> None:
        if zero:
            nn.init.zeros_(conv.weight)
        else:
            nn.init.normal_(conv.weight, 0.0, 0.01)
        nn.init.zeros_(conv.bias)

    def trunk(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        """Pooled backbone maps (pool1..pool5) and the stride-32 class scores for ``x``."""
        feats = self.backbone(x)
        y = self.drop6(self.relu6(self.fc6(feats[-1])))
        y = self.drop7(self.relu7(self.fc7(y)))
        return feats, self.score_fr(y)

    def load_classifier_state_dict(self, state: Mapping[str, Tensor]) -> list[str]:
        """Load a torchvision classification state_dict, fully connected layers reshaped.

        ``classifier`` Linear weights ``(out, C * k * k)`` become convolution kernels
        ``(out, C, k, k)`` (the flattening order of torchvision's ``torch.flatten`` is channel,
        row, column, which is exactly a conv weight's layout). The class-score layer is loaded
        only when its class count matches; otherwise it keeps its initialisation.

        Args:
            state: e.g. ``torchvision.models.vgg16(weights=...).state_dict()``.

        Returns:
            Keys of this module that were left as initialised (the score layer's on a class
            count mismatch).

        Raises:
            CheckpointError: the state_dict is not a torchvision classifier of this backbone.
        """
        layout = CLASSIFIER_LAYOUT[self.backbone_name]
        mapping = {layout.fc6: "fc6", layout.fc7: "fc7", layout.score: "score_fr"}
        own = self.state_dict()
        converted: dict[str, Tensor] = {}
        for key, value in state.items():
            if key.startswith("features."):
                converted["backbone." + key] = value
            elif key.rsplit(".", 1)[0] in mapping:
                layer, kind = key.rsplit(".", 1)
                target = f"{mapping[layer]}.{kind}"
                if target in own and value.numel() == own[target].numel():
                    value = value.reshape(own[target].shape)
                converted[target] = value
        wrong = [
            k
            for k in own
            if k.startswith(("backbone.", "fc6.", "fc7."))
            and (k not in converted or converted[k].shape != own[k].shape)
        ]
        if wrong:
            raise CheckpointError(
                f"not a torchvision {self.backbone_name} classifier state_dict (first mismatch: "
                f"{wrong[0]}); give the state_dict of torchvision.models.{self.backbone_name}"
            )
        skipped = [
            k
            for k in ("score_fr.weight", "score_fr.bias")
            if k not in converted or converted[k].shape != own[k].shape
        ]
        self.load_state_dict({k: v for k, v in converted.items() if k not in skipped}, strict=False)
        if skipped:
            log.info("class count differs: %s left as initialised", ", ".join(skipped))
        return skipped


class FCNTrunk(_Trunk):
    """A classification network in convolutional form: backbone, fc6, fc7, class scores.

    This is the "convolutionalized" classifier of the FCN paper (section 3.1): fully
    connected layers become convolutions whose kernel covers the whole map they used to see
    (7x7 for VGG-16's pool5), so the net slides over larger images and yields a map of scores.
    Build one from a torchvision classifier with
    :func:`denseseg.models.convert.convert_classifier_to_fcn`; arguments as in ``_Trunk``.

    Forward:
        ``x (N, in_channels, H, W) -> scores (N, num_classes, h, w)`` at stride 32; for VGG-16
        with torchvision's padding ``h = floor(H / 32) - 6``: 1x1 at 224x224.
    """

    def forward(self, x: Tensor) -> Tensor:
        """Class score map ``(N, num_classes, h, w)`` for ``x (N, in_channels, H, W)``."""
        return self.trunk(x)[1]


class FCN(_Trunk):
    """FCN-32s / FCN-16s / FCN-8s on VGG-16 (see the module docstring for the layout).

    Args:
        num_classes: output channels (21 for PASCAL VOC); 1 means binary.
        stride: 32, 16 or 8: the finest skip (none, pool4, pool4 + pool3).
        backbone: ``"vgg16"`` (the paper) or ``"vgg16_bn"`` (same geometry, same crops).
        in_channels: input channels.
        width: backbone channel multiplier (tests/experiments).
        fc_channels: fc6/fc7 channels (4096 in the paper).
        dropout: dropout after fc6 and fc7 (0.5).
        learnable_upsampling: let the bilinear up-samplers learn (frozen by default).
        at_once: FCN-8s only: scale pool4 by 0.01 and pool3 by 0.0001 (the at-once model).
        zero_init_scores: start all score layers at zero (the paper).

    Forward:
        ``x (N, in_channels, H, W) -> {"out": logits (N, num_classes, H, W)}``, any ``H, W >= 1``.
    """

    def __init__(
        self,
        num_classes: int,
        stride: int = 8,
        backbone: str = "vgg16",
        *,
        in_channels: int = 3,
        width: float = 1.0,
        fc_channels: int = 4096,
        dropout: float = 0.5,
        learnable_upsampling: bool = False,
        at_once: bool = False,
        zero_init_scores: bool = True,
    ) -> None:
        if stride not in CROP_OFFSETS:
            raise ConfigError(f"FCN option stride={stride!r}; choose 32, 16 or 8")
        if backbone not in FCN_BACKBONES:
            raise ConfigError(
                f"FCN-{stride}s is defined on VGG-16: backbone={backbone!r}; choose "
                f"{' or '.join(FCN_BACKBONES)} (for AlexNet use convert_classifier_to_fcn)"
            )
        if at_once and stride != 8:
            raise ConfigError("FCN option at_once=True exists for FCN-8s only (fcn8s)")
        super().__init__(
            num_classes,
            backbone,
            in_channels=in_channels,
            width=width,
            fc_channels=fc_channels,
            dropout=dropout,
            first_padding=CAFFE_FIRST_PADDING,
            ceil_mode=True,
            zero_init_scores=zero_init_scores,
        )
        self.stride = stride
        self.crops = CROP_OFFSETS[stride]
        self.skip_scales = AT_ONCE_SCALES if at_once else (1.0, 1.0)
        k, info = num_classes, self.backbone.feature_info
        learn = learnable_upsampling
        if stride == 32:
            self.upscore = bilinear_upsampler(k, 64, 32, learnable=learn)
            return
        self.upscore2 = bilinear_upsampler(k, 4, 2, learnable=learn)
        self.score_pool4 = nn.Conv2d(info[3].channels, k, 1)
        self._init_score(self.score_pool4, zero_init_scores)
        if stride == 16:
            self.upscore16 = bilinear_upsampler(k, 32, 16, learnable=learn)
            return
        self.upscore_pool4 = bilinear_upsampler(k, 4, 2, learnable=learn)
        self.score_pool3 = nn.Conv2d(info[2].channels, k, 1)
        self._init_score(self.score_pool3, zero_init_scores)
        self.upscore8 = bilinear_upsampler(k, 16, 8, learnable=learn)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Segment a batch.

        Args:
            x: images ``(N, in_channels, H, W)``.

        Returns:
            ``{"out": logits (N, num_classes, H, W)}``.
        """
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"FCN expects (N, {self.in_channels}, H, W) input, got {x.shape}")
        size = (x.shape[-2], x.shape[-1])
        feats, score = self.trunk(x)
        if self.stride == 32:
            return {"out": crop_like(self.upscore(score), self.crops[0], size)}
        up = self.upscore2(score)
        pool4 = self.score_pool4(feats[3] * self.skip_scales[0])
        fused = up + crop_like(pool4, self.crops[0], (up.shape[-2], up.shape[-1]))
        if self.stride == 16:
            return {"out": crop_like(self.upscore16(fused), self.crops[1], size)}
        up = self.upscore_pool4(fused)
        pool3 = self.score_pool3(feats[2] * self.skip_scales[1])
        fused = up + crop_like(pool3, self.crops[1], (up.shape[-2], up.shape[-1]))
        return {"out": crop_like(self.upscore8(fused), self.crops[2], size)}


def build_fcn(
    num_classes: int,
    in_channels: int = 3,
    backbone: str = "vgg16",
    backbone_weights: str | Path | None = None,
    width: float = 1.0,
    fc_channels: int = 4096,
    dropout: float = 0.5,
    learnable_upsampling: bool = False,
    at_once: bool = False,
    zero_init_scores: bool = True,
    *,
    stride: int,
) -> FCN:
    """FCN-32s, FCN-16s or FCN-8s, registered as ``fcn32s``, ``fcn16s`` and ``fcn8s``.

    Args:
        num_classes: output channels (21 for PASCAL VOC).
        in_channels: input channels.
        backbone: ``"vgg16"`` or ``"vgg16_bn"``.
        backbone_weights: a torchvision ImageNet classifier of ``backbone``: a local file (e.g.
            ``vgg16-397923af.pth``), a state_dict or a torchvision weights name
            (``"IMAGENET1K_V1"``). conv1-conv5 load as they are and fc6/fc7 convolutionalised
            (the paper's initialisation); the 1000-class layer is dropped.
        width, fc_channels, dropout, learnable_upsampling, at_once, zero_init_scores: see
            :class:`FCN`.
        stride: 32, 16 or 8.

    Returns:
        The model.
    """
    if backbone_weights is not None and (width != 1.0 or fc_channels != 4096 or in_channels != 3):
        raise ConfigError(
            "FCN option backbone_weights needs width=1, fc_channels=4096 and in_channels=3 "
            "(the layout of an ImageNet VGG-16 file)"
        )
    model = FCN(
        num_classes,
        stride,
        backbone,
        in_channels=in_channels,
        width=width,
        fc_channels=fc_channels,
        dropout=dropout,
        learnable_upsampling=learnable_upsampling,
        at_once=at_once,
        zero_init_scores=zero_init_scores,
    )
    if backbone_weights is not None:
        model.load_classifier_state_dict(read_weights(backbone_weights, backbone)[0])
    return model


# The three nets of the paper: build_fcn at each stride (only FCN-8s has an at-once variant).
_FCN_DOCS = {
    32: """FCN-32s: single stream, 32-pixel prediction stride; options as :func:`build_fcn`
    (136,152,917 parameters for 21 classes, 1,806,336 of them in the frozen 64x64 up-sampler).""",
    16: """FCN-16s: two streams (pool5, pool4), 16-pixel prediction stride; options as
    :func:`build_fcn` (134,815,994 parameters for 21 classes).""",
    8: """FCN-8s: three streams (pool5, pool4, pool3), 8-pixel prediction stride; options as
    :func:`build_fcn`, ``at_once=True`` for the all-at-once variant (pool4 x 0.01, pool3 x
    0.0001), the one to train directly from ImageNet weights (134,489,759 parameters for 21
    classes, either way).""",
}
for _stride, _doc in _FCN_DOCS.items():
    register_variant(
        f"fcn{_stride}s",
        build_fcn,
        fixed={"stride": _stride} if _stride == 8 else {"stride": _stride, "at_once": False},
        test_cfg=TEST_CFG,
        description=f"FCN-{_stride}s (Long et al. 2015), VGG-16",
        doc=_doc,
    )
