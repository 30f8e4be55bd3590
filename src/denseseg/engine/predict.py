"""Prediction over image files: label maps, overlays and probabilities (semantic models), instance
pictures and COCO results (instance models).

:func:`predict_folder` is ``denseseg predict``: it lists the inputs, plans every output name and
checks it against the inputs before the first write (:mod:`denseseg.engine.outputs`), then runs
:func:`predict_semantic` or :func:`predict_instances`. Every file is written atomically.
Images above :data:`~denseseg.engine.large_image.LARGE_IMAGE_PIXELS` pixels, with a Segmenter in
``slide`` or ``overlap_tile`` mode, are segmented one at a time in bounded memory
(:mod:`denseseg.engine.large_image`).

Under ``torchrun`` (``torchrun --nproc_per_node N -m denseseg predict ...``) rank ``r`` segments
the inputs ``r, r + N, ...`` of the sorted list and writes their outputs, each once; rank 0
checks every output name before any rank writes, gathers the instance detections for
``results.json``, and alone shows progress.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from denseseg.data import io as data_io
from denseseg.data.palette import draw_legend, overlay
from denseseg.engine import distributed as dist
from denseseg.engine import large_image
from denseseg.engine.evaluate import inference_group
from denseseg.engine.large_image import is_large, predict_large_file
from denseseg.engine.outputs import NoClobber, check_out_folder, plan_outputs, refuse_out_in_input
from denseseg.errors import ConfigError, DataError, DensesegError
from denseseg.inference.instance_segmenter import InstanceSegmenter
from denseseg.inference.segmenter import Segmenter
from denseseg.metrics.coco import encode_masks
from denseseg.progress import tqdm

log = logging.getLogger("denseseg")

__all__ = [
    "IMAGE_EXTS",
    "Predictions",
    "coco_results",
    "list_inputs",
    "predict_folder",
    "predict_instances",
    "predict_semantic",
]

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
"""File name suffixes (any case) taken as images in an input folder."""

BeforeWrite = Callable[[Path, Path | None], None]
Plan = dict[Path, list[Path]]


@dataclass
class Predictions:
    """What :func:`predict_folder` did.

    Attributes:
        inputs: the images segmented, in order.
        written: every file written.
        results: ``results.json`` (COCO results of an instance model), else None.
    """

    inputs: list[Path]
    written: list[Path]
    results: Path | None = None


def list_inputs(path: Path) -> list[Path]:
    """The image files to segment: ``path`` itself, or the images in the folder ``path``
    (hidden files, whose names start with ``.``, are skipped).

    Raises:
        DataError: ``path`` does not exist, or the folder holds no images.
    """
    if path.is_file():
        return [path]
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTS)
        files = [p for p in found if not p.name.startswith(".") and p.is_file()]
        hidden = [p.name for p in found if p.name.startswith(".")]
        if hidden:
            log.info("skipped %d hidden file(s) in %s: %s", len(hidden), path, ", ".join(hidden))
        if not files:
            raise DataError(f"no images ({', '.join(IMAGE_EXTS)}) in folder {path}")
        return files
    raise DataError(f"input {path} does not exist; give an image file or a folder of images")


def predict_folder(
    predictor: Segmenter | InstanceSegmenter,
    source: str | Path,
    out: str | Path,
    *,
    batch_size: int = 4,
    alpha: float = 0.5,
    probs: bool = False,
    overwrite: bool = False,
) -> Predictions:
    """Segment an image file or the images of a folder into the folder ``out``.

    Each input ``STEM.EXT`` gets ``STEM.png`` (palette label map), ``STEM_overlay.png`` (the
    image's size, with a legend of the classes present in its bottom-left corner) and,
    with ``probs``, ``STEM_probs.npy`` (float16 class probabilities ``(K, H, W)``); an instance
    model gives ``STEM_instances.png`` per input and ``results.json`` (see
    :func:`predict_instances`). Nothing is written until every output name is known to be free
    of the inputs; an input is never overwritten. Under ``torchrun`` the inputs are shared out
    among the ranks (see the module docstring); every rank returns the whole job's result.

    Args:
        predictor: a Segmenter or InstanceSegmenter (e.g. from :func:`denseseg.load_model`).
        source: an image file or a folder of images (hidden files skipped).
        out: the output folder, outside the input folder; created if missing.
        batch_size: images per forward pass.
        alpha: overlay opacity, 0 to 1.
        probs: also write class probabilities (semantic models).
        overwrite: replace files of those names already in ``out`` (else refused: they may be
            a user's, e.g. ground-truth masks).

    Returns:
        The inputs and the files written.

    Raises:
        DataError: no input images, or a target is an input or a file this run wrote.
        ConfigError: ``out`` is a file, is or lies inside the input folder, two inputs would
            share an output name, or an output exists already and ``overwrite`` is False.
    """
    source, out = Path(source), Path(out)
    instance = getattr(predictor, "task", "semantic") == "instance"
    with inference_group(predictor):
        files, plan, guard = _agreed_plan(source, out, instance, probs, overwrite)
        mine = shard_files(files, dist.rank(), dist.world_size())
        written = [target for path in files for target in plan[path]]
        if not instance:
            predict_semantic(
                predictor,
                {path: plan[path] for path in mine},
                batch_size=batch_size,
                alpha=alpha,
                before_write=guard,
                progress=dist.is_main(),
            )
            dist.barrier()  # every rank returns once every output is written
            return Predictions(files, written)
        results = _sharded_instances(predictor, files, plan, out, batch_size, alpha, guard)
        dist.barrier()
    return Predictions(files, [*written, out / "results_images.json", results], results)


def check_outputs(
    predictor: Segmenter | InstanceSegmenter,
    source: str | Path,
    out: str | Path,
    *,
    probs: bool = False,
    overwrite: bool = False,
) -> None:
    """The checks :func:`predict_folder` makes before writing anything (inputs, output names,
    files in the way), for a launcher to make before it starts processes; creates ``out``."""
    instance = getattr(predictor, "task", "semantic") == "instance"
    _check_plan(Path(source), Path(out), instance, probs, overwrite)


def shard_files(files: Sequence[Path], rank: int, world: int) -> list[Path]:
    """Rank ``rank``'s share of ``world`` processes: every ``world``-th input from ``rank`` on,
    so that every input is segmented (and each output written) by exactly one rank."""
    return list(files[rank::world])


def _check_plan(
    source: Path, out: Path, instance: bool, probs: bool, overwrite: bool
) -> tuple[list[Path], Plan, NoClobber]:
    """The inputs, their outputs, checked (none an input, a duplicate or, unless
    ``overwrite``, a file in ``out`` already), and the guard; creates ``out``, writes nothing."""
    files = list_inputs(source)
    check_out_folder(out, f"--out {out}")
    refuse_out_in_input(source, out)
    plan = plan_outputs(files, out, instance, probs)
    guard = NoClobber(files)
    for targets in plan.values():
        for target in targets:
            guard.check(target)
    if not overwrite:
        _refuse_existing([t for targets in plan.values() for t in targets], out)
    out.mkdir(parents=True, exist_ok=True)
    return files, plan, guard


def _agreed_plan(
    source: Path, out: Path, instance: bool, probs: bool, overwrite: bool
) -> tuple[list[Path], Plan, NoClobber]:
    """:func:`_check_plan`, by rank 0 before any rank writes; when rank 0 refuses the job
    every rank raises its error, else every rank lists and plans the same inputs."""
    if not dist.is_distributed():
        return _check_plan(source, out, instance, probs, overwrite)
    refused: DensesegError | None = None
    if dist.is_main():
        try:
            _check_plan(source, out, instance, probs, overwrite)
        except DensesegError as exc:
            refused = exc
    refused = dist.broadcast_object(refused)
    if refused is not None:
        raise refused
    files = list_inputs(source)  # the same sorted list on every rank
    return files, plan_outputs(files, out, instance, probs), NoClobber(files)


def _sharded_instances(
    segmenter: InstanceSegmenter,
    files: list[Path],
    plan: Plan,
    out: Path,
    batch_size: int,
    alpha: float,
    guard: BeforeWrite,
) -> Path:
    """:func:`predict_instances` over this rank's inputs; rank 0 gathers the detections and
    writes ``results.json`` (image ids numbered over all the inputs, as one process does)."""
    indices = range(dist.rank(), len(files), dist.world_size())
    records = _draw_instances(
        segmenter,
        [files[i] for i in indices],
        out,
        image_ids=[i + 1 for i in indices],
        picture_names=[plan[files[i]][0].name for i in indices],
        batch_size=batch_size,
        alpha=alpha,
        before_write=guard,
        progress=dist.is_main(),
    )
    parts = dist.gather_objects(records)
    if parts is not None:
        images = sorted((image for part in parts for image in part[0]), key=lambda i: i["id"])
        results = sorted((r for part in parts for r in part[1]), key=lambda r: r["image_id"])
        _write_results(out, images, results, guard)
    return out / "results.json"


def _refuse_existing(targets: Sequence[Path], out: Path) -> None:
    existing = [t for t in targets if t.exists() or t.is_symlink()]
    if existing:
        raise ConfigError(
            f"--out {out} already holds {len(existing)} of the files predict would write (e.g. "
            f"{existing[0].name}); pass --overwrite to replace them, or choose another --out"
        )


def predict_semantic(
    segmenter: Segmenter,
    plan: dict[Path, list[Path]],
    *,
    batch_size: int = 4,
    alpha: float = 0.5,
    before_write: BeforeWrite | None = None,
    progress: bool = True,
) -> int:
    """Write each input's label map, overlay and (when planned) probabilities.

    Args:
        segmenter: the predictor.
        plan: per input image, its outputs: the label map (palette PNG), the overlay and,
            optionally, the ``.npy`` probabilities (see :func:`plan_outputs`).
        batch_size: images per forward pass.
        alpha: overlay opacity.
        before_write: called as ``before_write(path, input_file)`` before each file is written;
            it raises to refuse the write.
        progress: show a progress bar.

    Returns:
        How many inputs were segmented.
    """
    check = before_write or (lambda path, source: None)
    probs = any(len(targets) > 2 for targets in plan.values())  # a third output: probabilities
    large = _streamed_inputs(segmenter, list(plan), probs)
    files = [path for path in plan if path not in large]
    bar = tqdm(
        total=len(plan), desc="predict", unit="img", dynamic_ncols=True, disable=not progress
    )
    with bar:
        for path in large:  # one at a time, strip by strip (engine/large_image.py)
            label_path, overlay_path = plan[path][:2]
            predict_large_file(
                segmenter, path, label_path, overlay_path, alpha=alpha, before_write=check
            )
            bar.update(1)
        for i in range(0, len(files), batch_size):
            chunk = files[i : i + batch_size]
            images = [data_io.read_image(p) for p in chunk]
            labels, chunk_probs = segmenter.predict_batch(
                images, return_probs=probs, on_pass=_pass_note(bar)
            )
            bar.set_postfix_str("", refresh=False)
            for k, (path, image, label) in enumerate(zip(chunk, images, labels)):
                image_probs = None if chunk_probs is None else chunk_probs[k]
                _write_semantic(
                    segmenter, path, plan[path], image, label, image_probs, alpha, check
                )
                bar.update(1)  # per image, as each one's files are written
    return len(plan)


def _pass_note(bar: Any) -> Callable[[int, int], None]:
    """``on_pass`` of :meth:`Segmenter.predict_batch`: the bar shows ``pass 3/8`` while a batch
    goes through several passes (test-time augmentation, slide windows per image)."""

    def note(done: int, total: int) -> None:
        if total > 1:
            bar.set_postfix_str(f"pass {done}/{total}")

    return note


def _write_semantic(
    segmenter: Segmenter,
    path: Path,
    targets: list[Path],
    image: Tensor,
    label: Tensor,
    probs: Tensor | None,
    alpha: float,
    check: BeforeWrite,
) -> None:
    """One input's label map (palette PNG, the labels alone), overlay with the class legend
    (:func:`~denseseg.data.palette.draw_legend`, bottom-left corner, the image's size) and
    probabilities (when planned)."""
    label_path, overlay_path, *probs_path = targets
    check(label_path, path)
    data_io.write_mask(label_path, label, palette=segmenter.palette)
    check(overlay_path, path)
    picture = overlay(image, label, segmenter.palette, alpha=alpha)
    picture = draw_legend(picture, label, segmenter.palette, segmenter.class_names)
    data_io.write_image(overlay_path, picture)
    if probs is not None:
        check(probs_path[0], path)
        with data_io.atomic_write(probs_path[0], "probabilities") as fh:
            np.save(fh, probs.numpy().astype(np.float16))


def _streamed_inputs(segmenter: Segmenter, files: Sequence[Path], probs: bool) -> list[Path]:
    """The inputs above :data:`~denseseg.engine.large_image.LARGE_IMAGE_PIXELS` pixels that go
    the memory-bounded way (the Segmenter streams, no probabilities asked for); the others are
    batched as usual."""
    if segmenter.mode == "whole":
        return []
    large = [path for path in files if is_large(path)]
    if large and (probs or not segmenter.streams() or segmenter.num_classes > 256):
        why = "--probs asks for whole-image probabilities" if probs else f"tta={segmenter.tta}"
        why = why if segmenter.num_classes <= 256 else "over 256 classes (no palette PNG)"
        log.warning(
            "%d image(s) above %d pixels (e.g. %s) are segmented whole-image in memory: %s; "
            "tta none or hflip without --probs streams them strip by strip",
            len(large),
            large_image.LARGE_IMAGE_PIXELS,
            large[0].name,
            why,
        )
        return []
    return large


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
    before_write: BeforeWrite | None = None,
    progress: bool = True,
) -> Path:
    """Draw the instances of each image and write every detection as COCO results.

    Writes ``<stem>_instances.png`` per image (a colour per instance, boxes, class names and
    scores of the detections scoring at least ``min_score``) and ``results.json``: every
    detection in COCO's results format (``image_id`` numbers the files from 1 in the order
    given; ``images`` in ``results_images.json`` maps ids to file names).

    Args:
        picture_names: the picture's file name for each of ``files`` (default
            ``<stem>_instances.png``); the caller makes them unique.
        before_write: called as ``before_write(path, input_file)`` before each file is written
            (``input_file`` None for the results files); it raises to refuse the write.
        progress: show a progress bar.

    Returns:
        The path of ``results.json``.
    """
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    check = before_write or (lambda path, source: None)
    images, results = _draw_instances(
        segmenter,
        files,
        folder,
        image_ids=range(1, len(files) + 1),
        picture_names=picture_names or [f"{p.stem}_instances.png" for p in files],
        batch_size=batch_size,
        alpha=alpha,
        min_score=min_score,
        before_write=check,
        progress=progress,
    )
    return _write_results(folder, images, results, check)


def _draw_instances(
    segmenter: InstanceSegmenter,
    files: Sequence[Path],
    folder: Path,
    *,
    image_ids: Sequence[int],
    picture_names: Sequence[str],
    batch_size: int,
    alpha: float,
    before_write: BeforeWrite,
    progress: bool,
    min_score: float = 0.5,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Write each image's instance picture (``folder / picture_names[k]``).

    Returns:
        The images' entries of ``results_images.json`` and their detections as COCO results,
        numbered by ``image_ids``.
    """
    from denseseg.viz import draw_instances  # matplotlib: imported only when drawing

    results: list[dict[str, Any]] = []
    images_meta = []
    cat_ids = segmenter.meta.get("category_ids")
    bar = tqdm(
        total=len(files), desc="predict", unit="img", dynamic_ncols=True, disable=not progress
    )
    with bar:
        for start in range(0, len(files), batch_size):
            chunk = list(files[start : start + batch_size])
            images = [data_io.read_image(p) for p in chunk]
            preds = segmenter.predict_batch(images)
            for k, (path, image, pred) in enumerate(zip(chunk, images, preds), start):
                h, w = image.shape[-2:]
                images_meta.append(
                    {"id": image_ids[k], "file_name": path.name, "height": h, "width": w}
                )
                results += coco_results(pred, image_ids[k], cat_ids)
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
                before_write(folder / picture_names[k], path)
                data_io.write_image(folder / picture_names[k], picture)
            bar.update(len(chunk))
    return images_meta, results


def _write_results(
    folder: Path, images: list[dict[str, Any]], results: list[dict[str, Any]], check: BeforeWrite
) -> Path:
    """``results_images.json`` and ``results.json``; returns the latter's path."""
    _write_json(folder / "results_images.json", json.dumps(images, indent=1), check)
    return _write_json(folder / "results.json", json.dumps(results), check)


def _write_json(path: Path, text: str, check: BeforeWrite) -> Path:
    check(path, None)
    with data_io.atomic_write(path, "results file") as fh:
        fh.write(text.encode())
    return path
