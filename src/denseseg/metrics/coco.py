"""COCO box and mask AP through pycocotools' ``COCOeval``.

Ground truth and detections are both gathered in class-index space (category id = class index,
1 .. K-1), so any instance dataset is evaluated the same way, whatever its on-disk format or
category mapping. Masks are run-length encoded as they arrive, so memory stays small.

As detectron2 does, the mask results are loaded without their boxes: given both, pycocotools
takes the box area as the instance's area, which would move detections between the small,
medium and large ranges of the mask AP.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from denseseg.errors import ConfigError, require_extra

__all__ = ["COCO_STATS", "CocoInstanceMetrics", "encode_masks", "format_coco_table"]

COCO_STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
"""The first six numbers of ``COCOeval.summarize()``, in its order."""


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    # pycocotools prints progress and trips numpy 2's copy= deprecation on every call.
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


def _pycocotools(module: str) -> Any:
    """``pycocotools.<module>`` (the extra denseseg[coco]), imported when first needed."""
    return require_extra(f"pycocotools.{module}", "coco", "COCO evaluation (pycocotools)")


def _mask_utils() -> Any:
    return _pycocotools("mask")


def encode_masks(masks: Tensor) -> list[dict[str, Any]]:
    """Binary masks ``(N, H, W)`` -> COCO run-length encodings (``counts`` as str, JSON-ready)."""
    if len(masks) == 0:
        return []
    arr = np.asfortranarray(masks.detach().cpu().bool().numpy().transpose(1, 2, 0).astype(np.uint8))
    with _quiet():
        rles = _mask_utils().encode(arr)
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def _xywh(boxes: Tensor) -> list[list[float]]:
    b = boxes.detach().cpu().double()
    return torch.cat([b[:, :2], b[:, 2:] - b[:, :2]], dim=1).tolist()


class CocoInstanceMetrics:
    """Streaming COCO evaluation of box and mask predictions.

    Args:
        class_names: names of the classes, index = label; index 0 (background) is not scored.
        max_detections: detections per image counted by AP (COCO's 100; more for images with
            more objects, e.g. nuclei).

    Example::

        metrics = CocoInstanceMetrics(["background", "cell"])
        for target, pred in pairs:
            metrics.update(target, pred)
        metrics.compute()["segm_AP"]
    """

    def __init__(self, class_names: Sequence[str], max_detections: int = 100) -> None:
        if len(class_names) < 2:
            raise ConfigError("instance evaluation needs background plus at least one class")
        _pycocotools("cocoeval")  # missing: say so now, not after the predictions
        self.class_names = list(class_names)
        self.max_detections = int(max_detections)
        self.images: list[dict[str, Any]] = []
        self.gts: list[dict[str, Any]] = []
        self.dets: list[dict[str, Any]] = []

    def update(self, target: dict[str, Any], prediction: dict[str, Tensor]) -> int:
        """Add one image.

        Args:
            target: ``boxes (N, 4)`` XYXY, ``labels (N,)``, ``masks (N, H, W)`` and optionally
                ``iscrowd (N,)`` and ``area (N,)`` (COCO's own areas; else mask pixel counts).
            prediction: ``boxes (M, 4)`` XYXY, ``labels (M,)``, ``scores (M,)``, binary
                ``masks (M, H, W)``.

        Returns:
            The image id given to this image (1, 2, ...).
        """
        image_id = len(self.images) + 1
        masks = torch.as_tensor(target["masks"])
        h, w = masks.shape[-2:] if masks.ndim == 3 else prediction["masks"].shape[-2:]
        self.images.append({"id": image_id, "height": int(h), "width": int(w)})
        labels = torch.as_tensor(target["labels"]).tolist()
        n = len(labels)
        crowd = torch.as_tensor(target.get("iscrowd", torch.zeros(n))).tolist()
        rles = encode_masks(masks)
        area = target.get("area")
        areas = torch.as_tensor(area).tolist() if area is not None else [0.0] * n
        for i, (box, rle) in enumerate(zip(_xywh(torch.as_tensor(target["boxes"])), rles)):
            self.gts.append(
                {
                    "id": len(self.gts) + 1,  # pycocotools reads id 0 as "unmatched"
                    "image_id": image_id,
                    "category_id": int(labels[i]),
                    "bbox": box,
                    "segmentation": rle,
                    "area": float(areas[i]) if areas[i] > 0 else float(masks[i].sum()),
                    "iscrowd": int(crowd[i]),
                }
            )
        scores = prediction["scores"].tolist()
        p_labels = prediction["labels"].tolist()
        for box, rle, label, score in zip(
            _xywh(prediction["boxes"]), encode_masks(prediction["masks"]), p_labels, scores
        ):
            self.dets.append(
                {
                    "image_id": image_id,
                    "category_id": int(label),
                    "bbox": box,
                    "segmentation": rle,
                    "score": float(score),
                }
            )
        return image_id

    def _ground_truth(self) -> Any:
        gt = _pycocotools("coco").COCO()
        gt.dataset = {
            "images": self.images,
            "annotations": self.gts,
            "categories": [{"id": i, "name": n} for i, n in enumerate(self.class_names) if i > 0],
        }
        with _quiet():
            gt.createIndex()
        return gt

    def _evaluate(self, gt: Any, iou_type: str) -> list[float]:
        COCO = _pycocotools("coco").COCO  # noqa: N806 (pycocotools' class names)
        COCOeval = _pycocotools("cocoeval").COCOeval  # noqa: N806

        drop = "segmentation" if iou_type == "bbox" else "bbox"
        dets = [{k: v for k, v in d.items() if k != drop} for d in self.dets]
        with _quiet():
            if dets:
                dt = gt.loadRes(copy.deepcopy(dets))
            else:  # loadRes refuses an empty list; no detections score 0
                dt = COCO()
                dt.dataset = {**gt.dataset, "annotations": []}
                dt.createIndex()
            ev = COCOeval(gt, dt, iou_type)
            ev.params.maxDets = [1, 10, self.max_detections]
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        # -1 marks "no ground truth in this range".
        return [float(s) if s >= 0 else math.nan for s in ev.stats[: len(COCO_STATS)]]

    def compute(self) -> dict[str, float]:
        """COCO AP, AP50, AP75, APs, APm, APl for boxes and masks, in 0-1.

        Returns:
            ``{"bbox_AP": ..., "bbox_AP50": ..., ..., "segm_APl": ..., "num_images": n}``;
            NaN where no ground truth falls in a size range (or there is none at all).
        """
        out: dict[str, float] = {"num_images": float(len(self.images))}
        if not self.gts:
            for iou_type in ("bbox", "segm"):
                out.update({f"{iou_type}_{k}": math.nan for k in COCO_STATS})
            return out
        gt = self._ground_truth()
        for iou_type in ("bbox", "segm"):
            out.update(zip((f"{iou_type}_{k}" for k in COCO_STATS), self._evaluate(gt, iou_type)))
        return out


def format_coco_table(metrics: dict[str, float]) -> str:
    """The box and mask APs as a small table, in percent."""
    lines = ["      " + "".join(f"{k:>7}" for k in COCO_STATS)]
    for iou_type, name in (("bbox", "box"), ("segm", "mask")):
        vals = [metrics.get(f"{iou_type}_{k}", math.nan) for k in COCO_STATS]
        lines.append(f"{name:<6}" + "".join(f"{100 * v:7.1f}" for v in vals))
    return "\n".join(lines)
