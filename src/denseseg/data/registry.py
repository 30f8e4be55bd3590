"""``get_dataset``: one word per dataset format, used by the CLI (``--dataset``) and recipes
(``dataset:``) alike."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from denseseg.data.datasets import (
    ADE20KDataset,
    CamVidDataset,
    CityscapesDataset,
    CocoDataset,
    ISBI2012Dataset,
    VOCDataset,
)
from denseseg.data.demo_scenes import make_demo_dataset
from denseseg.data.folder import FolderDataset
from denseseg.errors import ConfigError, DataError

# Format name -> reader class. (CocoDataset imports pycocotools only when it opens a file.)
_READERS: dict[str, type] = {
    "voc": VOCDataset,
    "cityscapes": CityscapesDataset,
    "ade20k": ADE20KDataset,
    "camvid": CamVidDataset,
    "isbi2012": ISBI2012Dataset,
    "coco": CocoDataset,
}

DATASETS = ("folder", "demo", *_READERS)
"""Every dataset format name ``get_dataset`` accepts."""


def dataset_class(dataset: str) -> type:
    """The reader class of a benchmark format (``voc``, ``cityscapes``, ...).

    Args:
        dataset: A format name from :data:`DATASETS` other than ``demo``.

    Returns:
        The dataset class; its ``__init__`` arguments after ``root``, ``split`` and
        ``transforms`` are the format's options.
    """
    if dataset == "folder":
        return FolderDataset
    if dataset not in _READERS:
        raise ConfigError(f"unknown dataset {dataset!r}; choose one of: {', '.join(DATASETS)}")
    return _READERS[dataset]


def _format_options(cls: type) -> list[str]:
    params = inspect.signature(cls.__init__).parameters
    return [p for p in params if p not in ("self", "root", "split", "transforms")]


def get_dataset(
    dataset: str,
    root: str | Path | None,
    split: str,
    transforms: Callable | None = None,
    **options: Any,
) -> Dataset:
    """Open a dataset in its on-disk format.

    Args:
        dataset: the format's name: ``folder`` (the generic layout), ``demo`` (the built-in
            procedural scenes, generated and cached on first use; ``root`` may be None),
            ``voc``, ``cityscapes``, ``ade20k``, ``camvid``, ``isbi2012`` or ``coco`` (the
            benchmarks' layouts as they ship; see :mod:`denseseg.data.datasets`).
        root: the dataset's folder.
        split: ``train``, ``val``, ...
        transforms: joint transform ``(image, target) -> (image, target)``; None returns the uint8
            image ``(C, H, W)`` and int64 target ``(H, W)``.
        **options: format-specific options: for ``demo`` ``make_demo_dataset``'s arguments; for
            the benchmark formats the reader's keyword arguments (``voc``: ``mask_dir``;
            ``coco``: ``target``, ``category_map``, ``classes``, ``ann_file``, ``img_dir``,
            ``drop_empty``).

    Returns:
        A map-style dataset with ``classes``, ``num_classes``, ``palette``, ``ignore_index``,
        ``in_channels`` and ``files`` attributes, and ``load_target`` and ``check`` methods.

    Raises:
        ConfigError: Unknown format or option, or no root.
        DataError: The root does not exist, or the layout or split is wrong.
    """
    if dataset == "demo":
        # Generated on first use, then reused from its cache (or from ``root`` when given).
        root = make_demo_dataset(root, **options)
        return FolderDataset(root, split=split, transforms=transforms)
    cls = dataset_class(dataset)
    allowed = [] if dataset == "folder" else _format_options(cls)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        takes = f"options {', '.join(allowed)}" if allowed else "no options"
        raise ConfigError(f"dataset {dataset!r} takes {takes}, got {unknown}")
    if root is None:
        if not (dataset == "coco" and options.get("ann_file") and options.get("img_dir")):
            raise ConfigError(f"dataset {dataset!r} needs a root folder (data.root or --root)")
    elif not Path(root).is_dir():
        raise DataError(f"dataset folder {root} does not exist; check data.root / --root")
    return cls(root, split=split, transforms=transforms, **options)
