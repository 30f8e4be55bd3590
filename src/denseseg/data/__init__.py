"""Datasets, the one image/mask reader, the one palette, joint transforms and dataset statistics.

- :mod:`denseseg.data.io`: ``read_image``, ``read_mask``, ``write_image``, ``write_mask``.
- :mod:`denseseg.data.palette`: ``default_palette`` (PASCAL VOC colours), ``colorize``,
  ``overlay``.
- :mod:`denseseg.data.folder`: ``FolderDataset``, the generic ``images/`` + ``masks/`` layout.
- :mod:`denseseg.data.transforms`: ``build_transforms`` (image and mask move together).
- :mod:`denseseg.data.stats`: class pixel counts and median frequency weights.
- :mod:`denseseg.data.demo`: ``make_demo_dataset``, procedural scenes for a first run.
"""

from denseseg.data.demo import make_demo_dataset
from denseseg.data.folder import FolderDataset, available_splits
from denseseg.data.io import image_info, read_image, read_mask, write_image, write_mask
from denseseg.data.palette import colorize, default_palette, overlay, palette_to_flat
from denseseg.data.stats import (
    class_image_pixel_counts,
    class_pixel_counts,
    median_frequency_weights,
)
from denseseg.data.transforms import build_transforms, default_mean_std

__all__ = [
    "FolderDataset",
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
