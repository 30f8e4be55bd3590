"""Dataset statistics: class pixel counts and median frequency balancing.

These work on any dataset with ``num_classes`` and ``ignore_index`` attributes whose items are
``(image, target)``. Datasets that offer ``load_target(index)`` (as :class:`FolderDataset` does)
are read through it, which skips decoding images and running transforms.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

__all__ = [
    "class_frequency_counts",
    "class_image_pixel_counts",
    "class_pixel_counts",
    "median_frequency_weights",
    "median_frequency_weights_from_counts",
]


def _targets(dataset: Any) -> Iterator[torch.Tensor]:
    load = getattr(dataset, "load_target", None)
    for i in range(len(dataset)):
        yield torch.as_tensor(load(i) if load is not None else dataset[i][1])


def class_frequency_counts(dataset: Any) -> tuple[np.ndarray, np.ndarray]:
    """Both class counts in one pass over the masks.

    Args:
        dataset: Dataset with ``num_classes``, ``ignore_index`` and ``(image, target)`` items.

    Returns:
        ``(pixel_counts, image_pixel_counts)``, each ``int64 (num_classes,)``: the pixels
        labelled with each class, and for each class the total pixels (``H * W``, ignored pixels
        included, as SegNet counts them) of the images in which that class appears.
    """
    n = int(dataset.num_classes)
    ignore = getattr(dataset, "ignore_index", None)
    pixels = np.zeros(n, dtype=np.int64)
    image_pixels = np.zeros(n, dtype=np.int64)
    for target in _targets(dataset):
        flat = target.reshape(-1).long()
        keep = (flat >= 0) & (flat < n)
        if ignore is not None:
            keep &= flat != ignore
        counts = torch.bincount(flat[keep], minlength=n).numpy()
        pixels += counts
        image_pixels[counts > 0] += flat.numel()
    return pixels, image_pixels


def class_pixel_counts(dataset: Any) -> np.ndarray:
    """Number of pixels of each class over the dataset (ignored pixels not counted).

    Args:
        dataset: As for :func:`class_frequency_counts`.

    Returns:
        ``int64`` array ``(num_classes,)``.
    """
    return class_frequency_counts(dataset)[0]


def class_image_pixel_counts(dataset: Any) -> np.ndarray:
    """For each class, the total pixels of the images in which it appears.

    Args:
        dataset: As for :func:`class_frequency_counts`.

    Returns:
        ``int64`` array ``(num_classes,)``; 0 for classes that never appear.
    """
    return class_frequency_counts(dataset)[1]


def median_frequency_weights_from_counts(
    pixel_counts: np.ndarray | Any, image_pixel_counts: np.ndarray | Any
) -> torch.Tensor:
    """Median frequency balancing (Eigen and Fergus, as used by SegNet) from counts.

    ``freq_c = pixel_counts[c] / image_pixel_counts[c]`` and
    ``weight_c = median(freq) / freq_c``, the median taken over the classes that appear.
    Classes that never appear get weight 0: nothing to balance, and a 0 keeps them out of a
    weighted loss rather than giving them an infinite weight.

    Args:
        pixel_counts: ``(num_classes,)`` pixels per class.
        image_pixel_counts: ``(num_classes,)`` pixels of the images containing each class.

    Returns:
        ``float32`` tensor ``(num_classes,)``.
    """
    pix = np.asarray(pixel_counts, dtype=np.float64)
    img = np.asarray(image_pixel_counts, dtype=np.float64)
    if pix.shape != img.shape or pix.ndim != 1:
        raise ValueError(f"counts must be two (num_classes,) arrays, got {pix.shape}, {img.shape}")
    present = (pix > 0) & (img > 0)
    weights = np.zeros_like(pix)
    if present.any():
        freq = pix[present] / img[present]
        weights[present] = np.median(freq) / freq
    return torch.from_numpy(weights.astype(np.float32))


def median_frequency_weights(dataset: Any) -> torch.Tensor:
    """Median frequency class weights for a weighted cross-entropy (SegNet, CamVid).

    Args:
        dataset: As for :func:`class_frequency_counts`.

    Returns:
        ``float32`` tensor ``(num_classes,)``; see :func:`median_frequency_weights_from_counts`.
    """
    return median_frequency_weights_from_counts(*class_frequency_counts(dataset))
