"""ResNet-18/34/50/101 trunks from torchvision's definitions, with dilation on request.

The stem and the four stages are torchvision's own modules (``torchvision.models.resnet*``), kept
under torchvision's attribute names, so parameter names read ``conv1.weight``,
``layer3.5.conv2.weight`` exactly as in a torchvision classification state_dict (whose ``fc.*``
keys a backbone simply does not use).

Output stride (DeepLab's "atrous convolution"): ``output_stride=16`` removes the stride of
``layer4`` and dilates its 3x3 convolutions by 2; ``output_stride=8`` does the same to ``layer3``
(dilation 2) and ``layer4`` (dilation 4). For ResNet-50/101 this is exactly torchvision's
``replace_stride_with_dilation``: the first unit of a dilated stage keeps the previous stage's
dilation, the others take the stage's. torchvision refuses dilation in ``BasicBlock``
(ResNet-18/34); here the same rule is applied to both of its 3x3 convolutions (the first one of the
first unit keeps the previous dilation, as timm does).

Multi-grid (DeepLabv3, section 3.2): ``multi_grid=(1, 2, 4)`` gives the units of ``layer4`` their
own rates, each multiplied by the stage's dilation (output stride 16: 2, 4, 8; at 8: 4, 8, 16).
It needs one rate per unit (three for ResNet-50/101, two for ResNet-18/34).

The forward returns five maps ordered by stride: ``stem`` (after conv1/bn1/relu, stride 2),
``layer1`` (4), ``layer2`` (8), ``layer3`` (16), ``layer4`` (32); dilation caps the strides at
the output stride.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn as nn
import torchvision
from torch import Tensor
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from denseseg.backbones._registry import FeatureInfo, register_backbone, with_weights
from denseseg.errors import ConfigError

DEPTHS = (18, 34, 50, 101)
OUTPUT_STRIDES = (8, 16, 32)
STAGES = ("layer1", "layer2", "layer3", "layer4")
LAYOUTS = {
    18: (BasicBlock, [2, 2, 2, 2]),
    34: (BasicBlock, [3, 4, 6, 3]),
    50: (Bottleneck, [3, 4, 6, 3]),
    101: (Bottleneck, [3, 4, 23, 3]),
}


class ResNetBackbone(nn.Module):
    """A torchvision ResNet without its pooling and ``fc``, returning the map of every stage.

    Args:
        depth: 18, 34, 50 or 101.
        output_stride: 32 (no dilation), 16 or 8.
        multi_grid: unit rates of ``layer4`` (one per unit), multiplied by its dilation; ``None``
            keeps torchvision's rates.
        in_channels: input channels; other than 3 replaces ``conv1`` by a fresh convolution.
        width: multiplier of every stage's channels (1: torchvision's network; smaller widths
            make cheap trunks for tests and experiments).

    Forward:
        ``x (N, C_in, H, W) -> list`` of five ``(N, C_i, ceil(H / s_i), ceil(W / s_i))`` maps,
        with ``feature_info[i] = FeatureInfo(C_i, s_i, name)``.
    """

    def __init__(
        self,
        depth: int = 50,
        *,
        output_stride: int = 32,
        multi_grid: Sequence[int] | None = None,
        in_channels: int = 3,
        width: float = 1.0,
    ) -> None:
        super().__init__()
        name = f"resnet{depth}"
        if depth not in DEPTHS:
            raise ConfigError(f"ResNet depth {depth!r} is not one of {DEPTHS}")
        if output_stride not in OUTPUT_STRIDES:
            raise ConfigError(
                f"{name}: output_stride={output_stride!r} must be one of {OUTPUT_STRIDES}"
            )
        if not isinstance(in_channels, int) or in_channels < 1:
            raise ConfigError(f"{name}: in_channels={in_channels!r} must be an integer >= 1")
        if not (isinstance(width, int | float) and width > 0):
            raise ConfigError(f"{name}: width={width!r} must be > 0")
        net = (
            getattr(torchvision.models, name)(weights=None)
            if width == 1
            else _WidthResNet(*LAYOUTS[depth], width=float(width))
        )
        self.name = name
        self.tv_name = name  # the torchvision classification model the weights come from
        self.output_stride = output_stride
        self.multi_grid = tuple(multi_grid) if multi_grid is not None else None
        self.conv1 = net.conv1
        if in_channels != 3:
            stem = net.conv1.out_channels
            self.conv1 = nn.Conv2d(in_channels, stem, 7, stride=2, padding=3, bias=False)
            nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.bn1, self.relu, self.maxpool = net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            net.layer1,
            net.layer2,
            net.layer3,
            net.layer4,
        )

        # Stage strides 4, 8, 16, 32: stages past the output stride lose their stride and dilate.
        dilation, stride = 1, 4
        reductions = [2, 4]
        for stage_name in STAGES[1:]:
            stage = getattr(self, stage_name)
            if stride * 2 > output_stride:
                previous = dilation
                dilation *= 2
                _dilate_stage(stage, previous, dilation)
            else:
                stride *= 2
            reductions.append(stride)
        if self.multi_grid is not None:
            _apply_multi_grid(self.layer4, self.multi_grid, dilation, name)
        channels = [self.bn1.num_features] + [_out_channels(getattr(self, s)) for s in STAGES]
        self.feature_info = [
            FeatureInfo(c, r, n) for c, r, n in zip(channels, reductions, ("stem", *STAGES))
        ]

    @property
    def in_channels(self) -> int:
        """Input channels of ``conv1``."""
        return int(self.conv1.in_channels)

    def forward(self, x: Tensor) -> list[Tensor]:
        """Return the stem's and every stage's map, ordered by stride (see the class docstring)."""
        x = self.relu(self.bn1(self.conv1(x)))
        feats = [x]
        x = self.maxpool(x)
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = stage(x)
            feats.append(x)
        return feats


def _out_channels(stage: nn.Sequential) -> int:
    last = stage[-1]
    return int((last.bn3 if isinstance(last, Bottleneck) else last.bn2).num_features)


class _WidthResNet(ResNet):
    """torchvision's ResNet (its blocks, its initialisation) with every width scaled by
    ``width``: a cheap trunk for tests and experiments; ``width=1`` is torchvision's network."""

    def __init__(self, block: type[BasicBlock | Bottleneck], layers: list[int], width: float):
        self._width = width
        super().__init__(block, layers)
        stem = self.layer1[0].conv1.in_channels
        self.conv1 = nn.Conv2d(3, stem, 7, stride=2, padding=3, bias=False)
        nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.bn1 = nn.BatchNorm2d(stem)
        del self.fc  # sized for the unscaled network and unused by a backbone

    def _make_layer(
        self,
        block: type[BasicBlock | Bottleneck],
        planes: int,
        blocks: int,
        stride: int = 1,
        dilate: bool = False,
    ) -> nn.Sequential:
        if planes == 64:  # the first stage, which follows the (scaled) stem
            self.inplanes = _scaled(64, self._width)
        return super()._make_layer(block, _scaled(planes, self._width), blocks, stride, dilate)


