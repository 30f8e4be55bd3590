"""Joint transforms beyond scale/crop/flip: base-size resize, cat_max_ratio crops, padding,
photometric distortion, instance targets and the evaluation resize."""

from __future__ import annotations

import colorsys

import pytest
import torch
from torchvision import tv_tensors
from torchvision.ops import masks_to_boxes

from denseseg.data.transforms import (
    PadTo,
    PhotoMetricDistortion,
    RandomCrop,
    RandomScale,
    ResizeKeepAspect,
    build_eval_resize,
    build_transforms,
    keep_ratio_factor,
)
from denseseg.errors import ConfigError

IGNORE = 255


def _labels_image(labels: torch.Tensor) -> torch.Tensor:
    lut = torch.tensor([[10, 200, 30], [60, 20, 220], [120, 90, 5]], dtype=torch.uint8)
    return lut[labels].permute(2, 0, 1).contiguous()


def _size_after(transform, h: int, w: int) -> tuple[int, int]:
    image = tv_tensors.Image(torch.zeros(3, h, w, dtype=torch.uint8))
    mask = tv_tensors.Mask(torch.zeros(h, w, dtype=torch.int64))
    out_image, out_mask = transform(image, mask)
    assert out_image.shape[-2:] == out_mask.shape[-2:]
    return tuple(out_mask.shape)


def test_keep_ratio_factor_follows_mmseg_rule():
    # mmseg keep_ratio: as large as possible with long <= 2048 and short <= 512.
    assert keep_ratio_factor(1024, 2048, (2048, 512)) == pytest.approx(0.5)
    assert keep_ratio_factor(375, 500, (2048, 512)) == pytest.approx(512 / 375)
    assert keep_ratio_factor(100, 1000, (2048, 512)) == pytest.approx(2.048)  # long side binds
    assert keep_ratio_factor(40, 60, (20,)) == pytest.approx(0.5)  # int: the short side


def test_random_scale_relative_to_base_size():
    assert _size_after(RandomScale((1.0, 1.0), base_size=(80, 40)), 100, 200) == (40, 80)
    assert _size_after(RandomScale((0.5, 0.5), base_size=(80, 40)), 100, 200) == (20, 40)
    assert _size_after(RandomScale((2.0, 2.0), base_size=50), 100, 200) == (100, 200)
    # Without base_size the ratio is relative to the image itself (the existing mode).
    assert _size_after(RandomScale((0.5, 0.5)), 100, 200) == (50, 100)
    torch.manual_seed(0)
    sizes = {_size_after(RandomScale((0.5, 2.0), base_size=(80, 40)), 100, 200) for _ in range(20)}
    assert all(20 <= h <= 80 and abs(w - 2 * h) <= 1 for h, w in sizes) and len(sizes) > 5


def test_build_transforms_base_size_then_crop_and_pad():
    labels = torch.zeros(100, 200, dtype=torch.int64)
    labels[:, 100:] = 1
    transform = build_transforms(
        True, crop_size=(48, 64), scale_range=(1.0, 1.0), base_size=(80, 40), hflip=False
    )
    out, target = transform(_labels_image(labels), labels)
    # 100x200 fits to 40x80, the 48x64 crop keeps all 40 rows and pads 8 with ignore.
    assert out.shape == (3, 48, 64) and target.shape == (48, 64)
    assert (target[40:] == IGNORE).all() and (target[:40] != IGNORE).all()


def _cat_max_scene() -> torch.Tensor:
    labels = torch.zeros(16, 32, dtype=torch.int64)
    labels[:, 24:] = 1  # 8 columns of class 1 at the right
    return labels


def _dominated(target: torch.Tensor, ratio: float) -> bool:
    counts = torch.unique(target[target != IGNORE], return_counts=True)[1]
    return len(counts) < 2 or float(counts.max()) / float(counts.sum()) >= ratio


def test_cat_max_ratio_redraws_dominated_crops():
    """A 16x16 window slides over 17 columns; only offsets 13-16 give class 1 more than a
    quarter, so a single draw passes 4/17 of the time and eleven draws ~95% of the time."""
    labels = _cat_max_scene()
    image = tv_tensors.Image(_labels_image(labels))
    mask = tv_tensors.Mask(labels)
    torch.manual_seed(0)
    passed = {}
    for ratio in (1.0, 0.75):
        crop = RandomCrop((16, 16), cat_max_ratio=ratio)
        outs = [crop(image, mask)[1] for _ in range(200)]
        assert all(o.shape == (16, 16) for o in outs)
        passed[ratio] = sum(not _dominated(o, 0.75) for o in outs)
    assert 25 < passed[1.0] < 75  # ~47 expected
    assert passed[0.75] > 170  # ~190 expected


