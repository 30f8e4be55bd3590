"""Instance segmentation in training (Mask R-CNN): the model's own losses, COCO mask AP.

Batches are lists (images of any sizes; the model resizes, pads and normalises them itself),
the loss is the sum of the model's loss dict (RPN, box and mask), evaluation is COCO box and mask
AP (:mod:`denseseg.metrics.coco`), sharded over the processes of a distributed run with the
detections gathered to rank 0.

Mask R-CNN's losses (torchvision's) are means over a fixed number of sampled anchors and RoIs
per image, so with equal per-process batches DDP's average of the ranks' gradients is the
gradient of the global batch's mean: unlike the semantic losses they need no global
normalisation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from denseseg.config import Config, DataCfg
from denseseg.engine import distributed as dist
from denseseg.engine.evaluate import evaluate_instances
from denseseg.engine.tasks.base import EvalReport, Task
from denseseg.engine.training_data import TrainingData
from denseseg.errors import ConfigError, require_extra


def instance_collate(batch: Sequence[tuple[Tensor, dict]]) -> tuple[list[Tensor], list[dict]]:
    """Lists of images and targets: instance models take images of different sizes."""
    images, targets = zip(*batch)
    return list(images), list(targets)


class InstanceTask(Task):
    """Models with ``task = "instance"``; ``best.pt`` by COCO mask AP (``segm_AP``)."""

    best_metric = "segm_AP"
    normalises_inside = True
    collate = staticmethod(instance_collate)

    def check(self, cfg: Config, raw: Any) -> None:
        # Evaluation (COCO AP, after the last step at least) needs pycocotools: say so now.
        require_extra("pycocotools.cocoeval", "coco", "training an instance model (COCO AP)")
        check_instance_data(raw, cfg.data)
        if cfg.train.precise_bn:
            raise ConfigError("train.precise_bn applies to semantic models; set it to 0")

    def loss(self, model: nn.Module, batch: Any, device: torch.device) -> Tensor:
        images, targets = batch
        xs = [x.to(device, non_blocking=True) for x in images]
        losses = model(xs, [_training_target(t, device) for t in targets])
        return sum(losses.values())

    def evaluate(self, predictor: Any, dataset: Any, cfg: Config) -> dict[str, Any]:
        """COCO AP of the validation split: each rank predicts its shard, rank 0 scores the
        gathered detections, and every rank gets its metrics (so all pick best.pt alike)."""
        return evaluate_instances(
            predictor,
            dataset,
            batch_size=cfg.data.eval_batch_size,
            num_workers=cfg.data.num_workers,
            progress=cfg.train.progress and dist.is_main(),
            shard=True,
        )

    def report(self, metrics: dict[str, Any], step: int) -> EvalReport:
        pct = {k: 100 * metrics[k] for k in ("segm_AP", "segm_AP50", "bbox_AP")}
        return EvalReport(
            line=f"step {step}  val mask AP {pct['segm_AP']:.2f}%  AP50 {pct['segm_AP50']:.2f}%"
            f"  box AP {pct['bbox_AP']:.2f}%",
            csv={k: f"{metrics[k[4:]]:.6f}" for k in ("val_bbox_AP", "val_segm_AP")},
            scalars={f"val/{k}": v for k, v in metrics.items() if k != "num_images"},
        )

    def meta(self, data: TrainingData, cfg: Config) -> dict[str, Any]:
        return instance_meta(data.raw, cfg.data)


def check_instance_data(dataset: Any, dc: DataCfg) -> None:
    """Refuse data settings an instance model cannot use, naming the option to change.

    Raises:
        ConfigError: the dataset gives semantic targets, or the recipe sets normalisation or an
            evaluation resize (the model does both inside).
    """
    if getattr(dataset, "target", None) != "instance":
        raise ConfigError(
            f"the model is an instance model but dataset {dc.dataset!r} gives semantic targets; "
            "set data.options.target=instance (COCO-format data)"
        )
    if dc.mean is not None or dc.std is not None:
        raise ConfigError(
            "data.mean/data.std do not apply to instance models, which normalise inside; set "
            "model.kwargs.image_mean/image_std instead"
        )
    if dc.eval_resize is not None:
        raise ConfigError(
            "data.eval_resize does not apply to instance models, which resize inside; set "
            "model.kwargs.min_size/max_size instead"
        )


def instance_meta(dataset: Any, dc: DataCfg) -> dict[str, Any]:
    """Checkpoint entries an instance predictor needs besides the trainer's own.

    Returns:
        ``category_ids`` (the dataset's category id of each class, for COCO results files) and
        the reader's ``data_options`` (so ``denseseg eval`` reads the same classes).
    """
    to_class = getattr(dataset, "category_to_class", None) or {}
    ids = list(range(dataset.num_classes))
    for cat, cls in sorted(to_class.items(), reverse=True):  # the lowest id wins a merged class
        if 0 < cls < len(ids):
            ids[cls] = int(cat)
    return {"category_ids": ids, "dataset": dc.dataset, "data_options": dict(dc.options)}


def _training_target(target: dict[str, Any], device: torch.device) -> dict[str, Tensor]:
    # Crowd regions are left out of training, as torchvision's detection references do.
    keep = torch.as_tensor(target.get("iscrowd", torch.zeros(len(target["labels"])))) == 0
    return {
        "boxes": torch.as_tensor(target["boxes"])[keep].float().to(device),
        "labels": torch.as_tensor(target["labels"])[keep].long().to(device),
        "masks": torch.as_tensor(target["masks"])[keep].to(device, torch.uint8),
    }
