"""Joint transforms: the mask follows the image through scale, crop, pad and flip."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as nnf

from denseseg.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    build_transforms,
    default_mean_std,
)
from denseseg.errors import ConfigError

IGNORE = 255
# One distinct colour per class: the image is a function of the label map.
LUT = torch.tensor(
    [[10, 200, 30], [60, 20, 220], [120, 90, 5], [180, 250, 140], [240, 140, 80]],
    dtype=torch.uint8,
)


def _scene(h: int = 32, w: int = 40, block: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Square blocks labelled (row + 2 * col) % 5; with 5 block columns only the centre one is
    symmetric under a horizontal flip."""
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    labels = (yy // block + 2 * (xx // block)) % 5
    return LUT[labels].permute(2, 0, 1).contiguous(), labels


def _denorm(image: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    return (image * std + mean) * 255


def _misaligned_fraction(image: torch.Tensor, target: torch.Tensor) -> tuple[float, int]:
    """Share of block-interior pixels whose colour is not their label's; interior count.

    Pixels next to a label edge, padding or the border are skipped: bilinear resizing blends the
    image there while the mask stays sharp. One pixel is enough only if the mask is sampled at
    pixel centres like the image (NEAREST_EXACT); plain NEAREST fails this check.
    """
    t = target.float()[None, None]
    hi = nnf.max_pool2d(t, 3, stride=1, padding=1)
    lo = -nnf.max_pool2d(-t, 3, stride=1, padding=1)
    interior = ((hi == lo) & (t != IGNORE))[0, 0]
    # A label edge just outside a crop is invisible to the window, so skip the crop's rim.
    interior[0] = interior[-1] = False
    interior[:, 0] = interior[:, -1] = False
    if not interior.any():
        return 0.0, 0
    want = LUT[target[interior]].float()  # (K, 3)
    got = _denorm(image).permute(1, 2, 0)[interior]
    wrong = (got - want).abs().amax(dim=1) > 1.5
    return float(wrong.float().mean()), int(interior.sum())


def test_default_mean_std():
    assert default_mean_std(3) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert default_mean_std(1) == ((0.5,), (0.5,))
    with pytest.raises(ConfigError):
        default_mean_std(4)


def test_eval_only_normalises():
    image, labels = _scene(7, 9)
    out, target = build_transforms(False, crop_size=4)(image, labels)
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    assert out.dtype == torch.float32 and out.shape == (3, 7, 9)
    assert torch.allclose(out, (image.float() / 255 - mean) / std, atol=1e-5)
    assert target.dtype == torch.int64 and torch.equal(target, labels)
    assert type(out) is torch.Tensor and type(target) is torch.Tensor


def test_one_channel_and_mean_length():
    gray = torch.tensor([[[0, 255], [51, 102]]], dtype=torch.uint8)
    labels = torch.zeros(2, 2, dtype=torch.int64)
    out, _ = build_transforms(False)(gray, labels)
    assert out.shape == (1, 2, 2)
    assert torch.allclose(out, torch.tensor([[[-1.0, 1.0], [-0.6, -0.2]]]), atol=1e-6)
    out, _ = build_transforms(False, mean=(0.2,), std=(0.1,))(gray, labels)
    assert torch.allclose(out[0, 0, 0], torch.tensor(-2.0))
    with pytest.raises(ConfigError, match="3 values but the image has 1 channel"):
        build_transforms(False, mean=IMAGENET_MEAN, std=IMAGENET_STD)(gray, labels)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"mean": (0.5,), "std": (0.5, 0.5)},
        {"mean": (0.5,)},
        {"std": (0.0,), "mean": (0.5,)},
        {"crop_size": 0},
        {"crop_size": (4, 4, 4)},
        {"scale_range": (2.0, 1.0)},
        {"scale_range": (0.0, 1.0)},
    ],
)
def test_bad_options(kwargs):
    with pytest.raises(ConfigError):
        build_transforms(True, **kwargs)


def test_alignment_checker_detects_misalignment():
    image, labels = _scene()
    out, target = build_transforms(False)(image, labels)
    assert _misaligned_fraction(out, target)[0] == 0.0
    assert _misaligned_fraction(out, target.flip(-1))[0] > 0.5


def test_train_keeps_alignment_and_pads_with_ignore():
    torch.manual_seed(0)
    image, labels = _scene()
    transform = build_transforms(True, crop_size=(24, 28), scale_range=(0.5, 2.0))
    pad_value = (-torch.tensor(IMAGENET_MEAN) / torch.tensor(IMAGENET_STD))[:, None]
    padded_runs = 0
    for _ in range(12):
        out, target = transform(image, labels)
        assert out.shape == (3, 24, 28) and target.shape == (24, 28)
        assert target.dtype == torch.int64
        assert set(target.unique().tolist()) <= {0, 1, 2, 3, 4, IGNORE}
        wrong, interior = _misaligned_fraction(out, target)
        assert interior > 0 and wrong == 0.0
        pad = target == IGNORE
        if pad.any():
            padded_runs += 1
            assert torch.allclose(out[:, pad], pad_value.expand(3, int(pad.sum())), atol=1e-5)
    assert padded_runs > 0  # some draws scaled below the crop size


def test_exact_padding_amount():
    image, labels = _scene(32, 32, block=16)
    out, target = build_transforms(True, crop_size=24, scale_range=(0.5, 0.5), hflip=False)(
        image, labels
    )
    assert int((target == IGNORE).sum()) == 24 * 24 - 16 * 16
    assert _misaligned_fraction(out, target)[1] > 0


def test_flip_moves_image_and_mask_together():
    image, labels = _scene()
    transform = build_transforms(True, scale_range=None)
    reference, _ = build_transforms(False)(image, labels)
    torch.manual_seed(1)
    flipped = 0
    for _ in range(16):
        out, target = transform(image, labels)
        if torch.equal(target, labels):
            assert torch.allclose(out, reference)
        else:
            assert torch.equal(target, labels.flip(-1))
            assert torch.allclose(out, reference.flip(-1))
            flipped += 1
    assert 0 < flipped < 16


def test_scale_uses_nearest_for_the_mask():
    image, labels = _scene(8, 8)
    labels = torch.arange(64).reshape(8, 8) % 5
    image = LUT[labels].permute(2, 0, 1).contiguous()
    out, target = build_transforms(True, scale_range=(2.0, 2.0), hflip=False)(image, labels)
    assert out.shape == (3, 16, 16)
    assert torch.equal(target, labels.repeat_interleave(2, 0).repeat_interleave(2, 1))


def test_deterministic_given_seed():
    image, labels = _scene()
    transform = build_transforms(True, crop_size=20)
    torch.manual_seed(5)
    a = transform(image, labels)
    torch.manual_seed(5)
    b = transform(image, labels)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c = [transform(image, labels)[1] for _ in range(4)]
    assert any(not torch.equal(a[1], x) for x in c)
