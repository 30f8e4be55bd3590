"""Weighted sum of losses (e.g. cross-entropy + Dice)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch.nn as nn
from torch import Tensor


class CombinedLoss(nn.Module):
    """``sum_k weight_k * loss_k(logits, target)`` over named loss terms.

    Args:
        terms: name -> loss module, each called as ``loss(logits, target) -> scalar``.
        weights: name -> weight; a missing name has weight 1.

    Forward:
        ``logits (N, C, H, W)``, ``target (N, H, W)`` -> scalar.

    Like every loss here, it also gives summable ``statistics`` (and ``num_statistics`` of
    them) and the loss ``from_statistics``, for global normalisation on several processes.
    """

    def __init__(
        self, terms: Mapping[str, nn.Module], weights: Mapping[str, float] | None = None
    ) -> None:
        super().__init__()
        if not terms:
            raise ValueError("CombinedLoss needs at least one term")
        weights = dict(weights or {})
        unknown = set(weights) - set(terms)
        if unknown:
            raise ValueError(f"CombinedLoss weights name unknown terms: {sorted(unknown)}")
        self.terms = nn.ModuleDict(terms)
        self.weights = {name: float(weights.get(name, 1.0)) for name in terms}

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """Return the weighted sum of the terms (a scalar)."""
        losses = [self.weights[name] * term(logits, target) for name, term in self.terms.items()]
        return sum(losses[1:], losses[0])

    @property
    def num_statistics(self) -> int:
        return sum(term.num_statistics for term in self.terms.values())

    def statistics(self, logits: Tensor, target: Tensor) -> tuple[Tensor, ...]:
        """The terms' ``statistics``, one after the other (summable over batches and
        processes, as each term's)."""
        return tuple(s for term in self.terms.values() for s in term.statistics(logits, target))

    def from_statistics(self, stats: Sequence[Tensor]) -> Tensor:
        """The weighted sum of the terms' losses of summed :meth:`statistics`."""
        losses, start = [], 0
        for name, term in self.terms.items():
            part = stats[start : start + term.num_statistics]
            losses.append(self.weights[name] * term.from_statistics(part))
            start += term.num_statistics
        return sum(losses[1:], losses[0])
