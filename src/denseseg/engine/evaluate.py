"""Evaluation at the images' original resolution: metrics, and the report ``denseseg eval`` writes.

:func:`evaluate` fills a streaming :class:`SegmentationMetrics` from a Segmenter's predictions;
:func:`run_eval` is ``denseseg eval`` for semantic and instance models alike (metrics table,
``metrics.json``; for semantic models also ``per_class.csv`` and two pictures,
:func:`semantic_report`).

Under ``torchrun`` (``torchrun --nproc_per_node N -m denseseg eval ...``) :func:`run_eval` joins
the process group and every rank evaluates its shard of the split (every N-th image, none twice):
the confusion matrices are summed, the COCO detections gathered to rank 0
(:func:`evaluate_instances` with ``shard=True``), and rank 0 alone prints and writes the report.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed
from torch.utils.data import DataLoader, Dataset

from denseseg.data.io import atomic_write
from denseseg.data.registry import get_dataset
from denseseg.engine import distributed as dist
from denseseg.errors import ConfigError, DataError
from denseseg.inference.build import source_name
from denseseg.inference.instance_segmenter import InstanceSegmenter
from denseseg.inference.segmenter import Segmenter
from denseseg.metrics import SegmentationMetrics, format_table, save_results
from denseseg.metrics.coco import CocoInstanceMetrics, format_coco_table
from denseseg.progress import tqdm

REPORT_FILES = ("metrics.json", "per_class.csv", "confusion_matrix.png", "per_class_iou.png")
"""The files an evaluation writes in its ``out`` folder (semantic; instance: ``metrics.json``)."""

__all__ = [
    "eval_batches",
    "evaluate",
    "evaluate_instances",
    "inference_group",
    "merge_coco_shards",
    "run_eval",
    "semantic_report",
    "REPORT_FILES",
]

T = TypeVar("T")


def _list_collate(batch: Sequence) -> tuple[list, list]:
    images, targets = zip(*batch)
    return list(images), list(targets)


def eval_batches(
    dataset: Dataset, batch_size: int = 4, num_workers: int = 0
) -> Iterator[tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """Batches of ``(uint8 images (C, H_i, W_i), int64 targets (H_i, W_i))`` of mixed sizes."""
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_list_collate,
    )
    yield from loader


def evaluate(
    segmenter: Segmenter,
    dataset: Dataset,
    *,
    batch_size: int = 4,
    num_workers: int = 0,
    absent: str = "nan",
    progress: bool = True,
) -> SegmentationMetrics:
    """Predict every image of ``dataset`` (raw uint8 items, no transforms) and accumulate metrics.

    Images of different sizes share a batch: the Segmenter pads them to a common size and crops
    each prediction back, so nothing is resized and padded pixels never reach the metrics.

    Returns:
        The filled :class:`SegmentationMetrics` (call ``.compute()``).
    """
    metrics = SegmentationMetrics(
        segmenter.num_classes, ignore_index=segmenter.ignore_index, absent=absent
    )
    total = (len(dataset) + batch_size - 1) // batch_size  # type: ignore[arg-type]
    bar = tqdm(
        eval_batches(dataset, batch_size, num_workers),
        total=total,
        desc="eval",
        disable=not progress,
        leave=False,
        dynamic_ncols=True,
    )
    for images, targets in bar:
        labels, _ = segmenter.predict_batch(images)
        for pred, target in zip(labels, targets):
            metrics.update(pred, target)
    return metrics


def evaluate_instances(
    segmenter: InstanceSegmenter,
    dataset: Dataset,
    *,
    batch_size: int = 2,
    num_workers: int = 0,
    progress: bool = True,
    shard: bool = False,
) -> dict[str, float]:
    """COCO box and mask AP of ``segmenter`` on ``dataset`` (raw uint8 items, instance targets).

    Args:
        shard: in a process group, evaluate this rank's shard of ``dataset`` (every
            ``world``-th item, none twice), gather the detections to rank 0, which runs the
            COCO evaluation, and give its metrics to every rank; every rank must call it. With
            one process (or ``shard=False``) the whole ``dataset`` is evaluated here.

    Returns:
        See :meth:`CocoInstanceMetrics.compute` (``segm_AP``, ``bbox_AP50``, ...): the same
        on every rank, and the same as one process's.
    """
    if shard and dist.is_distributed():
        parts = dist.gather_objects(
            _coco_detections(segmenter, dist.shard(dataset), batch_size, num_workers, progress)
        )
        merged = merge_coco_shards(parts).compute() if parts is not None else None
        return dist.broadcast_object(merged)
    return _coco_detections(segmenter, dataset, batch_size, num_workers, progress).compute()


def _coco_detections(
    segmenter: InstanceSegmenter,
    dataset: Dataset,
    batch_size: int,
    num_workers: int,
    progress: bool,
) -> CocoInstanceMetrics:
    """Ground truth and detections of every item of ``dataset`` (RLE masks), not yet scored."""
    metrics = CocoInstanceMetrics(segmenter.class_names, segmenter.max_detections)
    total = (len(dataset) + batch_size - 1) // batch_size  # type: ignore[arg-type]
    batches = eval_batches(dataset, batch_size, num_workers)
    for images, targets in tqdm(
        batches, total=total, desc="eval", disable=not progress, leave=False, dynamic_ncols=True
    ):
        for target, pred in zip(targets, segmenter.predict_batch(images)):
            metrics.update(target, pred)
    return metrics


def merge_coco_shards(parts: Sequence[CocoInstanceMetrics]) -> CocoInstanceMetrics:
    """The shards of :func:`denseseg.engine.distributed.shard` (rank ``r`` of ``W`` holds items
    ``r, r + W, ...``) as one process fills them: images in the split's order, numbered from 1,
    annotations and detections numbered and ordered as :meth:`CocoInstanceMetrics.update`
    gives them, so the COCO evaluation is the one process's, bit for bit.
    """
    merged = CocoInstanceMetrics(parts[0].class_names, parts[0].max_detections)
    images = [_per_image(part) for part in parts]
    world, total = len(parts), sum(len(part) for part in images)
    for index in range(total):
        image, gts, dets = images[index % world][index // world]
        image_id = index + 1
        merged.images.append({**image, "id": image_id})
        for gt in gts:
            merged.gts.append({**gt, "id": len(merged.gts) + 1, "image_id": image_id})
        merged.dets += [{**det, "image_id": image_id} for det in dets]
    return merged


def _per_image(metrics: CocoInstanceMetrics) -> list[tuple[dict, list[dict], list[dict]]]:
    gts: defaultdict[int, list[dict]] = defaultdict(list)
    dets: defaultdict[int, list[dict]] = defaultdict(list)
    for gt in metrics.gts:
        gts[gt["image_id"]].append(gt)
    for det in metrics.dets:
        dets[det["image_id"]].append(det)
    return [(image, gts[image["id"]], dets[image["id"]]) for image in metrics.images]


def _main_writes(write: Callable[[], T]) -> T:
    """``write()`` run by rank 0 alone (the report's files and lines); its result on every
    rank, once written."""
    return dist.broadcast_object(write() if dist.is_main() else None)  # type: ignore[arg-type]


@contextlib.contextmanager
def inference_group(predictor: Any) -> Iterator[None]:
    """Under ``torchrun``: join the process group for the block (gloo on a CPU, NCCL on
    CUDA), with ``predictor`` moved to this process's own GPU (``cuda:LOCAL_RANK``) and the
    ranks other than 0 logging errors only; without torchrun's environment nothing changes."""
    device = dist.local_device(predictor.device)
    if device != predictor.device:
        predictor.model.to(device)
        predictor.device = device
    with dist.process_group(device), dist.quiet_unless_main():
        yield


def run_eval(
    predictor: Segmenter | InstanceSegmenter,
    dataset: str,
    root: str | None,
    split: str,
    out: str | Path,
    *,
    json_path: str | Path | None = None,
    batch_size: int = 4,
    num_workers: int = 0,
    absent: str = "nan",
    options: Mapping[str, Any] | None = None,
    say: Callable[[str], None] = print,
) -> dict[str, Path]:
    """Evaluate ``predictor`` on a dataset split and write the report into ``out``.

    Semantic models: the metrics table is printed; ``metrics.json``, ``per_class.csv``,
    ``confusion_matrix.png`` and ``per_class_iou.png`` are written (:func:`semantic_report`).
    Instance models (COCO-format data only): the COCO AP table is printed and ``metrics.json``
    written; the reader gets ``target="instance"`` and, for the format the model was trained
    on, the training recipe's category mapping, so the classes line up.

    Args:
        predictor: a Segmenter or InstanceSegmenter (e.g. from :func:`denseseg.load_model`).
        dataset: the dataset format (``folder``, ``camvid``, ``coco``, ...).
        root: the dataset folder.
        split: the split to evaluate.
        out: the report folder; created if missing.
        json_path: also write the metrics JSON to this file.
        batch_size: images per forward pass.
        num_workers: data loader processes.
        absent: how classes absent from the ground truth count in the means (semantic).
        options: the reader's options, as a recipe's ``data.options`` (semantic).
        say: prints the table (``print``; the CLI passes its terminal-safe printer).

    Under ``torchrun`` every rank evaluates its shard of the split and the counts are
    reduced (:func:`inference_group`); rank 0 alone calls ``say`` and writes the files.

    Returns:
        The files written: ``json`` (``metrics.json``), ``csv``, ``confusion``, ``iou``
        (semantic) and ``copy`` (``json_path``), in the order written; on every rank.

    Raises:
        DataError: the dataset's classes are not the model's.
        ConfigError: an instance model evaluated on data that is not COCO-format, or with
            another number of classes.
    """
    out = Path(out)
    with inference_group(predictor):
        if getattr(predictor, "task", "semantic") == "instance":
            return _instance_eval(
                predictor, dataset, root, split, out, json_path, batch_size, num_workers, say
            )
        ds = get_dataset(dataset, root, split, **dict(options or {}))
        if ds.num_classes != predictor.num_classes:
            raise DataError(
                f"dataset {root} has {ds.num_classes} classes, model "
                f"{source_name(predictor.meta)} predicts {predictor.num_classes}"
            )
        metrics = evaluate(
            predictor,
            dist.shard(ds),
            batch_size=batch_size,
            num_workers=num_workers,
            absent=absent,
            progress=dist.is_main(),
        )
        metrics.all_reduce()  # the shards' confusion matrices summed: the split's, on each rank
        results = metrics.compute()

        def report() -> dict[str, Path]:
            say(format_table(results, predictor.class_names))
            return semantic_report(
                results, metrics.confusion, predictor, out, json_path=json_path, title=split
            )

        return _main_writes(report)


def semantic_report(
    results: Mapping[str, Any],
    confusion: np.ndarray,
    segmenter: Segmenter,
    out: str | Path,
    *,
    json_path: str | Path | None = None,
    title: str = "",
    confusion_png: str | Path | None = None,
    confusion_title: str = "",
    iou_png: str | Path | None = None,
) -> dict[str, Path]:
    """Write a semantic evaluation: ``metrics.json`` and ``per_class.csv`` in ``out``
    (:func:`denseseg.metrics.save_results`), a copy of the JSON at ``json_path``, the confusion
    matrix and the per-class IoU bar chart.

    Args:
        results: the dict of :meth:`SegmentationMetrics.compute`.
        confusion: the ``(K, K)`` confusion matrix (rows ground truth).
        segmenter: the predictor evaluated (class names and palette).
        out: the report folder; created if missing.
        json_path: also write ``metrics.json`` here.
        title: the per-class IoU chart's title.
        confusion_png: the confusion picture (default ``out/confusion_matrix.png``).
        confusion_title: its title.
        iou_png: the per-class IoU picture (default ``out/per_class_iou.png``).

    Returns:
        ``{"json", "csv", "copy" (with json_path), "confusion", "iou"}``: the files written.
    """
    from denseseg.viz import plot_confusion_matrix, plot_per_class_iou  # matplotlib: slow

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = segmenter.class_names
    written = save_results(results, names, out, confusion=confusion)
    if json_path:
        written["copy"] = _copy_file(written["json"], Path(json_path))
    written["confusion"] = plot_confusion_matrix(
        confusion, names, confusion_png or out / "confusion_matrix.png", title=confusion_title
    )
    written["iou"] = plot_per_class_iou(
        results["IoU"],
        names,
        iou_png or out / "per_class_iou.png",
        title=title,
        palette=segmenter.palette,
    )
    return written


def _instance_eval(
    segmenter: InstanceSegmenter,
    dataset: str,
    root: str | None,
    split: str,
    out: Path,
    json_path: str | Path | None,
    batch_size: int,
    num_workers: int,
    say: Callable[[str], None],
) -> dict[str, Path]:
    """:func:`run_eval` for an instance model: COCO AP table, ``metrics.json`` in ``out``."""
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
    metrics = evaluate_instances(
        segmenter,
        ds,
        batch_size=batch_size,
        num_workers=num_workers,
        progress=dist.is_main(),
        shard=True,
    )

    def report() -> dict[str, Path]:
        say(format_coco_table(metrics))
        data = json.dumps({"split": split, **metrics}, indent=2).encode()
        written = {"json": _write_bytes(out / "metrics.json", data)}
        if json_path:
            written["copy"] = _write_bytes(Path(json_path), data)
        return written

    return _main_writes(report)


def _copy_file(src: Path, dst: Path) -> Path:
    if dst.exists() and os.path.samefile(src, dst):
        return dst  # json_path names the metrics.json already written
    return _write_bytes(dst, src.read_bytes())


def _write_bytes(path: Path, data: bytes) -> Path:
    with atomic_write(path, "metrics file") as fh:
        fh.write(data)
    return path
