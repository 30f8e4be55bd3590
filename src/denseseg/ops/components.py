"""Connected components of binary masks and distances to the two nearest components, in torch.

Used by U-Net's border weight map (:mod:`denseseg.losses.weight_map`) and by the ISBI 2012
Rand error (:mod:`denseseg.metrics.isbi`). Written on torch tensors rather than with
``scipy.ndimage`` (``label``, ``distance_transform_edt``): scipy is not a denseseg dependency,
and these run inside data-loader workers on every augmented sample, so they are vectorised
over the whole image.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

__all__ = ["label_components", "two_nearest_distances"]


def label_components(mask: Tensor) -> tuple[Tensor, int]:
    """Label the 4-connected components of a binary mask.

    Run-based: each row's foreground runs get ids, runs that touch a run of the row above are
    joined (label propagation over the run graph with pointer jumping), and the pixels take their
    run's component. Components are numbered ``1..n`` in raster order of their first pixel, as
    ``scipy.ndimage.label`` does.

    Args:
        mask: ``(H, W)`` bool (or 0/1) tensor; True pixels are foreground.

    Returns:
        ``(labels, n)``: int64 ``(H, W)`` on the mask's device with 0 for background and
        ``1..n`` for the components, and the number of components ``n``.
    """
    if mask.ndim != 2:
        raise ValueError(f"label_components expects an (H, W) mask, got {tuple(mask.shape)}")
    fg = mask.detach().cpu().bool().numpy()
    h, w = fg.shape
    starts = fg.copy()
    starts[:, 1:] &= ~fg[:, :-1]
    run = np.cumsum(starts.ravel()).reshape(h, w) * fg  # run ids 1..R, 0 on background
    n_runs = int(run.max()) if fg.any() else 0
    parent = np.arange(n_runs + 1)
    touch = fg[1:] & fg[:-1]
    if n_runs and touch.any():
        # One edge per pair of touching runs (not per touching pixel).
        pairs = np.unique(run[:-1][touch] * (n_runs + 1) + run[1:][touch])
        a, b = pairs // (n_runs + 1), pairs % (n_runs + 1)
        while True:
            low = np.minimum(parent[a], parent[b])
            new = parent.copy()
            np.minimum.at(new, a, low)
            np.minimum.at(new, b, low)
            new = new[new]  # pointer jumping: follow each run's root one level further
            if np.array_equal(new, parent):
                break
            parent = new
    # Roots are the smallest run id of each component: numbering roots in order gives raster
    # order of the components' first pixels.
    roots = np.unique(parent[1:])
    relabel = np.zeros(n_runs + 1, dtype=np.int64)
    relabel[roots] = np.arange(1, len(roots) + 1)
    labels = relabel[parent][run]
    return torch.from_numpy(labels).to(mask.device), len(roots)


def _two_nearest(cand: Tensor, dist: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per pixel, the nearest and the nearest other label among ``K`` candidates.

    Args:
        cand: int ``(K, ...)`` candidate labels (0 = none).
        dist: float ``(K, ...)`` their (squared) distances.

    Returns:
        ``(d1, l1, d2, l2)`` of shape ``(...)``; ``inf`` and 0 where there is none.
    """
    dist = torch.where(cand != 0, dist, torch.inf)
    d1, k1 = dist.min(0)
    l1 = cand.gather(0, k1[None])[0]
    d2, k2 = torch.where(cand == l1, torch.inf, dist).min(0)
    l2 = cand.gather(0, k2[None])[0]
    return d1, torch.where(d1.isinf(), 0, l1), d2, torch.where(d2.isinf(), 0, l2)


