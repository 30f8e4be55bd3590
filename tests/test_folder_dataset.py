"""FolderDataset: layout, splits, classes.yaml, per-item validation, check(), statistics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from denseseg.data.folder import FolderDataset, available_splits
from denseseg.data.palette import default_palette
from denseseg.data.stats import (
    class_image_pixel_counts,
    class_pixel_counts,
    median_frequency_weights,
)
from denseseg.errors import ConfigError, DataError


def _image(seed: int, h: int = 4, w: int = 5, gray: bool = False) -> np.ndarray:
    shape = (h, w) if gray else (h, w, 3)
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def _add(
    folder: Path,
    stem: str,
    labels: np.ndarray,
    seed: int = 0,
    suffix: str = ".png",
    gray: bool = False,
    image_hw: tuple[int, int] | None = None,
) -> np.ndarray:
    """Write images/<stem><suffix> and masks/<stem>.png under ``folder``; return the image."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    h, w = image_hw or labels.shape
    img = _image(seed, h, w, gray)
    Image.fromarray(img).save(folder / "images" / f"{stem}{suffix}")
    Image.fromarray(labels.astype(np.uint8)).save(folder / "masks" / f"{stem}.png")
    return img


LAB_A = np.array([[0, 1, 1, 0, 0], [2, 2, 0, 0, 255], [0, 0, 0, 1, 1], [2, 0, 0, 0, 0]])
LAB_B = np.array([[1, 1, 1, 1, 1], [0, 0, 0, 0, 0], [0, 3, 3, 0, 0], [0, 0, 0, 0, 0]])


def test_items_pixel_exact_and_sorted(tmp_path):
    img_b = _add(tmp_path, "b", LAB_B, seed=2)
    img_a = _add(tmp_path, "a", LAB_A, seed=1)
    ds = FolderDataset(tmp_path, split="all")
    assert [p[0].name for p in ds.files] == ["a.png", "b.png"]
    assert ds.files[0][1] == tmp_path / "masks" / "a.png"
    assert len(ds) == 2 and ds.in_channels == 3
    image, target = ds[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 4, 5)
    assert np.array_equal(image.permute(1, 2, 0).numpy(), img_a)
    assert target.dtype == torch.int64 and target.tolist() == LAB_A.tolist()
    assert np.array_equal(ds[1][0].permute(1, 2, 0).numpy(), img_b)
    # No classes.yaml: inferred from the largest label (3), ignore_index 255 excluded.
    assert ds.num_classes == 4 and ds.classes == ["class_0", "class_1", "class_2", "class_3"]
    assert ds.ignore_index == 255 and ds.palette == default_palette(4)
    assert ds.check() == []
    assert len(FolderDataset(tmp_path, split=None)) == 2


def test_grayscale_and_jpeg_images(tmp_path):
    img = _add(tmp_path, "g", LAB_A, gray=True, suffix=".jpg")
    ds = FolderDataset(tmp_path, split="all", num_classes=3)
    image, _ = ds[0]
    assert ds.in_channels == 1 and image.shape == (1, 4, 5)
    assert (image[0].int() - torch.from_numpy(img).int()).abs().float().mean() < 20


def test_transforms_called(tmp_path):
    _add(tmp_path, "a", LAB_A)
    ds = FolderDataset(tmp_path, "all", transforms=lambda i, t: (i.float() / 2, t + 1))
    image, target = ds[0]
    assert (
        image.dtype == torch.float32 and target.tolist() == (torch.from_numpy(LAB_A) + 1).tolist()
    )


def test_classes_yaml_names_colors_ignore(tmp_path):
    _add(tmp_path, "a", np.where(LAB_A == 255, 9, LAB_A))
    (tmp_path / "classes.yaml").write_text(
        "classes:\n  - {name: bg, color: [1, 2, 3]}\n  - {name: cat}\n  - dog\nignore_index: 9\n"
    )
    ds = FolderDataset(tmp_path, "all")
    assert ds.classes == ["bg", "cat", "dog"] and ds.num_classes == 3 and ds.ignore_index == 9
    assert ds.palette == [(1, 2, 3), default_palette(3)[1], default_palette(3)[2]]
    assert ds[0][1].max() == 9  # the ignore label passes validation


def test_classes_yaml_palette_and_overrides(tmp_path):
    _add(tmp_path, "a", LAB_A)
    (tmp_path / "classes.yaml").write_text(
        "classes: [a, b, c]\npalette: [[9, 9, 9], [8, 8, 8], [7, 7, 7], [6, 6, 6]]\n"
    )
    ds = FolderDataset(tmp_path, "all")
    assert ds.palette == [(9, 9, 9), (8, 8, 8), (7, 7, 7)]
    ds = FolderDataset(tmp_path, "all", classes=["x", "y", "z"])
    assert ds.classes == ["x", "y", "z"]
    with pytest.raises(ConfigError, match="num_classes=5 but 3 class names"):
        FolderDataset(tmp_path, "all", num_classes=5)


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("classes: [a, b, c]\nlabels: 3\n", r"classes\.yaml: unknown key 'labels'"),
        ("classes: [a, b, c]\npalette: [[0, 0, 0]]\n", "palette has 1 colours for 3 classes"),
        ("classes: [{name: a, color: [0, 0, 0]}, b, c]\npalette: [[0,0,0]]\n", "not both"),
        ("classes: [a, b, c]\nignore_index: -1\n", "ignore_index must be an integer"),
        ("classes: [a, b\n", "not valid YAML"),
    ],
)
def test_classes_yaml_errors(tmp_path, text, pattern):
    _add(tmp_path, "a", LAB_A)
    (tmp_path / "classes.yaml").write_text(text)
    with pytest.raises(ConfigError, match=pattern):
        FolderDataset(tmp_path, "all")


