"""Cityscapes reader: leftImg8bit/gtFine layout, labelIds -> trainIds, labelTrainIds preferred."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from denseseg.data.datasets.cityscapes import (
    CITYSCAPES_CLASSES,
    CITYSCAPES_PALETTE,
    LABEL_ID_TO_TRAIN_ID,
    CityscapesDataset,
    cityscapes_to_label_ids,
)
from denseseg.data.registry import get_dataset
from denseseg.errors import DataError

# The 19 trained label ids of cityscapesScripts' labels.py, in training-id order.
TRAINED_IDS = [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]

# labelIds as stored: road 7, car 26, unlabeled 0, ego vehicle 1, sky 23, bicycle 33,
# parking 9 and polegroup 18 (not trained), person 24, sidewalk 8.
LABEL_IDS = np.array(
    [
        [7, 7, 26, 26, 0, 1],
        [23, 23, 33, 9, 18, 24],
        [8, 7, 26, 3, 24, 24],
    ],
    dtype=np.uint8,
)
EXPECTED = np.array(
    [
        [0, 0, 13, 13, 255, 255],
        [10, 10, 18, 255, 255, 11],
        [1, 0, 13, 255, 11, 11],
    ]
)


def _png_rgb(path: Path, seed: int, hw: tuple[int, int] = (3, 6)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, size=(*hw, 3), dtype=np.uint8)
    Image.fromarray(arr, "RGB").save(path)


def _png_l(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8), "L").save(path)


def write_cityscapes(root: Path) -> Path:
    """Two train cities and one val city; bochum also has a labelTrainIds file."""
    for split, city, frame, seed in (
        ("train", "aachen", "000000_000019", 0),
        ("train", "bochum", "000000_000313", 1),
        ("val", "frankfurt", "000000_000294", 2),
    ):
        stem = f"{city}_{frame}"
        _png_rgb(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", seed)
        gt = root / "gtFine" / split / city
        _png_l(gt / f"{stem}_gtFine_labelIds.png", LABEL_IDS)
        # The other files of the release sit beside it and must not be picked up.
        _png_l(gt / f"{stem}_gtFine_instanceIds.png", LABEL_IDS)
        Image.new("RGB", (6, 3)).save(gt / f"{stem}_gtFine_color.png")
        (gt / f"{stem}_gtFine_polygons.json").write_text("{}")
    # createTrainIdLabelImgs output: used as is (here deliberately different from labelIds).
    _png_l(
        root / "gtFine/train/bochum/bochum_000000_000313_gtFine_labelTrainIds.png",
        np.array([[0, 1, 2, 3, 4, 5], [13, 14, 15, 16, 17, 18], [255, 255, 6, 7, 8, 9]]),
    )
    return root


@pytest.fixture
def cityscapes(tmp_path: Path) -> Path:
    return write_cityscapes(tmp_path / "cityscapes")


def test_label_ids_mapped_to_train_ids_pixel_by_pixel(cityscapes):
    ds = get_dataset("cityscapes", cityscapes, "train")
    assert len(ds) == 2 and ds.num_classes == 19 and ds.in_channels == 3
    assert [p[0].parent.name for p in ds.files] == ["aachen", "bochum"]
    assert ds.files[0][1].name == "aachen_000000_000019_gtFine_labelIds.png"
    image, target = ds[0]
    assert image.shape == (3, 3, 6) and image.dtype == torch.uint8
    assert target.dtype == torch.int64 and target.tolist() == EXPECTED.tolist()
    assert ds.check() == []


def test_label_train_ids_used_directly(cityscapes):
    ds = CityscapesDataset(cityscapes, "train")
    assert ds.files[1][1].name == "bochum_000000_000313_gtFine_labelTrainIds.png"
    assert ds[1][1].tolist() == [
        [0, 1, 2, 3, 4, 5],
        [13, 14, 15, 16, 17, 18],
        [255, 255, 6, 7, 8, 9],
    ]


def test_official_table_classes_and_colours():
    expected = {lid: 255 for lid in range(34)}
    expected.update({lid: tid for tid, lid in enumerate(TRAINED_IDS)})
    assert expected == LABEL_ID_TO_TRAIN_ID
    assert CITYSCAPES_CLASSES[0] == "road" and CITYSCAPES_CLASSES[13] == "car"
    assert CITYSCAPES_CLASSES[18] == "bicycle" and len(CITYSCAPES_CLASSES) == 19
    assert CITYSCAPES_PALETTE[0] == (128, 64, 128) and CITYSCAPES_PALETTE[13] == (0, 0, 142)
    assert CITYSCAPES_PALETTE[10] == (70, 130, 180) and CITYSCAPES_PALETTE[18] == (119, 11, 32)


def test_predictions_back_to_label_ids():
    pred = torch.arange(19).reshape(1, 19)
    assert cityscapes_to_label_ids(pred).tolist() == [TRAINED_IDS]
    arr = cityscapes_to_label_ids(np.array([[0, 13]]))
    assert isinstance(arr, np.ndarray) and arr.tolist() == [[7, 26]]
    with pytest.raises(ValueError, match="0..18"):
        cityscapes_to_label_ids(np.array([255]))


def test_undefined_id_reported(cityscapes):
    bad = LABEL_IDS.copy()
    bad[0, 0] = 40
    _png_l(cityscapes / "gtFine/val/frankfurt/frankfurt_000000_000294_gtFine_labelIds.png", bad)
    ds = CityscapesDataset(cityscapes, "val")
    with pytest.raises(DataError, match=r"labelIds\.png holds values 40, which this format"):
        ds[0]
    assert len(ds.check()) == 1


def test_splits_and_missing_annotation(cityscapes):
    with pytest.raises(DataError, match="no split 'test'; available: train, val"):
        CityscapesDataset(cityscapes, "test")
    missing = cityscapes / "gtFine/val/frankfurt/frankfurt_000000_000294_gtFine_labelIds.png"
    missing.unlink()
    with pytest.raises(DataError, match=rf"has no annotation: expected {missing}"):
        CityscapesDataset(cityscapes, "val")
    (cityscapes / "gtFine").rename(cityscapes / "gtFine_trainvaltest")
    with pytest.raises(
        DataError, match=rf"folder {cityscapes / 'gtFine'} does not exist; the layout"
    ):
        CityscapesDataset(cityscapes, "val")