def test_cat_max_ratio_gives_up_after_ten_draws():
    labels = torch.zeros(16, 32, dtype=torch.int64)  # every crop holds a single class
    crop = RandomCrop((8, 8), cat_max_ratio=0.75)
    torch.manual_seed(0)
    draws = []
    original = crop._draw
    crop._draw = lambda h, w: draws.append(1) or original(h, w)
    out = crop(tv_tensors.Image(_labels_image(labels)), tv_tensors.Mask(labels))[1]
    assert out.shape == (8, 8) and len(draws) == 11  # first draw + 10 re-draws, as mmseg


def test_cat_max_ratio_ignores_the_ignore_label():
    labels = torch.full((8, 8), IGNORE, dtype=torch.int64)
    labels[:, :3] = 0
    labels[:, 3:5] = 1  # among non-ignored pixels class 0 has 60 %
    crop = RandomCrop((8, 8), cat_max_ratio=0.75)
    assert not crop._dominated(labels, {"top": 0, "left": 0, "height": 8, "width": 8})
    crop_strict = RandomCrop((8, 8), cat_max_ratio=0.5)
    assert crop_strict._dominated(labels, {"top": 0, "left": 0, "height": 8, "width": 8})


def test_pad_to_fills_bottom_right():
    image = tv_tensors.Image(torch.full((3, 5, 6), 7, dtype=torch.uint8))
    semantic = tv_tensors.Mask(torch.ones(5, 6, dtype=torch.int64))
    instances = tv_tensors.Mask(torch.ones(2, 5, 6, dtype=torch.uint8))
    out_image, out_sem, out_inst = PadTo((8, 6), ignore_index=IGNORE)(image, semantic, instances)
    assert out_image.shape == (3, 8, 6) and (out_image[:, 5:] == 0).all()
    assert (out_image[:, :5] == 7).all()
    assert (out_sem[5:] == IGNORE).all() and (out_sem[:5] == 1).all()
    assert (out_inst[:, 5:] == 0).all() and (out_inst[:, :5] == 1).all()


def _photo_params(**kw):
    params = {"beta": None, "contrast_first": True, "alpha": None, "saturation": None, "hue": None}
    params.update(kw)
    return params


def _rgb_image(h: int = 6, w: int = 7, seed: int = 0) -> tv_tensors.Image:
    g = torch.Generator().manual_seed(seed)
    return tv_tensors.Image(torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8))


def test_photometric_brightness_and_contrast_are_mmseg_arithmetic():
    image = _rgb_image()
    x = image.float()
    t = PhotoMetricDistortion()
    out = t.transform(image, _photo_params(beta=20.0))
    assert torch.equal(out, (x + 20).clamp(0, 255).round().to(torch.uint8))
    out = t.transform(image, _photo_params(alpha=1.4))
    assert torch.equal(out, (x * 1.4).clamp(0, 255).round().to(torch.uint8))
    assert isinstance(out, tv_tensors.Image) and out.dtype == torch.uint8
    # Contrast before or after the colour steps: both orders, as mmseg's mode.
    first = t.transform(image, _photo_params(alpha=1.6, saturation=1.5, contrast_first=True))
    last = t.transform(image, _photo_params(alpha=1.6, saturation=1.5, contrast_first=False))
    assert not torch.equal(first, last)


@pytest.mark.parametrize(("saturation", "hue"), [(1.4, None), (0.5, None), (None, 10), (None, -18)])
def test_photometric_saturation_and_hue_match_hsv(saturation, hue):
    image = _rgb_image(5, 5, seed=1)
    out = PhotoMetricDistortion().transform(image, _photo_params(saturation=saturation, hue=hue))
    for y in range(5):
        for x in range(5):
            h, s, v = colorsys.rgb_to_hsv(*image[:, y, x].float().tolist())
            if saturation is not None:
                s = min(s * saturation, 1.0)
            if hue is not None:
                h = (h + 2 * hue / 360.0) % 1.0  # OpenCV hue steps are 2 degrees
            want = torch.tensor(colorsys.hsv_to_rgb(h, s, v))
            assert torch.allclose(out[:, y, x].float(), want, atol=0.51)


def test_photometric_draws_and_leaves_masks_alone():
    t = PhotoMetricDistortion()
    torch.manual_seed(0)
    draws = [t.make_params([]) for _ in range(400)]
    for key in ("beta", "alpha", "saturation", "hue"):
        share = sum(d[key] is not None for d in draws) / len(draws)
        assert 0.4 < share < 0.6, key  # each step with probability 0.5
    assert 0.4 < sum(d["contrast_first"] for d in draws) / len(draws) < 0.6
    betas = [d["beta"] for d in draws if d["beta"] is not None]
    hues = {d["hue"] for d in draws if d["hue"] is not None}
    assert -32 <= min(betas) and max(betas) <= 32
    assert hues <= set(range(-18, 18)) and len(hues) > 25  # numpy's half-open randint
    mask = tv_tensors.Mask(torch.arange(25).reshape(5, 5))
    image = _rgb_image(5, 5)
    torch.manual_seed(3)
    outs = [t(image, mask) for _ in range(8)]
    assert all(torch.equal(m, mask) for _, m in outs)
    assert any(not torch.equal(i, image) for i, _ in outs)