def test_list_file_splits(tmp_path):
    for i, stem in enumerate(["a", "b", "c", "d"]):
        _add(tmp_path, stem, LAB_A, seed=i)
    (tmp_path / "train.txt").write_text("# training images\nc\n\n  a  \nd.png\n")
    (tmp_path / "val.txt").write_text("b\n")
    assert available_splits(tmp_path) == ["train", "val", "all"]
    train = FolderDataset(tmp_path, "train")
    assert [p[0].stem for p in train.files] == ["c", "a", "d"]
    assert np.array_equal(train[0][0].permute(1, 2, 0).numpy(), _image(2))
    assert [p[0].stem for p in FolderDataset(tmp_path, "val").files] == ["b"]
    assert len(FolderDataset(tmp_path, "all")) == 4
    with pytest.raises(DataError, match="no split 'test'; available: train, val, all"):
        FolderDataset(tmp_path, "test")
    (tmp_path / "val.txt").write_text("b\nzzz\n")
    with pytest.raises(DataError, match=r"val\.txt line 2 names 'zzz'"):
        FolderDataset(tmp_path, "val")


def test_subfolder_splits_and_shared_class_inference(tmp_path):
    _add(tmp_path / "train", "a", LAB_A, seed=1)
    _add(tmp_path / "val", "b", LAB_B, seed=2)
    assert available_splits(tmp_path) == ["train", "val", "all"]
    train = FolderDataset(tmp_path, "train")
    val = FolderDataset(tmp_path, "val")
    assert [p[0] for p in train.files] == [tmp_path / "train" / "images" / "a.png"]
    assert val[0][1].tolist() == LAB_B.tolist()
    # Inference scans every split, so train (max label 2) agrees with val (max label 3).
    assert train.num_classes == val.num_classes == 4
    assert len(FolderDataset(tmp_path, "all")) == 2


def test_no_splits_lists_all(tmp_path):
    _add(tmp_path, "a", LAB_A)
    with pytest.raises(DataError, match="no split 'train'; available: all"):
        FolderDataset(tmp_path)  # default split is train


def test_missing_mask_names_image_and_expected_path(tmp_path):
    _add(tmp_path, "a", LAB_A)
    Image.fromarray(_image(3)).save(tmp_path / "images" / "lonely.jpg")
    expected = tmp_path / "masks" / "lonely.png"
    with pytest.raises(DataError, match=rf"lonely\.jpg has no mask: expected {expected}"):
        FolderDataset(tmp_path, "all")


def test_empty_and_missing_folders(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    (tmp_path / "images" / "readme.txt").write_text("not an image")
    with pytest.raises(DataError, match=rf"dataset {tmp_path} \(split all\) has no images"):
        FolderDataset(tmp_path, "all")
    with pytest.raises(DataError, match="does not exist"):
        FolderDataset(tmp_path / "nowhere", "all")


def test_size_mismatch_names_both_files(tmp_path):
    _add(tmp_path, "a", LAB_A, image_hw=(6, 5))
    ds = FolderDataset(tmp_path, "all", num_classes=3)
    with pytest.raises(
        DataError, match=r"masks/a\.png is 4x5 \(HxW\) but image .*images/a\.png is 6x5"
    ):
        ds[0]


def test_bad_labels_named_with_range(tmp_path):
    _add(tmp_path, "a", LAB_B)  # holds label 3
    ds = FolderDataset(tmp_path, "all", num_classes=3)
    with pytest.raises(
        DataError, match=r"masks/a\.png holds labels 3 outside 0\.\.2 \(ignore_index"
    ):
        ds[0]


def test_channel_mismatch_and_check_lists_every_problem(tmp_path):
    _add(tmp_path, "a", LAB_A, seed=1)
    _add(tmp_path, "b", LAB_A, seed=2, gray=True)
    _add(tmp_path, "c", LAB_B, seed=3)  # label 3 out of range
    _add(tmp_path, "d", LAB_A, seed=4, image_hw=(3, 3))
    _add(tmp_path, "e", LAB_A, seed=5)
    ds = FolderDataset(tmp_path, "all", num_classes=3)
    with pytest.raises(DataError, match=r"images/b\.png has 1 channel\(s\) but .*a\.png has 3"):
        ds[1]
    problems = ds.check()
    assert len(problems) == 3
    assert "b.png" in problems[0] and "c.png" in problems[1] and "d.png" in problems[2]


# ---------------------------------------------------------------- statistics


def test_class_counts_and_median_frequency_weights(tmp_path):
    # a (2x2): c0 x3, c1 x1.  b (2x3): c0 x1, c2 x4, one ignored pixel.  Class 3 never appears.
    _add(tmp_path, "a", np.array([[0, 0], [0, 1]]))
    _add(tmp_path, "b", np.array([[0, 2, 2], [2, 2, 255]]))
    ds = FolderDataset(tmp_path, "all", num_classes=4)
    assert class_pixel_counts(ds).tolist() == [4, 1, 4, 0]
    # Pixels of the images containing each class: c0 in a and b (4 + 6), c1 in a, c2 in b.
    assert class_image_pixel_counts(ds).tolist() == [10, 4, 6, 0]
    # freq = [0.4, 0.25, 2/3]; median 0.4; weight = 0.4 / freq; absent class -> 0.
    weights = median_frequency_weights(ds)
    assert weights.dtype == torch.float32
    assert torch.allclose(weights, torch.tensor([1.0, 1.6, 0.6, 0.0]))
