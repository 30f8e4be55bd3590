"""U-Net's border weight map: the map, its loss, the recipe (components: test_ops_components)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_recipe
from denseseg.config import load_config
from denseseg.engine.trainer import train
from denseseg.errors import ConfigError
from denseseg.losses.weight_map import (
    PixelWeightedCrossEntropy,
    WithWeightMap,
    parse_weight_map,
    unet_weight_map,
)


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
