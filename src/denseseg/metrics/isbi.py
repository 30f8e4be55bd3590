"""ISBI 2012 EM segmentation metrics: pixel error, Rand error and membrane IoU.

Definitions (Arganda-Carreras et al., "Crowdsourcing the creation of image segmentation
algorithms for connectomics", Front. Neuroanat. 2015; the challenge's evaluation page and Fiji's
``trainableSegmentation.metrics.RandError``), for membrane (0) / cell (1) label maps and a
predicted cell probability ``p``:

* **Rand error** (the challenge's original, "foreground-restricted" Rand error, the one the U-Net
  paper reports): ``1 - max_t F(t)`` over the thresholds ``t = 0.0, 0.1, ..., 0.9``. At a
  threshold the prediction's segments are the 4-connected components of ``p > t``; the ground
  truth's are the 4-connected components of its cell pixels. Only pixels that are cell in the
  ground truth count (its membrane, "the zero component", is pruned); there a pixel the
  prediction calls membrane is a segment of its own. Over all unordered pairs of these pixels,
  ``precision = TP / (pairs together in the prediction)``, ``recall = TP / (pairs together in the
  ground truth)``, ``TP = pairs together in both``, and ``F = 2 P R / (P + R)`` (the Rand
  F-score ``V_Rand`` with alpha = 0.5). Pair counts are summed over slices before the F-score,
  and one threshold serves the whole stack. Fiji's later "N^2" variant counts each pixel paired
  with itself too; the two differ by ``O(1 / n)`` for ``n`` counted pixels (< 1e-4 on 512x512
  slices). No border thinning: that belongs to the challenge's later ``V_Rand (thinned)``.
  ``rand_error_at_0.5`` is the same at the single threshold 0.5.
* **Pixel error**: ``1 - pixel accuracy`` of the prediction ``p > 0.5`` (the challenge defined
  it as one minus the best pixel F-score over thresholds; ours is the plain error rate).
  ``pixel_error_min`` is the lowest over the same thresholds as the Rand error (chosen on the
  evaluated slices themselves, so optimistic; a weighted loss such as U-Net's border map moves
  the best threshold away from 0.5).
* **Membrane IoU**: intersection over union of the membrane class at ``p > 0.5``.

scikit-image's ``adapted_rand_error`` is the SNEMI3D variant: it keeps the prediction's label 0
as one segment instead of single pixels, so it differs where the prediction has membrane inside
ground-truth cells.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from denseseg.ops.components import label_components

__all__ = ["THRESHOLDS", "ISBIMetrics", "evaluate_isbi", "rand_pair_counts", "rand_scores"]

THRESHOLDS: tuple[float, ...] = tuple(i / 10 for i in range(10))
"""The challenge script's thresholds on the cell probability: 0.0, 0.1, ..., 0.9."""


def _pairs(counts: Tensor) -> float:
    counts = counts.double()
    return float((counts * (counts - 1) / 2).sum())


def rand_pair_counts(gt_cells: Tensor, pred_cells: Tensor) -> tuple[float, float, float]:
    """Pair counts of the foreground-restricted Rand index for one slice.

    Args:
        gt_cells: bool ``(H, W)``: ground-truth cell pixels (membrane False).
        pred_cells: bool ``(H, W)``: predicted cell pixels.

    Returns:
        ``(together_in_both, together_in_truth, together_in_prediction)``: numbers of unordered
        pairs of ground-truth cell pixels in one segment of both, of the ground truth, and of the
        prediction (its membrane pixels are single-pixel segments).
    """
    gt_lab, n_gt = label_components(gt_cells)
    pred_lab, n_pred = label_components(pred_cells)
    keep = gt_lab > 0
    a, b = gt_lab[keep].long(), pred_lab[keep].long()
    joint = torch.bincount(a * (n_pred + 1) + b, minlength=(n_gt + 1) * (n_pred + 1))
    joint = joint.view(n_gt + 1, n_pred + 1)[1:]  # rows: ground-truth cells 1..n_gt
    in_both = _pairs(joint[:, 1:])
    in_truth = _pairs(joint.sum(1))
    in_pred = _pairs(joint[:, 1:].sum(0))
    return in_both, in_truth, in_pred


