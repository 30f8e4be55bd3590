"""Overlap-tile inference (U-Net paper, Fig. 2) as a Segmenter mode: the tile plan, equality with
whole-image inference, agreement with a same-padding twin in the interior, any image size."""

from __future__ import annotations

import pytest
import torch

from denseseg.errors import ConfigError
from denseseg.inference.segmenter import Segmenter, plan_tiles
from denseseg.models import UNet, create_model

MEAN, STD = [0.5], [0.25]


def _valid_unet(depth: int, seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    return UNet(num_classes=3, in_channels=1, base_channels=4, depth=depth, padding="valid")


def test_plan_for_the_papers_unet() -> None:
    # Arithmetic only (no forward): a 1-channel-wide net has the paper's geometry.
    net = UNet(num_classes=2, in_channels=1, base_channels=1, padding="valid")
    plan = plan_tiles(1000, net, 580)  # rounded down to the accepted 572
    assert (plan.tile_in, plan.tile_out, plan.border) == (572, 388, 92)
    # 388 = 24 * 16 + 4: tiles step by 384 so every tile keeps the first one's pooling grid.
    assert plan.starts == (0, 384, 768) and plan.covered >= 1000
    one = plan_tiles(300, net, 572)  # one tile suffices: the smallest that covers the image
    assert one.starts == (0,) and one.tile_out >= 300 and one.tile_in == 492
    assert plan_tiles(300, net) == one  # the whole-image (single-tile) plan


@pytest.mark.parametrize(("depth", "tile"), [(2, 64), (3, 124)])
def test_overlap_tile_equals_whole_image(depth: int, tile: int) -> None:
    # Whole-image inference of a valid network is the single-tile case of the tiler; several
    # tiles on the same pooling grid must give the same logits.
    model = _valid_unet(depth)
    whole = Segmenter(model, mean=MEAN, std=STD, device="cpu")
    tiled = Segmenter(model, mean=MEAN, std=STD, device="cpu", mode="overlap_tile", tile_size=tile)
    x = torch.randn(2, 1, 75, 93)
    rows = plan_tiles(75, model, tile)
    assert len(rows.starts) > 2
    if depth == 3:  # output tile 36 = 4 * 8 + 4: steps of 32, neighbouring outputs overlap
        assert rows.tile_out == 36 and rows.starts[1] == 32
    a, b = whole.logits(x), tiled.logits(x)
    assert a.shape == b.shape == (2, 3, 75, 93)
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5 * a.abs().max().item())


@pytest.mark.parametrize(("depth", "tile"), [(2, 64), (3, 124)])
def test_interior_agrees_with_same_padding_twin(depth: int, tile: int) -> None:
    # A valid and a same-padding U-Net with identical weights compute the same function wherever
    # no padding is involved, provided both pool on the same grid. Same padding pools pixel pairs
    # (0, 1), (2, 3), ... of its input (we give it a multiple of 2**depth, so it pads nothing
    # itself). The tiler starts a tile `border` pixels before the image, and the valid net's
    # two 3x3 convolutions before the pooling at level k shift its grid by 2 * 2**k pixels, so
    # it pools on pairs starting at image offset -border + 2 + 4 + ... + 2**depth, which is
    # -(border + 2) = 2 (mod 2**depth) for a U-Net (border = 6 * 2**depth - 4). So the twin is run
    # on the image without its first 2 rows and columns; with any other offset the grids differ.
    model = _valid_unet(depth)
    twin = UNet(3, in_channels=1, base_channels=4, depth=depth, padding="same").eval()
    twin.load_state_dict(model.state_dict())
    seg = Segmenter(model, mean=MEAN, std=STD, device="cpu", mode="overlap_tile", tile_size=tile)
    g = 2**depth
    plan = plan_tiles(100, model, tile)
    offset = -(plan.border + 2) % g
    assert offset == 2
    margin = plan.border + g  # the twin's zero padding reaches this far in
    side = 2 * margin + 2 * g  # the twin's input: a multiple of the grid, with some interior
    x = torch.randn(1, 1, offset + side, offset + side + g)
    tiled = seg.logits(x)
    assert len(plan_tiles(x.shape[-1], model, tile).starts) > 2
    inner = (..., slice(margin, -margin), slice(margin, -margin))

    def twin_error(d: int) -> float:
        with torch.no_grad():
            y = twin(x[..., d : d + side, d : d + side + g])["out"]
        ref = tiled[..., d : d + side, d : d + side + g]
        return ((y - ref)[inner].abs().max() / ref[inner].abs().max()).item()

    assert twin_error(offset) < 1e-5
    assert twin_error(0) > 1e-2 and twin_error(offset + 1) > 1e-2


@pytest.mark.parametrize("size", [(1, 1), (3, 5), (37, 53), (130, 20)])
def test_any_image_size(size: tuple[int, int]) -> None:
    model = _valid_unet(2)
    seg = Segmenter(
        model, mean=MEAN, std=STD, device="cpu", mode="overlap_tile", tile_size=(64, 56)
    )
    image = torch.randint(0, 256, (1, *size), dtype=torch.uint8)
    assert seg.predict(image).shape == size
    probs = seg.predict_proba(image)
    assert probs.shape == (3, *size)
    torch.testing.assert_close(probs.sum(0), torch.ones(size))
    assert "overlap_tile" in repr(seg)


def test_mode_errors() -> None:
    valid = _valid_unet(2)
    with pytest.raises(ConfigError, match="tile_size"):
        Segmenter(valid, mean=MEAN, std=STD, device="cpu", mode="overlap_tile")
    with pytest.raises(ConfigError, match="tile_size >= 44"):  # 44 -> 4 output pixels = 2**2
        Segmenter(valid, mean=MEAN, std=STD, device="cpu", mode="overlap_tile", tile_size=43)
    with pytest.raises(ConfigError, match="sliding"):
        Segmenter(valid, mean=MEAN, std=STD, device="cpu", mode="sliding")
    same = create_model("unet", num_classes=2, in_channels=1, base_channels=4, depth=2)
    with pytest.raises(ConfigError, match="valid-padding"):
        Segmenter(same, mean=MEAN, std=STD, device="cpu", mode="overlap_tile", tile_size=64)
    with pytest.raises(ConfigError, match="tile_size"):
        Segmenter(valid, mean=MEAN, std=STD, device="cpu", mode="overlap_tile", tile_size=(64,))
