"""Tests for the training losses and their factory, against hand computations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from denseseg.errors import ConfigError
from denseseg.losses import (
    LOSS_NAMES,
    BCEWithLogits,
    CombinedLoss,
    CrossEntropyLoss,
    DiceLoss,
    build_loss,
)

IGNORE = 255


def _nll(logit_row: list[float], label: int) -> float:
    """-log softmax(logit_row)[label], written out."""
    return -logit_row[label] + math.log(sum(math.exp(v) for v in logit_row))


# Three pixels of a 1x1x3 image with 3 classes; the third pixel is ignored.
PIXEL_LOGITS = [[2.0, 0.5, -1.0], [0.1, 0.2, 3.0], [5.0, -5.0, 0.0]]
PIXEL_LABELS = [0, 1, IGNORE]


def _ce_batch() -> tuple[torch.Tensor, torch.Tensor]:
    logits = torch.tensor(PIXEL_LOGITS).T.reshape(1, 3, 1, 3)  # (N, C, H, W)
    target = torch.tensor(PIXEL_LABELS).reshape(1, 1, 3)  # (N, H, W)
    return logits, target


def test_cross_entropy_ignore_index_by_hand() -> None:
    logits, target = _ce_batch()
    expected = (_nll(PIXEL_LOGITS[0], 0) + _nll(PIXEL_LOGITS[1], 1)) / 2
    assert CrossEntropyLoss()(logits, target).item() == pytest.approx(expected, rel=1e-6)


def test_cross_entropy_class_weights_by_hand() -> None:
    logits, target = _ce_batch()
    w = [0.5, 2.0, 7.0]
    expected = (w[0] * _nll(PIXEL_LOGITS[0], 0) + w[1] * _nll(PIXEL_LOGITS[1], 1)) / (w[0] + w[1])
    loss = CrossEntropyLoss(weight=torch.tensor(w))(logits, target)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_cross_entropy_label_smoothing_by_hand() -> None:
    logits, target = _ce_batch()
    eps = 0.2
    per_pixel = [
        (1 - eps) * _nll(row, y) + eps * sum(_nll(row, c) for c in range(3)) / 3
        for row, y in zip(PIXEL_LOGITS[:2], PIXEL_LABELS[:2])
    ]
    loss = CrossEntropyLoss(label_smoothing=eps)(logits, target)
    assert loss.item() == pytest.approx(sum(per_pixel) / 2, rel=1e-6)


def test_cross_entropy_all_ignored_is_zero_not_nan() -> None:
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    loss = CrossEntropyLoss()(logits, torch.full((1, 2, 2), IGNORE))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.count_nonzero(logits.grad) == 0


def _sig(v: float) -> float:
    return 1 / (1 + math.exp(-v))


def test_bce_with_ignore_and_weights_by_hand() -> None:
    x = [1.5, -0.5, 2.0, 0.3]
    y = [1, 0, IGNORE, 0]
    logits = torch.tensor(x).reshape(1, 1, 2, 2)
    target = torch.tensor(y).reshape(1, 2, 2)
    terms = [-math.log(_sig(x[0])), -math.log(1 - _sig(x[1])), -math.log(1 - _sig(x[3]))]
    assert BCEWithLogits()(logits, target).item() == pytest.approx(sum(terms) / 3, rel=1e-6)
    w_bg, w_fg = 0.25, 3.0
    weighted = (w_fg * terms[0] + w_bg * terms[1] + w_bg * terms[2]) / (w_fg + 2 * w_bg)
    loss = BCEWithLogits(weight=torch.tensor([w_bg, w_fg]))(logits, target)
    assert loss.item() == pytest.approx(weighted, rel=1e-6)


def test_dice_multiclass_by_hand_with_absent_class() -> None:
    # Probabilities given directly; 4 pixels, 3 classes, class 2 absent from the target.
    p = [[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]]
    t = [0, 0, 1, 1]
    prob = torch.tensor(p).T.reshape(1, 3, 1, 4)
    target = torch.tensor(t).reshape(1, 1, 4)
    smooth = 1.0
    losses = []
    for c in range(3):
        inter = sum(p[i][c] for i in range(4) if t[i] == c)
        card = sum(p[i][c] for i in range(4)) + sum(1 for i in range(4) if t[i] == c)
        present = any(label == c for label in t)
        losses.append((1 - (2 * inter + smooth) / (card + smooth)) if present else 0.0)
    expected = sum(losses) / 3
    loss = DiceLoss(smooth=smooth, from_logits=False)(prob, target)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_dice_perfect_prediction_is_near_zero() -> None:
    target = torch.randint(0, 4, (2, 8, 9))
    logits = 30.0 * torch.nn.functional.one_hot(target, 4).permute(0, 3, 1, 2).float()
    assert DiceLoss()(logits, target).item() < 1e-4
    assert DiceLoss()(-logits, target).item() > 0.5  # and a wrong one is not


def test_dice_ignored_pixels_do_not_change_the_loss() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 6, 7)
    target = torch.randint(0, 3, (2, 6, 7))
    target[:, :2] = IGNORE
    loss = DiceLoss()(logits, target)
    logits2 = logits.clone()
    logits2[:, :, :2] = 50 * torch.randn(2, 3, 2, 7)
    assert DiceLoss()(logits2, target).item() == pytest.approx(loss.item(), rel=1e-6)
    # ... and equal the loss of the non-ignored pixels alone.
    alone = DiceLoss()(logits[:, :, 2:], target[:, 2:])
    assert alone.item() == pytest.approx(loss.item(), rel=1e-6)


def test_binary_dice_by_hand() -> None:
    x = [2.0, -1.0, 0.5, 3.0]
    y = [1, 0, 1, IGNORE]
    logits = torch.tensor(x).reshape(1, 1, 1, 4)
    target = torch.tensor(y).reshape(1, 1, 4)
    p = [_sig(v) for v in x[:3]]
    inter = p[0] + p[2]
    expected = 1 - (2 * inter + 1.0) / (sum(p) + 2 + 1.0)
    assert DiceLoss("binary")(logits, target).item() == pytest.approx(expected, rel=1e-6)
    # A batch with no foreground gives no Dice signal (BCE carries it in "bce+dice").
    assert DiceLoss("binary")(logits, torch.zeros(1, 1, 4, dtype=torch.long)).item() == 0.0


def test_bce_plus_dice_is_the_weighted_sum() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 1, 5, 5, requires_grad=True)
    target = torch.randint(0, 2, (2, 5, 5))
    target[0, 0] = IGNORE
    loss = build_loss("bce+dice", num_classes=1, dice_weight=0.5)
    assert isinstance(loss, CombinedLoss)
    expected = BCEWithLogits()(logits, target) + 0.5 * DiceLoss("binary")(logits, target)
    value = loss(logits, target)
    assert value.item() == pytest.approx(expected.item(), rel=1e-6)
    value.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_ce_plus_dice_with_class_weights() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 4)
    target = torch.randint(0, 3, (2, 4, 4))
    w = [1.0, 2.0, 0.5]
    loss = build_loss("ce+dice", num_classes=3, class_weights=w, smooth=0.5)
    expected = CrossEntropyLoss(weight=torch.tensor(w))(logits, target) + DiceLoss(smooth=0.5)(
        logits, target
    )
    assert loss(logits, target).item() == pytest.approx(expected.item(), rel=1e-6)


def test_factory_builds_every_name() -> None:
    for name in LOSS_NAMES:
        num_classes = 1 if name.startswith("bce") else 3
        loss = build_loss(name, num_classes=num_classes)
        logits = torch.randn(1, num_classes, 4, 4)
        target = torch.randint(0, max(num_classes, 2), (1, 4, 4))
        assert torch.isfinite(loss(logits, target))
    assert build_loss("dice", num_classes=1).mode == "binary"
    assert build_loss("dice", num_classes=3).mode == "multiclass"


@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [
        ("focal", {"num_classes": 3}, "ce, dice, ce\\+dice, bce, bce\\+dice"),
        ("bce", {"num_classes": 3}, "num_classes=1"),
        ("bce+dice", {"num_classes": 2}, "num_classes=1"),
        ("ce", {"num_classes": 1}, "bce"),
        ("ce+dice", {"num_classes": 1}, "bce"),
        ("ce", {"num_classes": 3, "class_weights": [1.0, 2.0]}, "expected 3"),
        ("bce", {"num_classes": 1, "class_weights": [1.0]}, "expected 2"),
        ("ce", {"num_classes": 3, "class_weights": [1.0, -1.0, 1.0]}, ">= 0"),
        ("dice", {"num_classes": 3, "class_weights": [1.0, 1.0, 1.0]}, "no class_weights"),
        ("ce", {"num_classes": 3, "smooth": 1.0}, "no option smooth"),
    ],
)
def test_factory_errors(name: str, kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        build_loss(name, **kwargs)


def test_dice_runs_in_float32_for_half_inputs() -> None:
    # Per-class sums over many pixels overflow float16 (max 65504).
    target = torch.ones(1, 300, 300, dtype=torch.long)
    logits = torch.zeros(1, 2, 300, 300, dtype=torch.float16)
    logits[:, 1] = 20.0
    loss = DiceLoss()(logits, target)
    assert loss.dtype == torch.float32 and loss.item() < 1e-3


# ---------------------------------------------------------------- online hard example mining


def _ohem_case() -> tuple[torch.Tensor, torch.Tensor]:
    # 1 x 3 classes x 2 x 3 pixels; the true class's probability rises from left to right.
    target = torch.tensor([[[0, 1, 2], [0, 255, 1]]])
    logits = torch.zeros(1, 3, 2, 3)
    margins = torch.tensor([[-1.0, 0.5, 2.0], [4.0, 0.0, 6.0]])
    logits.scatter_(1, target.clamp(max=2).unsqueeze(1), margins.unsqueeze(0).unsqueeze(0))
    return logits, target


def test_ohem_counts_only_pixels_below_the_threshold() -> None:
    from denseseg.losses.cross_entropy import OhemCrossEntropyLoss

    logits, target = _ohem_case()
    prob = logits.softmax(1).gather(1, target.clamp(max=2).unsqueeze(1)).squeeze(1)
    hard = (prob < 0.7) & (target != 255)
    assert hard.sum() == 2  # the two left-most of the top row
    expected = F.cross_entropy(logits, torch.where(hard, target, 255), ignore_index=255)
    loss = OhemCrossEntropyLoss(thresh=0.7, min_kept=1)
    assert loss(logits, target).item() == pytest.approx(expected.item())
    # min_kept raises the threshold to keep the hardest 4 of the 5 labelled pixels.
    four = OhemCrossEntropyLoss(thresh=0.7, min_kept=4)
    keep = (prob <= prob[target != 255].kthvalue(4).values) & (target != 255)
    assert keep.sum() == 4
    expected4 = F.cross_entropy(logits, torch.where(keep, target, 255), ignore_index=255)
    assert four(logits, target).item() == pytest.approx(expected4.item())
    # More than the labelled pixels asked for: all of them, plain cross-entropy.
    every = OhemCrossEntropyLoss(thresh=0.1, min_kept=100)
    plain = F.cross_entropy(logits, target, ignore_index=255)
    assert every(logits, target).item() == pytest.approx(plain.item())


def test_ohem_statistics_agree_with_forward_and_gradients_skip_easy_pixels() -> None:
    from denseseg.losses.cross_entropy import OhemCrossEntropyLoss

    logits, target = _ohem_case()
    logits.requires_grad_(True)
    loss = OhemCrossEntropyLoss(thresh=0.7, min_kept=1, weight=torch.tensor([1.0, 2.0, 3.0]))
    value = loss(logits, target)
    assert loss.from_statistics(loss.statistics(logits, target)).item() == pytest.approx(
        value.item()
    )
    value.backward()
    grad = logits.grad.abs().sum(1)[0]
    assert (grad[0, :2] > 0).all() and (grad[0, 2] == 0) and (grad[1] == 0).all()


def test_ohem_from_the_recipe() -> None:
    from denseseg.losses.cross_entropy import OhemCrossEntropyLoss

    loss = build_loss("ce", num_classes=3, ohem_thresh=0.7, ohem_min_kept=10)
    assert isinstance(loss, OhemCrossEntropyLoss) and (loss.thresh, loss.min_kept) == (0.7, 10)
    assert type(build_loss("ce", num_classes=3, ohem_thresh=None)) is not OhemCrossEntropyLoss
    with pytest.raises(ConfigError, match="has no option ohem_thresh"):
        build_loss("dice", num_classes=3, ohem_thresh=0.7)