def test_photometric_on_grayscale_changes_brightness_only():
    image = tv_tensors.Image(torch.arange(30, dtype=torch.uint8).reshape(1, 5, 6) * 8)
    out = PhotoMetricDistortion().transform(image, _photo_params(beta=-10.0, saturation=1.5, hue=9))
    assert out.shape == (1, 5, 6)
    assert torch.equal(out, (image.float() - 10).clamp(0, 255).to(torch.uint8))


def test_photometric_in_pipeline_keeps_padding_black():
    labels = torch.zeros(10, 10, dtype=torch.int64)
    transform = build_transforms(
        True, crop_size=16, scale_range=None, hflip=False, photometric=True, mean=(0, 0, 0),
        std=(1, 1, 1),
    )  # fmt: skip
    torch.manual_seed(0)
    for _ in range(6):
        out, target = transform(torch.full((3, 10, 10), 128, dtype=torch.uint8), labels)
        # Padding comes after the distortion, so padded pixels stay 0 and ignored.
        assert (target[10:] == IGNORE).all() and (out[:, 10:] == 0).all()


def _instance_sample() -> tuple[torch.Tensor, dict]:
    h, w = 40, 60
    masks = torch.zeros(3, h, w, dtype=torch.uint8)
    masks[0, 5:15, 5:20] = 1
    masks[1, 20:35, 30:55] = 1
    masks[2, 30:38, 2:8] = 1
    target = {
        "boxes": tv_tensors.BoundingBoxes(masks_to_boxes(masks), format="XYXY", canvas_size=(h, w)),
        "masks": tv_tensors.Mask(masks),
        "labels": torch.tensor([1, 2, 3]),
        "iscrowd": torch.zeros(3, dtype=torch.int64),
        "area": masks.flatten(1).sum(1).float(),
        "image_id": 7,
    }
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8), target


@pytest.mark.parametrize("elastic", [None, {"sigma": 3.0}])
def test_instance_targets_follow_the_image(elastic):
    image, target = _instance_sample()
    transform = build_transforms(True, crop_size=(32, 32), scale_range=(0.75, 1.5), elastic=elastic)
    torch.manual_seed(0)
    seen_drop = False
    for _ in range(12):
        out, t = transform(image, target)
        assert out.shape == (3, 32, 32) and t["masks"].shape[-2:] == (32, 32)
        n = len(t["labels"])
        assert len(t["boxes"]) == len(t["masks"]) == len(t["iscrowd"]) == len(t["area"]) == n
        assert t["image_id"] == 7 and set(t["labels"].tolist()) <= {1, 2, 3}
        seen_drop |= n < 3
        assert (t["masks"].flatten(1).sum(1) > 0).all()
        assert torch.equal(t["area"], t["masks"].flatten(1).sum(1).float())
        if n:
            from_masks = masks_to_boxes(t["masks"])
            tol = 0.0 if elastic else 2.5  # boxes move analytically, masks are resampled
            assert (t["boxes"] - from_masks).abs().max() <= tol
    assert seen_drop  # some crops lose an instance, whose labels go with it


def test_eval_resize_keeps_aspect_and_nearest_labels():
    labels = torch.arange(6).repeat_interleave(10).reshape(1, 60).repeat(30, 1) % 3
    image = _labels_image(labels)
    out, target = build_transforms(False, eval_resize=15)(image, labels)
    assert out.shape == (3, 15, 30) and target.shape == (15, 30)
    assert set(target.unique().tolist()) <= {0, 1, 2}
    assert _size_after(ResizeKeepAspect((40, 20)), 30, 60) == (20, 40)
    raw_image, raw_target = build_eval_resize((40, 20))(image, labels)
    assert raw_image.dtype == torch.uint8 and raw_image.shape == (3, 20, 40)
    # NEAREST_EXACT: output pixel i reads input floor((i + 0.5) * 1.5), at pixel centres.
    iy = ((torch.arange(20) + 0.5) * 1.5).floor().long()
    ix = ((torch.arange(40) + 0.5) * 1.5).floor().long()
    assert torch.equal(raw_target, labels[iy][:, ix])
    # Without eval_resize evaluation keeps the original size.
    assert build_transforms(False)(image, labels)[1].shape == (30, 60)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"base_size": 0},
        {"base_size": [10, 20, 30]},
        {"cat_max_ratio": 0.5},  # without crop_size
        {"crop_size": 8, "cat_max_ratio": 1.5},
        {"photometric": {"hue_delta": 100}},
        {"photometric": {"colour": 1}},
        {"elastic": {"sigma": 10, "grids": 3}},
        {"elastic": {"interpolation": "nearest"}},
        {"elastic": "yes"},
    ],
)
def test_bad_new_options(kwargs):
    with pytest.raises(ConfigError):
        build_transforms(True, **kwargs)
