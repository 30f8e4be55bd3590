"""Training losses: cross-entropy (ignore label, class weights), Dice, BCE, and their sums.

All take ``logits (N, C, H, W)`` and an int64 ``target (N, H, W)`` and return a scalar;
:func:`build_loss` builds one from its recipe name. Each also gives ``statistics(logits,
target)``, ``num_statistics`` sums over pixels (weighted pixel counts, Dice's per-class sums)
that add up over batches, and ``from_statistics(stats)``, the loss of their sum: training on
several processes sums them over the processes, so that each loss is the global batch's.
"""

from denseseg.losses.build import LOSS_NAMES, build_loss
from denseseg.losses.combined import CombinedLoss
from denseseg.losses.cross_entropy import BCEWithLogits, CrossEntropyLoss
from denseseg.losses.dice import DiceLoss

__all__ = [
    "LOSS_NAMES",
    "BCEWithLogits",
    "CombinedLoss",
    "CrossEntropyLoss",
    "DiceLoss",
    "build_loss",
]
