"""``get_dataset``: one word per dataset format, used by the CLI (``--dataset``) and recipes
(``dataset:``) alike."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from denseseg.errors import ConfigError, DataError

DATASETS = ("folder", "demo")


def get_dataset(
    dataset: str,
    root: str | Path | None,
    split: str,
    transforms: Callable | None = None,
    **options: Any,
) -> Dataset:
    """Open a dataset in its on-disk format.

    Args:
        dataset: the format's name: ``folder`` (the generic layout) or ``demo`` (the built-in
            procedural scenes, generated and cached on first use; ``root`` may be None).
        root: the dataset's folder.
        split: ``train``, ``val``, ...
        transforms: joint transform ``(image, target) -> (image, target)``; None returns the uint8
            image ``(C, H, W)`` and int64 target ``(H, W)``.
        **options: format-specific options (for ``demo``: ``make_demo_dataset``'s arguments).

    Returns:
        A map-style dataset with ``classes``, ``num_classes``, ``palette``, ``ignore_index`` and
        ``in_channels`` attributes.
    """
    from denseseg.data.folder import FolderDataset

    if dataset == "demo":
        from denseseg.data.demo import make_demo_dataset

        # Generated on first use, then reused from its cache (or from ``root`` when given).
        root = make_demo_dataset(root, **options)
        return FolderDataset(root, split=split, transforms=transforms)
    if dataset == "folder":
        if options:
            raise ConfigError(f"dataset 'folder' takes no options, got {sorted(options)}")
        if root is None:
            raise ConfigError("dataset 'folder' needs a root folder (data.root or --root)")
        if not Path(root).is_dir():
            raise DataError(f"dataset folder {root} does not exist; check data.root / --root")
        return FolderDataset(root, split=split, transforms=transforms)
    raise ConfigError(f"unknown dataset {dataset!r}; choose one of: {', '.join(DATASETS)}")
