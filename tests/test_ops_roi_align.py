"""denseseg.ops: RoIAlign avg/max against torchvision and a slow reference; multi-scale poolers."""

from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch
import torchvision
from torchvision.ops.poolers import MultiScaleRoIAlign

from denseseg.errors import ConfigError
from denseseg.ops import POOLER_KINDS, MultiScaleRoIPool, RoIAlign, roi_align

torch.set_num_threads(min(2, torch.get_num_threads()))


def _bilinear(feat: torch.Tensor, y: float, x: float) -> torch.Tensor:
    """One sample ``(C,)`` of ``feat`` ``(C, H, W)``, following torchvision's CPU kernel."""
    _, height, width = feat.shape
    if y < -1.0 or y > height or x < -1.0 or x > width:
        return feat.new_zeros(feat.shape[0])
    y, x = max(y, 0.0), max(x, 0.0)
    y0, x0 = int(y), int(x)
    if y0 >= height - 1:
        y0 = y1 = height - 1
        y = float(y0)
    else:
        y1 = y0 + 1
    if x0 >= width - 1:
        x0 = x1 = width - 1
        x = float(x0)
    else:
        x1 = x0 + 1
    ly, lx = y - y0, x - x0
    return (
        (1 - ly) * (1 - lx) * feat[:, y0, x0]
        + (1 - ly) * lx * feat[:, y0, x1]
        + ly * (1 - lx) * feat[:, y1, x0]
        + ly * lx * feat[:, y1, x1]
    )


def reference_roi_align(
    feats: torch.Tensor,
    rois: torch.Tensor,
    output_size: tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
    mode: str,
    quantize: bool = False,
) -> torch.Tensor:
    """Box by box, bin by bin, sample by sample."""
    ph_n, pw_n = output_size
    out = feats.new_zeros((rois.shape[0], feats.shape[1], ph_n, pw_n))
    for k, (b, *box) in enumerate(rois.tolist()):
        c = [v * spatial_scale for v in box]
        if quantize:
            c = [math.copysign(math.floor(abs(v) + 0.5), v) for v in c]
        if aligned:
            c = [v - 0.5 for v in c]
        roi_w, roi_h = c[2] - c[0], c[3] - c[1]
        if not aligned:
            roi_w, roi_h = max(roi_w, 1.0), max(roi_h, 1.0)
        bin_h, bin_w = roi_h / ph_n, roi_w / pw_n
        gh = sampling_ratio if sampling_ratio > 0 else max(math.ceil(bin_h), 0)
        gw = sampling_ratio if sampling_ratio > 0 else max(math.ceil(bin_w), 0)
        for ph in range(ph_n):
            for pw in range(pw_n):
                samples = []
                for iy in range(gh):
                    y = c[1] + ph * bin_h + (iy + 0.5) * bin_h / gh
                    for ix in range(gw):
                        x = c[0] + pw * bin_w + (ix + 0.5) * bin_w / gw
                        samples.append(_bilinear(feats[int(b)], y, x))
                if not samples:
                    continue
                stack = torch.stack(samples)
                out[k, :, ph, pw] = stack.mean(0) if mode == "avg" else stack.amax(0)
    return out


def _random_rois(
    n: int, batch: int, height: int, width: int, scale: float, gen: torch.Generator
) -> torch.Tensor:
    """Boxes in image coordinates: inside, partly and entirely outside, tiny, degenerate, huge."""
    img_h, img_w = height / scale, width / scale
    centre = torch.rand(n, 2, generator=gen) * torch.tensor([img_w, img_h]) * 1.4 - torch.tensor(
        [0.2 * img_w, 0.2 * img_h]
    )
    size = torch.rand(n, 2, generator=gen) ** 3 * torch.tensor([img_w, img_h]) * 1.5
    size[: n // 8] = torch.rand(n // 8, 2, generator=gen) * 0.3 / scale  # smaller than a cell
    boxes = torch.cat([centre - size / 2, centre + size / 2], dim=1)
    extra = torch.tensor(
        [
            [-3.0 * img_w, -3.0 * img_h, -2.0 * img_w, -2.0 * img_h],  # entirely outside
            [1.5 * img_w, 0.2 * img_h, 2.0 * img_w, 0.5 * img_h],  # entirely outside, right
            [-0.5 * img_w, -0.5 * img_h, 1.5 * img_w, 1.5 * img_h],  # larger than the image
            [0.3 * img_w, 0.3 * img_h, 0.3 * img_w, 0.3 * img_h],  # zero size
            [0.6 * img_w, 0.6 * img_h, 0.5 * img_w, 0.5 * img_h],  # x2 < x1
            [-1.0 / scale, 0.1 * img_h, 0.4 / scale, 0.9 * img_h],  # straddles x = 0
        ]
    )
    boxes = torch.cat([boxes, extra])
    idx = torch.randint(0, batch, (boxes.shape[0], 1), generator=gen).float()
    return torch.cat([idx, boxes], dim=1)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 1, 2, 4])
