"""Pixel-wise cross-entropy losses with an ignore label and class weights."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


def _check_shapes(logits: Tensor, target: Tensor, name: str) -> None:
    if logits.ndim != 4 or target.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(
            f"{name} expects logits (N, C, H, W) and target (N, H, W); got "
            f"{tuple(logits.shape)} and {tuple(target.shape)}"
        )


class CrossEntropyLoss(nn.Module):
    """Multiclass cross-entropy over pixels, a thin layer over ``F.cross_entropy``.

    The mean runs over the non-ignored pixels; with class weights it is the weighted mean
    ``sum_i w[y_i] * l_i / sum_i w[y_i]`` (PyTorch's convention). A batch whose pixels are all
    ignored gives 0 (with a graph), not NaN.

    Args:
        ignore_index: target value of pixels that add nothing to the loss (void, borders).
        weight: per-class weights ``(num_classes,)`` (e.g. median-frequency balancing), or None.
        label_smoothing: in ``[0, 1)``; 0 is plain cross-entropy.

    Forward:
        ``logits (N, C, H, W)``, ``target (N, H, W)`` int64 in ``[0, C) U {ignore_index}``
        -> scalar.
    """

    weight: Tensor | None
    num_statistics = 2  # summed loss, summed weight

    def __init__(
        self, ignore_index: int = 255, weight: Tensor | None = None, label_smoothing: float = 0.0
    ) -> None:
        super().__init__()
        self.ignore_index = ignore_index
        self.label_smoothing = float(label_smoothing)
        self.register_buffer(
            "weight", None if weight is None else torch.as_tensor(weight, dtype=torch.float32)
        )

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """Return the mean loss over the non-ignored pixels (a scalar)."""
        _check_shapes(logits, target, "CrossEntropyLoss")
        if not (target != self.ignore_index).any():
            return logits.sum() * 0.0
        weight = None if self.weight is None else self.weight.to(logits.device, logits.dtype)
        return F.cross_entropy(
            logits,
            target.long(),
            weight=weight,
            ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing,
        )

    def statistics(self, logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """The summed loss and the summed weight of the non-ignored pixels (their count without
        class weights). Statistics of several batches add up, and :meth:`from_statistics` of
        their sum is the mean over all of them: training on several processes sums them over
        the processes, so that the mean is the global batch's."""
        _check_shapes(logits, target, "CrossEntropyLoss")
        target = target.long()
        valid = target != self.ignore_index
        weight = None if self.weight is None else self.weight.to(logits.device, logits.dtype)
        total = F.cross_entropy(
            logits,
            target,
            weight=weight,
            ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing,
            reduction="sum",
        )
        if weight is None:
            return total, valid.sum().to(logits.dtype)
        return total, weight[target[valid]].sum()

    @staticmethod
    def from_statistics(stats: Sequence[Tensor]) -> Tensor:
        """The loss of summed :meth:`statistics`: the weighted mean (0 without a pixel)."""
        return weighted_mean(stats)


class OhemCrossEntropyLoss(CrossEntropyLoss):
    """:class:`CrossEntropyLoss` over the hard pixels only (online hard example mining, as
    DDRNet and mmsegmentation's ``OHEMPixelSampler`` train on street scenes).

    A pixel is kept when the softmax probability of its true class is at most ``thresh``; when
    fewer than ``min_kept`` are, the threshold rises to the ``min_kept``-th lowest probability,
    so at least that many (the hardest) count, and every labelled pixel when fewer are. The
    rest are ignored for this batch (on several processes each process selects in its own
    share). Class weights apply to the kept pixels.

    Args:
        thresh: probability in ``(0, 1]``; 1 keeps every labelled pixel (plain cross-entropy).
        min_kept: least number of pixels kept per batch.
        ignore_index, weight, label_smoothing: as :class:`CrossEntropyLoss`.
    """

    def __init__(
        self,
        thresh: float = 0.7,
        min_kept: int = 100_000,
        ignore_index: int = 255,
        weight: Tensor | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__(ignore_index, weight, label_smoothing)
        self.thresh, self.min_kept = float(thresh), int(min_kept)

    def hard_targets(self, logits: Tensor, target: Tensor) -> Tensor:
        """``target`` with every pixel that is not hard set to ``ignore_index``."""
        _check_shapes(logits, target, "OhemCrossEntropyLoss")
        target = target.long()
        valid = target != self.ignore_index
        if not valid.any():
            return target
        with torch.no_grad():
            safe = torch.where(valid, target, 0).unsqueeze(1)
            prob = logits.detach().float().softmax(1).gather(1, safe).squeeze(1)
            probs = prob[valid]
            # The min_kept-th lowest probability (all of them when fewer are labelled).
            kth = probs.kthvalue(min(self.min_kept, probs.numel())).values.item()
            thresh = max(self.thresh, kth)
            keep = valid & (prob <= thresh) if thresh < 1.0 else valid
        return torch.where(keep, target, self.ignore_index)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return super().forward(logits, self.hard_targets(logits, target))

    def statistics(self, logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        return super().statistics(logits, self.hard_targets(logits, target))


def weighted_mean(stats: Sequence[Tensor]) -> Tensor:
    """``summed loss / summed weight`` of ``(summed loss, summed weight)``; 0 (with a graph) when
    the weight is 0, as every pixel's loss is then 0 too."""
    total, weight = stats
    return total / weight.clamp_min(1e-12)


class BCEWithLogits(nn.Module):
    """Binary cross-entropy on one logit channel, with an ignore label.

    Args:
        ignore_index: target value of pixels that add nothing to the loss.
        weight: optional ``(2,)`` weights for background (label 0) and foreground (label 1); the
            mean is then weighted as in :class:`CrossEntropyLoss`.

    Forward:
        ``logits (N, 1, H, W)``, ``target (N, H, W)`` int64 in ``{0, 1, ignore_index}`` -> scalar,
        the mean over non-ignored pixels (0 when every pixel is ignored).
    """

    weight: Tensor | None
    num_statistics = 2  # summed loss, summed weight

    def __init__(self, ignore_index: int = 255, weight: Tensor | None = None) -> None:
        super().__init__()
        self.ignore_index = ignore_index
        if weight is not None and torch.as_tensor(weight).shape != (2,):
            shape = tuple(torch.as_tensor(weight).shape)
            raise ValueError(f"BCEWithLogits weight must have shape (2,), got {shape}")
        self.register_buffer(
            "weight", None if weight is None else torch.as_tensor(weight, dtype=torch.float32)
        )

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """Return the mean binary cross-entropy over the non-ignored pixels (a scalar)."""
        _check_shapes(logits, target, "BCEWithLogits")
        if logits.shape[1] != 1:
            raise ValueError(f"BCEWithLogits expects one logit channel, got {logits.shape[1]}")
        logits = logits[:, 0]
        valid = target != self.ignore_index
        if not valid.any():
            return logits.sum() * 0.0
        x = logits[valid]
        y = target[valid].to(x.dtype)
        if self.weight is None:
            return F.binary_cross_entropy_with_logits(x, y)
        w = self.weight.to(x.device, x.dtype)[target[valid].long()]
        return (F.binary_cross_entropy_with_logits(x, y, reduction="none") * w).sum() / w.sum()

    def statistics(self, logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """The summed loss and the summed weight of the non-ignored pixels, summable over
        batches and processes (see :meth:`CrossEntropyLoss.statistics`)."""
        _check_shapes(logits, target, "BCEWithLogits")
        if logits.shape[1] != 1:
            raise ValueError(f"BCEWithLogits expects one logit channel, got {logits.shape[1]}")
        valid = target != self.ignore_index
        x = logits[:, 0][valid]
        losses = F.binary_cross_entropy_with_logits(x, target[valid].to(x.dtype), reduction="none")
        if self.weight is None:
            return losses.sum(), valid.sum().to(x.dtype)
        w = self.weight.to(x.device, x.dtype)[target[valid].long()]
        return (losses * w).sum(), w.sum()

    @staticmethod
    def from_statistics(stats: Sequence[Tensor]) -> Tensor:
        """The loss of summed :meth:`statistics`: the weighted mean (0 without a pixel)."""
        return weighted_mean(stats)
