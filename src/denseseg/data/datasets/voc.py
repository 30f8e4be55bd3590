"""PASCAL VOC 2012 segmentation, as the VOCdevkit ships it, plus the SBD-augmented masks.

Layout (``root`` may be the folder holding ``VOCdevkit``, the ``VOCdevkit`` folder itself, or
the ``VOC2012`` folder)::

    VOCdevkit/VOC2012/
      JPEGImages/<id>.jpg
      SegmentationClass/<id>.png          palette PNGs: pixel value = class index, 255 = the
                                          "void" border around objects (ignored)
      SegmentationClassAug/<id>.png       optional, SBD-augmented masks (single-channel PNGs,
                                          same values), 10,582 images for train_aug
      ImageSets/Segmentation/<split>.txt  one image id per line (train, val, trainval, ...)

Split ``s`` reads ``ImageSets/Segmentation/<s>.txt``. Masks come from ``SegmentationClass``,
except for splits ending in ``_aug`` (``train_aug``, ``trainval_aug``), which read
``SegmentationClassAug``, as DeepLab and mmsegmentation do; ``mask_dir`` overrides the choice.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from denseseg.data.datasets.base import (
    SegmentationDataset,
    pair_by_stem,
    read_split_list,
    require_dir,
    unknown_split,
)
from denseseg.data.palette import default_palette
from denseseg.errors import DataError

__all__ = ["VOC_CLASSES", "VOCDataset", "find_voc_root"]

VOC_CLASSES: tuple[str, ...] = (
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)
"""The 20 PASCAL VOC object classes plus background, index = label value."""

_LAYOUT = (
    "VOCdevkit/VOC2012/{JPEGImages/<id>.jpg, SegmentationClass/<id>.png, "
    "ImageSets/Segmentation/<split>.txt}"
)


def find_voc_root(root: str | os.PathLike) -> Path:
    """Find the ``VOC2012`` folder from any of the roots users pass.

    Args:
        root: The ``VOC2012`` folder, the ``VOCdevkit`` folder, or the folder holding
            ``VOCdevkit``.

    Returns:
        The folder that holds ``JPEGImages``.

    Raises:
        DataError: None of these holds ``JPEGImages``.
    """
    root = Path(root)
    for candidate in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
        if (candidate / "JPEGImages").is_dir():
            return candidate
    raise DataError(
        f"{root} is not a PASCAL VOC folder: expected {root}/JPEGImages, "
        f"{root}/VOC2012/JPEGImages or {root}/VOCdevkit/VOC2012/JPEGImages; the layout is {_LAYOUT}"
    )


class VOCDataset(SegmentationDataset):
    """PASCAL VOC 2012 semantic segmentation (21 classes, VOC palette, 255 = void border).

    Args:
        root: See :func:`find_voc_root`.
        split: Name of a list in ``ImageSets/Segmentation`` (``train``, ``val``, ``trainval``,
            ``train_aug``, ...).
        transforms: Called as ``transforms(image, target)`` on each item.
        mask_dir: Mask folder under ``VOC2012``; ``None`` picks ``SegmentationClassAug`` for
            ``*_aug`` splits and ``SegmentationClass`` otherwise.

    Items are ``(image uint8 (3, H, W), target int64 (H, W))``; grayscale JPEGs are repeated
    to three channels.
    """

    expand_gray = True

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        transforms: Callable[[torch.Tensor, torch.Tensor], Any] | None = None,
        mask_dir: str | None = None,
    ) -> None:
        self.root = find_voc_root(root)
        self.split = split
        self.transforms = transforms
        lists = require_dir(self.root / "ImageSets" / "Segmentation", _LAYOUT)
        list_file = lists / f"{split}.txt"
        if not list_file.is_file():
            available = sorted(p.stem for p in lists.glob("*.txt"))
            raise unknown_split(
                self.root, split, available, f"add {list_file} with one image id per line"
            )
        if mask_dir is None:
            mask_dir = "SegmentationClassAug" if split.endswith("_aug") else "SegmentationClass"
        masks = require_dir(self.root / mask_dir, _LAYOUT)
        stems = read_split_list(list_file)
        if not stems:
            raise DataError(f"split list {list_file} names no images; add one image id per line")
        self.files = pair_by_stem(self.root / "JPEGImages", masks, stems, ".jpg")
        self._set_classes(VOC_CLASSES, default_palette(len(VOC_CLASSES)))
