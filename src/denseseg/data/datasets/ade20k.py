"""ADE20K scene parsing (the MIT SceneParsing benchmark, 150 classes), as ``ADEChallengeData2016``.

Layout (``root`` may be ``ADEChallengeData2016`` or the folder holding it)::

    ADEChallengeData2016/
      images/training/ADE_train_<n>.jpg       images/validation/ADE_val_<n>.jpg
      annotations/training/ADE_train_<n>.png  annotations/validation/ADE_val_<n>.png

Annotation PNGs store 0 for "other" (pixels outside the 150 classes) and 1-150 for the classes
in ``objectInfo150`` order. As mmsegmentation's ``reduce_zero_label`` does, 0 becomes 255
(ignored) and every class moves down by one, so class ids are 0-149. Predictions go back to the
benchmark's numbering (+1) with :func:`ade20k_to_submission` before they are written for the
official evaluation.

The palette is mmsegmentation's ``ADE20KDataset`` palette (Apache-2.0), so pictures look like
the ones the community already knows; it gives road (6) and skyscraper (48) the same grey.
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
from denseseg.data.palette import Color, parse_palette
from denseseg.errors import DataError

__all__ = ["ADE20K_CLASSES", "ADE20K_PALETTE", "ADE20KDataset", "ade20k_to_submission"]

# The first name of each objectInfo150 entry, in its order (annotation value = index + 1).
ADE20K_CLASSES: tuple[str, ...] = tuple(
    """wall|building|sky|floor|tree|ceiling|road|bed|windowpane|grass|cabinet|sidewalk|person|
earth|door|table|mountain|plant|curtain|chair|car|water|painting|sofa|shelf|house|sea|mirror|
rug|field|armchair|seat|fence|desk|rock|wardrobe|lamp|bathtub|railing|cushion|base|box|column|
signboard|chest of drawers|counter|sand|sink|skyscraper|fireplace|refrigerator|grandstand|path|
stairs|runway|case|pool table|pillow|screen door|stairway|river|bridge|bookcase|blind|
coffee table|toilet|flower|book|hill|bench|countertop|stove|palm|kitchen island|computer|
swivel chair|boat|bar|arcade machine|hovel|bus|towel|light|truck|tower|chandelier|awning|
streetlight|booth|television receiver|airplane|dirt track|apparel|pole|land|bannister|
escalator|ottoman|bottle|buffet|poster|stage|van|ship|fountain|conveyer belt|canopy|washer|
plaything|swimming pool|stool|barrel|basket|waterfall|tent|bag|minibike|cradle|oven|ball|food|
step|tank|trade name|microwave|pot|animal|bicycle|lake|dishwasher|screen|blanket|sculpture|
hood|sconce|vase|traffic light|tray|ashcan|fan|pier|crt screen|plate|monitor|bulletin board|
shower|radiator|glass|clock|flag""".replace("\n", "").split("|")
)
"""The 150 ADE20K classes, index = class id (annotation value - 1)."""

# fmt: off
_PALETTE_FLAT = (
    120, 120, 120, 180, 120, 120, 6, 230, 230, 80, 50, 50, 4, 200, 3, 120, 120, 80, 140, 140,
    140, 204, 5, 255, 230, 230, 230, 4, 250, 7, 224, 5, 255, 235, 255, 7, 150, 5, 61, 120, 120,
    70, 8, 255, 51, 255, 6, 82, 143, 255, 140, 204, 255, 4, 255, 51, 7, 204, 70, 3, 0, 102, 200,
    61, 230, 250, 255, 6, 51, 11, 102, 255, 255, 7, 71, 255, 9, 224, 9, 7, 230, 220, 220, 220,
    255, 9, 92, 112, 9, 255, 8, 255, 214, 7, 255, 224, 255, 184, 6, 10, 255, 71, 255, 41, 10, 7,
    255, 255, 224, 255, 8, 102, 8, 255, 255, 61, 6, 255, 194, 7, 255, 122, 8, 0, 255, 20, 255, 8,
    41, 255, 5, 153, 6, 51, 255, 235, 12, 255, 160, 150, 20, 0, 163, 255, 140, 140, 140, 250, 10,
    15, 20, 255, 0, 31, 255, 0, 255, 31, 0, 255, 224, 0, 153, 255, 0, 0, 0, 255, 255, 71, 0, 0,
    235, 255, 0, 173, 255, 31, 0, 255, 11, 200, 200, 255, 82, 0, 0, 255, 245, 0, 61, 255, 0, 255,
    112, 0, 255, 133, 255, 0, 0, 255, 163, 0, 255, 102, 0, 194, 255, 0, 0, 143, 255, 51, 255, 0,
    0, 82, 255, 0, 255, 41, 0, 255, 173, 10, 0, 255, 173, 255, 0, 0, 255, 153, 255, 92, 0, 255,
    0, 255, 255, 0, 245, 255, 0, 102, 255, 173, 0, 255, 0, 20, 255, 184, 184, 0, 31, 255, 0, 255,
    61, 0, 71, 255, 255, 0, 204, 0, 255, 194, 0, 255, 82, 0, 10, 255, 0, 112, 255, 51, 0, 255, 0,
    194, 255, 0, 122, 255, 0, 255, 163, 255, 153, 0, 0, 255, 10, 255, 112, 0, 143, 255, 0, 82, 0,
    255, 163, 255, 0, 255, 235, 0, 8, 184, 170, 133, 0, 255, 0, 255, 92, 184, 0, 255, 255, 0, 31,
    0, 184, 255, 0, 214, 255, 255, 0, 112, 92, 255, 0, 0, 224, 255, 112, 224, 255, 70, 184, 160,
    163, 0, 255, 153, 0, 255, 71, 255, 0, 255, 0, 163, 255, 204, 0, 255, 0, 143, 0, 255, 235, 133,
    255, 0, 255, 0, 235, 245, 0, 255, 255, 0, 122, 255, 245, 0, 10, 190, 212, 214, 255, 0, 0, 204,
    255, 20, 0, 255, 255, 255, 0, 0, 153, 255, 0, 41, 255, 0, 255, 204, 41, 0, 255, 41, 255, 0,
    173, 0, 255, 0, 245, 255, 71, 0, 255, 122, 0, 255, 0, 255, 184, 0, 92, 255, 184, 255, 0, 0,
    133, 255, 255, 214, 0, 25, 194, 194, 102, 255, 0, 92, 0, 255,
)
# fmt: on
ADE20K_PALETTE: tuple[Color, ...] = tuple(parse_palette(_PALETTE_FLAT))
"""mmsegmentation's ADE20K colours, one per class id."""

