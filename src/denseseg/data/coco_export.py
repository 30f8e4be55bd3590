"""Write instance data as a COCO-format dataset (the inverse of the ``coco`` reader).

Turns images with instance masks (or label images, one id per object, as microscopy tools save
them) into ``root/annotations/instances_<split>.json`` plus ``root/<split>/*.png``, with
run-length encoded masks made by pycocotools, so ``get_dataset("coco", root, split,
target="instance", category_map="file")`` reads them back.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from denseseg.errors import require_extra

__all__ = ["Instances", "label_image_instances", "write_coco_split"]

Instances = list[tuple[np.ndarray, int]]
"""One image's instances: ``(binary mask (H, W), category id)`` pairs."""


def label_image_instances(labels: np.ndarray, category: int = 1) -> Instances:
    """A label image (0 = background, one positive id per object) -> its instances.

    Args:
        labels: integer ``(H, W)``.
        category: the category id every object gets.

    Returns:
        One ``(mask, category)`` per object id, in increasing id order.
    """
    return [(labels == i, category) for i in np.unique(labels) if i != 0]


def write_coco_split(
    root: str | Path,
    split: str,
    images: Sequence[np.ndarray],
    instances: Sequence[Instances],
    categories: Mapping[int, str],
    *,
    names: Sequence[str] | None = None,
) -> Path:
    """Write one split of a COCO-format instance dataset.

    Args:
        root: dataset folder (created).
        split: split name: images go to ``root/<split>/``, annotations to
            ``root/annotations/instances_<split>.json``.
        images: ``uint8`` ``(H, W)`` or ``(H, W, 3)`` arrays.
        instances: per image, its ``(mask, category id)`` pairs; empty masks are left out.
        categories: ``{category id: name}``.
        names: file names of the images (default ``<split>_0001.png``, ...).

    Returns:
        The annotation file's path.
    """
    mask_utils = require_extra("pycocotools.mask", "coco", "writing COCO annotations")

    root = Path(root)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / split).mkdir(parents=True, exist_ok=True)
    imgs, anns = [], []
    for i, (image, inst) in enumerate(zip(images, instances, strict=True), start=1):
        name = names[i - 1] if names is not None else f"{split}_{i:04d}.png"
        Image.fromarray(np.asarray(image, dtype=np.uint8)).save(root / split / name)
        h, w = image.shape[:2]
        imgs.append({"id": i, "file_name": name, "height": int(h), "width": int(w)})
        for mask, cat in inst:
            if mask.shape != (h, w):
                raise ValueError(f"mask {mask.shape} does not match image {name} ({h}, {w})")
            if not mask.any():
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # pycocotools on numpy 2
                rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
                box = [float(v) for v in mask_utils.toBbox(rle)]
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i,
                    "category_id": int(cat),
                    "bbox": box,
                    "area": float(mask.sum()),
                    "iscrowd": 0,
                    "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
                }
            )
    cats = [{"id": int(k), "name": str(v)} for k, v in categories.items()]
    path = root / "annotations" / f"instances_{split}.json"
    path.write_text(json.dumps({"images": imgs, "annotations": anns, "categories": cats}))
    return path
