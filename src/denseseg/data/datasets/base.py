"""What every dataset format shares: attributes, loading, label checks and ``check()``.

A format subclasses :class:`SegmentationDataset`, fills ``files`` and the class metadata in its
``__init__``, and, when its masks store something other than class indices (Cityscapes'
``labelIds``, ADE20K's shifted labels, CamVid's void index), returns a lookup table from
:meth:`SegmentationDataset.label_lut`. Loading, label validation and ``check()`` are written once
here, so every format reports a bad file the same way.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from denseseg.data.io import read_image, read_mask, read_text, show_path
from denseseg.data.palette import Color
from denseseg.errors import DataError

__all__ = [
    "IMAGE_SUFFIXES",
    "INVALID",
    "SegmentationDataset",
    "SplitNotFound",
    "build_lut",
    "pair_by_stem",
    "read_split_list",
    "require_dir",
    "sorted_files",
    "unknown_split",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
"""Image file suffixes the readers recognise (lower case)."""

INVALID = -1
"""Lookup-table entry for a raw mask value the format does not define."""


def build_lut(mapping: dict[int, int], size: int = 256) -> np.ndarray:
    """Build a raw-value -> class-id lookup table.

    Args:
        mapping: ``{raw_value: class_id}``; ``class_id`` may be the ignore index.
        size: Number of raw values the table covers (256 for 8-bit masks).

    Returns:
        ``int64`` array ``(size,)``; values missing from ``mapping`` hold :data:`INVALID`.
    """
    lut = np.full(size, INVALID, dtype=np.int64)
    for raw, cls in mapping.items():
        lut[raw] = cls
    return lut


class SplitNotFound(DataError):
    """The dataset has no split of that name (as opposed to a split that exists but fails)."""


def require_dir(path: Path, layout: str) -> Path:
    """Return ``path`` if it is a folder, else a :class:`DataError` naming it and ``layout``."""
    if not path.is_dir():
        raise DataError(f"expected folder {show_path(path)} does not exist; the layout is {layout}")
    return path


def unknown_split(root: Path, split: Any, available: Iterable[str], fix: str = "") -> DataError:
    """The error (a :class:`SplitNotFound`) for a split the dataset does not have, listing the
    ones it has."""
    names = ", ".join(available) or "none"
    more = f"; {fix}" if fix else ""
    return SplitNotFound(
        f"dataset {show_path(root)} has no split '{split}'; available: {names}{more}"
    )


def read_split_list(path: Path) -> list[str]:
    """Read a split list file: one sample per line, as file stems.

    Blank lines and ``#`` comments are skipped. A line may name a stem (``2007_000032``), a file
    (``2007_000032.jpg``) or, as DeepLab's ``train_aug.txt`` does, an image path followed by a
    mask path (``/JPEGImages/2007_000032.jpg /SegmentationClassAug/2007_000032.png``): the stem
    of the first entry is taken.

    Args:
        path: The list file.

    Returns:
        Stems in file order.
    """
    text = read_text(path, "split list")
    stems = []
    for line in text.splitlines():
        entry = line.strip()
        if entry and not entry.startswith("#"):
            name = Path(entry.split()[0]).name
            # Only a known image suffix is cut, so ids that hold a dot keep it.
            stems.append(Path(name).stem if Path(name).suffix.lower() in IMAGE_SUFFIXES else name)
    return stems


class SegmentationDataset(Dataset):
    """Base of the dataset formats: images paired with class-index masks.

    Subclasses set, in ``__init__``, every attribute below (the class metadata through
    :meth:`_set_classes`) and call nothing else; items then load through :meth:`load`. The
    ``folder`` format (:class:`~denseseg.data.folder.FolderDataset`) and every benchmark format
    share this base.

    Attributes:
        root: Dataset folder.
        split: Split name.
        transforms: Called as ``transforms(image, target)`` on each item, or ``None``.
        files: ``[(image_path, mask_path), ...]`` in load order.
        classes: Class names, ``num_classes`` of them.
        num_classes: Number of classes; valid labels are ``0 .. num_classes - 1``.
        palette: One ``(r, g, b)`` per class.
        ignore_index: Label excluded from training and metrics.
        in_channels: 1 (grayscale) or 3 (RGB).

    Items are ``(image uint8 (C, H, W), target int64 (H, W))``, or what ``transforms`` returns.
    """

    #: Formats of colour photographs set this: the odd grayscale JPEG (PASCAL VOC, COCO and
    #: ADE20K ship a few) is repeated to three channels instead of failing the channel check.
    expand_gray: bool = False

    root: Path
    split: str | None
    transforms: Callable[[torch.Tensor, torch.Tensor], Any] | None
    files: list[tuple[Path, Path]]
    classes: list[str]
    num_classes: int
    palette: list[Color]
    ignore_index: int = 255
    in_channels: int

    def _set_classes(
        self,
        classes: Sequence[str],
        palette: Sequence[Color],
        *,
        in_channels: int = 3,
        ignore_index: int = 255,
    ) -> None:
        """Set the class metadata: ``classes``, ``num_classes``, ``palette``, ``ignore_index``
        and ``in_channels``; a format's ``__init__`` calls it once."""
        self.classes = list(classes)
        self.num_classes = len(self.classes)
        self.palette = list(palette)
        self.ignore_index = ignore_index
        self.in_channels = in_channels

    def label_lut(self, index: int) -> np.ndarray | None:
        """Lookup table from the raw values stored in mask ``index`` to class ids.

        Args:
            index: Item index (formats such as Cityscapes pick the table per file).

        Returns:
            ``int64`` array indexed by raw value, :data:`INVALID` for undefined values; ``None``
            when the mask already stores class ids.
        """
        return None

    def label_hint(self) -> str:
        """What the raw mask values of this format mean, for error messages."""
        return "class indices"

    def __len__(self) -> int:
        return len(self.files)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, "
            f"len={len(self)}, num_classes={self.num_classes}, in_channels={self.in_channels})"
        )

    def _check_labels(self, target: torch.Tensor, mask_path: Path) -> None:
        ok = ((target >= 0) & (target < self.num_classes)) | (target == self.ignore_index)
        if not bool(ok.all()):
            bad = torch.unique(target[~ok]).tolist()
            shown = ", ".join(map(str, bad[:10])) + (", ..." if len(bad) > 10 else "")
            raise DataError(
                f"mask {show_path(mask_path)} holds labels {shown} outside "
                f"0..{self.num_classes - 1} (ignore_index {self.ignore_index}); fix the mask or "
                "the class list"
            )

    def _decode(self, raw: torch.Tensor, index: int, mask_path: Path) -> torch.Tensor:
        """Map raw mask values through :meth:`label_lut`; DataError on undefined values."""
        lut = self.label_lut(index)
        if lut is None:
            return raw
        inside = (raw >= 0) & (raw < len(lut))
        out = torch.from_numpy(lut)[raw.clamp(0, len(lut) - 1)]
        bad = ~inside | (out == INVALID)
        if bool(bad.any()):
            values = torch.unique(raw[bad]).tolist()
            shown = ", ".join(map(str, values[:10])) + (", ..." if len(values) > 10 else "")
            raise DataError(
                f"mask {show_path(mask_path)} holds values {shown}, which this format does not "
                f"define (its masks store {self.label_hint()}); fix or re-export the mask"
            )
        return out

    def load_target(self, index: int) -> torch.Tensor:
        """Read, decode and check one mask without its image (used by dataset statistics).

        Args:
            index: Item index.

        Returns:
            ``int64`` tensor ``(H, W)`` of class ids, ``ignore_index`` for ignored pixels.
        """
        mask_path = self.files[index][1]
        target = self._decode(read_mask(mask_path), index, mask_path)
        self._check_labels(target, mask_path)
        return target

    def _channel_error(self, image_path: Path, channels: int) -> str:
        return (
            f"image {show_path(image_path)} has {channels} channel(s) but "
            f"{show_path(self.files[0][0])} has "
            f"{self.in_channels}; convert all images to the same colour mode"
        )

    def load_image(self, index: int) -> torch.Tensor:
        """Read one image as ``uint8 (in_channels, H, W)``; DataError on a channel mismatch."""
        image_path = self.files[index][0]
        image = read_image(image_path)
        if image.shape[0] == 1 and self.in_channels == 3 and self.expand_gray:
            image = image.expand(3, -1, -1).contiguous()
        if image.shape[0] != self.in_channels:
            raise DataError(self._channel_error(image_path, image.shape[0]))
        return image

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Read and check one item, without transforms.

        Args:
            index: Item index.

        Returns:
            ``(image uint8 (C, H, W), target int64 (H, W))``.

        Raises:
            DataError: Unreadable file, size or channel mismatch, or a bad label.
        """
        image_path, mask_path = self.files[index]
        image = self.load_image(index)
        target = self.load_target(index)
        if tuple(target.shape) != tuple(image.shape[1:]):
            raise DataError(
                f"mask {show_path(mask_path)} is {target.shape[0]}x{target.shape[1]} (HxW) but "
                f"image {show_path(image_path)} is {image.shape[1]}x{image.shape[2]}; masks must "
                "match their image"
            )
        return image, target

    def __getitem__(self, index: int) -> Any:
        image, target = self.load(index)
        if self.transforms is not None:
            return self.transforms(image, target)
        return image, target

    def check(self) -> list[str]:
        """Load every item and collect the problems instead of raising.

        Returns:
            One message per faulty item (empty when the split is clean).
        """
        problems: list[str] = []
        for i in range(len(self)):
            try:
                self.load(i)
            except DataError as exc:
                problems.append(str(exc))
        return problems


def pair_by_stem(
    image_dir: Path,
    mask_dir: Path,
    stems: Sequence[str],
    image_suffix: str,
    mask_suffix: str = ".png",
) -> list[tuple[Path, Path]]:
    """Pair ``image_dir/<stem><image_suffix>`` with ``mask_dir/<stem><mask_suffix>``.

    Args:
        image_dir: Folder of images.
        mask_dir: Folder of masks.
        stems: Sample stems in load order.
        image_suffix: Image file suffix, e.g. ``".jpg"``.
        mask_suffix: Mask file suffix.

    Returns:
        ``[(image_path, mask_path), ...]``.

    Raises:
        DataError: An image or a mask is missing (the first is named, the rest counted).
    """
    pairs = [(image_dir / f"{s}{image_suffix}", mask_dir / f"{s}{mask_suffix}") for s in stems]
    for what, k in (("image", 0), ("mask", 1)):
        missing = [p[k] for p in pairs if not p[k].is_file()]
        if missing:
            more = f" ({len(missing) - 1} more missing)" if len(missing) > 1 else ""
            raise DataError(
                f"{what} {show_path(missing[0])} does not exist{more}; every listed sample needs "
                f"{image_dir.name}/<name>{image_suffix} and {mask_dir.name}/<name>{mask_suffix}"
            )
    return pairs


def sorted_files(folder: Path, suffix: str) -> list[Path]:
    """Files in ``folder`` (not recursive) ending in ``suffix``, sorted by name."""
    with os.scandir(folder) as entries:
        return sorted(Path(e.path) for e in entries if e.is_file() and e.name.endswith(suffix))