_SPLITS = {
    "train": "training",
    "val": "validation",
    "training": "training",
    "validation": "validation",
}
_LUT = build_lut({0: 255, **{v: v - 1 for v in range(1, len(ADE20K_CLASSES) + 1)}})
_LAYOUT = (
    "ADEChallengeData2016/images/{training,validation}/<name>.jpg with "
    "ADEChallengeData2016/annotations/{training,validation}/<name>.png"
)


def ade20k_to_submission(pred: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
    """Undo ``reduce_zero_label``: class ids 0-149 -> the benchmark's values 1-150.

    Args:
        pred: Integer map (any shape) of class ids 0-149; 255 (no prediction) becomes 0
            ("other").

    Returns:
        ``uint8`` map of the same shape and type (tensor or array), ready to save as a PNG for
        the official evaluation.

    Raises:
        ValueError: A value is neither 0-149 nor 255.
    """
    arr = pred.detach().cpu().numpy() if isinstance(pred, torch.Tensor) else np.asarray(pred)
    arr = arr.astype(np.int64)
    valid = ((arr >= 0) & (arr < len(ADE20K_CLASSES))) | (arr == 255)
    if not valid.all():
        raise ValueError(f"ADE20K class ids must be 0..{len(ADE20K_CLASSES) - 1} or 255")
    out = np.where(arr == 255, 0, arr + 1).astype(np.uint8)
    return torch.from_numpy(out) if isinstance(pred, torch.Tensor) else out


class ADE20KDataset(SegmentationDataset):
    """ADE20K SceneParsing: 150 classes, "other" ignored, labels shifted down by one.

    Args:
        root: ``ADEChallengeData2016`` or the folder holding it.
        split: ``train`` / ``val`` (or the folder names ``training`` / ``validation``).
        transforms: Called as ``transforms(image, target)`` on each item.

    Items are ``(image uint8 (3, H, W), target int64 (H, W))``; grayscale JPEGs are repeated
    to three channels.
    """

    expand_gray = True

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        transforms: Callable[[torch.Tensor, torch.Tensor], Any] | None = None,
    ) -> None:
        root = Path(root)
        if not (root / "images").is_dir() and (root / "ADEChallengeData2016").is_dir():
            root = root / "ADEChallengeData2016"
        self.root = root
        self.split = split
        self.transforms = transforms
        if split not in _SPLITS:
            raise unknown_split(root, split, ["train", "val"])
        folder = _SPLITS[split]
        images = require_dir(root / "images" / folder, _LAYOUT)
        masks = require_dir(root / "annotations" / folder, _LAYOUT)
        stems = [p.stem for p in sorted_files(images, ".jpg")]
        if not stems:
            raise DataError(f"no .jpg images in {images}; the layout is {_LAYOUT}")
        self.files = pair_by_stem(images, masks, stems, ".jpg")
        self._set_classes(ADE20K_CLASSES, ADE20K_PALETTE)

    def label_lut(self, index: int) -> np.ndarray:
        return _LUT

    def label_hint(self) -> str:
        return "0 for 'other' and 1-150 for the classes"

    def encode_prediction(self, label_map: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
        """Class ids -> the benchmark's annotation values; see :func:`ade20k_to_submission`."""
        return ade20k_to_submission(label_map)