def test_avg_matches_torchvision(aligned: bool, sampling_ratio: int) -> None:
    gen = torch.Generator().manual_seed(sampling_ratio + 10 * aligned)
    feats = torch.randn(2, 3, 13, 17, generator=gen)
    for scale in (1.0, 0.5, 0.25, 1 / 16):
        rois = _random_rois(40, 2, 13, 17, scale, gen)
        for size in (1, (7, 7), (3, 5), (14, 14)):
            ours = roi_align(feats, rois, size, scale, sampling_ratio, aligned)
            ref = torchvision.ops.roi_align(feats, rois, size, scale, sampling_ratio, aligned)
            assert ours.shape == ref.shape
            torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_avg_backward_matches_torchvision() -> None:
    gen = torch.Generator().manual_seed(1)
    feats = torch.randn(2, 4, 12, 15, generator=gen)
    rois = _random_rois(30, 2, 12, 15, 0.5, gen)
    grad_out = torch.randn(rois.shape[0], 4, 5, 5, generator=gen)
    grads = []
    for op in (roi_align, torchvision.ops.roi_align):
        x = feats.clone().requires_grad_(True)
        (op(x, rois, 5, 0.5, -1, False) * grad_out).sum().backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=0)


def test_list_boxes_equal_tensor_boxes() -> None:
    gen = torch.Generator().manual_seed(2)
    feats = torch.randn(3, 2, 10, 10, generator=gen)
    per_image = [torch.rand(n, 2, generator=gen) * 15 for n in (4, 0, 6)]
    boxes = [torch.cat([p, p + 1 + torch.rand(p.shape, generator=gen) * 10], 1) for p in per_image]
    rois = torch.cat(
        [torch.cat([torch.full((len(b), 1), float(i)), b], 1) for i, b in enumerate(boxes)]
    )
    ref = torchvision.ops.roi_align(feats, boxes, (4, 3), 0.5, 2)
    for mode in ("avg", "max"):
        from_list = roi_align(feats, boxes, (4, 3), 0.5, 2, mode=mode)
        torch.testing.assert_close(from_list, roi_align(feats, rois, (4, 3), 0.5, 2, mode=mode))
    torch.testing.assert_close(roi_align(feats, boxes, (4, 3), 0.5, 2), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 2])
@pytest.mark.parametrize("quantize", [False, True])
def test_max_and_quantize_match_reference(
    aligned: bool, sampling_ratio: int, quantize: bool
) -> None:
    gen = torch.Generator().manual_seed(3 + sampling_ratio + 5 * aligned + 11 * quantize)
    feats = torch.randn(2, 3, 9, 11, dtype=torch.float64, generator=gen)
    scale = 0.5
    rois = _random_rois(14, 2, 9, 11, scale, gen).double()
    for mode in ("max", "avg"):
        ours = roi_align(feats, rois, (3, 4), scale, sampling_ratio, aligned, mode, quantize)
        ref = reference_roi_align(
            feats, rois, (3, 4), scale, sampling_ratio, aligned, mode, quantize
        )
        torch.testing.assert_close(ours, ref, atol=1e-10, rtol=0)


def test_quantize_is_roialign_of_rounded_boxes() -> None:
    # Halves must round away from zero, as C's round() in torchvision's roi_pool.
    gen = torch.Generator().manual_seed(4)
    feats = torch.randn(1, 2, 12, 12, generator=gen)
    boxes = torch.tensor([[0, 2.0, 6.0, 26.0, 30.0], [0, 1.0, 3.1, 14.2, 33.0], [0, -2.0, 1, 9, 8]])
    scaled = boxes[:, 1:] * 0.25  # 0.5, 1.5, 6.5, 7.5, ...: exact halves
    rounded = torch.cat([boxes[:, :1], torch.floor(scaled.abs() + 0.5) * scaled.sign() / 0.25], 1)
    assert rounded[0, 1:].tolist() == [4.0, 8.0, 28.0, 32.0]
    ours = roi_align(feats, boxes, 3, 0.25, 2, quantize=True)
    torch.testing.assert_close(ours, torchvision.ops.roi_align(feats, rounded, 3, 0.25, 2))


