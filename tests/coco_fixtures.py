"""Tiny synthetic COCO-format instance datasets written on the fly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from denseseg.data.coco_export import Instances, write_coco_split


def shapes_images(
    n: int, size: tuple[int, int] = (64, 80), seed: int = 0
) -> tuple[list[np.ndarray], list[Instances]]:
    """``n`` noisy images with two bright squares (category 1) and a dark one (category 2)."""
    rng = np.random.default_rng(seed)
    h, w = size
    images, instances = [], []
    for _ in range(n):
        img = rng.normal(120, 12, (h, w, 3))
        inst: Instances = []
        for cat, value in ((1, 230), (1, 230), (2, 20)):
            s = int(rng.integers(10, 20))
            y, x = int(rng.integers(0, h - s)), int(rng.integers(0, w - s))
            m = np.zeros((h, w), bool)
            m[y : y + s, x : x + s] = True
            for other, _ in inst:  # a later square covers the earlier ones
                other &= ~m
            img[m] = value
            inst.append((m, cat))
        images.append(np.clip(img, 0, 255).astype(np.uint8))
        instances.append([(m, c) for m, c in inst if m.any()])
    return images, instances


def _to_box_polygons(ann_file: Path) -> None:
    # Replace each RLE by its box's corner polygon: the reader's polygon path, tested on shapes
    # that stay rectangles (a covered corner makes an L, whose box polygon differs; fine here).
    data = json.loads(ann_file.read_text())
    for ann in data["annotations"]:
        x, y, w, h = ann["bbox"]
        ann["segmentation"] = [[x, y, x + w, y, x + w, y + h, x, y + h]]
    ann_file.write_text(json.dumps(data))


def write_shapes_dataset(root: Path, n_train: int = 4, n_val: int = 2) -> Path:
    """A two-class synthetic COCO dataset: polygon annotations for train, RLE for val."""
    cats = {1: "bright", 2: "dark"}
    _to_box_polygons(write_coco_split(root, "train", *shapes_images(n_train, seed=0), cats))
    write_coco_split(root, "val", *shapes_images(n_val, seed=1), cats)
    return root
