"""COCO reader: instances JSON (polygon, RLE, crowd) -> semantic maps and instance targets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("pycocotools")
from pycocotools import mask as mask_utils  # noqa: E402

from denseseg.data.datasets.coco import CocoDataset  # noqa: E402
from denseseg.data.registry import get_dataset  # noqa: E402
from denseseg.errors import ConfigError, DataError  # noqa: E402

H, W = 8, 10


def _rect(top: int, left: int, bottom: int, right: int) -> np.ndarray:
    """Boolean (H, W) mask of rows top..bottom-1, columns left..right-1."""
    m = np.zeros((H, W), bool)
    m[top:bottom, left:right] = True
    return m


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE: run lengths over the column-major pixels, starting with 0s."""
    counts, current, run = [], 0, 0
    for value in mask.flatten(order="F").astype(int):
        if value == current:
            run += 1
        else:
            counts.append(run)
            current, run = value, 1
    counts.append(run)
    return {"size": [H, W], "counts": counts}


def _compressed_rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


PERSON = _rect(0, 0, 6, 8)  # polygon, 48 px
DOG = _rect(2, 3, 4, 6)  # compressed RLE, 6 px, inside the person
CROWD = _rect(4, 6, 8, 10)  # uncompressed RLE crowd of people, overlaps the person
BRUSH = _rect(7, 0, 8, 2)  # polygon


def write_coco(root: Path) -> Path:
    (root / "annotations").mkdir(parents=True)
    (root / "val2017").mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(
        root / "val2017" / "000000000042.jpg"
    )
    Image.fromarray(rng.integers(0, 256, (4, 5), dtype=np.uint8), "L").save(
        root / "val2017" / "000000000007.jpg"  # COCO has a few grayscale JPEGs
    )
    anns = [
        # The dog comes first in the file: painting order must not depend on file order.
        {"id": 1, "image_id": 42, "category_id": 18, "iscrowd": 0, "area": 6.0,
         "bbox": [3, 2, 3, 2], "segmentation": _compressed_rle(DOG)},
        {"id": 2, "image_id": 42, "category_id": 1, "iscrowd": 0, "area": 48.0,
         "bbox": [0, 0, 8, 6], "segmentation": [[0, 0, 8, 0, 8, 6, 0, 6]]},
        {"id": 3, "image_id": 42, "category_id": 1, "iscrowd": 1, "area": 16.0,
         "bbox": [6, 4, 4, 4], "segmentation": _uncompressed_rle(CROWD)},
        {"id": 4, "image_id": 42, "category_id": 90, "iscrowd": 0, "area": 2.0,
         "bbox": [0, 7, 2, 1], "segmentation": [[0, 7, 2, 7, 2, 8, 0, 8]]},
        # A degenerate box: no pixels, no width; instance targets leave it out.
        {"id": 5, "image_id": 42, "category_id": 3, "iscrowd": 0, "area": 0.0,
         "bbox": [9, 0, 0, 3], "segmentation": [[9, 0, 9, 3, 9, 1]]},
    ]  # fmt: skip
    data = {
        "images": [
            {"id": 42, "file_name": "000000000042.jpg", "height": H, "width": W},
            {"id": 7, "file_name": "000000000007.jpg", "height": 4, "width": 5},
        ],
        "annotations": anns,
        "categories": [
            {"id": 1, "name": "person", "supercategory": "person"},
            {"id": 3, "name": "car", "supercategory": "vehicle"},
            {"id": 18, "name": "dog", "supercategory": "animal"},
            {"id": 90, "name": "toothbrush", "supercategory": "indoor"},
        ],
    }
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(data))
    return root


@pytest.fixture
def coco(tmp_path: Path) -> Path:
    return write_coco(tmp_path / "coco")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools vs numpy 2, harmless
def test_rle_encodings_written_as_coco_does():
    # The fixture's RLE writers agree with pycocotools' decoder (so the fixture is what we think).
    decoded = mask_utils.decode(_compressed_rle(DOG))
    assert np.array_equal(decoded, DOG.astype(np.uint8))
    decoded = mask_utils.decode(mask_utils.frPyObjects(_uncompressed_rle(CROWD), H, W))
    assert np.array_equal(decoded, CROWD.astype(np.uint8))