def test_samples_outside_read_zero_and_clamp_at_border() -> None:
    feats = torch.arange(1.0, 21.0).view(1, 1, 4, 5)
    far = roi_align(feats, torch.tensor([[0, -30.0, -30.0, -10.0, -10.0]]), 2, mode="max")
    assert torch.equal(far, torch.zeros_like(far))
    # One sample per bin at y = -0.75 / x = -0.75: clamped onto pixel (0, 0), not zero-padded.
    edge = roi_align(feats, torch.tensor([[0, -1.0, -1.0, -0.5, -0.5]]), 1, 1.0, 1, aligned=False)
    assert edge.item() == pytest.approx(feats[0, 0, 0, 0].item())
    # A box half left of the map: its left bin samples x < -1 and reads zero.
    half = roi_align(feats, torch.tensor([[0, -4.0, 0.0, 4.0, 4.0]]), (1, 2), 1.0, 1)
    assert half[0, 0, 0, 0].item() == 0.0 and half[0, 0, 0, 1].item() > 0.0


def test_degenerate_aligned_boxes_and_no_boxes_give_zeros() -> None:
    feats = torch.randn(1, 2, 6, 6)
    rois = torch.tensor([[0, 3.0, 3.0, 3.0, 3.0], [0, 4.0, 4.0, 2.0, 2.0]])
    for mode in ("avg", "max"):
        out = roi_align(feats, rois, 2, 1.0, -1, aligned=True, mode=mode)
        assert torch.equal(out, torch.zeros(2, 2, 2, 2))
        empty = roi_align(feats, torch.zeros(0, 5), (3, 2), mode=mode)
        assert empty.shape == (0, 2, 3, 2)
    tv = torchvision.ops.roi_align(feats, rois, 2, 1.0, -1, aligned=True)
    assert torch.equal(tv, torch.zeros_like(tv))


def test_gradcheck_float64() -> None:
    gen = torch.Generator().manual_seed(5)
    feats = torch.randn(2, 2, 6, 7, dtype=torch.float64, generator=gen).requires_grad_(True)
    # Boxes inside the map, so no two samples of a bin clamp onto the same point (a max tie).
    xy = torch.rand(4, 2, dtype=torch.float64, generator=gen) * 3 + 0.3
    wh = torch.rand(4, 2, dtype=torch.float64, generator=gen) * 2.5 + 1.2
    batch = torch.tensor([[0.0], [1.0], [1.0], [0.0]], dtype=torch.float64)
    rois = torch.cat([batch, xy, xy + wh], dim=1)
    for mode in ("avg", "max"):
        for ratio in (-1, 2):
            assert torch.autograd.gradcheck(
                lambda f, m=mode, r=ratio: roi_align(f, rois, (2, 3), 1.0, r, False, m), (feats,)
            )
    # The box coordinates are differentiable too (samples move, bilinear weights change).
    coords = rois[:, 1:].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda c: roi_align(feats.detach(), torch.cat([batch, c], 1), 2, 1.0, 2), (coords,)
    )


def test_max_ties_send_the_gradient_to_one_sample_on_both_paths() -> None:
    # A constant map makes every sample of a bin tie. Bins of side 1.5 give an adaptive grid of
    # ceil(1.5) = 2, the same samples as sampling_ratio=2, so the fixed-grid path and the
    # per-RoI-grid path must agree, each bin's gradient landing on one sample.
    grads = []
    for ratio in (2, -1):
        feats = torch.ones(1, 1, 8, 8, dtype=torch.float64, requires_grad=True)
        out = roi_align(
            feats, torch.tensor([[0, 1.2, 1.2, 4.2, 4.2]]).double(), 2, 1.0, ratio, mode="max"
        )
        out.sum().backward()
        grads.append(feats.grad)
    torch.testing.assert_close(grads[0], grads[1])
    assert grads[0].sum().item() == pytest.approx(4.0)
    # Samples at 1.575, 2.325 (bin 0): the first one's four corners are rows/cols 1 and 2 only.
    assert grads[0][0, 0].nonzero().unique().tolist() == [1, 2, 3, 4]
    assert grads[0][0, 0, 1:3, 1:3].sum().item() == pytest.approx(1.0)