def _two_nearest_above(lab: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """In each column, the nearest labelled pixel at or above each row, and the nearest one above
    it with another label: ``(label1, dy1, label2, dy2)``, dy = inf where there is none."""
    h = lab.shape[0]
    rows = torch.arange(h, device=lab.device).view(h, 1).expand_as(lab)
    nz = lab != 0
    none = torch.full_like(rows, -1)
    last = torch.where(nz, rows, none).cummax(0).values  # last labelled row <= y
    prev = torch.cat([none[:1], last[:-1]])  # last labelled row < y
    prev_label = lab.gather(0, prev.clamp_min(0)) * (prev >= 0)
    # A labelled pixel starts a group when the labelled pixel before it has another label;
    # the nearest other label above any pixel of a group is the one just before the group.
    start = torch.where(nz & (prev_label != lab), rows, none).cummax(0).values
    before = prev.gather(0, start.clamp_min(0))
    other = torch.where(last >= 0, before.gather(0, last.clamp_min(0)), none)
    out = []
    for pos in (last, other):
        label = lab.gather(0, pos.clamp_min(0)) * (pos >= 0)
        out += [label, torch.where(pos >= 0, (rows - pos).float(), torch.inf)]
    return out[0], out[1], out[2], out[3]


def two_nearest_distances(
    labels: Tensor, max_distance: float, where: Tensor | None = None, chunk: int = 32768
) -> tuple[Tensor, Tensor]:
    """Euclidean distance from pixels to their nearest and second-nearest component.

    The distance to a component is the distance between pixel centres to its closest pixel
    (0 inside it). Exact (the numbers ``scipy.ndimage.distance_transform_edt`` gives on each
    component's complement, sorted per pixel) for distances up to ``max_distance``; larger ones
    are returned as ``inf``, which bounds the work to ``O(H W max_distance)``.

    Method: the squared distance separates into a column pass (vertical distance to the
    components in the same column, found with cumulative maxima, so in ``O(H W)``) and a row pass
    (minimum over columns ``|dx| <= max_distance`` of ``dx^2 + dy^2``). Keeping only the two
    nearest distinct components of each column is exact: a component that is third in some
    column is beaten, through that same column, by two others.

    Args:
        labels: int ``(H, W)`` component labels, 0 for background (:func:`label_components`).
        max_distance: largest distance computed, in pixels.
        where: optional bool ``(H, W)``: compute only these pixels (the others get ``inf``).
        chunk: pixels processed at once in the row pass (bounds the memory to about
            ``chunk * (2 max_distance + 1) * 16`` bytes).

    Returns:
        ``(d1, d2)``: float32 ``(H, W)`` distances to the nearest and second-nearest component
        (``inf`` where there is none within ``max_distance``).
    """
    if labels.ndim != 2:
        raise ValueError(f"two_nearest_distances expects (H, W) labels, got {tuple(labels.shape)}")
    lab = labels.long()
    h, w = lab.shape
    up = _two_nearest_above(lab)
    down = _two_nearest_above(lab.flip(0))
    cand = torch.stack([up[0], up[2], down[0].flip(0), down[2].flip(0)])
    dist = torch.stack([up[1], up[3], down[1].flip(0), down[3].flip(0)]).square()
    g1, l1, g2, l2 = _two_nearest(cand, dist)  # squared column distances

    r = max(int(math.floor(max_distance)), 0)
    dx = torch.arange(-r, r + 1, device=lab.device)
    limit = float(max_distance) ** 2
    d1 = torch.full((h * w,), torch.inf, device=lab.device)
    d2 = d1.clone()
    idx = (
        torch.arange(h * w, device=lab.device) if where is None else where.flatten().nonzero()[:, 0]
    )
    labs = torch.stack([l1, l2]).view(2, -1).to(torch.int32)
    dists = torch.stack([g1, g2]).view(2, -1)
    for part in idx.split(chunk):
        ys, xs = part // w, part % w
        xx = xs[None] + dx[:, None]  # (K, n)
        inside = (xx >= 0) & (xx < w)
        flat = (ys[None] * w + xx.clamp(0, w - 1)).expand(2, -1, -1)  # (2, K, n)
        c = labs.gather(1, flat.reshape(2, -1)).view(2, len(dx), -1) * inside
        d = dists.gather(1, flat.reshape(2, -1)).view(2, len(dx), -1) + dx.view(1, -1, 1) ** 2
        e1, _, e2, _ = _two_nearest(c.flatten(0, 1), d.flatten(0, 1))
        d1[part], d2[part] = e1, e2
    d1, d2 = d1.view(h, w), d2.view(h, w)
    inf = torch.full_like(d1, torch.inf)
    return torch.where(d1 <= limit, d1.sqrt(), inf), torch.where(d2 <= limit, d2.sqrt(), inf)
