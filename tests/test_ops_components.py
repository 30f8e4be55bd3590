"""denseseg.ops.components: connected components and two-nearest distances against brute force."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch

from denseseg.ops.components import label_components, two_nearest_distances


def _flood_fill_labels(mask: np.ndarray) -> np.ndarray:
    """Reference 4-connected labelling, components numbered in raster order."""
    lab = np.zeros(mask.shape, int)
    k = 0
    h, w = mask.shape
    for y, x in zip(*np.nonzero(mask)):
        if lab[y, x]:
            continue
        k += 1
        lab[y, x] = k
        queue = collections.deque([(y, x)])
        while queue:
            a, b = queue.popleft()
            for c, d in ((a + 1, b), (a - 1, b), (a, b + 1), (a, b - 1)):
                if 0 <= c < h and 0 <= d < w and mask[c, d] and not lab[c, d]:
                    lab[c, d] = k
                    queue.append((c, d))
    return lab


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_components_and_distances_match_brute_force(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(23, 31, generator=g) > 0.6
    labels, n = label_components(mask)
    ref = _flood_fill_labels(mask.numpy())
    assert n == ref.max() and np.array_equal(labels.numpy(), ref)

    reach = 6.5
    d1, d2 = two_nearest_distances(labels, reach)
    ys, xs = np.mgrid[: mask.shape[0], : mask.shape[1]]
    per = []
    for c in range(1, n + 1):
        pts = np.argwhere(ref == c)
        dist = (ys[..., None] - pts[:, 0]) ** 2 + (xs[..., None] - pts[:, 1]) ** 2
        per.append(np.sqrt(dist.min(-1)))
    per = np.sort(np.stack(per), 0)
    for got, want in ((d1, per[0]), (d2, per[1])):
        want = np.where(want <= reach, want, np.inf)
        assert np.allclose(got.numpy(), want)
    # Restricting to some pixels computes the same values there.
    where = ~mask
    e1, e2 = two_nearest_distances(labels, reach, where=where)
    assert torch.equal(e1[where], d1[where]) and torch.isinf(e1[~where]).all()
    assert torch.equal(e2[where], d2[where])


def test_components_edge_cases() -> None:
    assert label_components(torch.zeros(3, 4, dtype=torch.bool))[1] == 0
    full, n = label_components(torch.ones(3, 4, dtype=torch.bool))
    assert n == 1 and (full == 1).all()
    # Diagonal neighbours are not 4-connected; a U shape is one component.
    diag = torch.tensor([[1, 0], [0, 1]], dtype=torch.bool)
    assert label_components(diag)[1] == 2
    u = torch.tensor([[1, 0, 1], [1, 0, 1], [1, 1, 1]], dtype=torch.bool)
    assert label_components(u)[1] == 1
