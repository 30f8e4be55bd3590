"""ISBI 2012 reader: image/ + label/, 0 = membrane -> 0, 255 = cell -> 1, grayscale, splits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from denseseg.data.registry import get_dataset
from denseseg.data.stats import class_pixel_counts
from denseseg.errors import DataError

STORED = np.array([[0, 255, 255, 0], [255, 255, 0, 0], [0, 0, 0, 255]], np.uint8)


@pytest.fixture
def isbi(tmp_path: Path) -> Path:
    root = tmp_path / "isbi2012"
    (root / "image").mkdir(parents=True)
    (root / "label").mkdir()
    rng = np.random.default_rng(0)
    for n in (0, 1, 2, 10):  # numeric names, as the challenge slices are numbered
        Image.fromarray(rng.integers(0, 256, (3, 4), dtype=np.uint8), "L").save(
            root / "image" / f"{n}.png"
        )
        Image.fromarray(np.roll(STORED, n, axis=1), "L").save(root / "label" / f"{n}.png")
    return root


def test_membrane_and_cell_ids_pixel_by_pixel(isbi):
    ds = get_dataset("isbi2012", isbi, "all")
    assert ds.classes == ["membrane", "cell"] and ds.num_classes == 2 and ds.in_channels == 1
    # Numeric order, not string order (10 after 2).
    assert [p[0].name for p in ds.files] == ["0.png", "1.png", "2.png", "10.png"]
    image, target = ds[0]
    assert image.shape == (1, 3, 4) and image.dtype == torch.uint8
    assert np.array_equal(image[0].numpy(), np.asarray(Image.open(isbi / "image/0.png")))
    assert target.dtype == torch.int64 and target.tolist() == (STORED == 255).astype(int).tolist()
    assert ds[3][1].tolist() == (np.roll(STORED, 10, axis=1) == 255).astype(int).tolist()
    counts = class_pixel_counts(ds)
    assert counts.tolist() == [4 * 7, 4 * 5]  # 7 membrane and 5 cell pixels per slice


def test_without_list_files_train_is_every_slice_and_val_is_refused(isbi):
    assert len(get_dataset("isbi2012", isbi, "train")) == 4
    with pytest.raises(DataError, match="no split 'val'; available: train, all; write .*val.txt"):
        get_dataset("isbi2012", isbi, "val")


def test_list_files_define_splits(isbi):
    (isbi / "train.txt").write_text("# slices\n0\n2.png\n10\n")
    (isbi / "val.txt").write_text("1\n")
    train = get_dataset("isbi2012", isbi, "train")
    val = get_dataset("isbi2012", isbi, "val")
    assert [p[0].stem for p in train.files] == ["0", "2", "10"]
    assert [p[0].stem for p in val.files] == ["1"]
    assert len(get_dataset("isbi2012", isbi, "all")) == 4
    with pytest.raises(DataError, match="no split 'test'; available: train, val, all"):
        get_dataset("isbi2012", isbi, "test")
    (isbi / "val.txt").write_text("7\n")
    with pytest.raises(DataError, match=r"image .*image/7\.png does not exist"):
        get_dataset("isbi2012", isbi, "val")


def test_bad_values_and_colour_images_named(isbi):
    grey = STORED.copy()
    grey[0, 0] = 128  # an interpolated (resized) mask
    Image.fromarray(grey, "L").save(isbi / "label/1.png")
    Image.new("RGB", (4, 3)).save(isbi / "image/2.png")
    problems = get_dataset("isbi2012", isbi, "all").check()
    assert len(problems) == 2
    assert (
        "label/1.png holds values 128" in problems[0] and "membrane and 255 for cell" in problems[0]
    )
    assert "image/2.png has 3 channels; ISBI 2012 slices are single-channel" in problems[1]


def test_missing_folder(tmp_path):
    (tmp_path / "image").mkdir()
    with pytest.raises(DataError, match=r"folder .*label does not exist; the layout is root/image"):
        get_dataset("isbi2012", tmp_path, "all")
