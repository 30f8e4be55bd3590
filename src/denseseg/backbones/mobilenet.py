"""MobileNetV3-Large trunk from torchvision's definition, dilated for segmentation on request.

The blocks are torchvision's own ``features`` (``torchvision.models.mobilenet_v3_large``), kept
under the attribute ``features`` so parameter names read ``features.N...`` as in a torchvision
classification state_dict.

Output stride: as torchvision's segmentation builder does (``mobilenet_v3_large(dilated=True)``),
a stage past the output stride loses its stride and every depthwise convolution in it, the first
included, is dilated: ``output_stride=16`` dilates the last stage (features 13-15) by 2, which is
exactly torchvision's ``dilated=True``; ``output_stride=8`` also dilates features 7-12 by 2 and the
last stage by 4.

Levels: by default the last block of every stride (features 1, 3, 6, 12 and the final 1x1
convolution, 16), at strides 2, 4, 8, 16, 32. ``out_indices`` picks other blocks; torchvision's
segmentation models tap the *first* block of a stride instead (features 4: 40 channels at stride
8, and 16), which :mod:`denseseg.models.tv_layouts` asks for.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch.nn as nn
import torchvision
from torch import Tensor

from denseseg.backbones._registry import FeatureInfo, register_backbone, with_weights
from denseseg.errors import ConfigError

OUTPUT_STRIDES = (8, 16, 32)


class MobileNetV3Backbone(nn.Module):
    """torchvision's MobileNetV3-Large ``features``, returning the maps of chosen blocks.

    Args:
        output_stride: 32 (no dilation), 16 or 8.
        width_mult: torchvision's channel multiplier (1.0 is the published network).
        in_channels: input channels; other than 3 replaces the first convolution.
        out_indices: indices into ``features`` whose outputs are returned, increasing; ``None``:
            the last block of each stride, ``(1, 3, 6, 12, 16)``.

    Forward:
        ``x (N, C_in, H, W) -> list`` of ``(N, C_i, ceil(H / s_i), ceil(W / s_i))`` maps, one per
        index, with ``feature_info[i] = FeatureInfo(C_i, s_i, "features.<index>")``.
    """

    def __init__(
        self,
        *,
        output_stride: int = 32,
        width_mult: float = 1.0,
        in_channels: int = 3,
        out_indices: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if output_stride not in OUTPUT_STRIDES:
            raise ConfigError(
                f"mobilenet_v3_large: output_stride={output_stride!r} must be one of "
                f"{OUTPUT_STRIDES}"
            )
        if not (isinstance(width_mult, int | float) and width_mult > 0):
            raise ConfigError(f"mobilenet_v3_large: width_mult={width_mult!r} must be > 0")
        if not isinstance(in_channels, int) or in_channels < 1:
            raise ConfigError(
                f"mobilenet_v3_large: in_channels={in_channels!r} must be an integer >= 1"
            )
        self.name = self.tv_name = "mobilenet_v3_large"
        self.output_stride = output_stride
        self.features = torchvision.models.mobilenet_v3_large(
            weights=None, width_mult=float(width_mult)
        ).features
        if in_channels != 3:
            old = self.features[0][0]
            self.features[0][0] = nn.Conv2d(
                in_channels, old.out_channels, 3, stride=2, padding=1, bias=False
            )
            nn.init.kaiming_normal_(self.features[0][0].weight, mode="fan_out")

        self._strides = _dilate(self.features, output_stride)
        # A stride ends where the next block is strided (torchvision marks those ``_is_cn``).
        ends = [i for i in range(len(self.features) - 1) if _is_strided(self.features[i + 1])]
        default = [i for i in ends if i > 0] + [len(self.features) - 1]
        self.set_out_indices(out_indices if out_indices is not None else default)

    def stage_starts(self) -> list[int]:
        """torchvision's ``stage_indices``: the stem, every strided block, the last layer."""
        strided = [i for i, b in enumerate(self.features) if _is_strided(b)]
        return [0, *strided, len(self.features) - 1]

    def set_out_indices(self, out_indices: Sequence[int]) -> None:
        """Choose the blocks whose outputs the forward returns (and ``feature_info`` describes).

        Args:
            out_indices: increasing indices into ``features``.
        """
        indices = [int(i) for i in out_indices]
        if (
            not indices
            or indices != sorted(set(indices))
            or not (0 <= indices[0] and indices[-1] < len(self.features))
        ):
            raise ConfigError(
                f"mobilenet_v3_large: out_indices={list(out_indices)!r} must be increasing "
                f"indices into features (0..{len(self.features) - 1})"
            )
        self.out_indices = indices
        self.feature_info = [
            FeatureInfo(_out_channels(self.features[i]), self._strides[i], f"features.{i}")
            for i in indices
        ]

    @property
    def in_channels(self) -> int:
        """Input channels of the first convolution."""
        return int(self.features[0][0].in_channels)

    def forward(self, x: Tensor) -> list[Tensor]:
        """Run the blocks up to the last index; returns the chosen maps ordered by stride."""
        feats = []
        for i, block in enumerate(self.features[: self.out_indices[-1] + 1]):
            x = block(x)
            if i in self.out_indices:
                feats.append(x)
        return feats

    @staticmethod
    def adapt_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
        """Accept the keys of a torchvision segmentation backbone (``0.0.weight``, after its
        ``backbone.`` prefix is stripped) as well as a classifier's ``features.0.0.weight``."""
        return {(f"features.{k}" if re.match(r"\d+\.", k) else k): v for k, v in state.items()}


