"""Evaluation of a Segmenter on a dataset at the images' original resolution."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from denseseg.inference.segmenter import Segmenter
from denseseg.metrics import SegmentationMetrics


def _list_collate(batch: Sequence) -> tuple[list, list]:
    images, targets = zip(*batch)
    return list(images), list(targets)


def eval_batches(
    dataset: Dataset, batch_size: int = 4, num_workers: int = 0
) -> Iterator[tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """Batches of ``(uint8 images (C, H_i, W_i), int64 targets (H_i, W_i))`` of mixed sizes."""
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_list_collate,
    )
    yield from loader


def evaluate(
    segmenter: Segmenter,
    dataset: Dataset,
    *,
    batch_size: int = 4,
    num_workers: int = 0,
    absent: str = "nan",
    progress: bool = True,
) -> SegmentationMetrics:
    """Predict every image of ``dataset`` (raw uint8 items, no transforms) and accumulate metrics.

    Images of different sizes share a batch: the Segmenter pads them to a common size and crops
    each prediction back, so nothing is resized and padded pixels never reach the metrics.

    Returns:
        The filled :class:`SegmentationMetrics` (call ``.compute()``).
    """
    metrics = SegmentationMetrics(
        segmenter.num_classes, ignore_index=segmenter.ignore_index, absent=absent
    )
    total = (len(dataset) + batch_size - 1) // batch_size  # type: ignore[arg-type]
    bar = tqdm(
        eval_batches(dataset, batch_size, num_workers),
        total=total,
        desc="eval",
        disable=not progress,
        leave=False,
        dynamic_ncols=True,
    )
    for images, targets in bar:
        labels, _ = segmenter.predict_batch(images)
        for pred, target in zip(labels, targets):
            metrics.update(pred, target)
    return metrics
