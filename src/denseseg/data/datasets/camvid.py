"""CamVid in the SegNet layout (11 classes, 360x480), as the SegNet tutorial publishes it.

Layout::

    root/
      train/<name>.png   trainannot/<name>.png
      val/<name>.png     valannot/<name>.png
      test/<name>.png    testannot/<name>.png

Images are RGB PNGs; label maps are single-channel 8-bit PNGs (mode ``L``) with the image's file
name, holding 0-10 for the classes below and 11 for "Unlabelled" (void), which is read as 255
(ignored). Split ``trainval`` joins ``train`` and ``val``.

Drives: a frame's name starts with the drive it was filmed on (``0001TP_006690.png``: drive
``0001TP``; the SegNet split's train holds 0001TP, 0006R0 and 0016E5, val only 0016E5). A split
may keep or leave out drives, to validate on a drive no training frame comes from:
``trainval:-0001TP`` is train+val without 0001TP, ``trainval:0001TP`` only its frames (several
drives: ``trainval:-0001TP,0006R0``). A drive the split does not hold is an error (a typo would
otherwise keep or drop nothing).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from denseseg.data.datasets.base import (
    SegmentationDataset,
    build_lut,
    pair_by_stem,
    require_dir,
    sorted_files,
    unknown_split,
)
from denseseg.data.palette import Color
from denseseg.errors import DataError

__all__ = ["CAMVID_CLASSES", "CAMVID_PALETTE", "CAMVID_VOID", "CamVidDataset", "drive_of"]

CAMVID_CLASSES: tuple[str, ...] = (
    "Sky",
    "Building",
    "Pole",
    "Road",
    "Pavement",
    "Tree",
    "SignSymbol",
    "Fence",
    "Car",
    "Pedestrian",
    "Bicyclist",
)
"""The 11 SegNet CamVid classes, index = label value."""

CAMVID_PALETTE: tuple[Color, ...] = (
    (128, 128, 128),
    (128, 0, 0),
    (192, 192, 128),
    (128, 64, 128),
    (60, 40, 222),
    (128, 128, 0),
    (192, 128, 128),
    (64, 64, 128),
    (64, 0, 128),
    (64, 64, 0),
    (0, 128, 192),
)
"""The SegNet tutorial's colours for the 11 classes."""

CAMVID_VOID = 11
"""The stored value of "Unlabelled" pixels, read as the ignore index 255."""

_LUT = build_lut({**{v: v for v in range(len(CAMVID_CLASSES))}, CAMVID_VOID: 255})
_LAYOUT = "root/<split>/<name>.png with root/<split>annot/<name>.png (train, val, test)"


def _available(root: Path) -> list[str]:
    names = sorted(
        d.name for d in root.iterdir() if d.is_dir() and (root / f"{d.name}annot").is_dir()
    )
    return [*names, "trainval"] if {"train", "val"} <= set(names) else names


def drive_of(path: str | os.PathLike) -> str:
    """The drive a CamVid frame comes from: its file name up to the first ``_`` (the whole
    stem when it has none)."""
    return Path(path).stem.split("_", 1)[0]


def _select_drives(files: list, spec: str, where: str) -> list:
    """The ``(image, label)`` pairs kept by ``spec`` (``D1,D2`` or ``-D1,D2``)."""
    drop = spec.startswith("-")
    wanted = {d.strip() for d in (spec[1:] if drop else spec).split(",") if d.strip()}
    held = {drive_of(image) for image, _ in files}
    if not wanted or wanted - held:
        missing = ", ".join(sorted(wanted - held)) or "none named"
        raise DataError(
            f"{where}: drive(s) {missing} not in the split; it holds {', '.join(sorted(held))} "
            "(split:D1,D2 keeps drives, split:-D1,D2 leaves them out)"
        )
    kept = [pair for pair in files if (drive_of(pair[0]) in wanted) != drop]
    if not kept:
        raise DataError(f"{where}: no frames left")
    return kept


class CamVidDataset(SegmentationDataset):
    """CamVid, 11 classes, void (11) ignored as 255.

    Args:
        root: Folder holding ``train``, ``trainannot``, ``val``, ``valannot``, ...
        split: ``train``, ``val``, ``test``, ``trainval``, or any ``<name>`` with a
            ``<name>annot`` beside it; ``<split>:D1,D2`` keeps only drives D1 and D2,
            ``<split>:-D1,D2`` leaves them out (see the module docstring).
        transforms: Called as ``transforms(image, target)`` on each item.

    Items are ``(image uint8 (3, H, W), target int64 (H, W))``.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        transforms: Callable[[torch.Tensor, torch.Tensor], Any] | None = None,
    ) -> None:
        self.root = require_dir(Path(root), _LAYOUT)
        self.split = split
        self.transforms = transforms
        available = _available(self.root)
        split, colon, drives = split.partition(":")
        if split not in available:
            raise unknown_split(
                self.root,
                split,
                available,
                f"expected {self.root / split} and {self.root / (split + 'annot')}",
            )
        parts = ["train", "val"] if split == "trainval" else [split]
        self.files = []
        for part in parts:
            images = self.root / part
            stems = [p.stem for p in sorted_files(images, ".png")]
            if not stems:
                raise DataError(f"no .png images in {images}; the layout is {_LAYOUT}")
            self.files += pair_by_stem(images, self.root / f"{part}annot", stems, ".png")
        if colon:
            self.files = _select_drives(self.files, drives, f"{self.root}: split {self.split!r}")
        self._set_classes(CAMVID_CLASSES, CAMVID_PALETTE)

    def label_lut(self, index: int) -> np.ndarray:
        return _LUT

    def label_hint(self) -> str:
        return f"0-10 for the classes and {CAMVID_VOID} for void"
