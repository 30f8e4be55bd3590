"""U-Net (Ronneberger, Fischer & Brox, MICCAI 2015).

Contracting path: per level two 3x3 convolutions with ReLU, then 2x2 max-pooling (stride 2);
channels double from ``base_channels`` (64) to ``base_channels * 2**depth`` (1024 at depth 4).
Expanding path: 2x2 transposed convolution halving the channels, concatenation with the
(centre-cropped) skip, two 3x3 convolutions; a final 1x1 convolution gives the class scores.

Two paddings:

* ``"valid"`` (the paper): unpadded convolutions, so the output is the centre of the input that the
  net sees whole: 572x572 -> 388x388. Only sizes for which every pooling sees an even map are
  accepted (:func:`unet_valid_input_size`); large images are predicted tile by tile with a mirrored
  border (overlap-tile), which the Segmenter does, reading ``model.padding``.
* ``"same"``: padded convolutions; any input size works (padded internally to a multiple of
  ``2**depth`` and cropped back), the output has the input's resolution.

``num_classes=1`` means binary segmentation: one logit channel, sigmoid and threshold 0.5 at
prediction (done by the Segmenter), trained with the ``"bce"`` / ``"bce+dice"`` losses.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from denseseg.errors import ConfigError
from denseseg.layers import ConvNormAct, he_normal_
from denseseg.models._registry import register_model, register_variant
from denseseg.models.base import check_positive_ints
from denseseg.models.unet_backbone import backbone_unet

PADDINGS = ("same", "valid")


class InvalidInputSizeError(ConfigError, ValueError):
    """An input side does not fit a valid-padding U-Net (caught as ConfigError or ValueError)."""


def _valid_output_or_none(size: int, depth: int) -> int | None:
    """Output side of a valid-padding U-Net for input side ``size``, or None if not allowed."""
    s = size
    for _ in range(depth):
        s -= 4  # two unpadded 3x3 convolutions
        if s <= 0 or s % 2:  # the pooling must see an even, non-empty map
            return None
        s //= 2
    s -= 4  # bottleneck
    if s <= 0:
        return None
    for _ in range(depth):
        s = 2 * s - 4  # 2x2 up-convolution, then two unpadded 3x3 convolutions
        if s <= 0:
            return None
    return s


def unet_valid_input_size(min_size: int, depth: int = 4) -> int:
    """Smallest input side ``>= min_size`` that a valid-padding U-Net of ``depth`` accepts.

    Args:
        min_size: the wanted minimal input side in pixels.
        depth: number of 2x2 poolings.

    Returns:
        The input side, e.g. ``unet_valid_input_size(570) == 572`` for depth 4.
    """
    s = max(int(min_size), 1)
    while _valid_output_or_none(s, depth) is None:
        s += 1
    return s


def unet_output_size(input_size: int, depth: int = 4, padding: str = "valid") -> int:
    """Output side of a U-Net for an input side (``572 -> 388`` for the paper's net).

    Args:
        input_size: input side in pixels.
        depth: number of 2x2 poolings.
        padding: ``"valid"`` (unpadded convolutions) or ``"same"``.

    Returns:
        The output side; equal to ``input_size`` for ``"same"`` padding.

    Raises:
        InvalidInputSizeError: (a ConfigError and ValueError) for a size a valid-padding net cannot
            take; the message names the nearest valid sizes.
    """
    if padding == "same":
        return int(input_size)
    out = _valid_output_or_none(int(input_size), depth)
    if out is None:
        raise InvalidInputSizeError(_invalid_size_message(int(input_size), depth))
    return out


def _invalid_size_message(size: int, depth: int) -> str:
    below = next(
        (s for s in range(size - 1, 0, -1) if _valid_output_or_none(s, depth) is not None), None
    )
    above = unet_valid_input_size(size, depth)
    nearest = f"{below} or {above}" if below is not None else str(above)
    return (
        f"input size {size} does not fit a valid-padding U-Net of depth {depth} (every pooling "
        f"needs an even map); use {nearest}, or padding='same'"
    )


def _double_conv(in_ch: int, out_ch: int, pad: int, batch_norm: bool) -> nn.Sequential:
    norm = nn.BatchNorm2d if batch_norm else None
    return nn.Sequential(
        ConvNormAct(in_ch, out_ch, 3, padding=pad, norm=norm),
        ConvNormAct(out_ch, out_ch, 3, padding=pad, norm=norm),
    )


def _center_crop(x: Tensor, size: tuple[int, int]) -> Tensor:
    top = (x.shape[-2] - size[0]) // 2
    left = (x.shape[-1] - size[1]) // 2
    return x[..., top : top + size[0], left : left + size[1]]


class UNet(nn.Module):
    """U-Net for semantic segmentation.

    Args:
        num_classes: output channels; 1 means binary (one logit, sigmoid at prediction).
        in_channels: input image channels (1 for the paper's grey microscopy images).
        base_channels: channels of the first level (64 in the paper); level k has
            ``base_channels * 2**k``.
        depth: number of 2x2 max-poolings (4 in the paper).
        padding: ``"valid"`` (paper; output is the centre crop) or ``"same"`` (output at input
            resolution, any input size).
        batch_norm: add BatchNorm after every 3x3 convolution (not in the paper).
        dropout: drop probability at the end of the contracting path (the deepest skip level and
            the bottleneck); 0 disables it.

    Forward:
        ``x (N, in_channels, H, W) -> {"out": (N, num_classes, H', W')}`` with ``H' = H`` for
        ``"same"`` and ``H' = output_size(H)`` for ``"valid"``.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        base_channels: int = 64,
        depth: int = 4,
        padding: str = "same",
        batch_norm: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        check_positive_ints(
            "U-Net",
            num_classes=num_classes,
            in_channels=in_channels,
            base_channels=base_channels,
            depth=depth,
        )
        if padding not in PADDINGS:
            raise ConfigError(f"U-Net option padding={padding!r}; choose 'same' or 'valid'")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"U-Net option dropout={dropout!r} must lie in [0, 1)")
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.depth = depth
        self.padding = padding

        pad = 1 if padding == "same" else 0
        chans = [base_channels * 2**k for k in range(depth + 1)]
        # encoder[k] works at stride 2**k; encoder[depth] is the bottleneck.
        self.encoder = nn.ModuleList(
            _double_conv(c_in, c_out, pad, batch_norm)
            for c_in, c_out in zip([in_channels, *chans[:-1]], chans)
        )
        self.pool = nn.MaxPool2d(2, stride=2)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # upsamplers[i] / decoder[i] go from stride 2**(depth-i) to 2**(depth-i-1).
        self.upsamplers = nn.ModuleList(
            nn.ConvTranspose2d(chans[k + 1], chans[k], 2, stride=2) for k in reversed(range(depth))
        )
        self.decoder = nn.ModuleList(
            _double_conv(2 * chans[k], chans[k], pad, batch_norm) for k in reversed(range(depth))
        )
        self.head = nn.Conv2d(chans[0], num_classes, 1)
        he_normal_(self)

    def output_size(self, input_size: int) -> int:
        """Output side for an input side (see :func:`unet_output_size`)."""
        return unet_output_size(input_size, self.depth, self.padding)

    def valid_input_size(self, min_size: int) -> int:
        """Smallest accepted input side ``>= min_size`` (any size for ``"same"`` padding)."""
        if self.padding == "same":
            return max(int(min_size), 1)
        return unet_valid_input_size(min_size, self.depth)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Segment a batch.

        Args:
            x: images ``(N, in_channels, H, W)``.

        Returns:
            ``{"out": logits (N, num_classes, H', W')}``, ``H'``/``W'`` as in the class docstring.
        """
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"U-Net expects (N, {self.in_channels}, H, W) input, got {tuple(x.shape)}"
            )
        height, width = x.shape[-2:]
        if self.padding == "valid":
            for side in (height, width):
                self.output_size(side)  # raises with the nearest valid sizes
        else:
            x, box = _pad_to_multiple(x, 2**self.depth)

        skips = []
        for k, block in enumerate(self.encoder):
            if k > 0:
                x = self.pool(x)
            x = block(x)
            if k >= self.depth - 1:
                x = self.dropout(x)
            if k < self.depth:
                skips.append(x)
        for up, block, skip in zip(self.upsamplers, self.decoder, reversed(skips)):
            x = up(x)
            x = torch.cat([_center_crop(skip, x.shape[-2:]), x], dim=1)
            x = block(x)
        out = self.head(x)

        if self.padding == "same":
            top, left = box
            out = out[..., top : top + height, left : left + width]
        return {"out": out}


def _pad_to_multiple(x: Tensor, multiple: int) -> tuple[Tensor, tuple[int, int]]:
    """Pad ``(N, C, H, W)`` symmetrically up to a multiple; returns the tensor and (top, left)."""
    height, width = x.shape[-2:]
    ph = -height % multiple
    pw = -width % multiple
    if ph == 0 and pw == 0:
        return x, (0, 0)
    top, left = ph // 2, pw // 2
    pads = (left, pw - left, top, ph - top)
    # Mirroring keeps image statistics at the border (as overlap-tile does); it needs the pad to be
    # smaller than the side, so tiny inputs fall back to zeros.
    mode = "reflect" if max(top, ph - top) < height and max(left, pw - left) < width else "constant"
    return F.pad(x, pads, mode=mode), (top, left)


@register_model(
    "unet",
    test_cfg={"base_channels": 8, "depth": 3},
    description="U-Net (Ronneberger et al. 2015), padded convolutions, output at input size",
)
def unet(
    num_classes: int,
    in_channels: int = 3,
    base_channels: int = 64,
    depth: int = 4,
    padding: str = "same",
    batch_norm: bool = False,
    dropout: float = 0.0,
    backbone: str | None = None,
    backbone_kwargs: dict[str, Any] | None = None,
    decoder_channels: Sequence[int] | None = None,
) -> nn.Module:
    """U-Net; ``padding="same"`` by default so any image size works.

    With ``backbone`` (a registered backbone, e.g. ``"resnet34"``) the contracting path is that
    network (:class:`~denseseg.models.unet_backbone.BackboneUNet`; ``base_channels``, ``depth``,
    ``padding`` and ``dropout`` then do not apply, ``decoder_channels`` sets the expanding path).
    """
    if backbone is not None:
        own = {"base_channels": 64, "depth": 4, "padding": "same", "batch_norm": False}
        given = {"base_channels": base_channels, "depth": depth, "padding": padding}
        clash = [k for k, v in given.items() if v != own[k]] + (["dropout"] if dropout else [])
        if clash:
            raise ConfigError(
                f"unet with backbone={backbone!r} has no option {clash[0]!r} (the backbone sets "
                "the contracting path); use decoder_channels for the expanding path"
            )
        return backbone_unet(num_classes, in_channels, backbone, backbone_kwargs, decoder_channels)
    if backbone_kwargs or decoder_channels:
        raise ConfigError("unet options backbone_kwargs/decoder_channels need backbone=...")
    return UNet(num_classes, in_channels, base_channels, depth, padding, batch_norm, dropout)


for _depth in (18, 34, 50):
    register_variant(
        f"unet_resnet{_depth}",
        unet,
        fixed={"backbone": f"resnet{_depth}"},
        test_cfg={"backbone_kwargs": {"width": 0.25}},
        description=f"U-Net expanding path on a resnet{_depth} contracting path",
    )

unet_valid = register_variant(
    "unet_valid",
    unet,
    fixed={"padding": "valid"},
    test_cfg={"base_channels": 8, "depth": 3},
    description="U-Net as in the paper: unpadded convolutions, 572x572 in -> 388x388 out",
    doc="""U-Net with the paper's unpadded convolutions (predict large images by overlap-tile);
    takes :func:`unet`'s options except ``padding``.""",
)
