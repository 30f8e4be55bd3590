"""``browse``: a grid picture of dataset samples with their masks overlaid.

With a training transform the samples are shown as the model sees them (scaled, warped,
cropped, flipped, colour-distorted, padded with ignore); the normalised float image is mapped
back to ``uint8`` with the transform's mean and std for display, and ignored pixels (padding)
show the bare image.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from denseseg.data.palette import overlay
from denseseg.errors import ConfigError
from denseseg.viz import grid_shape, save_image_grid

__all__ = ["browse", "instance_label_map", "to_display"]


def to_display(
    image: torch.Tensor,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> torch.Tensor:
    """Turn a sample's image back into ``uint8 (C, H, W)`` for display.

    Args:
        image: ``uint8 (C, H, W)`` (returned as is) or a normalised float image.
        mean: Per-channel mean in 0-1 units used to normalise it.
        std: Per-channel std in 0-1 units.

    Returns:
        ``uint8 (C, H, W)``: ``round(255 * (image * std + mean))`` clipped to 0-255.
    """
    if image.dtype == torch.uint8:
        return image
    if mean is None or std is None:
        raise ValueError("a float image needs the mean and std it was normalised with")
    m = torch.tensor(list(mean), dtype=torch.float32).view(-1, 1, 1)
    s = torch.tensor(list(std), dtype=torch.float32).view(-1, 1, 1)
    return ((image.float() * s + m) * 255.0).round().clamp(0, 255).to(torch.uint8)


def instance_label_map(target: dict[str, Any], ignore_index: int = 255) -> torch.Tensor:
    """Paint an instance target (``masks (N, H, W)``, ``labels (N,)``) into one label map.

    Later instances paint over earlier ones; pixels of no instance get ``ignore_index`` so the
    overlay leaves them bare.
    """
    masks = torch.as_tensor(target["masks"]).bool()
    out = torch.full(masks.shape[-2:], ignore_index, dtype=torch.int64)
    for mask, label in zip(masks, torch.as_tensor(target["labels"]).tolist()):
        out[mask] = int(label)
    return out


def browse(
    dataset: Any,
    out: str | Path,
    *,
    n: int = 16,
    transform: Callable[[torch.Tensor, Any], tuple[torch.Tensor, Any]] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    seed: int = 0,
    alpha: float = 0.5,
) -> Path:
    """Save a grid of ``n`` samples of ``dataset`` with their labels overlaid.

    Args:
        dataset: A dataset without transforms (``classes``, ``palette``, ``ignore_index`` and
            ``(image uint8 (C, H, W), target)`` items).
        out: PNG file to write.
        n: Number of samples, drawn at random without repetition (all when fewer).
        transform: Optional joint transform, e.g. the recipe's training pipeline; it runs
            under a per-sample seed, as in training, so a seed gives the same picture.
        mean: The normalisation mean of ``transform`` (0-1 units), to un-normalise.
        std: Its std.
        seed: Seed of the sample choice and of the augmentation.
        alpha: Overlay opacity.

    Returns:
        ``out``.
    """
    if n < 1:
        raise ConfigError(f"the number of samples must be >= 1, got {n}")
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(dataset), generator=g)[:n].tolist()
    pictures: list[np.ndarray] = []
    present: set[int] = set()
    for k, index in enumerate(order):
        image, target = dataset[index]
        if transform is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed * 1_000_003 + k)
                image, target = transform(image, target)
        if isinstance(target, dict):
            target = instance_label_map(target, dataset.ignore_index)
        present.update(int(v) for v in torch.unique(target).tolist())
        shown = to_display(image, mean, std)
        pictures.append(
            overlay(shown, target, dataset.palette, alpha=alpha, ignore_index=dataset.ignore_index)
        )
    rows_n, cols = grid_shape(len(pictures))
    rows = [pictures[r * cols : (r + 1) * cols] for r in range(rows_n)]
    # The legend names only the classes on show (ADE20K has 150).
    shown_ids = sorted(i for i in present if 0 <= i < len(dataset.classes))
    return save_image_grid(
        rows,
        out,
        palette=[dataset.palette[i] for i in shown_ids],
        class_names=[dataset.classes[i] for i in shown_ids],
        cell=2.4,
    )