def rand_scores(in_both: float, in_truth: float, in_pred: float) -> dict[str, float]:
    """Precision, recall, F-score and error from the pair counts of :func:`rand_pair_counts`."""
    precision = in_both / in_pred if in_pred else 1.0
    recall = in_both / in_truth if in_truth else 1.0
    denom = in_truth + in_pred
    f = 2 * in_both / denom if denom else 1.0
    return {"precision": precision, "recall": recall, "f_score": f, "error": 1.0 - f}


class ISBIMetrics:
    """Streaming ISBI 2012 metrics over slices (see the module docstring).

    Args:
        thresholds: thresholds on the cell probability for the Rand error.
        ignore_index: target value of pixels left out of the pixel error and IoU.
    """

    def __init__(self, thresholds: Sequence[float] = THRESHOLDS, ignore_index: int = 255) -> None:
        self.thresholds = tuple(float(t) for t in thresholds)
        self.ignore_index = ignore_index
        self.rand = torch.zeros(len(self.thresholds), 3, dtype=torch.float64)
        self.rand_half = torch.zeros(3, dtype=torch.float64)
        self.wrong_at = torch.zeros(len(self.thresholds), dtype=torch.float64)
        self.wrong = self.total = self.inter = self.union = 0
        self.slices = 0

    def update(self, cell_prob: Tensor, target: Tensor) -> None:
        """Add one slice.

        Args:
            cell_prob: float ``(H, W)``: predicted probability of the cell class.
            target: int ``(H, W)``: 0 membrane, 1 cell, ``ignore_index`` void.
        """
        if cell_prob.shape != target.shape or target.ndim != 2:
            raise ValueError(
                f"ISBIMetrics.update expects (H, W) maps, got {tuple(cell_prob.shape)} and "
                f"{tuple(target.shape)}"
            )
        cell_prob, target = cell_prob.detach().float().cpu(), target.detach().cpu()
        valid = target != self.ignore_index
        gt_cells = valid & (target == 1)
        pred = cell_prob > 0.5
        self.wrong += int(((pred.long() != target) & valid).sum())
        self.total += int(valid.sum())
        gt_mem, pred_mem = valid & (target == 0), valid & ~pred
        self.inter += int((gt_mem & pred_mem).sum())
        self.union += int((gt_mem | pred_mem).sum())
        for i, t in enumerate(self.thresholds):
            self.rand[i] += torch.tensor(rand_pair_counts(gt_cells, cell_prob > t))
            self.wrong_at[i] += int((((cell_prob > t).long() != target) & valid).sum())
        self.rand_half += torch.tensor(rand_pair_counts(gt_cells, pred))
        self.slices += 1

    def compute(self) -> dict[str, Any]:
        """``pixel_error``, ``pixel_error_min`` and ``pixel_threshold``, ``rand_error`` (best
        threshold), ``rand_threshold``,
        ``rand_precision``/``rand_recall`` there, ``rand_error_at_0.5``, ``membrane_IoU``,
        ``slices``."""
        scores = [rand_scores(*row.tolist()) for row in self.rand]
        best = max(range(len(scores)), key=lambda i: scores[i]["f_score"])
        least = int(self.wrong_at.argmin())
        total = self.total if self.total else float("nan")
        return {
            "pixel_error": self.wrong / total,
            "pixel_error_min": float(self.wrong_at[least]) / total,
            "pixel_threshold": self.thresholds[least],
            "rand_error": scores[best]["error"],
            "rand_threshold": self.thresholds[best],
            "rand_precision": scores[best]["precision"],
            "rand_recall": scores[best]["recall"],
            "rand_error_at_0.5": rand_scores(*self.rand_half.tolist())["error"],
            "membrane_IoU": self.inter / self.union if self.union else float("nan"),
            "slices": self.slices,
        }


def evaluate_isbi(segmenter: Any, dataset: Any, thresholds: Sequence[float] = THRESHOLDS) -> dict:
    """Run a two-class (membrane, cell) model over a dataset and compute the ISBI metrics.

    Args:
        segmenter: a :class:`~denseseg.inference.Segmenter` predicting membrane (0) and cell (1).
        dataset: items ``(uint8 image (C, H, W), int64 target (H, W))``, e.g. ``isbi2012``.
        thresholds: thresholds of the Rand error.

    Returns:
        :meth:`ISBIMetrics.compute`'s dict.
    """
    metrics = ISBIMetrics(thresholds, ignore_index=getattr(dataset, "ignore_index", 255))
    for i in range(len(dataset)):
        image, target = dataset[i]
        metrics.update(segmenter.predict_proba(image)[1], target)
    return metrics.compute()
