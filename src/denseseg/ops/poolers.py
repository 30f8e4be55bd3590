"""Multi-scale RoI pooling over FPN levels with a choice of per-level op (Mask R-CNN Table 2c).

:class:`MultiScaleRoIPool` is ``torchvision.ops.MultiScaleRoIAlign`` with the pooling op made a
choice. It subclasses torchvision's class, because torchvision's Faster/Mask R-CNN constructors
accept only ``MultiScaleRoIAlign`` instances as poolers, and it reuses torchvision's scale
inference and FPN level assignment (eq. 1 of the FPN paper) rather than restating them.

The kinds, as in the paper's ablation:

==============  ======================  ==================  ========  =====================
kind            RoI coordinates         bins                pooling   op
==============  ======================  ==================  ========  =====================
roipool         rounded to the grid     rounded             max       torchvision roi_pool
roiwarp         rounded to the grid     bilinear samples    max       ours, quantize=True
roialign        exact                   bilinear samples    average   torchvision roi_align
roialign_max    exact                   bilinear samples    max       ours, mode="max"
==============  ======================  ==================  ========  =====================

All use ``aligned=False``, as torchvision's Mask R-CNN does, so ``roialign`` reproduces it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torchvision
from torch import Tensor
from torchvision.ops.poolers import (
    MultiScaleRoIAlign,
    _convert_to_roi_format,
    _filter_input,
    _multiscale_roi_align,
    _setup_scales,
)

from denseseg.errors import ConfigError
from denseseg.ops.roi_align import roi_align

POOLER_KINDS = ("roipool", "roiwarp", "roialign", "roialign_max")

# (features (B, C, H, W), rois (K, 5), output_size, spatial_scale, sampling_ratio) -> (K, C, h, w)
LevelOp = Callable[[Tensor, Tensor, tuple[int, int], float, int], Tensor]


def _roipool(feat: Tensor, rois: Tensor, size: tuple[int, int], scale: float, _: int) -> Tensor:
    return torchvision.ops.roi_pool(feat, rois, size, scale)


def _roiwarp(feat: Tensor, rois: Tensor, size: tuple[int, int], scale: float, ratio: int) -> Tensor:
    return roi_align(feat, rois, size, scale, ratio, aligned=False, mode="max", quantize=True)


def _roialign_max(
    feat: Tensor, rois: Tensor, size: tuple[int, int], scale: float, ratio: int
) -> Tensor:
    return roi_align(feat, rois, size, scale, ratio, aligned=False, mode="max")


# Per-level ops of the kinds pooled here; "roialign" runs torchvision's own multi-scale path.
_LEVEL_OPS: dict[str, LevelOp] = {
    "roipool": _roipool,
    "roiwarp": _roiwarp,
    "roialign_max": _roialign_max,
}


def pool_levels(
    features: list[Tensor],
    boxes: list[Tensor],
    output_size: tuple[int, int],
    sampling_ratio: int,
    scales: list[float],
    level_of: Callable[[list[Tensor]], Tensor],
    op: LevelOp,
) -> Tensor:
    """Pool every box from the FPN level assigned to it.

    Args:
        features: per-level features ``(B, C, H_l, W_l)``, finest first.
        boxes: per-image boxes ``(K_i, 4)`` in image coordinates.
        output_size: ``(h, w)`` bins per box.
        sampling_ratio: samples per bin and axis for the bilinear ops.
        scales: per-level spatial scale (1 / stride).
        level_of: maps the box list to a level index per box ``(K,)`` (torchvision's
            ``LevelMapper``).
        op: the per-level pooling op.

    Returns:
        Pooled features ``(K, C, h, w)``, boxes in the order of ``boxes``.
    """
    rois = _convert_to_roi_format(boxes)
    if len(features) == 1:
        return op(features[0], rois, output_size, scales[0], sampling_ratio)
    levels = level_of(boxes)
    first = features[0]
    result = first.new_zeros((rois.shape[0], first.shape[1], *output_size))
    for level, (feat, scale) in enumerate(zip(features, scales)):
        in_level = torch.where(levels == level)[0]
        pooled = op(feat, rois[in_level], output_size, scale, sampling_ratio)
        # Under autocast the levels may come in different dtypes; index_put needs one.
        result[in_level] = pooled.to(result.dtype)
    return result


class MultiScaleRoIPool(MultiScaleRoIAlign):
    """Drop-in ``MultiScaleRoIAlign`` whose per-level op is RoIPool, RoIWarp, RoIAlign or
    RoIAlign max.

    Args:
        featmap_names: names of the feature maps (keys of the forward dict) to pool from.
        output_size: bins per box, ``h`` or ``(h, w)``.
        sampling_ratio: samples per bin and axis (``<= 0``: adaptive); RoIPool ignores it.
        kind: one of :data:`POOLER_KINDS`.
        canonical_scale: box side that maps to ``canonical_level`` (FPN eq. 1, 224).
        canonical_level: FPN level ``k0`` of a box of side ``canonical_scale`` (4).
    """

    def __init__(
        self,
        featmap_names: list[str],
        output_size: int | Sequence[int],
        sampling_ratio: int,
        kind: str = "roialign",
        canonical_scale: int = 224,
        canonical_level: int = 4,
    ) -> None:
        if kind not in POOLER_KINDS:
            raise ConfigError(f"unknown RoI pooler kind {kind!r}; choose one of {POOLER_KINDS}")
        super().__init__(
            featmap_names,
            output_size,
            sampling_ratio,
            canonical_scale=canonical_scale,
            canonical_level=canonical_level,
        )
        self.kind = kind

    def forward(
        self,
        x: dict[str, Tensor],
        boxes: list[Tensor],
        image_shapes: list[tuple[int, int]],
    ) -> Tensor:
        """Pool ``boxes`` from the levels of ``x``.

        Args:
            x: feature maps by name, each ``(B, C, H_l, W_l)``, finest first.
            boxes: per-image boxes ``(K_i, 4)`` ``[x1, y1, x2, y2]`` in image coordinates.
            image_shapes: ``(height, width)`` of each image as fed to the backbone; used once to
                infer the levels' scales.

        Returns:
            Pooled features ``(sum K_i, C, h, w)``.
        """
        features = _filter_input(x, self.featmap_names)
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = _setup_scales(
                features, image_shapes, self.canonical_scale, self.canonical_level
            )
        scales, levels = self.scales, self.map_levels
        args = (features, boxes, self.output_size, self.sampling_ratio, scales, levels)
        if self.kind == "roialign":
            # torchvision's own path, tracing/ONNX branch included, so outputs are identical.
            return _multiscale_roi_align(*args)
        return pool_levels(*args, _LEVEL_OPS[self.kind])

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}(featmap_names={self.featmap_names}, "
            f"output_size={self.output_size}, sampling_ratio={self.sampling_ratio}, "
            f"kind={self.kind!r})"
        )
