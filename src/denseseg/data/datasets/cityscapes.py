"""Cityscapes fine annotations, as the official archives unpack.

Layout::

    root/
      leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png
      gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png
      gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelTrainIds.png   (optional)

``*_labelIds.png`` stores the 34 label ids of cityscapesScripts' ``labels.py`` (0-33; the
license plate's id -1 is never written to an image). They are mapped to the 19 training ids
with the official table (:data:`LABEL_ID_TO_TRAIN_ID`); the other ids (void, parking, rail
track, guard rail, bridge, tunnel, pole group, caravan, trailer) become 255. When the
``*_labelTrainIds.png`` written by cityscapesScripts' ``createTrainIdLabelImgs`` sits next to
it, that file is read as is. Predictions go back to label ids (what the evaluation server
expects) with :func:`cityscapes_to_label_ids`.
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
    require_dir,
    sorted_files,
    unknown_split,
)
from denseseg.data.palette import Color
from denseseg.errors import DataError

__all__ = [
    "CITYSCAPES_CLASSES",
    "CITYSCAPES_PALETTE",
    "LABEL_ID_TO_TRAIN_ID",
    "CityscapesDataset",
    "cityscapes_to_label_ids",
]

# (name, label id, train id, colour), from cityscapesScripts/helpers/labels.py; train id 255
# marks labels that are not trained on (ignoreInEval there).
_LABELS: tuple[tuple[str, int, int, Color], ...] = (
    ("unlabeled", 0, 255, (0, 0, 0)),
    ("ego vehicle", 1, 255, (0, 0, 0)),
    ("rectification border", 2, 255, (0, 0, 0)),
    ("out of roi", 3, 255, (0, 0, 0)),
    ("static", 4, 255, (0, 0, 0)),
    ("dynamic", 5, 255, (111, 74, 0)),
    ("ground", 6, 255, (81, 0, 81)),
    ("road", 7, 0, (128, 64, 128)),
    ("sidewalk", 8, 1, (244, 35, 232)),
    ("parking", 9, 255, (250, 170, 160)),
    ("rail track", 10, 255, (230, 150, 140)),
    ("building", 11, 2, (70, 70, 70)),
    ("wall", 12, 3, (102, 102, 156)),
    ("fence", 13, 4, (190, 153, 153)),
    ("guard rail", 14, 255, (180, 165, 180)),
    ("bridge", 15, 255, (150, 100, 100)),
    ("tunnel", 16, 255, (150, 120, 90)),
    ("pole", 17, 5, (153, 153, 153)),
    ("polegroup", 18, 255, (153, 153, 153)),
    ("traffic light", 19, 6, (250, 170, 30)),
    ("traffic sign", 20, 7, (220, 220, 0)),
    ("vegetation", 21, 8, (107, 142, 35)),
    ("terrain", 22, 9, (152, 251, 152)),
    ("sky", 23, 10, (70, 130, 180)),
    ("person", 24, 11, (220, 20, 60)),
    ("rider", 25, 12, (255, 0, 0)),
    ("car", 26, 13, (0, 0, 142)),
    ("truck", 27, 14, (0, 0, 70)),
    ("bus", 28, 15, (0, 60, 100)),
    ("caravan", 29, 255, (0, 0, 90)),
    ("trailer", 30, 255, (0, 0, 110)),
    ("train", 31, 16, (0, 80, 100)),
    ("motorcycle", 32, 17, (0, 0, 230)),
    ("bicycle", 33, 18, (119, 11, 32)),
)

LABEL_ID_TO_TRAIN_ID: dict[int, int] = {lid: tid for _, lid, tid, _ in _LABELS}
"""Official label id (0-33) -> training id (0-18, or 255 for labels not trained on)."""

_TRAINED = sorted((tid, name, lid, color) for name, lid, tid, color in _LABELS if tid != 255)
CITYSCAPES_CLASSES: tuple[str, ...] = tuple(name for _, name, _, _ in _TRAINED)
"""The 19 training classes, index = training id."""
CITYSCAPES_PALETTE: tuple[Color, ...] = tuple(color for _, _, _, color in _TRAINED)
"""Official colours of the 19 training classes."""
_TRAIN_ID_TO_LABEL_ID = np.array([lid for _, _, lid, _ in _TRAINED], dtype=np.uint8)

_ID_LUT = build_lut(LABEL_ID_TO_TRAIN_ID)
_TRAIN_ID_LUT = build_lut({**{t: t for t in range(len(_TRAINED))}, 255: 255})
_IMG_SUFFIX = "_leftImg8bit.png"
_LAYOUT = (
    "root/leftImg8bit/<split>/<city>/<name>_leftImg8bit.png with "
    "root/gtFine/<split>/<city>/<name>_gtFine_labelIds.png"
)


def cityscapes_to_label_ids(pred: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
    """Turn a map of training ids (0-18) into official label ids for the evaluation server.

    Args:
        pred: Integer ``(H, W)`` (or any shape) map of training ids.

    Returns:
        ``uint8`` map of the same shape and type (tensor or array) holding label ids, e.g.
        0 (road) -> 7, 13 (car) -> 26.

    Raises:
        ValueError: A value is outside 0-18.
    """
    arr = pred.detach().cpu().numpy() if isinstance(pred, torch.Tensor) else np.asarray(pred)
    if arr.size and (arr.min() < 0 or arr.max() >= len(_TRAIN_ID_TO_LABEL_ID)):
        raise ValueError(f"training ids must be 0..{len(_TRAIN_ID_TO_LABEL_ID) - 1}")
    out = _TRAIN_ID_TO_LABEL_ID[arr.astype(np.int64)]
    return torch.from_numpy(out) if isinstance(pred, torch.Tensor) else out


class CityscapesDataset(SegmentationDataset):
    """Cityscapes with fine annotations, 19 training classes, 255 ignored.

    Args:
        root: Folder holding ``leftImg8bit`` and ``gtFine``.
        split: A sub-folder of ``leftImg8bit`` (``train``, ``val``, ``test``).
        transforms: Called as ``transforms(image, target)`` on each item.

    Items are ``(image uint8 (3, H, W), target int64 (H, W))`` with training ids.
    """

    expand_gray = True

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        transforms: Callable[[torch.Tensor, torch.Tensor], Any] | None = None,
    ) -> None:
        self.root = Path(root)
        self.split = split
        self.transforms = transforms
        images_root = require_dir(self.root / "leftImg8bit", _LAYOUT)
        gt_root = require_dir(self.root / "gtFine", _LAYOUT)
        if not (images_root / split).is_dir():
            available = sorted(d.name for d in images_root.iterdir() if d.is_dir())
            raise unknown_split(self.root, split, available, f"expected {images_root / split}")
        self.files = []
        self._train_ids: list[bool] = []
        for city in sorted(d for d in (images_root / split).iterdir() if d.is_dir()):
            for image in sorted_files(city, _IMG_SUFFIX):
                stem = image.name[: -len(_IMG_SUFFIX)]
                gt = gt_root / split / city.name / stem
                train_ids = Path(f"{gt}_gtFine_labelTrainIds.png")
                label_ids = Path(f"{gt}_gtFine_labelIds.png")
                if train_ids.is_file():
                    self.files.append((image, train_ids))
                    self._train_ids.append(True)
                elif label_ids.is_file():
                    self.files.append((image, label_ids))
                    self._train_ids.append(False)
                else:
                    raise DataError(
                        f"image {image} has no annotation: expected {label_ids}; "
                        f"the layout is {_LAYOUT}"
                    )
        if not self.files:
            raise DataError(
                f"no *{_IMG_SUFFIX} images under {images_root / split}; the layout is {_LAYOUT}"
            )
        self._set_classes(CITYSCAPES_CLASSES, CITYSCAPES_PALETTE)

    def label_lut(self, index: int) -> np.ndarray:
        return _TRAIN_ID_LUT if self._train_ids[index] else _ID_LUT

    def label_hint(self) -> str:
        return "label ids 0-33 (labelIds) or training ids 0-18 and 255 (labelTrainIds)"

    def encode_prediction(self, label_map: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
        """Training ids -> official label ids; see :func:`cityscapes_to_label_ids`."""
        return cityscapes_to_label_ids(label_map)
