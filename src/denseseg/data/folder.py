"""The generic folder dataset: the format any user can produce by hand.

Layout::

    root/
      images/<stem>.png|jpg|jpeg|bmp|tif|tiff
      masks/<stem>.png              class indices, single-channel or palette PNG
      classes.yaml                  optional, see below
      train.txt, val.txt, ...       optional split lists: one stem per line; blank and # lines
                                    are skipped
    or, instead of list files, one sub-folder per split:
      train/images, train/masks, val/images, val/masks, ...

``classes.yaml`` may hold exactly these keys::

    classes: [background, cat, dog]      # or [{name: cat, color: [128, 0, 0]}, ...]
    palette: [[0, 0, 0], [128, 0, 0], [0, 128, 0]]   # alternative to colours in `classes`
    ignore_index: 255                    # label excluded from loss and metrics (default 255)

Without ``classes.yaml`` or ``classes``/``num_classes`` arguments, ``num_classes`` is inferred as
one more than the largest label (other than ``ignore_index``) found in *every* mask under
``root`` (all splits, so that train and val agree); this reads every mask once, so pass
``num_classes`` or write ``classes.yaml`` for large datasets. Names are then ``class_0``, ...
When some label below the largest never occurs (one stray pixel of 200 in masks of 0-2 would
make 201 classes), a warning on the ``denseseg`` logger names the largest value, its pixel count
and its file; the dataset still opens, since unused class ids can be genuine.

``classes.yaml`` and the list files are read as UTF-8 (a byte-order mark is allowed).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from denseseg.data.datasets.base import IMAGE_SUFFIXES, SegmentationDataset, SplitNotFound
from denseseg.data.io import image_info, read_mask, read_text, show_path
from denseseg.data.palette import Color, default_palette, parse_palette

# The statistics live in stats.py (they work on any dataset); re-exported for callers that
# reach for them next to the dataset.
from denseseg.data.stats import (  # noqa: F401
    class_image_pixel_counts,
    class_pixel_counts,
    median_frequency_weights,
)
from denseseg.errors import ConfigError, DataError
from denseseg.yamlfile import load_yaml

__all__ = ["IMAGE_SUFFIXES", "FolderDataset", "available_splits"]

log = logging.getLogger("denseseg")

_YAML_KEYS = ("classes", "palette", "ignore_index")
_ALL_SPLITS = ("all", None)


def _read_classes_yaml(path: Path) -> tuple[list[str] | None, list[Color] | None, int]:
    """Parse ``classes.yaml`` into (names, palette, ignore_index); ConfigError on any fault."""
    text = read_text(path, "class list", ConfigError)
    data = load_yaml(text, show_path(path)) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{show_path(path)} must be a mapping with keys {', '.join(_YAML_KEYS)}")
    for key in data:
        if key not in _YAML_KEYS:
            raise ConfigError(
                f"{show_path(path)}: unknown key '{key}'; allowed keys are {', '.join(_YAML_KEYS)}"
            )

    names: list[str] | None = None
    colors: list[Color | None] = []
    if "classes" in data:
        raw = data["classes"]
        if not isinstance(raw, list) or not raw:
            raise ConfigError(f"{show_path(path)}: 'classes' must be a non-empty list of names")
        names = []
        for i, entry in enumerate(raw):
            if isinstance(entry, dict):
                extra = set(entry) - {"name", "color"}
                if extra or "name" not in entry:
                    raise ConfigError(
                        f"{show_path(path)}: classes[{i}] must be {{name, color}}, got keys "
                        f"{sorted(entry)}"
                    )
                names.append(str(entry["name"]))
                colors.append(_yaml_colors(path, [entry["color"]])[0] if "color" in entry else None)
            else:
                names.append(str(entry))
                colors.append(None)

    palette: list[Color] | None = None
    if "palette" in data:
        if any(c is not None for c in colors):
            raise ConfigError(
                f"{show_path(path)}: give colours either in 'classes' or in 'palette', not both"
            )
        palette = _yaml_colors(path, data["palette"])
    elif any(c is not None for c in colors):
        # Classes without a colour take the default palette's colour for their index.
        fallback = default_palette(len(colors))
        palette = [c if c is not None else fallback[i] for i, c in enumerate(colors)]

    ignore_index = data.get("ignore_index", 255)
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        ignore_index = -1
    if not 0 <= ignore_index <= 65535:  # a mask PNG stores at most 16-bit values
        raise ConfigError(
            f"{show_path(path)}: ignore_index must be an integer from 0 to 65535, got "
            f"{data.get('ignore_index')!r}"
        )
    return names, palette, ignore_index


def _yaml_colors(path: Path, raw: Any) -> list[Color]:
    if not isinstance(raw, list):
        raise ConfigError(f"{show_path(path)}: a palette must be a list of [r, g, b] triples")
    try:
        return parse_palette(raw)
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"{show_path(path)}: {exc}; write colours as [r, g, b] with 0..255"
        ) from exc


def _index_images(folder: Path) -> dict[str, Path]:
    """Map stem -> image path for the image files directly inside ``folder``."""
    found: dict[str, Path] = {}
    with os.scandir(folder) as entries:
        for entry in entries:
            path = Path(entry.path)
            if not entry.is_file() or path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            if path.stem in found:
                raise DataError(
                    f"{show_path(found[path.stem])} and {show_path(path)} share the stem "
                    f"'{show_path(path.stem)}', so they would share one mask; rename or remove one"
                )
            found[path.stem] = path
    return found


def _read_list_file(path: Path, images: dict[str, Path]) -> list[str]:
    stems: list[str] = []
    for lineno, line in enumerate(read_text(path, "split list").splitlines(), start=1):
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        if entry in images:
            stems.append(entry)
        elif Path(entry).suffix.lower() in IMAGE_SUFFIXES and Path(entry).stem in images:
            stems.append(Path(entry).stem)
        else:
            raise DataError(
                f"{show_path(path)} line {lineno} names '{entry}', but "
                f"{show_path(path.parent / 'images')} holds no "
                "such image; fix the list or add the image"
            )
    return stems


def _pair(image_dir: Path, mask_dir: Path, stems: Sequence[str] | None) -> list[tuple[Path, Path]]:
    """Pair each image with ``mask_dir/<stem>.png``; DataError naming the first unpaired one."""
    if not image_dir.is_dir():
        raise DataError(
            f"image folder {show_path(image_dir)} does not exist; see the folder layout"
        )
    images = _index_images(image_dir)
    if stems is None:
        stems = sorted(images)
    if not mask_dir.is_dir():
        raise DataError(
            f"mask folder {show_path(mask_dir)} does not exist; put masks there as <stem>.png"
        )
    pairs = [(images[s], mask_dir / f"{s}.png") for s in stems]
    missing = [(img, m) for img, m in pairs if not m.is_file()]
    if missing:
        img, mask = missing[0]
        more = f" ({len(missing) - 1} more images lack masks)" if len(missing) > 1 else ""
        raise DataError(
            f"image {show_path(img)} has no mask: expected {show_path(mask)}{more}; add it or "
            "remove the image"
        )
    return pairs


def available_splits(root: str | os.PathLike) -> list[str]:
    """Names of the splits a folder dataset offers.

    Args:
        root: Dataset folder.

    Returns:
        Sorted split names (sub-folders with ``images/`` and ``<name>.txt`` list files), then
        ``"all"`` when there are any images at all.
    """
    root = Path(root)
    if not root.is_dir():
        return []
    subs = {d.name for d in root.iterdir() if d.is_dir() and (d / "images").is_dir()}
    flat = (root / "images").is_dir()
    lists = {p.stem for p in root.glob("*.txt")} if flat else set()
    names = sorted(subs | lists)
    return [*names, "all"] if flat or subs else names


def _split_files(root: Path, split: str | None) -> list[tuple[Path, Path]]:
    if split in _ALL_SPLITS:
        if (root / "images").is_dir():
            return _pair(root / "images", root / "masks", None)
        subs = [s for s in available_splits(root) if s != "all"]
        return [p for s in subs for p in _pair(root / s / "images", root / s / "masks", None)]
    if (root / split / "images").is_dir():
        return _pair(root / split / "images", root / split / "masks", None)
    list_file = root / f"{split}.txt"
    if list_file.is_file() and (root / "images").is_dir():
        stems = _read_list_file(list_file, _index_images(root / "images"))
        return _pair(root / "images", root / "masks", stems)
    avail = available_splits(root)
    raise SplitNotFound(
        f"dataset {show_path(root)} has no split '{split}'; available: "
        f"{', '.join(avail) or 'none'} (add {split}.txt or {split}/images)"
    )


def _all_mask_files(root: Path) -> list[Path]:
    dirs = [root / "masks"] + [d / "masks" for d in sorted(root.iterdir()) if d.is_dir()]
    return [p for d in dirs if d.is_dir() for p in sorted(d.glob("*.png"))]


class FolderDataset(SegmentationDataset):
    """Images and class-index masks laid out in plain folders (see the module docstring).

    Args:
        root: Dataset folder.
        split: Split name (``"train"``, ``"val"``, ...); ``"all"`` or ``None`` takes every image.
        transforms: Called as ``transforms(image, target)`` on each item, e.g. the result of
            :func:`denseseg.data.transforms.build_transforms`.
        num_classes: Number of classes; overrides inference, must agree with ``classes``.
        classes: Class names; override the names in ``classes.yaml``.

    Attributes:
        classes: Class names, ``num_classes`` of them.
        num_classes: Number of classes; valid labels are ``0 .. num_classes - 1``.
        palette: One ``(r, g, b)`` per class.
        ignore_index: Label excluded from training and metrics.
        in_channels: 1 or 3, from the first image; every image must agree.
        files: ``[(image_path, mask_path), ...]`` in load order.

    Items are ``(image uint8 (C, H, W), target int64 (H, W))``, or what ``transforms`` returns.
    Loading checks each item and raises :class:`DataError` on a size mismatch, a channel
    mismatch or a label outside ``[0, num_classes)`` other than ``ignore_index``.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str | None = "train",
        transforms: Callable[[torch.Tensor, torch.Tensor], Any] | None = None,
        num_classes: int | None = None,
        classes: Sequence[str] | None = None,
    ) -> None:
        self.root = Path(root)
        self.split = split
        self.transforms = transforms
        if not self.root.is_dir():
            raise DataError(f"dataset folder {show_path(self.root)} does not exist; check the path")

        yaml_path = self.root / "classes.yaml"
        names, palette, self.ignore_index = (
            _read_classes_yaml(yaml_path) if yaml_path.is_file() else (None, None, 255)
        )
        self.files: list[tuple[Path, Path]] = _split_files(self.root, split)
        if not self.files:
            raise DataError(
                f"dataset {show_path(self.root)} (split {split}) has no images; "
                f"expected files with suffix {', '.join(IMAGE_SUFFIXES)} under images/"
            )

        if classes is not None:
            names = [str(c) for c in classes]
        if num_classes is not None:
            if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
                raise ConfigError(f"num_classes must be a positive integer, got {num_classes!r}")
            if names is not None and len(names) != num_classes:
                raise ConfigError(
                    f"num_classes={num_classes} but {len(names)} class names are given "
                    f"({show_path(yaml_path) if classes is None else 'classes argument'}); "
                    "make them agree"
                )
        elif names is not None:
            num_classes = len(names)
        else:
            num_classes = self._infer_num_classes()
        self.num_classes: int = num_classes
        self.classes: list[str] = names or [f"class_{i}" for i in range(num_classes)]
        if not self.classes:
            raise ConfigError("classes must name at least one class")

        if palette is not None and len(palette) < num_classes:
            raise ConfigError(
                f"{show_path(yaml_path)}: palette has {len(palette)} colours for {num_classes} "
                "classes; give one colour per class"
            )
        self.palette: list[Color] = (palette or default_palette(num_classes))[:num_classes]
        self.in_channels: int = image_info(self.files[0][0]).channels

    def _infer_num_classes(self) -> int:
        pixels: dict[int, int] = {}  # label -> pixels over every mask
        first: dict[int, Path] = {}  # label -> first mask holding it
        for path in _all_mask_files(self.root):
            labels = read_mask(path)
            labels = labels[labels != self.ignore_index]
            if labels.numel():
                low = int(labels.min())
                if low < 0:
                    raise DataError(
                        f"mask {show_path(path)} holds negative label {low}; labels must be >= 0"
                    )
                values, counts = torch.unique(labels, return_counts=True)
                for v, n in zip(values.tolist(), counts.tolist()):
                    pixels[v] = pixels.get(v, 0) + n
                    first.setdefault(v, path)
        if not pixels:
            raise DataError(
                f"cannot infer the classes of {show_path(self.root)}: every mask is empty or "
                "ignored; write classes.yaml or pass num_classes"
            )
        _report_inferred(self.root, pixels, first)
        return max(pixels) + 1


def _report_inferred(root: Path, pixels: dict[int, int], first: dict[int, Path]) -> None:
    """Log the inferred class count; a warning when labels below the largest never occur."""
    top = max(pixels)
    fix = f"write {show_path(root / 'classes.yaml')} or pass num_classes"
    if len(pixels) == top + 1:
        log.info("inferred %d classes (0..%d) from the masks of %s", top + 1, top, show_path(root))
        return
    log.warning(
        "inferred %d classes from the masks of %s because the largest label is %d (%d pixel(s), "
        "first in %s), but only %d of the labels 0..%d occur; if %d is a stray value fix that "
        "mask, otherwise %s to state the classes",
        top + 1,
        show_path(root),
        top,
        pixels[top],
        show_path(first[top]),
        len(pixels),
        top,
        top,
        fix,
    )
