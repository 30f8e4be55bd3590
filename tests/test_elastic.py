"""U-Net's elastic deformation: a 3x3 grid of 10-px Gaussian displacements, bicubically
interpolated; images and masks warped by one field, masks by nearest neighbour."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as nnf
from torchvision import tv_tensors

from denseseg.data.elastic import ElasticDeformation, displacement_field, warp
from denseseg.errors import ConfigError

IGNORE = 255
LUT = torch.tensor([[10, 200, 30], [60, 20, 220], [120, 90, 5], [240, 140, 80]], dtype=torch.uint8)


def _blocks(h: int = 48, w: int = 64, block: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    labels = (yy // block + 2 * (xx // block)) % 4
    return LUT[labels].permute(2, 0, 1).contiguous(), labels


def test_field_passes_through_the_coarse_grid():
    h, w = 41, 61  # odd sides put the middle control point on a pixel
    field = displacement_field(h, w, sigma=10.0, grid=3, generator=torch.Generator().manual_seed(3))
    coarse = torch.randn(1, 2, 3, 3, generator=torch.Generator().manual_seed(3)) * 10.0
    assert field.shape == (2, h, w) and field.dtype == torch.float32
    for gy, y in enumerate((0, 20, 40)):
        for gx, x in enumerate((0, 30, 60)):
            assert torch.allclose(field[:, y, x], coarse[0, :, gy, gx], atol=1e-4)
    # Bicubic, not bilinear: between control points the field is not piecewise linear.
    bilinear = nnf.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=True)[0]
    assert (field - bilinear).abs().max() > 0.1


def test_field_statistics_and_smoothness():
    g = torch.Generator().manual_seed(0)
    corners = torch.stack([displacement_field(9, 9, 10.0, 3, g)[:, ::4, ::4] for _ in range(300)])
    assert abs(float(corners.std()) - 10.0) < 0.6  # 5400 draws of N(0, 10^2)
    assert abs(float(corners.mean())) < 0.6
    field = displacement_field(200, 200, 10.0, 3, g)
    # A 3x3 grid over 200 px: neighbouring pixels move by a small fraction of a pixel.
    assert field.diff(dim=1).abs().max() < 1.0 and field.diff(dim=2).abs().max() < 1.0


@pytest.mark.parametrize("mode", ["bilinear", "bicubic", "nearest"])
def test_zero_field_is_identity(mode):
    image, labels = _blocks(10, 12, 3)
    zero = torch.zeros(2, 10, 12)
    assert torch.equal(warp(image, zero, mode), image)
    assert torch.equal(warp(labels, zero, "nearest"), labels)


def test_constant_field_shifts():
    image, labels = _blocks(12, 20, 4)
    field = torch.zeros(2, 12, 20)
    field[1] = 3.0  # dx = 3: output x reads input x + 3
    out = warp(image, field, "bilinear", "zeros")
    assert torch.equal(out[..., :17], image[..., 3:])
    assert (out[..., 17:] == 0).all()
    shifted = warp(labels, field, "nearest", "zeros", fill=IGNORE)
    assert torch.equal(shifted[:, :17], labels[:, 3:]) and (shifted[:, 17:] == IGNORE).all()
    mirrored = warp(labels, field, "nearest", "reflection")
    # Mirrored about the last pixel centre (x = 19): x = 20, 21, 22 read 18, 17, 16.
    assert torch.equal(mirrored[:, 17:], labels[:, [18, 17, 16]])


def _interior(labels: torch.Tensor, reach: int) -> torch.Tensor:
    """Pixels whose (2 reach + 1)^2 neighbourhood holds one label, ``reach`` px or more from
    the border.

    Bilinear sampling blends two labels only within 1 px of a label edge (bicubic within 2),
    where some neighbour that close has the other label. At the picture's border that
    neighbour can lie outside (a mirrored sample point walks away from the edge), hence the rim.
    """
    t = labels.float()[None, None]
    k = 2 * reach + 1
    hi = nnf.max_pool2d(t, k, stride=1, padding=reach)
    lo = -nnf.max_pool2d(-t, k, stride=1, padding=reach)
    inside = ((hi == lo) & (t != IGNORE))[0, 0]
    inside[:reach] = inside[-reach:] = False
    inside[:, :reach] = inside[:, -reach:] = False
    return inside


@pytest.mark.parametrize(("interpolation", "reach"), [("bilinear", 2), ("bicubic", 3)])
def test_image_and_mask_move_together(interpolation, reach):
    image, labels = _blocks()
    transform = ElasticDeformation(sigma=10.0, interpolation=interpolation)
    torch.manual_seed(0)
    for _ in range(4):
        out_image, out_mask = transform(tv_tensors.Image(image), tv_tensors.Mask(labels))
        assert isinstance(out_image, tv_tensors.Image) and isinstance(out_mask, tv_tensors.Mask)
        assert out_image.dtype == torch.uint8 and out_mask.dtype == torch.int64
        assert set(out_mask.unique().tolist()) <= {0, 1, 2, 3}  # nearest: no new labels
        assert not torch.equal(out_mask, labels)
        inside = _interior(out_mask, reach)
        want = LUT[out_mask[inside]].float()
        got = out_image.permute(1, 2, 0)[inside].float()
        # Away from label edges the warped colours are exactly their labels' colours.
        assert inside.sum() > 500 and (got - want).abs().max() <= 1.0


def test_zeros_padding_marks_outside_as_ignore():
    image, labels = _blocks(32, 32, 8)
    transform = ElasticDeformation(sigma=25.0, padding_mode="zeros", ignore_index=IGNORE)
    instances = tv_tensors.Mask(torch.ones(2, 32, 32, dtype=torch.uint8))
    torch.manual_seed(1)
    out_image, out_mask, out_inst = transform(
        tv_tensors.Image(image), tv_tensors.Mask(labels), instances
    )
    outside = out_mask == IGNORE
    assert outside.any()  # 25 px displacements reach beyond a 32 px image
    # Bilinear sampling fades to 0 over the last pixel; deeper outside the image is 0.
    deep = -nnf.max_pool2d(-outside.float()[None, None], 3, stride=1, padding=1)[0, 0] > 0
    assert deep.any() and (out_image[:, deep] == 0).all()
    assert (out_inst[:, outside] == 0).all() and (out_inst[:, ~outside] == 1).all()


def test_seeded_probability_and_boxes():
    image, labels = _blocks(16, 16, 4)
    t = ElasticDeformation()
    torch.manual_seed(4)
    a = t(tv_tensors.Image(image), tv_tensors.Mask(labels))
    torch.manual_seed(4)
    b = t(tv_tensors.Image(image), tv_tensors.Mask(labels))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    never = ElasticDeformation(p=0.0)
    assert torch.equal(never(tv_tensors.Image(image)), image)
    boxes = tv_tensors.BoundingBoxes([[0, 0, 4, 4]], format="XYXY", canvas_size=(16, 16))
    with pytest.raises(TypeError, match="cannot move boxes"):
        t(tv_tensors.Image(image), boxes)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"sigma": -1},
        {"grid": 1},
        {"grid": 2.5},
        {"p": 1.5},
        {"interpolation": "nearest"},
        {"padding_mode": "wrap"},
    ],
)
def test_bad_options(kwargs):
    with pytest.raises(ConfigError):
        ElasticDeformation(**kwargs)
