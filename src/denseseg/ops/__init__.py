"""Pure tensor operators: RoI pooling for Mask R-CNN, connected components and distances.

``roi_align``/``RoIAlign`` are ours (pure PyTorch; torchvision has no max mode);
``MultiScaleRoIPool`` picks RoIPool, RoIWarp, RoIAlign or RoIAlign max per FPN level.
``label_components`` and ``two_nearest_distances`` (:mod:`denseseg.ops.components`) serve
U-Net's border weight map and the ISBI 2012 Rand error.
"""

from denseseg.ops.components import label_components, two_nearest_distances
from denseseg.ops.poolers import POOLER_KINDS, MultiScaleRoIPool
from denseseg.ops.roi_align import ROI_ALIGN_MODES, RoIAlign, roi_align

__all__ = [
    "POOLER_KINDS",
    "ROI_ALIGN_MODES",
    "MultiScaleRoIPool",
    "RoIAlign",
    "label_components",
    "roi_align",
    "two_nearest_distances",
]
