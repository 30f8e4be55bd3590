"""Evaluation and prediction of instance models (Mask R-CNN): COCO box and mask AP
(:mod:`denseseg.metrics.coco`), instance pictures and COCO results files. Their training is
:class:`denseseg.engine.tasks.InstanceTask`'s.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from denseseg.errors import ConfigError
from denseseg.inference.instance import InstanceSegmenter
from denseseg.metrics.coco import CocoInstanceMetrics, encode_masks, format_coco_table

log = logging.getLogger("denseseg")

__all__ = ["evaluate_instances", "predict_instances", "run_instance_eval"]


def evaluate_instances(
    segmenter: InstanceSegmenter,
    dataset: Dataset,
    *,
    batch_size: int = 2,
    num_workers: int = 0,
    progress: bool = True,
) -> dict[str, float]:
    """COCO box and mask AP of ``segmenter`` on ``dataset`` (raw uint8 items, instance targets).

    Returns:
        See :meth:`CocoInstanceMetrics.compute` (``segm_AP``, ``bbox_AP50``, ...).
    """
    from denseseg.engine.evaluate import eval_batches

    metrics = CocoInstanceMetrics(segmenter.class_names, segmenter.max_detections)
    total = (len(dataset) + batch_size - 1) // batch_size  # type: ignore[arg-type]
    batches = eval_batches(dataset, batch_size, num_workers)
    for images, targets in tqdm(
        batches, total=total, desc="eval", disable=not progress, leave=False, dynamic_ncols=True
    ):
        for target, pred in zip(targets, segmenter.predict_batch(images)):
            metrics.update(target, pred)
    return metrics.compute()


def run_instance_eval(
    segmenter: InstanceSegmenter,
    dataset: str,
    root: str | None,
    split: str,
    out: str | Path,
    *,
    json_path: str | None = None,
    batch_size: int = 2,
    num_workers: int = 0,
) -> Path:
    """``denseseg eval`` for an instance checkpoint: COCO AP table, ``metrics.json`` in ``out``.

    The reader gets ``target="instance"`` and, for the format the model was trained on, the
    training recipe's category mapping, so the classes line up.
    """
    from denseseg.data.registry import get_dataset

    if dataset != "coco":
        raise ConfigError(
            "instance models are evaluated on COCO-format data; pass --dataset coco, "
            f"not {dataset!r}"
        )
    options: dict[str, Any] = {"target": "instance"}
    if dataset == segmenter.meta.get("dataset"):
        saved = segmenter.meta.get("data_options") or {}
        options.update({k: saved[k] for k in ("category_map", "classes") if k in saved})
    ds = get_dataset(dataset, root, split, **options)
    if ds.num_classes != segmenter.num_classes:
        raise ConfigError(
            f"dataset {root} has {ds.num_classes} classes, the model predicts "
            f"{segmenter.num_classes}; give the training recipe's category mapping"
        )
    metrics = evaluate_instances(segmenter, ds, batch_size=batch_size, num_workers=num_workers)
    print(format_coco_table(metrics))
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "metrics.json"
    text = json.dumps({"split": split, **metrics}, indent=2)
    path.write_text(text)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(text)
    return path


def coco_results(
    prediction: dict[str, Tensor], image_id: int, category_ids: Sequence[int] | None = None
) -> list[dict[str, Any]]:
    """One image's predictions as COCO results entries (bbox XYWH, RLE segmentation, score).

    Args:
        prediction: what :meth:`InstanceSegmenter.predict` returns.
        image_id: the image's id in the results file.
        category_ids: the dataset category id of each class (default: the class index).
    """
    boxes = prediction["boxes"].double()
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    out = []
    for box, rle, label, score in zip(
        xywh,
        encode_masks(prediction["masks"]),
        prediction["labels"].tolist(),
        prediction["scores"].tolist(),
    ):
        cat = category_ids[label] if category_ids is not None else label
        out.append(
            {
                "image_id": image_id,
                "category_id": int(cat),
                "bbox": [round(v, 2) for v in box],
                "score": round(float(score), 5),
                "segmentation": rle,
            }
        )
    return out


def predict_instances(
    segmenter: InstanceSegmenter,
    files: Sequence[Path],
    out: str | Path,
    *,
    batch_size: int = 2,
    alpha: float = 0.5,
    min_score: float = 0.5,
    picture_names: Sequence[str] | None = None,
    before_write: Callable[[Path, Path | None], None] | None = None,
) -> Path:
    """``denseseg predict`` for an instance checkpoint.

    Writes ``<stem>_instances.png`` per image (a colour per instance, boxes, class names and
    scores of the detections scoring at least ``min_score``) and ``results.json``: every
    detection in COCO's results format (``image_id`` numbers the files from 1 in the order
    given; ``images`` in ``results_images.json`` maps ids to file names).

    Args:
        picture_names: the picture's file name for each of ``files`` (default
            ``<stem>_instances.png``); the caller makes them unique.
        before_write: called as ``before_write(path, input_file)`` before each file is written
            (``input_file`` None for the results files); it raises to refuse the write.

    Returns:
        The path of ``results.json``.
    """
    from denseseg.data.io import read_image, write_image
    from denseseg.viz import draw_instances

    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    names = list(picture_names or [f"{p.stem}_instances.png" for p in files])
    check = before_write or (lambda path, source: None)
    results: list[dict[str, Any]] = []
    images_meta = []
    cat_ids = segmenter.meta.get("category_ids")
    bar = tqdm(total=len(files), desc="predict", unit="img", dynamic_ncols=True)
    for start in range(0, len(files), batch_size):
        chunk = list(files[start : start + batch_size])
        images = [read_image(p) for p in chunk]
        for k, (path, image, pred) in enumerate(
            zip(chunk, images, segmenter.predict_batch(images))
        ):
            image_id = start + k + 1
            h, w = image.shape[-2:]
            images_meta.append({"id": image_id, "file_name": path.name, "height": h, "width": w})
            results += coco_results(pred, image_id, cat_ids)
            shown = pred["scores"] >= min_score
            picture = draw_instances(
                image,
                pred["boxes"][shown],
                pred["labels"][shown],
                pred["masks"][shown],
                scores=pred["scores"][shown],
                class_names=segmenter.class_names,
                alpha=alpha,
            )
            check(folder / names[image_id - 1], path)
            write_image(folder / names[image_id - 1], picture)
        bar.update(len(chunk))
    bar.close()
    check(folder / "results_images.json", None)
    (folder / "results_images.json").write_text(json.dumps(images_meta, indent=1))
    path = folder / "results.json"
    check(path, None)
    path.write_text(json.dumps(results))
    return path
