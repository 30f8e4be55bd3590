"""Build a loss from its recipe name."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from denseseg.errors import ConfigError
from denseseg.losses.combined import CombinedLoss
from denseseg.losses.cross_entropy import BCEWithLogits, CrossEntropyLoss, OhemCrossEntropyLoss
from denseseg.losses.dice import DiceLoss

LOSS_NAMES = ("ce", "dice", "ce+dice", "bce", "bce+dice")
_BINARY_ONLY = ("bce", "bce+dice")
_MULTICLASS_ONLY = ("ce", "ce+dice")
# The extra keyword options each name accepts.
_OPTIONS = {
    "ce": {"label_smoothing", "ohem_thresh", "ohem_min_kept"},
    "dice": {"smooth"},
    "ce+dice": {"label_smoothing", "smooth", "dice_weight"},
    "bce": set(),
    "bce+dice": {"smooth", "dice_weight"},
}


def build_loss(
    name: str,
    *,
    num_classes: int,
    ignore_index: int = 255,
    class_weights: torch.Tensor | Sequence[float] | None = None,
    **kw: Any,
) -> nn.Module:
    """Build the training loss ``name``.

    Args:
        name: ``"ce"``, ``"dice"``, ``"ce+dice"`` (multiclass; ``"dice"`` is binary when
            ``num_classes == 1``), ``"bce"`` or ``"bce+dice"`` (binary, ``num_classes == 1``).
        num_classes: the model's output channels; 1 means binary.
        ignore_index: target value of pixels left out of the loss.
        class_weights: per-class weights for the cross-entropy term: ``(num_classes,)`` for
            multiclass, ``(2,)`` (background, foreground) for binary; Dice takes none.
        **kw: ``label_smoothing`` (CE), ``smooth`` (Dice), ``dice_weight`` (weight of the Dice
            term in a sum; the CE/BCE term has weight 1), ``ohem_thresh`` and ``ohem_min_kept``
            (``"ce"``: :class:`~denseseg.losses.cross_entropy.OhemCrossEntropyLoss`; a
            threshold of None is plain cross-entropy).

    Returns:
        A module called as ``loss(logits (N, C, H, W), target (N, H, W) int64) -> scalar``.

    Raises:
        ConfigError: unknown name or option, a name that does not fit ``num_classes``, or class
            weights of the wrong shape.
    """
    if name not in LOSS_NAMES:
        raise ConfigError(f"unknown loss {name!r}; choose one of: {', '.join(LOSS_NAMES)}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"loss {name!r}: num_classes={num_classes!r} must be an integer >= 1")
    if name in _BINARY_ONLY and num_classes != 1:
        raise ConfigError(
            f"loss {name!r} is binary and needs num_classes=1 (got {num_classes}); "
            f"use 'ce' or 'ce+dice' for several classes"
        )
    if name in _MULTICLASS_ONLY and num_classes == 1:
        raise ConfigError(
            f"loss {name!r} needs num_classes >= 2; with num_classes=1 (binary) use 'bce' or "
            f"'bce+dice'"
        )
    unknown = set(kw) - _OPTIONS[name]
    if unknown:
        allowed = ", ".join(sorted(_OPTIONS[name])) or "none"
        raise ConfigError(
            f"loss {name!r} has no option {', '.join(sorted(unknown))}; its options: {allowed}"
        )
    binary = num_classes == 1
    weight = _check_weights(name, class_weights, 2 if binary else num_classes)

    dice = DiceLoss(
        "binary" if binary else "multiclass",
        ignore_index=ignore_index,
        smooth=kw.get("smooth", 1.0),
    )
    if binary:
        xent: nn.Module = BCEWithLogits(ignore_index=ignore_index, weight=weight)
    elif kw.get("ohem_thresh") is not None:
        xent = OhemCrossEntropyLoss(
            kw["ohem_thresh"],
            kw.get("ohem_min_kept", 100_000),
            ignore_index=ignore_index,
            weight=weight,
            label_smoothing=kw.get("label_smoothing", 0.0),
        )
    else:
        xent = CrossEntropyLoss(
            ignore_index=ignore_index,
            weight=weight,
            label_smoothing=kw.get("label_smoothing", 0.0),
        )
    if name == "dice":
        return dice
    if name in ("ce", "bce"):
        return xent
    key = name.split("+")[0]
    return CombinedLoss({key: xent, "dice": dice}, {"dice": kw.get("dice_weight", 1.0)})


def _check_weights(
    name: str, class_weights: torch.Tensor | Sequence[float] | None, expected: int
) -> torch.Tensor | None:
    if class_weights is None:
        return None
    if name == "dice":
        raise ConfigError(
            "loss 'dice' takes no class_weights; drop them or use 'ce+dice' / 'bce+dice'"
        )
    weight = torch.as_tensor(class_weights, dtype=torch.float32).flatten()
    if weight.numel() != expected:
        raise ConfigError(
            f"loss {name!r}: class_weights has {weight.numel()} values, expected {expected} "
            f"({'background, foreground' if name.startswith('bce') else 'one per class'})"
        )
    if not torch.isfinite(weight).all() or (weight < 0).any():
        raise ConfigError(f"loss {name!r}: class_weights must be finite and >= 0")
    return weight
