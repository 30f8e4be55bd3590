"""Datasets, the one image/mask reader, the one palette, joint transforms and dataset statistics.

- :mod:`denseseg.data.io`: ``read_image``, ``read_mask``, ``write_image``, ``write_mask``.
- :mod:`denseseg.data.palette`: ``default_palette`` (PASCAL VOC colours), ``colorize``,
  ``overlay``.
- :mod:`denseseg.data.folder`: ``FolderDataset``, the generic ``images/`` + ``masks/`` layout.
- :mod:`denseseg.data.datasets`: the benchmarks in the layouts they ship in (``VOCDataset``,
  ``CityscapesDataset``, ``ADE20KDataset``, ``CamVidDataset``, ``ISBI2012Dataset``,
  ``CocoDataset``); :mod:`denseseg.data.registry`: ``get_dataset`` opens any format by name.
- :mod:`denseseg.data.transforms`: ``build_transforms`` (image and mask move together).
- :mod:`denseseg.data.stats`: class pixel counts and median frequency weights.
- :mod:`denseseg.data.demo_scenes`: ``make_demo_dataset``, procedural scenes for a first run.
"""

from denseseg.data.datasets import (
    ADE20KDataset,
    CamVidDataset,
    CityscapesDataset,
    CocoDataset,
    ISBI2012Dataset,
    SegmentationDataset,
    VOCDataset,
    ade20k_to_submission,
    cityscapes_to_label_ids,
)
from denseseg.data.demo_scenes import make_demo_dataset
from denseseg.data.folder import FolderDataset, available_splits
from denseseg.data.io import image_info, read_image, read_mask, write_image, write_mask
from denseseg.data.palette import colorize, default_palette, overlay, palette_to_flat
from denseseg.data.registry import DATASETS, get_dataset
from denseseg.data.stats import (
    class_image_pixel_counts,
    class_pixel_counts,
    median_frequency_weights,
)
from denseseg.data.transforms import build_transforms, default_mean_std

__all__ = [
    "DATASETS",
    "ADE20KDataset",
    "CamVidDataset",
    "CityscapesDataset",
    "CocoDataset",
    "FolderDataset",
    "ISBI2012Dataset",
    "SegmentationDataset",
    "VOCDataset",
    "ade20k_to_submission",
    "cityscapes_to_label_ids",
    "get_dataset",
    "available_splits",
    "build_transforms",
    "class_image_pixel_counts",
    "class_pixel_counts",
    "colorize",
    "default_mean_std",
    "default_palette",
    "image_info",
    "make_demo_dataset",
    "median_frequency_weights",
    "overlay",
    "palette_to_flat",
    "read_image",
    "read_mask",
    "write_image",
    "write_mask",
]
