"""Soft Dice loss (Milletari et al. 2016), multiclass or binary, with an ignore label."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

MODES = ("multiclass", "binary")


class DiceLoss(nn.Module):
    """``1 - soft Dice`` per class, averaged over classes.

    Per class c, over all non-ignored pixels of the batch:
    ``dice_c = (2 * sum(p_c * t_c) + smooth) / (sum(p_c) + sum(t_c) + smooth)``, with ``p_c`` the
    predicted probability and ``t_c`` the one-hot target. Ignored pixels are removed from the
    intersection and from both sums. As in segmentation_models_pytorch, a class with no pixel in
    the batch's target contributes 0 (its Dice is undefined), and the mean still runs over all
    classes, so the loss shrinks when few classes are present. In binary mode there is one class,
    the foreground: a batch without foreground gives 0, so pair it with BCE (``"bce+dice"``).

    Computed in float32: per-class sums over a batch overflow float16 under autocast.

    Args:
        mode: ``"multiclass"`` (softmax over C channels) or ``"binary"`` (sigmoid of 1 channel).
        ignore_index: target value of pixels left out.
        smooth: added to numerator and denominator.
        from_logits: apply softmax/sigmoid first; False if the inputs are already probabilities.
        eps: lower bound of the denominator.

    Forward:
        ``logits (N, C, H, W)`` (C = 1 in binary mode), ``target (N, H, W)`` int64 -> scalar.
    """

    num_statistics = 3  # per class: intersection, summed probability, target pixels

    def __init__(
        self,
        mode: str = "multiclass",
        ignore_index: int = 255,
        smooth: float = 1.0,
        from_logits: bool = True,
        eps: float = 1e-7,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"DiceLoss mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.ignore_index = ignore_index
        self.smooth = float(smooth)
        self.from_logits = from_logits
        self.eps = eps

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """Return the Dice loss of a batch (a scalar)."""
        return self.from_statistics(self.statistics(logits, target))

    def statistics(self, logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per class, over the batch's non-ignored pixels: the soft intersection, the summed
        probabilities and the pixel count of the target, each ``(C,)``. They add up over
        batches and processes; :meth:`from_statistics` of their sum is the Dice loss of the
        union (training on several processes sums them over the processes)."""
        if logits.ndim != 4 or target.shape != (logits.shape[0], *logits.shape[2:]):
            raise ValueError(
                f"DiceLoss expects logits (N, C, H, W) and target (N, H, W); got "
                f"{tuple(logits.shape)} and {tuple(target.shape)}"
            )
        num_classes = logits.shape[1]
        if self.mode == "binary" and num_classes != 1:
            raise ValueError(f"binary DiceLoss expects one logit channel, got {num_classes}")
        prob = logits.float().flatten(2)  # (N, C, P)
        if self.from_logits:
            prob = prob.sigmoid() if self.mode == "binary" else prob.softmax(dim=1)
        target = target.flatten(1)  # (N, P)
        valid = (target != self.ignore_index).unsqueeze(1)  # (N, 1, P)
        # Ignored pixels get label 0 here and are masked out just below.
        label = target.long() * valid.squeeze(1)
        if self.mode == "binary":
            onehot = label.unsqueeze(1).float()
        else:
            onehot = F.one_hot(label, num_classes).permute(0, 2, 1).float()
        prob = prob * valid
        onehot = onehot * valid
        dims = (0, 2)
        return (prob * onehot).sum(dims), prob.sum(dims), onehot.sum(dims)

    def from_statistics(self, stats: Sequence[Tensor]) -> Tensor:
        """The Dice loss of summed :meth:`statistics`."""
        intersection, prob_sum, target_sum = stats
        cardinality = prob_sum + target_sum
        dice = (2.0 * intersection + self.smooth) / (cardinality + self.smooth).clamp_min(self.eps)
        present = target_sum > 0
        return ((1.0 - dice) * present).mean()
