"""The one place that builds a recipe's training data: the reader's split, the normalisation, the
joint augmentation under per-sample seeds, and the resumable loader.

The trainer, PreciseBN's calibration batches (:mod:`denseseg.engine.precise_bn`) and
``pack --precise-bn`` all take their batches from here, so they see the same crops.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from denseseg.config import DataCfg
from denseseg.data.registry import get_dataset
from denseseg.data.transforms import build_eval_resize, build_transforms, default_mean_std
from denseseg.engine.sampler import EpochSampler, SeededTransformDataset
from denseseg.engine.stop import ignore_stop_signals
from denseseg.errors import DataError

__all__ = [
    "TrainingData",
    "read_training_split",
    "read_validation_split",
    "recipe_training_data",
    "train_loader",
    "training_pipeline",
]


@dataclass
class TrainingData:
    """A recipe's training split and what turns its items into training samples.

    Attributes:
        raw: the reader's dataset (uint8 images, class-index or instance targets).
        dataset: ``raw`` augmented and normalised, indexed by ``(index, sample_seed)`` as
            :class:`~denseseg.engine.sampler.EpochSampler` yields them.
        transform: the joint training transform inside ``dataset``.
        mean: normalisation mean (0-1 units); zeros for models that normalise inside.
        std: normalisation std; ones for models that normalise inside.
    """

    raw: Any
    dataset: Dataset
    transform: Callable
    mean: list[float]
    std: list[float]


def read_training_split(dc: DataCfg, root: str | None = None) -> Any:
    """The recipe's training split as the reader gives it; ``root`` replaces ``data.root``.

    Raises:
        DataError: the split holds no images.
    """
    raw = get_dataset(dc.dataset, root or dc.root, dc.train_split, **dc.reader_options())
    if len(raw) == 0:
        raise DataError(
            f"the {dc.train_split!r} split of {root or dc.root or dc.dataset} has no images"
        )
    return raw


def read_validation_split(dc: DataCfg) -> Any | None:
    """The recipe's validation split (raw uint8 items, only resized by ``data.eval_resize``),
    or None without ``data.val_split``."""
    if not dc.val_split:
        return None
    resize = build_eval_resize(dc.eval_resize) if dc.eval_resize is not None else None
    return get_dataset(dc.dataset, dc.root, dc.val_split, transforms=resize, **dc.reader_options())


def training_pipeline(
    dc: DataCfg,
    raw: Any,
    *,
    normalise: bool = True,
    mean: list[float] | None = None,
    std: list[float] | None = None,
) -> TrainingData:
    """Augmentation and normalisation of ``raw`` as the recipe says.

    Args:
        dc: the recipe's data section.
        raw: its training split (:func:`read_training_split`).
        normalise: False for models that normalise inside (they take 0-1 images).
        mean: override of the normalisation mean (e.g. a checkpoint's), else ``data.mean`` or
            the channel count's default.
        std: the same for the std.
    """
    channels = raw.in_channels
    if normalise:
        default_mean, default_std = default_mean_std(channels)
        mean = list(mean or dc.mean or default_mean)
        std = list(std or dc.std or default_std)
    else:
        mean, std = [0.0] * channels, [1.0] * channels
    tfm = build_transforms(
        True, mean=mean, std=std, ignore_index=raw.ignore_index, **dc.transform_kwargs()
    )
    return TrainingData(raw, SeededTransformDataset(raw, tfm), tfm, mean, std)


def recipe_training_data(
    dc: DataCfg, *, root: str | None = None, normalise: bool = True, **overrides: Any
) -> TrainingData:
    """:func:`training_pipeline` over :func:`read_training_split`: a recipe's training data."""
    return training_pipeline(dc, read_training_split(dc, root), normalise=normalise, **overrides)


def train_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    pos: int,
    num_workers: int = 0,
    collate: Callable | None = None,
    pin_memory: bool = False,
    rank: int = 0,
    world: int = 1,
    accumulate: int = 1,
) -> DataLoader:
    """The rest of epoch ``epoch`` from sample ``pos`` on, in the seed's shuffled order, whole
    batches only. The samples and their augmentation depend on ``(seed, epoch, pos)`` alone,
    not on the number of workers nor on where a run was interrupted. With ``world`` processes
    (``batch_size`` each), ``pos`` counts global samples and ``rank`` takes its slice of each
    global batch (:class:`~denseseg.engine.sampler.EpochSampler`); with ``accumulate`` batches
    per optimiser step, only whole steps' batches."""
    # Its own generator: by default every new loader iterator draws its workers' base seed
    # from the global RNG, one draw more after a resume mid-epoch than the uninterrupted run
    # made there, which shifts dropout and Mask R-CNN's box sampling afterwards.
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    n = len(dataset)  # type: ignore[arg-type]
    sampler = EpochSampler(
        n, seed, epoch, pos, rank=rank, world=world, batch_size=batch_size, accumulate=accumulate
    )
    workers = {"num_workers": num_workers, "worker_init_fn": ignore_stop_signals}
    batching = {"collate_fn": collate, "drop_last": True, "pin_memory": pin_memory}
    return DataLoader(
        dataset, batch_size, sampler=sampler, generator=generator, **workers, **batching
    )
