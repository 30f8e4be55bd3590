"""U-Net's border weight map: components, two-nearest distances, the map, its loss, the recipe."""

from __future__ import annotations

import collections
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_recipe
from denseseg.config import load_config
from denseseg.data.components import label_components, two_nearest_distances
from denseseg.engine.trainer import train
from denseseg.errors import ConfigError
from denseseg.losses.weight_map import (
    PixelWeightedCrossEntropy,
    WithWeightMap,
    parse_weight_map,
    unet_weight_map,
)


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


def _two_cells() -> torch.Tensor:
    """9x11: cells in columns 0-3 and 7-10, a 3-pixel membrane (class 0) between them."""
    target = torch.ones(9, 11, dtype=torch.int64)
    target[:, 4:7] = 0
    return target


def test_two_cell_mask_by_hand() -> None:
    target = _two_cells()
    w = unet_weight_map(target, w0=10, sigma=5)
    # w_c balances 27 membrane and 72 cell pixels: n / (K n_k).
    w_mem, w_cell = 99 / (2 * 27), 99 / (2 * 72)
    # Every membrane pixel has d1 + d2 = 4 (1 + 3, 2 + 2, 3 + 1).
    border = 10 * math.exp(-(4**2) / (2 * 5**2))
    assert torch.allclose(w[:, 4:7], torch.full((9, 3), w_mem + border))
    assert torch.allclose(w[target == 1], torch.tensor(w_cell))
    # Given class weights replace the per-sample balancing; ignored pixels weigh 0.
    target[0, 5] = 255
    w = unet_weight_map(target, w0=10, sigma=5, class_weights=[2.0, 0.5])
    assert w[0, 5] == 0 and torch.isclose(w[1, 5], torch.tensor(2.0 + border))
    assert torch.allclose(w[target == 1], torch.tensor(0.5))
    # Farther apart, the border term fades: 3 + 5 px -> exp(-64 / 50).
    wide = torch.ones(5, 15, dtype=torch.int64)
    wide[:, 4:11] = 0
    w = unet_weight_map(wide, w0=10, sigma=5, class_weights=[1.0, 1.0])
    assert torch.isclose(w[2, 6], torch.tensor(1 + 10 * math.exp(-64 / 50)))


def test_one_cell_has_no_border_term_and_weights_follow_the_augmented_target() -> None:
    target = _two_cells()
    single = target[:, :6]  # the second cell cropped away: no second-nearest cell
    w = unet_weight_map(single, class_weights=[1.0, 1.0])
    assert torch.equal(w, torch.ones(9, 6))

    # The pipeline computes the map after its transforms (here a crop), so the map is the
    # cropped target's, not a crop of the full target's map.
    def crop(image: torch.Tensor, tgt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return image[..., :6], tgt[:, :6]

    image, out, weights = WithWeightMap(crop, class_weights=[1.0, 1.0])(
        torch.zeros(1, 9, 11), target
    )
    assert out.shape == weights.shape == (9, 6)
    assert torch.equal(weights, torch.ones(9, 6))
    assert not torch.equal(weights, unet_weight_map(target, class_weights=[1.0, 1.0])[:, :6])


def test_weighted_cross_entropy() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 5, 6, generator=g, requires_grad=True)
    target = torch.randint(0, 3, (2, 5, 6), generator=g)
    target[0, 0, :3] = 255
    class_w = torch.tensor([0.5, 2.0, 1.0])
    pixel_w = class_w[target.clamp_max(2)]
    loss = PixelWeightedCrossEntropy()(logits, target, pixel_w)
    ref = F.cross_entropy(logits, target, weight=class_w, ignore_index=255)
    assert torch.isclose(loss, ref)
    loss.backward()
    assert logits.grad is not None and logits.grad[0, :, 0, :3].abs().sum() == 0
    zero = PixelWeightedCrossEntropy()(logits, target, torch.zeros_like(pixel_w))
    assert zero.item() == 0.0


def test_recipe_option_parsing() -> None:
    assert parse_weight_map(None) is None
    assert parse_weight_map("unet") == {"w0": 10.0, "sigma": 5.0, "foreground": 1}
    assert parse_weight_map({"w0": 5, "sigma": 3})["sigma"] == 3.0
    for bad, msg in (
        ("dist", "only weight map"),
        ({"w1": 3}, "unknown keys"),
        ({"w0": -1}, ">= 0"),
    ):
        with pytest.raises(ConfigError, match=msg):
            parse_weight_map(bad)


def test_training_with_the_weight_map(tiny_dataset: Path, tmp_path: Path) -> None:
    over = tiny_recipe(
        tiny_dataset,
        tmp_path / "run",
        **{"train.max_steps": 2, "train.eval_every": 0, "loss.weight_map": "unet"},
    )
    result = train(load_config("unet_demo", over))
    assert result["step"] == 2
    over = tiny_recipe(tiny_dataset, tmp_path / "run2", **{"loss.weight_map": "unet"})
    with pytest.raises(ConfigError, match="loss.name: ce"):
        train(load_config("unet_demo", [*over, "loss.name=dice"]))
