"""ISBI 2012 EM segmentation (neuronal membranes), the U-Net paper's data set.

Layout (as zhixuhao/unet's ``data/membrane/train`` ships the challenge's training slices)::

    root/
      image/<n>.png      grayscale 8-bit electron microscopy slices
      label/<n>.png      8-bit masks: 0 = membrane, 255 = cell interior
      train.txt, ...     optional split lists, one slice per line (``3`` or ``3.png``)

Masks are read as class 0 (membrane) and 1 (cell); any other stored value is an error.

Splits: ``all`` is every slice, always. A list file ``<split>.txt`` in ``root`` defines
``<split>``. When ``root`` holds no list file at all, ``train`` is every slice too, as the U-Net
paper trained on every labelled slice; any other split (``val``, ``test``) is then refused
rather than silently evaluating on the training slices: write ``val.txt`` (and ``train.txt``)
to hold slices out. Slices load in numeric order of their names (0, 1, 2, ..., 10, ...).

Holding slices out without writing files (the data may sit on a read-only disk): the option
``val_slices`` (a recipe's ``data.options: {val_slices: [0, 6, 12, 18, 24]}``) names slices (as
in their file names) that form the ``val`` split, and ``train`` is then every other slice. It
applies when ``root`` holds no list files; with list files it is refused as ambiguous.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from denseseg.data.datasets.base import (
    SegmentationDataset,
    build_lut,
    pair_by_stem,
    read_split_list,
    require_dir,
    sorted_files,
    unknown_split,
)
from denseseg.errors import DataError

__all__ = ["ISBI2012_CLASSES", "ISBI2012_PALETTE", "ISBI2012Dataset"]

ISBI2012_CLASSES: tuple[str, ...] = ("membrane", "cell")
"""Class 0 is membrane (stored 0), class 1 is cell interior (stored 255)."""

ISBI2012_PALETTE = [(0, 0, 0), (255, 255, 255)]
"""Membrane black, cell white: the colours the masks are stored in."""

_LUT = build_lut({0: 0, 255: 1})
_LAYOUT = "root/image/<n>.png with root/label/<n>.png (optional root/<split>.txt lists)"


def _slice_key(stem: str) -> tuple[int, int | str]:
    # Numeric names sort as numbers so slice 10 follows slice 9, as the stack was cut.
    return (0, int(stem)) if stem.isdigit() else (1, stem)


def _held_out(
    val_slices: Sequence[int | str] | None, every: list[str], lists: list[str], root: Path
) -> list[str] | None:
    """The held-out slice names, checked against the slices present; None when not asked."""
    if val_slices is None:
        return None
    if lists:
        raise DataError(
            f"{root} holds split lists ({', '.join(lists)}.txt) and val_slices is set too; "
            "use one or the other"
        )
    if isinstance(val_slices, str | int) or not val_slices:
        raise DataError(f"val_slices must be a non-empty list of slices, got {val_slices!r}")
    held = [str(s).removesuffix(".png") for s in val_slices]
    unknown = [s for s in held if s not in every]
    if unknown:
        raise DataError(
            f"val_slices names {', '.join(unknown)}, not among the slices in {root / 'image'} "
            f"({every[0]} .. {every[-1]})"
        )
    if len(held) >= len(every):
        raise DataError(f"val_slices holds out all {len(every)} slices; leave some to train on")
    return sorted(dict.fromkeys(held), key=_slice_key)


class ISBI2012Dataset(SegmentationDataset):
    """ISBI 2012 membranes: grayscale slices, classes membrane (0) and cell (1).

    Args:
        root: Folder holding ``image/`` and ``label/``.
        split: ``all``, a list file's name, or ``train`` when there are no list files (see the
            module docstring).
        transforms: Called as ``transforms(image, target)`` on each item.
        val_slices: Slices held out as the ``val`` split (``train`` is the rest), e.g.
            ``[0, 6, 12, 18, 24]``; see the module docstring.

    Items are ``(image uint8 (1, H, W), target int64 (H, W))``.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        transforms: Callable[[torch.Tensor, torch.Tensor], Any] | None = None,
        val_slices: Sequence[int | str] | None = None,
    ) -> None:
        self.root = Path(root)
        self.split = split
        self.transforms = transforms
        images = require_dir(self.root / "image", _LAYOUT)
        labels = require_dir(self.root / "label", _LAYOUT)
        every = sorted((p.stem for p in sorted_files(images, ".png")), key=_slice_key)
        if not every:
            raise DataError(f"no .png slices in {images}; the layout is {_LAYOUT}")
        lists = sorted(p.stem for p in self.root.glob("*.txt"))
        held = _held_out(val_slices, every, lists, self.root)
        if split == "all":
            stems = every
        elif held is not None and split in ("train", "val"):
            stems = held if split == "val" else [s for s in every if s not in held]
        elif split == "train" and not lists:
            stems = every
        elif split in lists:
            stems = read_split_list(self.root / f"{split}.txt")
            if not stems:
                raise DataError(f"split list {self.root / split}.txt names no slices")
        else:
            available = [*lists, "all"] if lists else ["train", "all"]
            raise unknown_split(
                self.root,
                split,
                available,
                f"write {self.root / split}.txt listing its slices"
                + (" or set data.options.val_slices" if split == "val" and not lists else ""),
            )
        self.files = pair_by_stem(images, labels, stems, ".png")
        self._set_classes(ISBI2012_CLASSES, ISBI2012_PALETTE, in_channels=1)

    def label_lut(self, index: int) -> np.ndarray:
        return _LUT

    def label_hint(self) -> str:
        return "0 for membrane and 255 for cell"

    def _channel_error(self, image_path: Path, channels: int) -> str:
        return (
            f"image {image_path} has {channels} channels; ISBI 2012 slices are single-channel "
            "grayscale, convert it to 8-bit grayscale (mode L)"
        )