def _scaled(channels: int, width: float) -> int:
    return max(1, int(round(channels * width)))


def _set_conv(conv: nn.Conv2d, *, dilation: int, stride: int | None = None) -> None:
    """Give a 3x3 conv a new dilation (padding follows, so the size is kept at stride 1)."""
    conv.dilation = (dilation, dilation)
    conv.padding = (dilation, dilation)
    if stride is not None:
        conv.stride = (stride, stride)


def _dilate_stage(stage: nn.Sequential, previous: int, dilation: int) -> None:
    """Replace the stride of ``stage`` by dilation (torchvision's replace_stride_with_dilation)."""
    for i, block in enumerate(stage):
        first = previous if i == 0 else dilation
        if isinstance(block, Bottleneck):
            _set_conv(block.conv2, dilation=first, stride=1 if i == 0 else None)
        elif isinstance(block, BasicBlock):
            _set_conv(block.conv1, dilation=first, stride=1 if i == 0 else None)
            _set_conv(block.conv2, dilation=dilation)
        else:  # pragma: no cover - torchvision's ResNets hold only these two blocks
            raise TypeError(f"unexpected ResNet block {type(block).__name__}")
        if i == 0:
            block.stride = 1
            if block.downsample is not None:
                block.downsample[0].stride = (1, 1)


def _apply_multi_grid(
    stage: nn.Sequential, rates: tuple[int, ...], dilation: int, name: str
) -> None:
    """Give unit ``i`` of ``stage`` the rate ``dilation * rates[i]`` (DeepLabv3 multi-grid)."""
    if len(rates) != len(stage) or not all(isinstance(r, int) and r >= 1 for r in rates):
        example = "(1, 2, 4)" if len(stage) == 3 else "(1, 2)"
        raise ConfigError(
            f"{name}: multi_grid={rates!r} needs {len(stage)} positive integer rates, one per "
            f"unit of layer4 (e.g. {example}), or null for none"
        )
    for block, rate in zip(stage, rates):
        convs = [block.conv2] if isinstance(block, Bottleneck) else [block.conv1, block.conv2]
        for conv in convs:
            _set_conv(conv, dilation=dilation * rate)


def _builder(depth: int):  # noqa: ANN202 - returns a registered builder
    def build(
        *,
        output_stride: int = 32,
        multi_grid: Sequence[int] | None = None,
        in_channels: int = 3,
        width: float = 1.0,
        weights: str | None = None,
    ) -> ResNetBackbone:
        backbone = ResNetBackbone(
            depth,
            output_stride=output_stride,
            multi_grid=multi_grid,
            in_channels=in_channels,
            width=width,
        )
        return with_weights(backbone, weights)

    build.__name__ = f"resnet{depth}"
    build.__doc__ = f"""ResNet-{depth} (torchvision) as a backbone; see :class:`ResNetBackbone`.

        Args:
            output_stride: 32, 16 or 8 (stride replaced by dilation).
            multi_grid: unit rates of layer4, e.g. ``(1, 2, 4)`` (DeepLabv3), or ``None``.
            in_channels: input channels.
            width: channel multiplier (1: torchvision's network; weights need 1).
            weights: a local torchvision ``resnet{depth}`` state_dict / denseseg checkpoint /
                safetensors file, or a torchvision weights name (e.g. ``"IMAGENET1K_V1"``).

        Returns:
            The backbone; five levels (stem, layer1..layer4).
        """
    return register_backbone(f"resnet{depth}")(build)


resnet18 = _builder(18)
resnet34 = _builder(34)
resnet50 = _builder(50)
resnet101 = _builder(101)
