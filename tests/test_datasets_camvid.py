"""CamVid reader: SegNet layout (train/trainannot, ...), mode-L masks, void 11 -> 255."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from denseseg.data.datasets.camvid import CamVidDataset
from denseseg.data.registry import get_dataset
from denseseg.data.stats import class_pixel_counts
from denseseg.errors import ConfigError, DataError

# The table of /work/shared/data/camvid/README.md (the SegNet tutorial's classes and colours).
README = [
    ("Sky", (128, 128, 128)),
    ("Building", (128, 0, 0)),
    ("Pole", (192, 192, 128)),
    ("Road", (128, 64, 128)),
    ("Pavement", (60, 40, 222)),
    ("Tree", (128, 128, 0)),
    ("SignSymbol", (192, 128, 128)),
    ("Fence", (64, 64, 128)),
    ("Car", (64, 0, 128)),
    ("Pedestrian", (64, 64, 0)),
    ("Bicyclist", (0, 128, 192)),
]

LABELS = np.array([[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11], [3, 3, 11, 11, 0, 8]], np.uint8)
EXPECTED = np.where(LABELS == 11, 255, LABELS).astype(np.int64)


def _add(root: Path, split: str, name: str, labels: np.ndarray, seed: int) -> None:
    (root / split).mkdir(parents=True, exist_ok=True)
    (root / f"{split}annot").mkdir(exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 256, size=(*labels.shape, 3), dtype=np.uint8)
    Image.fromarray(rgb, "RGB").save(root / split / name)
    Image.fromarray(labels, "L").save(root / f"{split}annot" / name)


@pytest.fixture
def camvid(tmp_path: Path) -> Path:
    root = tmp_path / "CamVid"
    _add(root, "train", "0001TP_006690.png", LABELS, 0)
    _add(root, "train", "0001TP_006720.png", np.flipud(LABELS).copy(), 1)
    _add(root, "val", "0016E5_07959.png", LABELS, 2)
    _add(root, "test", "0001TP_008550.png", LABELS, 3)
    return root


def test_void_ignored_and_ids_exact(camvid):
    ds = get_dataset("camvid", camvid, "train")
    assert len(ds) == 2 and ds.num_classes == 11 and ds.ignore_index == 255
    assert ds.files[0] == (
        camvid / "train/0001TP_006690.png",
        camvid / "trainannot/0001TP_006690.png",
    )
    image, target = ds[0]
    assert image.shape == (3, 3, 6) and image.dtype == torch.uint8
    assert target.dtype == torch.int64 and target.tolist() == EXPECTED.tolist()
    assert ds[1][1].tolist() == np.flipud(EXPECTED).tolist()
    # Void is not a class: it is not counted.
    counts = class_pixel_counts(ds)
    assert counts.sum() == 2 * (18 - 3) and counts[3] == 2 * 3 and counts[8] == 2 * 2


def test_names_and_colours_match_the_readme(camvid):
    ds = CamVidDataset(camvid, "val")
    assert ds.classes == [n for n, _ in README]
    assert ds.palette == [c for _, c in README]


def test_splits(camvid):
    assert len(CamVidDataset(camvid, "test")) == 1
    trainval = CamVidDataset(camvid, "trainval")
    assert [p[0].parent.name for p in trainval.files] == ["train", "train", "val"]
    with pytest.raises(
        DataError, match="no split 'training'; available: test, train, val, trainval"
    ):
        CamVidDataset(camvid, "training")


def test_errors_name_the_file(camvid):
    bad = LABELS.copy()
    bad[0, 0] = 12
    Image.fromarray(bad, "L").save(camvid / "valannot/0016E5_07959.png")
    problems = CamVidDataset(camvid, "val").check()
    assert len(problems) == 1 and "0016E5_07959.png holds values 12" in problems[0]
    missing = camvid / "testannot/0001TP_008550.png"
    missing.unlink()
    with pytest.raises(DataError, match=rf"mask {missing} does not exist"):
        CamVidDataset(camvid, "test")
    with pytest.raises(DataError, match="does not exist; the layout is root/<split>"):
        CamVidDataset(camvid / "nowhere", "train")


def test_registry_names_formats_and_roots(camvid, tmp_path):
    with pytest.raises(
        ConfigError, match="unknown dataset 'camvid11'; choose one of: folder, demo"
    ):
        get_dataset("camvid11", camvid, "train")
    with pytest.raises(ConfigError, match="'camvid' needs a root folder"):
        get_dataset("camvid", None, "train")
    with pytest.raises(DataError, match="does not exist; check data.root"):
        get_dataset("camvid", tmp_path / "nowhere", "train")
    with pytest.raises(ConfigError, match="'camvid' takes no options, got \\['classes'\\]"):
        get_dataset("camvid", camvid, "train", classes=["a"])


def test_drive_folds_keep_or_leave_out_drives(camvid):
    _add(camvid, "train", "0006R0_f02370.png", LABELS, 4)
    stems = lambda split: sorted(p.stem for p, _ in get_dataset("camvid", camvid, split).files)  # noqa: E731
    assert stems("trainval") == ["0001TP_006690", "0001TP_006720", "0006R0_f02370", "0016E5_07959"]
    assert stems("trainval:-0001TP") == ["0006R0_f02370", "0016E5_07959"]
    assert stems("trainval:0001TP") == ["0001TP_006690", "0001TP_006720"]
    assert stems("trainval:-0001TP,0006R0") == ["0016E5_07959"]
    assert stems("train:0006R0, 0001TP") == ["0001TP_006690", "0001TP_006720", "0006R0_f02370"]
    # The two halves of a fold split train+val exactly.
    assert sorted(stems("trainval:-0006R0") + stems("trainval:0006R0")) == stems("trainval")


@pytest.mark.parametrize(
    ("split", "says"),
    [
        ("trainval:0001XX", "drive(s) 0001XX not in the split; it holds 0001TP, 0016E5"),
        ("val:0001TP", "drive(s) 0001TP not in the split; it holds 0016E5"),
        ("trainval:-", "drive(s) none named"),
        ("val:-0016E5", "no frames left"),
        ("nosuch:0001TP", "has no split 'nosuch'"),
    ],
)
def test_drive_selection_errors_name_the_split(camvid, split, says):
    with pytest.raises(DataError, match=None) as info:
        get_dataset("camvid", camvid, split)
    assert says in str(info.value) and "\n" not in str(info.value)


def test_a_frame_without_underscore_is_its_own_drive(camvid):
    _add(camvid, "train", "frame1.png", LABELS, 5)
    files = get_dataset("camvid", camvid, "train:frame1").files
    assert [p.name for p, _ in files] == ["frame1.png"]
