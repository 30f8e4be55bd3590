"""ISBI 2012 metrics: foreground-restricted Rand error, pixel error, membrane IoU."""

from __future__ import annotations

import itertools
from math import comb

import numpy as np
import pytest
import torch

from denseseg.metrics.isbi import ISBIMetrics, evaluate_isbi, rand_pair_counts, rand_scores
from denseseg.ops.components import label_components


def _brute_force_pairs(gt_cells: torch.Tensor, pred_cells: torch.Tensor) -> tuple[int, int, int]:
    """Count the pairs one by one, straight from the definition."""
    gt, _ = label_components(gt_cells)
    pred, _ = label_components(pred_cells)
    pixels = [(int(g), int(p)) for g, p in zip(gt.flatten(), pred.flatten()) if g > 0]
    both = truth = together = 0
    for (ga, pa), (gb, pb) in itertools.combinations(pixels, 2):
        same_gt, same_pred = ga == gb, pa == pb and pa > 0  # predicted membrane: singletons
        truth += same_gt
        together += same_pred
        both += same_gt and same_pred
    return both, truth, together


def _two_cells() -> torch.Tensor:
    """6x9 target: cells in columns 0-3 (24 px) and 5-8 (24 px), membrane in column 4."""
    target = torch.ones(6, 9, dtype=torch.int64)
    target[:, 4] = 0
    return target


def test_pair_counts_by_hand() -> None:
    gt = _two_cells() == 1
    # A perfect prediction.
    assert rand_scores(*rand_pair_counts(gt, gt))["error"] == 0.0
    # Merging the two cells: every pair across them is a false merge.
    both, truth, pred = rand_pair_counts(gt, torch.ones_like(gt))
    assert (both, truth, pred) == (2 * comb(24, 2), 2 * comb(24, 2), comb(48, 2))
    # Splitting the left cell by a predicted membrane column (its 6 pixels become singletons).
    split = gt.clone()
    split[:, 1] = False
    both, truth, pred = rand_pair_counts(gt, split)
    expected_pred = comb(6, 2) + comb(12, 2) + comb(24, 2)
    assert (both, truth, pred) == (expected_pred, 2 * comb(24, 2), expected_pred)
    s = rand_scores(both, truth, pred)
    assert s["precision"] == 1.0 and s["recall"] == pytest.approx(expected_pred / truth)
    assert s["error"] == pytest.approx(1 - 2 * both / (truth + pred))


@pytest.mark.parametrize("seed", [0, 1])
def test_pair_counts_match_brute_force(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    gt = torch.rand(9, 11, generator=g) > 0.35
    pred = gt.clone()
    pred[torch.rand(9, 11, generator=g) > 0.8] ^= True
    assert rand_pair_counts(gt, pred) == _brute_force_pairs(gt, pred)


def test_against_scikit_image_adapted_rand_error() -> None:
    metrics = pytest.importorskip("skimage.metrics")
    g = torch.Generator().manual_seed(3)
    gt = torch.rand(20, 24, generator=g) > 0.3
    # Where the prediction has no membrane inside ground-truth cells the two definitions agree
    # (scikit-image keeps predicted label 0 as one segment, Fiji as single pixels).
    pred = gt | (torch.rand(20, 24, generator=g) > 0.5)
    gt_lab, pred_lab = label_components(gt)[0].numpy(), label_components(pred)[0].numpy()
    error = metrics.adapted_rand_error(gt_lab, pred_lab, ignore_labels=(0,))[0]
    assert rand_scores(*rand_pair_counts(gt, pred))["error"] == pytest.approx(error)


def test_streaming_metrics_pick_the_best_threshold() -> None:
    target = _two_cells()
    # The membrane column gets probability 0.6 of being cell: at 0.5 the cells merge, at
    # thresholds >= 0.6 they are apart.
    prob = torch.where(target == 1, 0.9, 0.6)
    m = ISBIMetrics()
    m.update(prob, target)
    m.update(target.float(), target)  # a perfect second slice
    out = m.compute()
    assert out["slices"] == 2 and out["rand_error"] == 0.0 and out["rand_threshold"] == 0.6
    merged = comb(48, 2)
    both = 2 * comb(24, 2)
    expected = 1 - 2 * (2 * both) / (2 * both + merged + both)  # counts summed over slices
    assert out["rand_error_at_0.5"] == pytest.approx(expected)
    # Pixel error and membrane IoU at 0.5: the 6 membrane pixels of slice one are wrong.
    assert out["pixel_error"] == pytest.approx(6 / (2 * 54))
    assert out["pixel_error_min"] == 0.0 and out["pixel_threshold"] == 0.6
    assert out["membrane_IoU"] == pytest.approx(6 / 12)


def test_ignored_pixels_and_shapes() -> None:
    target = _two_cells()
    target[0, 4] = 255
    m = ISBIMetrics()
    m.update(torch.where(target == 1, 1.0, 0.0), target)
    out = m.compute()
    assert out["pixel_error"] == 0.0 and out["membrane_IoU"] == 1.0
    with pytest.raises(ValueError, match="expects"):
        m.update(torch.zeros(2, 3), torch.zeros(3, 2, dtype=torch.int64))


class _Oracle:
    """A stand-in segmenter for images that hold their own labels (0 membrane, 1 cell)."""

    def predict_proba(self, image: torch.Tensor) -> torch.Tensor:
        t = image[0].long()
        return torch.stack([1.0 - t.float(), t.float()])


def test_evaluate_isbi_runs_a_segmenter_over_a_dataset() -> None:
    target = _two_cells()
    dataset = [(target[None].to(torch.uint8), target)] * 3
    out = evaluate_isbi(_Oracle(), dataset)
    assert out["slices"] == 3 and out["rand_error"] == 0.0 and out["pixel_error"] == 0.0
    assert np.isclose(out["membrane_IoU"], 1.0)
