"""FCN-32s/16s/8s: parameter counts, layer layout, size and alignment for every input size,
the at-once scaling, and the bilinear up-sampling kernel."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from denseseg.errors import ConfigError
from denseseg.layers.upsample import bilinear_kernel, bilinear_upsampler
from denseseg.models import create_model
from denseseg.models.fcn import FCN

NAMES = ("fcn32s", "fcn16s", "fcn8s")
TINY = {"width": 1 / 16, "fc_channels": 8, "zero_init_scores": False}
# name -> {upsampler: (kernel, stride)} as in the reference prototxts.
UPSAMPLERS = {
    "fcn32s": {"upscore": (64, 32)},
    "fcn16s": {"upscore2": (4, 2), "upscore16": (32, 16)},
    "fcn8s": {"upscore2": (4, 2), "upscore_pool4": (4, 2), "upscore8": (16, 8)},
}


def _count(module: nn.Module, prefix: str = "") -> int:
    return sum(p.numel() for n, p in module.named_parameters() if n.startswith(prefix))


@pytest.mark.parametrize(
    ("name", "total"), [("fcn32s", 136_152_917), ("fcn16s", 134_815_994), ("fcn8s", 134_489_759)]
)
def test_parameter_counts_for_21_classes(name: str, total: int) -> None:
    # Counting needs no memory: build on the meta device. Frozen up-samplers count too.
    with torch.device("meta"):
        model = create_model(name, num_classes=21)
    assert _count(model) == total
    assert _count(model, "backbone.") == 14_714_688  # conv1_1 .. conv5_3
    assert _count(model, "fc6.") == 102_764_544
    assert _count(model, "fc7.") == 16_781_312
    assert _count(model, "score_fr.") == 86_037
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert frozen == sum(21 * 21 * k * k for k, _ in UPSAMPLERS[name].values())


@pytest.mark.parametrize("name", NAMES)
def test_reference_layout(name: str) -> None:
    model = create_model(name, num_classes=5, **TINY)
    convs = [m for m in model.backbone.features if isinstance(m, nn.Conv2d)]
    pools = [m for m in model.backbone.features if isinstance(m, nn.MaxPool2d)]
    assert len(convs) == 13 and len(pools) == 5
    assert convs[0].padding == (100, 100) and all(c.padding == (1, 1) for c in convs[1:])
    assert all(p.ceil_mode and p.kernel_size == 2 and p.stride == 2 for p in pools)
    assert model.fc6.kernel_size == (7, 7) and model.fc7.kernel_size == (1, 1)
    assert model.drop6.p == model.drop7.p == 0.5
    for layer, (k, s) in UPSAMPLERS[name].items():
        up = getattr(model, layer)
        assert isinstance(up, nn.ConvTranspose2d) and up.bias is None
        assert up.kernel_size == (k, k) and up.stride == (s, s)
        assert not up.weight.requires_grad
        torch.testing.assert_close(up.weight, bilinear_kernel(5, 5, k))
    learn = create_model(name, num_classes=5, learnable_upsampling=True, **TINY)
    assert all(getattr(learn, layer).weight.requires_grad for layer in UPSAMPLERS[name])


@pytest.mark.parametrize("name", NAMES)
def test_score_layers_start_at_zero(name: str) -> None:
    # The paper zero-initialises the class scores (and the skips, so a refined net starts with
    # the coarser net's predictions); the tiny test config turns this off.
    model = create_model(name, num_classes=3, width=1 / 16, fc_channels=8).eval()
    scores = [m for n, m in model.named_children() if n.startswith("score")]
    assert len(scores) == {"fcn32s": 1, "fcn16s": 2, "fcn8s": 3}[name]
    assert all(torch.count_nonzero(m.weight) == 0 for m in scores)
    with torch.no_grad():
        assert torch.count_nonzero(model(torch.randn(1, 3, 40, 40))["out"]) == 0


@pytest.mark.parametrize("name", NAMES)
def test_output_size_equals_input_for_every_size_up_to_1000(name: str) -> None:
    # Shape arithmetic on the meta device (no computation): every side from 1 to 1000, rows
    # taking 1..500 and columns 501..1000 (the axes are independent).
    with torch.device("meta"):
        model = create_model(name, num_classes=2, **TINY).eval()
        for n in range(1, 501):
            m = 1001 - n
            assert model(torch.empty(1, 3, n, m))["out"].shape == (1, 2, n, m), (n, m)


@pytest.mark.parametrize("name", NAMES)
def test_real_forward_at_sizes(name: str) -> None:
    # One channel per VGG layer: size arithmetic does not depend on the width.
    torch.manual_seed(0)
    model = create_model(
        name, num_classes=2, width=1 / 64, fc_channels=4, zero_init_scores=False
    ).eval()
    with torch.no_grad():
        for h, w in [(1, 1), (2, 2), (31, 33), (32, 32), (33, 31), (97, 131), (500, 500)]:
            out = model(torch.randn(1, 3, h, w))["out"]
            assert out.shape == (1, 2, h, w) and torch.isfinite(out).all()
        out = model(torch.randn(1, 3, 1000, 1000))["out"]
        assert out.shape == (1, 2, 1000, 1000)


# ---------------------------------------------------------------- alignment

SKIP_WEIGHTS = {
    "fcn32s": {"score_fr": 1.0},
    "fcn16s": {"score_fr": 0.6, "score_pool4": 0.4},
    "fcn8s": {"score_fr": 0.5, "score_pool4": 0.3, "score_pool3": 0.2},
}


def _coordinate_net(name: str) -> FCN:
    """A 4-channel FCN that carries coordinate ramps through every layer.

    Every convolution averages each of channels 0..3 over its window (other channels are zero),
    fc7 and the score layers pass them on, weighted per stream with weights summing to 1. On a
    linear ramp an average returns the ramp at the window's centre, the bilinear up-samplers
    interpolate it exactly, and max-pooling returns the window's upper end, which a ramp and its
    mirror image shift by the same amount; so (ramp - mirrored ramp) decodes to the coordinate
    that each output pixel is aligned to.
    """
    model = create_model(name, num_classes=4, in_channels=4, width=1 / 16, fc_channels=4).eval()
    assert isinstance(model, FCN)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.zero_()
                m.bias.zero_()
                for c in range(4):
                    m.weight[c, c] = 1.0 / (m.weight.shape[-1] * m.weight.shape[-2])
        for layer, weight in SKIP_WEIGHTS[name].items():
            getattr(model, layer).weight.mul_(weight)
    return model


def _decoded_coordinates(model: nn.Module, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = torch.arange(h, dtype=torch.float32)[:, None].expand(h, w)
    cols = torch.arange(w, dtype=torch.float32)[None, :].expand(h, w)
    # Ramps stay positive inside the image so the ReLUs pass them.
    x = torch.stack([cols + 1, w - cols, rows + 1, h - rows])[None]
    with torch.no_grad():
        y = model(x)["out"][0]
    return (y[2] - y[3] + h - 1) / 2 - rows, (y[0] - y[1] + w - 1) / 2 - cols


@pytest.mark.parametrize("name", NAMES)
def test_output_is_aligned_with_input(name: str) -> None:
    # Farther from the border than the receptive field reaches (~220 px) only image pixels
    # matter, and there every output pixel must decode to its own coordinates.
    h, w, margin = 480, 512, 224
    model = _coordinate_net(name)
    drow, dcol = _decoded_coordinates(model, h, w)
    inner = (slice(margin, h - margin), slice(margin, w - margin))
    # float32 rounding of ramps up to ~500 leaves ~1e-4 px; a one-pixel crop error >= 1 px.
    assert drow[inner].abs().max() < 1e-3 and dcol[inner].abs().max() < 1e-3
    # The check is sensitive to the crops: moving one by a pixel (the output crop of FCN-32s
    # and FCN-16s, the pool3 crop of FCN-8s) misaligns the output by that stream's stride times
    # its weight.
    k = len(model.crops) // 2
    model.crops = tuple(c + (i == k) for i, c in enumerate(model.crops))
    drow, dcol = _decoded_coordinates(model, h, w)
    assert dcol[inner].abs().min() > 0.5 and drow[inner].abs().min() > 0.5


def test_at_once_scales_pool4_and_pool3_inputs() -> None:
    # voc-fcn8s-atonce multiplies pool4 by 0.01 and pool3 by 0.0001 before their score layers,
    # which equals scaling those layers' weights (not their biases).
    torch.manual_seed(0)
    staged = create_model("fcn8s", num_classes=3, **TINY).eval()
    at_once = create_model("fcn8s", num_classes=3, at_once=True, **TINY).eval()
    at_once.load_state_dict(staged.state_dict())
    x = torch.randn(1, 3, 45, 51)
    with torch.no_grad():
        for layer in ("score_pool4", "score_pool3"):
            torch.nn.init.uniform_(getattr(staged, layer).bias)
        at_once.load_state_dict(staged.state_dict())
        y_at_once = at_once(x)["out"]
        assert not torch.allclose(y_at_once, staged(x)["out"])
        staged.score_pool4.weight.mul_(0.01)
        staged.score_pool3.weight.mul_(0.0001)
        torch.testing.assert_close(y_at_once, staged(x)["out"])


def test_bad_options_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="VGG-16"):
        create_model("fcn8s", num_classes=2, backbone="alexnet")
    with pytest.raises(ConfigError, match="at_once"):
        FCN(2, 16, at_once=True, **TINY)
    with pytest.raises(ConfigError, match="stride"):
        FCN(2, 4, **TINY)
    with pytest.raises(ConfigError, match="fc_channels"):
        create_model("fcn32s", num_classes=2, fc_channels=0)


def test_vgg16_bn_backbone_has_the_same_geometry() -> None:
    model = create_model("fcn8s", num_classes=2, backbone="vgg16_bn", **TINY).eval()
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.backbone.modules())
    with torch.no_grad():
        assert model(torch.randn(1, 3, 37, 23))["out"].shape == (1, 2, 37, 23)


# ---------------------------------------------------------------- bilinear kernel


def test_bilinear_kernel_values() -> None:
    # The reference's upsample_filt: a separable tent, e.g. (1, 3, 3, 1) / 4 for k = 4.
    k4 = bilinear_kernel(2, 2, 4)
    tent = torch.tensor([0.25, 0.75, 0.75, 0.25])
    torch.testing.assert_close(k4[0, 0], tent[:, None] * tent[None, :])
    assert torch.count_nonzero(k4[0, 1]) == 0 and torch.count_nonzero(k4[1, 0]) == 0
    k3 = bilinear_kernel(1, 1, 3)[0, 0]  # odd size: centred on the middle tap
    torch.testing.assert_close(k3[1], torch.tensor([0.5, 1.0, 0.5]))
    assert bilinear_kernel(3, 1, 4).shape == (3, 1, 4, 4)
    with pytest.raises(ValueError):
        bilinear_kernel(3, 2, 4)


@pytest.mark.parametrize("factor", [2, 8, 16, 32])
def test_bilinear_upsampler_is_bilinear_interpolation(factor: int) -> None:
    # A 2f x 2f kernel with stride f, cropped by f/2, is F.interpolate(align_corners=False)
    # wherever two input samples surround the output pixel (the interior).
    torch.manual_seed(0)
    up = bilinear_upsampler(3, 2 * factor, factor).double()
    x = torch.randn(1, 3, 6, 7, dtype=torch.float64)
    with torch.no_grad():
        y = up(x)[..., factor // 2 :, factor // 2 :][..., : 6 * factor, : 7 * factor]
    ref = F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)
    inner = (..., slice(factor, -factor), slice(factor, -factor))
    torch.testing.assert_close(y[inner], ref[inner])
    assert not up.weight.requires_grad and up.bias is None
