"""Tests for the procedural demo dataset (denseseg.data.demo_scenes)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from denseseg.data import demo_scenes
from denseseg.data.demo_scenes import DEMO_CLASSES, DEMO_PALETTE, make_demo_dataset
from denseseg.errors import ConfigError, DataError

SMALL = {"num_train": 6, "num_val": 3, "image_size": 48}


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _load(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    stems = (root / f"{split}.txt").read_text().split()
    images = np.stack([np.array(Image.open(root / "images" / f"{s}.png")) for s in stems])
    masks = np.stack([np.array(Image.open(root / "masks" / f"{s}.png")) for s in stems])
    return images, masks


def _miou(target: np.ndarray, pred: np.ndarray, num_classes: int) -> float:
    conf = np.bincount(target.ravel() * num_classes + pred.ravel(), minlength=num_classes**2)
    conf = conf.reshape(num_classes, num_classes)
    union = conf.sum(0) + conf.sum(1) - np.diag(conf)
    return float(np.mean(np.diag(conf) / np.maximum(union, 1)))


@pytest.fixture(scope="module")
def colour_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("colour") / "demo"
    # Small images but many of them: each image has only a handful of region colours, so the
    # colour statistics below need a few hundred regions per class to settle.
    return make_demo_dataset(root, seed=1, num_train=200, num_val=50, image_size=48)


def test_same_seed_gives_identical_bytes(tmp_path: Path) -> None:
    a = make_demo_dataset(tmp_path / "a", seed=3, **SMALL)
    b = make_demo_dataset(tmp_path / "b", seed=3, **SMALL)
    files_a, files_b = _files(a), _files(b)
    assert len(files_a) == 2 * 9 + 4
    assert files_a == files_b


def test_different_seeds_differ(tmp_path: Path) -> None:
    a = make_demo_dataset(tmp_path / "a", seed=0, **SMALL)
    b = make_demo_dataset(tmp_path / "b", seed=1, **SMALL)
    for stem in ("train_0000", "val_0000"):
        assert (a / "images" / f"{stem}.png").read_bytes() != (
            b / "images" / f"{stem}.png"
        ).read_bytes()
    # Sample i does not depend on how many samples are drawn.
    c = make_demo_dataset(tmp_path / "c", seed=0, num_train=2, num_val=1, image_size=48)
    assert (a / "images/train_0001.png").read_bytes() == (c / "images/train_0001.png").read_bytes()


def test_folder_layout_and_formats(tmp_path: Path) -> None:
    root = make_demo_dataset(tmp_path / "d", seed=0, **SMALL)
    meta = yaml.safe_load((root / "classes.yaml").read_text())
    assert meta == {
        "classes": list(DEMO_CLASSES),
        "palette": [list(c) for c in DEMO_PALETTE],
        "ignore_index": 255,
    }
    assert len(DEMO_CLASSES) >= 5 and DEMO_CLASSES[0] == "background"
    train = (root / "train.txt").read_text().splitlines()
    val = (root / "val.txt").read_text().splitlines()
    assert train == [f"train_{i:04d}" for i in range(6)]
    assert val == [f"val_{i:04d}" for i in range(3)]
    for stem in train + val:
        image = Image.open(root / "images" / f"{stem}.png")
        mask = Image.open(root / "masks" / f"{stem}.png")
        assert image.mode == "RGB" and image.size == (48, 48)
        assert mask.mode == "P" and mask.size == (48, 48)
        assert mask.getpalette()[: 3 * len(DEMO_PALETTE)] == [v for c in DEMO_PALETTE for v in c]
        values = set(np.unique(np.array(mask)).tolist())
        assert values <= set(range(len(DEMO_CLASSES)))
        assert 0 in values and len(values) >= 2  # background plus at least one shape


def test_every_class_present_in_train(tmp_path: Path) -> None:
    root = make_demo_dataset(tmp_path / "d", seed=5, num_train=20, num_val=2, image_size=64)
    _, masks = _load(root, "train")
    counts = np.bincount(masks.ravel(), minlength=len(DEMO_CLASSES))
    assert len(counts) == len(DEMO_CLASSES)
    assert (counts > 0).all()
    # Shapes, not background, should not dominate; each shape class gets a fair share.
    shape_share = counts[1:] / counts[1:].sum()
    assert shape_share.min() > 0.1


def test_cached_dataset_is_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DENSESEG_CACHE", str(tmp_path / "cache"))
    root = make_demo_dataset(seed=2, **SMALL)
    assert root.parent == tmp_path / "cache" / "demo"
    mtimes = {p: p.stat().st_mtime_ns for p in root.rglob("*")}

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cached dataset was generated again")

    monkeypatch.setattr(demo_scenes, "render_scene", fail)
    assert make_demo_dataset(seed=2, **SMALL) == root
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == mtimes
    with pytest.raises(AssertionError, match="generated again"):
        make_demo_dataset(seed=3, **SMALL)  # other parameters, other folder: must generate


def test_interrupted_generation_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write = demo_scenes._write_sample
    calls = {"n": 0}

    def write_then_die(*args: object) -> None:
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        real_write(*args)

    monkeypatch.setattr(demo_scenes, "_write_sample", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        make_demo_dataset(tmp_path / "d", seed=0, **SMALL)
    assert list(tmp_path.iterdir()) == []  # neither the dataset nor a temporary folder
    monkeypatch.setattr(demo_scenes, "_write_sample", real_write)
    root = make_demo_dataset(tmp_path / "d", seed=0, **SMALL)
    assert len((root / "train.txt").read_text().split()) == 6


def test_refuses_foreign_or_mismatched_root(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match="foreign"):
        make_demo_dataset(foreign, **SMALL)
    assert (foreign / "keep.txt").read_text() == "mine"
    root = make_demo_dataset(tmp_path / "d", seed=0, **SMALL)
    with pytest.raises(DataError, match="other parameters"):
        make_demo_dataset(root, seed=1, **SMALL)
    with pytest.raises(ConfigError, match="image_size"):
        make_demo_dataset(tmp_path / "tiny", image_size=8)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert make_demo_dataset(empty, seed=0, **SMALL) == empty
    assert (empty / "demo.json").is_file()


def test_colour_does_not_tell_classes_apart(colour_data: Path) -> None:
    """The best colour-only classifier (Bayes on a colour histogram) must fail on val."""
    n = len(DEMO_CLASSES)
    images, masks = _load(colour_data, "train")
    val_images, val_masks = _load(colour_data, "val")
    bins = 8  # 8x8x8 colour cells, a per-pixel lookup table fitted on the training pixels

    def cell(x: np.ndarray) -> np.ndarray:
        q = x.reshape(-1, 3).astype(np.int64) // (256 // bins)
        return (q[:, 0] * bins + q[:, 1]) * bins + q[:, 2]

    hist = np.zeros((bins**3, n))
    np.add.at(hist, (cell(images), masks.ravel()), 1)
    lookup = hist.argmax(1)
    assert _miou(val_masks, lookup[cell(val_images)], n) <= 0.3

    # Every shape class's colour histogram (4x4x4 cells) overlaps the background's strongly; the
    # overlap tends to 0.9+ with thousands of images and is about 0.7 with 200.
    q = images.reshape(-1, 3).astype(np.int64) // 64
    coarse = (q[:, 0] * 4 + q[:, 1]) * 4 + q[:, 2]
    shares = np.stack(
        [np.bincount(coarse[masks.ravel() == c], minlength=64) for c in range(n)]
    ).astype(float)
    shares /= shares.sum(1, keepdims=True)
    for c in range(1, n):
        assert np.minimum(shares[0], shares[c]).sum() > 0.6, DEMO_CLASSES[c]
    # Mean colours of the classes are close (0-255 scale; region colours spread with std ~67).
    means = np.stack([images.reshape(-1, 3)[masks.ravel() == c].mean(0) for c in range(n)])
    assert np.abs(means - means[0]).max() < 35
