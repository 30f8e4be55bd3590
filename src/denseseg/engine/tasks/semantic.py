"""Semantic segmentation in training: a per-pixel loss, mIoU on the validation split."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import default_collate

from denseseg.config import Config, check_combinations
from denseseg.data.folder import median_frequency_weights
from denseseg.engine import distributed as dist
from denseseg.engine.evaluate import evaluate
from denseseg.engine.sampler import SeededTransformDataset
from denseseg.engine.tasks.base import EvalReport, Task
from denseseg.engine.training_data import TrainingData
from denseseg.errors import ConfigError
from denseseg.losses import build_loss
from denseseg.losses.weight_map import PixelWeightedCrossEntropy, WithWeightMap, parse_weight_map


class SemanticTask(Task):
    """Models that give ``{"out": logits (N, K, H, W)[, "aux": ..., "aux_*": ...]}`` (each
    auxiliary head's loss weighted by ``loss.aux_weight``); ``best.pt`` by mIoU."""

    best_metric = "mIoU"

    @staticmethod
    def collate(batch: list) -> Any:
        """torch's default stacking, with a one-line error when the samples differ in size."""
        try:
            return default_collate(batch)
        except RuntimeError as exc:
            if "equal size" not in str(exc):
                raise
            sizes = sorted({tuple(item[0].shape[-2:]) for item in batch})
            raise ConfigError(
                f"training samples of one batch differ in size ({', '.join(map(str, sizes))}): "
                "with data.crop_size null every image must keep one size; set data.crop_size, "
                "or data.scale_range=null and equal-sized images, or data.batch_size=1"
            ) from None

    def __init__(self) -> None:
        self.criterion: nn.Module | None = None
        self.class_weights: Tensor | None = None
        self.aux_weight = 0.0

    def prepare(self, cfg: Config, data: TrainingData, model_kwargs: dict, device: Any) -> None:
        raw = data.raw
        weights = class_weights(cfg, raw, raw.num_classes)
        self.class_weights, self.aux_weight = weights, cfg.loss.aux_weight
        self.criterion = build_loss(
            cfg.loss.name,
            num_classes=model_kwargs["num_classes"],
            ignore_index=raw.ignore_index,
            class_weights=weights.to(device) if weights is not None else None,
            **({"dice_weight": cfg.loss.dice_weight} if "+dice" in cfg.loss.name else {}),
            **_ohem_options(cfg),
        )
        if cfg.loss.weight_map:
            data.dataset, self.criterion = _use_weight_map(cfg, data, weights, model_kwargs)

    def loss(self, model: nn.Module, batch: Any, device: torch.device) -> Tensor:
        images, targets, *pixel_weights = batch
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        # Per-pixel loss weights (U-Net's weight map) travel with the targets, cropped alike.
        extra = tuple(w.to(device, non_blocking=True) for w in pixel_weights)
        out = model(images)
        logits = out["out"]
        if logits.shape[-2:] != targets.shape[-2:]:
            targets = center_crop(targets, logits.shape[-2:])
            extra = tuple(center_crop(w, logits.shape[-2:]) for w in extra)
        # Auxiliary heads: "aux" (torchvision's, DDRNet's) and "aux_*" (BiSeNetV2's boosters).
        aux = [v for k, v in out.items() if k == "aux" or k.startswith("aux_")]
        if dist.world_size() > 1:
            return self._global_loss(logits, aux, targets, extra)
        loss = self.criterion(logits.float(), targets, *extra)
        for head in aux if self.aux_weight else ():
            # torchvision's reference training: loss + 0.5 * the auxiliary head's loss.
            loss = loss + self.aux_weight * self.criterion(head.float(), targets, *extra)
        return loss

    def _global_loss(
        self, logits: Tensor, aux: list[Tensor], targets: Tensor, extra: tuple[Tensor, ...]
    ) -> Tensor:
        """The loss of the whole global batch, on several processes: each loss's summable
        statistics (weighted pixel counts, Dice's per-class sums) of this process's share,
        summed over the processes, give the value one process with the whole batch computes;
        autograd runs through this process's share, and DDP's gradient average is undone, so
        the update is that process's too."""
        heads = [(1.0, logits)]
        if self.aux_weight:
            heads += [(self.aux_weight, head) for head in aux]
        crit = self.criterion
        stats = [crit.statistics(out.float(), targets, *extra) for _, out in heads]
        summed = iter(dist.sum_over_ranks([t for s in stats for t in s]))
        losses = [
            w * crit.from_statistics([next(summed) for _ in s])
            for (w, _), s in zip(heads, stats, strict=True)
        ]
        return dist.undo_gradient_average(sum(losses[1:], losses[0]))

    def evaluate(self, predictor: Any, dataset: Any, cfg: Config) -> dict[str, Any]:
        dc = cfg.data
        metrics = evaluate(
            predictor,
            dist.shard(dataset),
            batch_size=dc.eval_batch_size,
            num_workers=dc.num_workers,
            progress=cfg.train.progress and dist.is_main(),
        )
        # The confusion matrices are summable: every rank gets the whole split's.
        metrics._counts[...] = dist.sum_array(metrics._counts)
        return metrics.compute()

    def report(self, metrics: dict[str, Any], step: int) -> EvalReport:
        keys = ("mIoU", "mAcc", "aAcc")
        shown = "  ".join(f"{k} {100 * metrics[k]:.2f}%" for k in keys)
        return EvalReport(
            line=f"step {step}  val {shown}",
            csv={f"val_{k}": f"{metrics[k]:.6f}" for k in keys},
            scalars={f"val/{k}": metrics[k] for k in keys},
        )

    def meta(self, data: TrainingData, cfg: Config) -> dict[str, Any]:
        weights = self.class_weights
        return {"class_weights": weights.tolist() if weights is not None else None}


def _ohem_options(cfg: Config) -> dict[str, Any]:
    if cfg.loss.ohem_thresh is None:
        return {}
    check_combinations(cfg)
    return {"ohem_thresh": cfg.loss.ohem_thresh, "ohem_min_kept": cfg.loss.ohem_min_kept}


def class_weights(cfg: Config, dataset: Any, num_classes: int) -> Tensor | None:
    """``loss.class_weights`` as a tensor: None, SegNet's median frequency, or the list."""
    cw = cfg.loss.class_weights
    if cw is None:
        return None
    if cw == "median_frequency":
        return median_frequency_weights(dataset).float()
    if isinstance(cw, list):
        if len(cw) != num_classes:
            raise ConfigError(f"loss.class_weights has {len(cw)} values for {num_classes} classes")
        return torch.tensor(cw, dtype=torch.float32)
    raise ConfigError(f"loss.class_weights={cw!r}: use null, median_frequency or a list of numbers")


def _use_weight_map(
    cfg: Config, data: TrainingData, class_weights: Tensor | None, model_kwargs: dict
) -> tuple[SeededTransformDataset, nn.Module]:
    """U-Net's border weight map: each augmented sample carries its map (w_c included, from
    ``class_weights`` when given), and the loss becomes the pixel-weighted cross-entropy."""
    opts = parse_weight_map(cfg.loss.weight_map)
    if cfg.loss.name != "ce" or model_kwargs["num_classes"] < 2:
        raise ConfigError(
            f"loss.weight_map needs loss.name: ce and a model with >= 2 classes (got "
            f"{cfg.loss.name!r}, {model_kwargs['num_classes']} classes)"
        )
    ignore_index = data.raw.ignore_index
    wrapped = WithWeightMap(
        data.transform,
        **opts,
        class_weights=class_weights,
        ignore_index=ignore_index,
        num_classes=model_kwargs["num_classes"],
    )
    return SeededTransformDataset(data.raw, wrapped), PixelWeightedCrossEntropy(ignore_index)


def center_crop(t: Tensor, size: tuple[int, int]) -> Tensor:
    """The centre ``size`` of ``t``'s last two dimensions: valid-padding networks see only the
    centre of their input, so they train on the matching labels."""
    h, w = t.shape[-2:]
    top, left = (h - size[0]) // 2, (w - size[1]) // 2
    return t[..., top : top + size[0], left : left + size[1]]