def test_semantic_default_80_categories_smaller_wins_crowd_ignored(coco):
    ds = get_dataset("coco", coco, "val")
    assert ds.num_classes == 81 and ds.in_channels == 3 and ds.ignore_index == 255
    assert ds.classes[0] == "background" and ds.classes[1] == "person"
    assert ds.classes[17] == "dog" and ds.classes[80] == "toothbrush" and ds.classes[3] == "car"
    assert ds.image_ids == [7, 42]
    expected = np.zeros((H, W), np.int64)
    expected[PERSON] = 1
    expected[DOG] = 17  # dog: COCO id 18 is the 17th category
    expected[CROWD & ~PERSON] = 255
    expected[BRUSH] = 80
    image, target = ds[1]
    assert image.shape == (3, H, W) and image.dtype == torch.uint8
    assert target.dtype == torch.int64 and target.tolist() == expected.tolist()
    assert ds.load_target(1).tolist() == expected.tolist()
    # The grayscale JPEG with no annotations: three channels, all background.
    image, target = ds[0]
    assert image.shape == (3, 4, 5) and target.tolist() == np.zeros((4, 5), int).tolist()
    assert ds.check() == []


def test_instance_targets(coco):
    ds = CocoDataset(coco, "val", target="instance")
    image, t = ds[1]
    assert image.shape == (3, H, W)
    assert t["image_id"] == 42
    assert t["labels"].tolist() == [17, 1, 1, 80] and t["labels"].dtype == torch.int64
    assert t["iscrowd"].tolist() == [0, 0, 1, 0]
    assert t["boxes"].dtype == torch.float32 and t["boxes"].format.value == "XYXY"
    assert t["boxes"].tolist() == [[3, 2, 6, 4], [0, 0, 8, 6], [6, 4, 10, 8], [0, 7, 2, 8]]
    assert t["area"].tolist() == [6.0, 48.0, 16.0, 2.0]
    assert t["masks"].dtype == torch.uint8 and t["masks"].shape == (4, H, W)
    for got, want in zip(t["masks"], (DOG, PERSON, CROWD, BRUSH), strict=True):
        assert np.array_equal(got.numpy(), want.astype(np.uint8))
    empty = ds[0][1]
    assert empty["boxes"].shape == (0, 4) and empty["masks"].shape == (0, 4, 5)


def test_user_mapping_dict_and_yaml(coco, tmp_path):
    ds = CocoDataset(coco, "val", category_map={"person": 1, 18: 2})
    assert ds.classes == ["background", "person", "dog"] and ds.num_classes == 3
    expected = np.zeros((H, W), np.int64)
    expected[PERSON] = 1
    expected[DOG] = 2
    expected[CROWD & ~PERSON] = 255  # the toothbrush is unmapped: background
    assert ds[1][1].tolist() == expected.tolist()

    path = tmp_path / "map.yaml"
    path.write_text("classes: [bg, living]\nmap: {person: 1, dog: 1, toothbrush: 255}\n")
    ds = get_dataset("coco", coco, "val", category_map=str(path))
    assert ds.classes == ["bg", "living"]
    expected = np.zeros((H, W), np.int64)
    expected[PERSON | DOG] = 1
    expected[(CROWD & ~PERSON) | BRUSH] = 255
    assert ds[1][1].tolist() == expected.tolist()
    inst = CocoDataset(coco, "val", target="instance", category_map=str(path))
    assert inst[1][1]["labels"].tolist() == [1, 1, 1]  # the ignored toothbrush is left out

    ds = CocoDataset(coco, "val", category_map="file")
    assert ds.classes == ["background", "person", "car", "dog", "toothbrush"]
    with pytest.raises(ConfigError, match="category 'cat' is not in the annotation file"):
        CocoDataset(coco, "val", category_map={"cat": 1})


def test_explicit_files_and_drop_empty(coco):
    ds = get_dataset(
        "coco",
        None,
        "val",
        ann_file=coco / "annotations" / "instances_val2017.json",
        img_dir=coco / "val2017",
        drop_empty=True,
    )
    assert ds.image_ids == [42] and ds.files[0][0] == coco / "val2017" / "000000000042.jpg"


def test_errors(coco):
    with pytest.raises(DataError, match="no split 'train'; available: val; expected .*instances_"):
        get_dataset("coco", coco, "train")
    with pytest.raises(ConfigError, match="takes options .*target.*, got \\['mode'\\]"):
        get_dataset("coco", coco, "val", mode="x")
    Image.new("RGB", (3, 3)).save(coco / "val2017" / "000000000042.jpg")
    problems = CocoDataset(coco, "val").check()
    assert len(problems) == 1 and "is 3x3 (HxW) but" in problems[0]
    (coco / "val2017" / "000000000007.jpg").unlink()
    with pytest.raises(DataError, match=r"000000000007\.jpg named in .* does not exist"):
        CocoDataset(coco, "val")
