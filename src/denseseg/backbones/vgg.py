"""VGG-16, VGG-16-BN and AlexNet trunks built from torchvision's definitions.

The convolutional part is torchvision's own ``features`` (``torchvision.models.vgg.make_layers``
with configuration "D"; ``torchvision.models.AlexNet().features``), kept under the attribute
``features`` so parameter names read ``features.N.weight`` exactly as in a torchvision
classification state_dict: an ImageNet file (or a torchvision weights name such as
``"IMAGENET1K_V1"``) loads with ``weights=`` through ``load_backbone_weights`` of
:mod:`denseseg.checkpoint.weights`; its ``classifier.*`` entries are skipped here, and
:mod:`denseseg.models.convert` / the FCN models turn them into convolutions.

Options beyond torchvision's layout, all off by default:

* ``first_padding``: zero padding of the first convolution (FCN's reference models pad conv1_1 by
  100 so every input size survives the poolings; see :mod:`denseseg.models.fcn`);
* ``ceil_mode``: max-pooling rounds up as Caffe does;
* ``in_channels`` other than 3, and ``width``: a channel multiplier for tests and experiments
  (``width=1/16`` gives 4..32 channels); ``weights`` needs ``width=1`` (another ``in_channels``
  gets the first convolution adapted by the loader).

The forward returns the output of every max-pooling, ordered by stride (VGG: 2, 4, 8, 16, 32 —
pool1..pool5; AlexNet: 8, 16, 32), described by ``feature_info``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
import torchvision
from torch import Tensor
from torchvision.models.vgg import cfgs, make_layers

from denseseg.backbones._registry import FeatureInfo, register_backbone, with_weights
from denseseg.errors import ConfigError
from denseseg.layers import kaiming_init


class ClassifierLayout(NamedTuple):
    """The torchvision classifier head a trunk comes from.

    ``fc6``, ``fc7`` and ``score`` name the Linear layers that become convolutions in an FCN;
    ``pool5_side`` is the side of the pool5 map they were trained on (fc6's kernel as a
    convolution). torchvision's ``AdaptiveAvgPool2d`` resamples pool5 to this side, an identity
    at 224x224 inputs.
    """

    fc6: str
    fc7: str
    score: str
    pool5_side: int


CLASSIFIER_LAYOUT: dict[str, ClassifierLayout] = {
    "vgg16": ClassifierLayout("classifier.0", "classifier.3", "classifier.6", 7),
    "vgg16_bn": ClassifierLayout("classifier.0", "classifier.3", "classifier.6", 7),
    "alexnet": ClassifierLayout("classifier.1", "classifier.4", "classifier.6", 6),
}


class PoolingTrunk(nn.Module):
    """A torchvision ``features`` sequence that returns the output of each max-pooling.

    Args:
        features: the torchvision ``features`` sequence (names ``features.N`` are kept).
        name: the architecture's name, for messages.

    Forward:
        ``x (N, C_in, H, W) -> list`` of ``(N, C_i, H_i, W_i)``, one per max-pooling, with
        ``feature_info[i]`` giving ``C_i`` and the stride.
    """

    def __init__(self, features: nn.Sequential, name: str) -> None:
        super().__init__()
        self.features = features
        self.name = self.tv_name = name  # the torchvision classifier its weights come from
        self.feature_info: list[FeatureInfo] = []
        self._taps: list[int] = []
        stride, channels = 1, 0
        for i, m in enumerate(features):
            if isinstance(m, nn.Conv2d):
                stride *= m.stride[0]
                channels = m.out_channels
            elif isinstance(m, nn.MaxPool2d):
                stride *= int(m.stride)  # type: ignore[arg-type]
                self._taps.append(i)
                self.feature_info.append(
                    FeatureInfo(channels, stride, f"pool{len(self.feature_info) + 1}")
                )
        # AlexNet's pools are pool1, pool2 and pool5.
        if name == "alexnet":
            names = ("pool1", "pool2", "pool5")
            self.feature_info = [
                FeatureInfo(f.channels, f.reduction, n) for f, n in zip(self.feature_info, names)
            ]

    @property
    def in_channels(self) -> int:
        """Input channels of the first convolution."""
        return int(self.features[0].in_channels)

    def forward(self, x: Tensor) -> list[Tensor]:
        """Run the trunk; returns the pooled maps ordered by stride (see the class docstring)."""
        outs = []
        for i, m in enumerate(self.features):
            x = m(x)
            if i in self._taps:
                outs.append(x)
        return outs


def _scaled(channels: int, width: float) -> int:
    return max(1, int(round(channels * width)))


def _rescale(features: nn.Sequential, in_channels: int, width: float) -> nn.Sequential:
    """Rebuild convolutions / batch norms with ``width`` times the channels (same indices)."""
    if in_channels == 3 and width == 1.0:
        return features
    prev = in_channels
    for i, m in enumerate(features):
        if isinstance(m, nn.Conv2d):
            out = _scaled(m.out_channels, width)
            features[i] = nn.Conv2d(
                prev, out, m.kernel_size, stride=m.stride, padding=m.padding, dilation=m.dilation
            )
            prev = out
        elif isinstance(m, nn.BatchNorm2d):
            features[i] = nn.BatchNorm2d(prev)
    return features


def _trunk_builder(
    name: str, make_features: Callable[[], nn.Sequential], summary: str
) -> Callable[..., PoolingTrunk]:
    """Register the backbone ``name``: the :class:`PoolingTrunk` of ``make_features()``."""

    def build(
        *,
        in_channels: int = 3,
        width: float = 1.0,
        first_padding: int | None = None,
        ceil_mode: bool = False,
        weights: str | Path | None = None,
    ) -> PoolingTrunk:
        features = make_features()
        if not isinstance(in_channels, int) or in_channels < 1:
            raise ConfigError(
                f"backbone {name}: in_channels={in_channels!r} must be an integer >= 1"
            )
        if not width > 0:
            raise ConfigError(f"backbone {name}: width={width!r} must be > 0")
        if weights is not None and width != 1.0:
            raise ConfigError(f"backbone {name}: weights= needs width=1 (the file's layout)")
        features = _rescale(features, in_channels, width)
        # torchvision's VGG initialisation (its make_layers leaves PyTorch's defaults; VGG.__init__
        # sets these), applied to AlexNet too so every trunk starts alike.
        kaiming_init(features)
        if first_padding is not None:
            features[0].padding = (first_padding, first_padding)
        for m in features:
            if isinstance(m, nn.MaxPool2d):
                m.ceil_mode = ceil_mode
        return with_weights(PoolingTrunk(features, name), weights)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = f"""{summary}

        Args:
            in_channels: input channels.
            width: channel multiplier (1 = torchvision's channels).
            first_padding: padding of the first convolution (``None``: torchvision's; FCN pads
                conv1_1 by 100).
            ceil_mode: round pooling sizes up (Caffe).
            weights: a torchvision ``{name}`` state_dict file (ImageNet weights), a denseseg or
                safetensors file, or a torchvision weights name (``"IMAGENET1K_V1"``).

        Returns:
            The trunk (see :class:`PoolingTrunk`).
        """
    return register_backbone(name)(build)


def _alexnet_features() -> nn.Sequential:
    # torchvision builds AlexNet's features inside the classifier class; building the class on
    # the meta device costs nothing and the layers are re-created for real just below.
    with torch.device("meta"):
        template = torchvision.models.alexnet(weights=None).features
    return nn.Sequential(*(_materialise(m) for m in template))


vgg16 = _trunk_builder(
    "vgg16",
    lambda: make_layers(cfgs["D"], batch_norm=False),
    """VGG-16 conv1_1..pool5 (torchvision configuration "D"); 14,714,688 parameters; five
        levels at strides 2..32 with 64, 128, 256, 512, 512 channels.""",
)
vgg16_bn = _trunk_builder(
    "vgg16_bn",
    lambda: make_layers(cfgs["D"], batch_norm=True),
    """VGG-16 with batch norm after every convolution (torchvision ``vgg16_bn``); the levels
        of ``vgg16``.""",
)
alexnet = _trunk_builder(
    "alexnet",
    _alexnet_features,
    """AlexNet conv1..pool5 as in torchvision (the "one weird trick" variant: 64-192-384-256-256
        channels, no LRN, no groups); ``first_padding=None`` keeps its 2. Three levels (pool1,
        pool2, pool5) at strides 8, 16, 32 with 64, 192, 256 channels; unpadded 3x3 stride-2
        poolings make the maps slightly smaller than ``H / 8``.""",
)


def _materialise(m: nn.Module) -> nn.Module:
    if isinstance(m, nn.Conv2d):
        return nn.Conv2d(
            m.in_channels, m.out_channels, m.kernel_size, stride=m.stride, padding=m.padding
        )
    return m
