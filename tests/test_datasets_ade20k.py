"""ADE20K reader: ADEChallengeData2016 layout, reduce_zero_label, and its reverse for submission."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from denseseg.data.datasets.ade20k import (
    ADE20K_CLASSES,
    ADE20K_PALETTE,
    ADE20KDataset,
    ade20k_to_submission,
)
from denseseg.data.registry import get_dataset
from denseseg.data.stats import class_pixel_counts
from denseseg.errors import DataError

# Stored annotation values: 0 = other, 1 = wall, 2 = building, 13 = person, 150 = flag.
STORED = np.array([[0, 1, 1, 2], [13, 13, 0, 150], [150, 2, 1, 0]], dtype=np.uint8)
EXPECTED = np.array([[255, 0, 0, 1], [12, 12, 255, 149], [149, 1, 0, 255]])


def write_ade(base: Path) -> Path:
    root = base / "ADEChallengeData2016"
    rng = np.random.default_rng(0)
    for folder, prefix, n in (("training", "ADE_train", 2), ("validation", "ADE_val", 1)):
        (root / "images" / folder).mkdir(parents=True)
        (root / "annotations" / folder).mkdir(parents=True)
        for i in range(1, n + 1):
            stem = f"{prefix}_{i:08d}"
            rgb = rng.integers(0, 256, size=(3, 4, 3), dtype=np.uint8)
            Image.fromarray(rgb).save(root / "images" / folder / f"{stem}.jpg")
            labels = STORED if i == 1 else np.roll(STORED, 1, axis=1)
            Image.fromarray(labels, "L").save(root / "annotations" / folder / f"{stem}.png")
    return root


@pytest.fixture
def ade(tmp_path: Path) -> Path:
    return write_ade(tmp_path)


def test_zero_ignored_and_labels_shifted_pixel_by_pixel(ade):
    ds = get_dataset("ade20k", ade, "train")
    assert len(ds) == 2 and ds.num_classes == 150 and ds.in_channels == 3
    assert [p[0].name for p in ds.files] == ["ADE_train_00000001.jpg", "ADE_train_00000002.jpg"]
    image, target = ds[0]
    assert image.shape == (3, 3, 4) and image.dtype == torch.uint8
    assert target.dtype == torch.int64 and target.tolist() == EXPECTED.tolist()
    assert ds[1][1].tolist() == np.roll(EXPECTED, 1, axis=1).tolist()
    counts = class_pixel_counts(ds)
    assert counts[0] == 6 and counts[149] == 4 and counts.sum() == 2 * (12 - 3)


def test_val_split_and_parent_root(ade):
    ds = ADE20KDataset(ade.parent, "val")
    assert ds.root == ade and ds.files[0][0].parent.name == "validation"
    assert ADE20KDataset(ade, "validation")[0][1].tolist() == EXPECTED.tolist()
    with pytest.raises(DataError, match="no split 'test'; available: train, val"):
        ADE20KDataset(ade, "test")


def test_classes_and_palette():
    assert len(ADE20K_CLASSES) == len(ADE20K_PALETTE) == 150
    assert ADE20K_CLASSES[:3] == ("wall", "building", "sky") and ADE20K_CLASSES[12] == "person"
    assert ADE20K_CLASSES[149] == "flag" and ADE20K_CLASSES[7] == "bed"
    assert ADE20K_PALETTE[0] == (120, 120, 120) and ADE20K_PALETTE[149] == (92, 0, 255)


def test_submission_reverses_reduce_zero_label(ade):
    ds = ADE20KDataset(ade, "train")
    target = ds[0][1]
    back = ds.encode_prediction(target)
    assert back.dtype == torch.uint8 and back.tolist() == STORED.tolist()
    arr = ade20k_to_submission(np.array([[0, 149]]))
    assert isinstance(arr, np.ndarray) and arr.tolist() == [[1, 150]]
    with pytest.raises(ValueError, match="0..149 or 255"):
        ade20k_to_submission(torch.tensor([150]))


def test_undefined_value_and_missing_annotation(ade):
    bad = STORED.copy()
    bad[0, 0] = 151
    Image.fromarray(bad, "L").save(ade / "annotations/validation/ADE_val_00000001.png")
    with pytest.raises(DataError, match=r"holds values 151, which this format does not define"):
        ADE20KDataset(ade, "val")[0]
    missing = ade / "annotations/training/ADE_train_00000002.png"
    missing.unlink()
    with pytest.raises(DataError, match=rf"mask {missing} does not exist"):
        ADE20KDataset(ade, "train")
