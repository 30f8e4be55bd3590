"""RoI operators: RoIAlign with average or max pooling, and multi-scale FPN poolers.

``roi_align``/``RoIAlign`` are ours (pure PyTorch; torchvision has no max mode);
``MultiScaleRoIPool`` picks RoIPool, RoIWarp, RoIAlign or RoIAlign max per FPN level.
"""

from denseseg.ops.poolers import POOLER_KINDS, MultiScaleRoIPool
from denseseg.ops.roi_align import ROI_ALIGN_MODES, RoIAlign, roi_align

__all__ = ["POOLER_KINDS", "ROI_ALIGN_MODES", "MultiScaleRoIPool", "RoIAlign", "roi_align"]