def test_module_wrapper_and_bad_mode() -> None:
    feats = torch.randn(1, 3, 8, 8)
    rois = torch.tensor([[0, 1.0, 1.0, 12.0, 9.0]])
    layer = RoIAlign((2, 3), 0.5, 2, aligned=True, mode="max", quantize=True)
    torch.testing.assert_close(
        layer(feats, rois), roi_align(feats, rois, (2, 3), 0.5, 2, True, "max", True)
    )
    assert "mode='max'" in repr(layer)
    with pytest.raises(ConfigError, match="avg"):
        roi_align(feats, rois, 2, mode="mean")
    with pytest.raises(ConfigError, match="max"):
        RoIAlign(2, 1.0, 2, mode="sum")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_and_torchvision() -> None:
    gen = torch.Generator().manual_seed(6)
    feats = torch.randn(2, 8, 20, 24, generator=gen)
    rois = _random_rois(64, 2, 20, 24, 0.25, gen)
    for mode in ("avg", "max"):
        for ratio in (-1, 2):
            x = feats.cuda().requires_grad_(True)
            out = roi_align(x, rois.cuda(), 7, 0.25, ratio, mode=mode)
            out.sum().backward()
            torch.testing.assert_close(
                out.cpu(), roi_align(feats, rois, 7, 0.25, ratio, mode=mode), atol=1e-5, rtol=0
            )
            assert torch.isfinite(x.grad).all()
    tv = torchvision.ops.roi_align(feats.cuda(), rois.cuda(), 7, 0.25, -1)
    torch.testing.assert_close(
        roi_align(feats.cuda(), rois.cuda(), 7, 0.25, -1), tv, atol=1e-5, rtol=0
    )


def _fpn_inputs(gen: torch.Generator) -> tuple[OrderedDict, list[torch.Tensor], list]:
    image_shapes = [(256, 320), (240, 300)]
    feats = OrderedDict(
        (name, torch.randn(2, 4, 256 // s, 320 // s, generator=gen))
        for name, s in (("0", 4), ("1", 8), ("2", 16), ("3", 32), ("pool", 64))
    )
    boxes = []
    for h, w in image_shapes:
        xy = torch.rand(12, 2, generator=gen) * torch.tensor([w * 0.6, h * 0.6])
        side = torch.exp(torch.rand(12, 1, generator=gen) * math.log(240 / 8)) * 8
        boxes.append(torch.cat([xy, xy + side * (0.5 + torch.rand(12, 2, generator=gen))], 1))
    return feats, boxes, image_shapes


def test_multiscale_roialign_equals_torchvision() -> None:
    feats, boxes, image_shapes = _fpn_inputs(torch.Generator().manual_seed(7))
    names = ["0", "1", "2", "3"]
    ours = MultiScaleRoIPool(names, 7, 2, kind="roialign")
    theirs = MultiScaleRoIAlign(names, 7, 2)
    assert isinstance(ours, MultiScaleRoIAlign)  # torchvision's Mask R-CNN accepts only these
    out = ours(feats, boxes, image_shapes)
    assert torch.equal(out, theirs(feats, boxes, image_shapes))
    assert ours.scales == [1 / 4, 1 / 8, 1 / 16, 1 / 32]
    assert len(torch.unique(ours.map_levels(boxes))) >= 3  # several levels really are used


@pytest.mark.parametrize("kind", POOLER_KINDS)
def test_every_pooler_kind_pools_each_box_from_its_level(kind: str) -> None:
    feats, boxes, image_shapes = _fpn_inputs(torch.Generator().manual_seed(8))
    names = ["0", "1", "2", "3"]
    feats = OrderedDict((k, v.requires_grad_(True)) for k, v in feats.items())
    pooler = MultiScaleRoIPool(names, (7, 5), 2, kind=kind)
    out = pooler(feats, boxes, image_shapes)
    assert out.shape == (24, 4, 7, 5) and torch.isfinite(out).all()
    out.square().sum().backward()
    assert all(feats[n].grad is not None for n in names)
    assert feats["0"].grad.abs().sum() > 0

    levels = pooler.map_levels(boxes)
    rois = torch.cat(
        [torch.cat([torch.full((len(b), 1), float(i)), b], 1) for i, b in enumerate(boxes)]
    )
    for k in range(rois.shape[0]):
        level = int(levels[k])
        feat, scale = feats[names[level]].detach(), pooler.scales[level]
        if kind == "roipool":
            ref = torchvision.ops.roi_pool(feat, rois[k : k + 1], (7, 5), scale)
        else:
            mode = "avg" if kind == "roialign" else "max"
            ref = roi_align(feat, rois[k : k + 1], (7, 5), scale, 2, False, mode, kind == "roiwarp")
        torch.testing.assert_close(out[k : k + 1].detach(), ref, atol=1e-5, rtol=0)


def test_unknown_pooler_kind_names_the_choices() -> None:
    with pytest.raises(ConfigError, match="roialign_max"):
        MultiScaleRoIPool(["0"], 7, 2, kind="roi_align")
    assert "kind='roiwarp'" in repr(MultiScaleRoIPool(["0"], 7, 2, kind="roiwarp"))