def _is_strided(block: nn.Module) -> bool:
    return bool(getattr(block, "_is_cn", False))


def _out_channels(block: nn.Module) -> int:
    if hasattr(block, "out_channels"):
        return int(block.out_channels)
    return int(block[0].out_channels)  # a Conv2dNormActivation (stem, final 1x1)


def _dilate(features: nn.Sequential, output_stride: int) -> list[int]:
    """Dilate the stages past ``output_stride`` in place; returns each block's output stride."""
    stride, dilation, strides = 2, 1, []  # the stem convolution has stride 2
    for i, block in enumerate(features):
        if i > 0 and _is_strided(block):
            if stride * 2 > output_stride:
                dilation *= 2
            else:
                stride *= 2
        if dilation > 1 and hasattr(block, "block"):
            for conv in block.modules():
                if isinstance(conv, nn.Conv2d) and conv.groups > 1:  # the depthwise conv
                    k = conv.kernel_size[0]
                    conv.stride = (1, 1)
                    conv.dilation = (dilation, dilation)
                    conv.padding = ((k - 1) // 2 * dilation,) * 2
        strides.append(stride)
    return strides


@register_backbone("mobilenet_v3_large")
def mobilenet_v3_large(
    *,
    output_stride: int = 32,
    width_mult: float = 1.0,
    in_channels: int = 3,
    out_indices: Sequence[int] | None = None,
    weights: str | None = None,
) -> MobileNetV3Backbone:
    """MobileNetV3-Large (torchvision) as a backbone; see :class:`MobileNetV3Backbone`.

    Args:
        output_stride: 32, 16 or 8 (stride replaced by dilation).
        width_mult: channel multiplier.
        in_channels: input channels.
        out_indices: blocks of ``features`` to return (default: the end of every stride).
        weights: a local torchvision ``mobilenet_v3_large`` state_dict / denseseg checkpoint /
            safetensors file, or a torchvision weights name (e.g. ``"IMAGENET1K_V1"``).

    Returns:
        The backbone; five levels at strides 2..32 (16, 24, 40, 112, 960 channels at width 1).
    """
    backbone = MobileNetV3Backbone(
        output_stride=output_stride,
        width_mult=width_mult,
        in_channels=in_channels,
        out_indices=out_indices,
    )
    return with_weights(backbone, weights)
