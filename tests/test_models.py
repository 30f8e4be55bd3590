"""Tests for the model registry suite, the U-Net and the per-pixel classifier."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from denseseg.errors import ConfigError
from denseseg.models import (
    PixelwiseClassifier,
    UNet,
    create_model,
    get_model_entry,
    list_models,
    unet_output_size,
    unet_valid_input_size,
)

ODD_SIZE = (97, 131)
VALID_MIN_SIZE = (188, 204)
# Instance models (Mask R-CNN) follow torchvision's detection convention instead (a loss dict in
# training, per-image dicts in eval mode): tests/test_maskrcnn.py runs their suite.
SUITE = [
    name
    if get_model_entry(name).task == "semantic"
    else pytest.param(
        name, marks=pytest.mark.skip(reason="instance model: suite in tests/test_maskrcnn.py")
    )
    for name in list_models()
]


def _build(name: str, num_classes: int = 3, in_channels: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return create_model(
        name, num_classes=num_classes, in_channels=in_channels, **get_model_entry(name).test_cfg
    )


def _sizes(model: nn.Module) -> tuple[tuple[int, int], tuple[int, int]]:
    """Input size to test and the output size the model must give for it."""
    if getattr(model, "padding", "same") == "valid":
        h, w = (model.valid_input_size(s) for s in VALID_MIN_SIZE)
        return (h, w), (model.output_size(h), model.output_size(w))
    return ODD_SIZE, ODD_SIZE


# ---------------------------------------------------------------- every registered model


@pytest.mark.parametrize("name", SUITE)
def test_forward_backward(name: str) -> None:
    model = _build(name).train()
    assert model.num_classes == 3 and model.in_channels == 3
    (h, w), (oh, ow) = _sizes(model)
    out = model(torch.randn(2, 3, h, w))
    assert isinstance(out, dict) and isinstance(out.get("out"), torch.Tensor)
    assert out["out"].shape == (2, 3, oh, ow)
    sum(v.float().square().mean() for v in out.values()).backward()
    for pname, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{pname} gets no gradient"
            assert torch.isfinite(p.grad).all(), pname


@pytest.mark.parametrize("name", SUITE)
def test_exportable_models_trace_to_the_same_output(name: str) -> None:
    # The flag promises a static graph: the frozen TorchScript trace (the Segmenter's fast path,
    # and what exporters start from) must give the eager model's logits.
    from denseseg.inference.fast import FrozenTraces

    if not get_model_entry(name).exportable:
        pytest.skip(f"{name} is not flagged exportable")
    model = _build(name).eval()
    (h, w), _ = _sizes(model)
    x = torch.randn(1, 3, h, w)
    with torch.no_grad():
        eager = model(x)["out"]
    traced = FrozenTraces(model)(x)
    assert torch.allclose(eager, traced, atol=1e-4 * max(1.0, eager.abs().max().item()))


@pytest.mark.parametrize("name", SUITE)
def test_feature_info_matches_the_backbone_outputs(name: str) -> None:
    model = _build(name).eval()
    backbone = getattr(model, "backbone", None)
    if backbone is None or not hasattr(backbone, "feature_info"):
        pytest.skip(f"{name} has no registered backbone")
    h, w = ODD_SIZE
    with torch.no_grad():
        feats = backbone(torch.randn(1, 3, h, w))
    infos = backbone.feature_info
    assert len(feats) == len(infos)
    assert [f.shape[1] for f in feats] == [i.channels for i in infos]
    # Strides: each level is its reduction ratio below the previous one (rounded up, as strided
    # convolutions and ceil-mode pooling do); the first is at least the input over its
    # reduction (FCN's trunk pads its input by 100 pixels).
    first = feats[0].shape[-2:]
    assert first[0] >= math.ceil(h / infos[0].reduction) and first[1] >= math.ceil(
        w / infos[0].reduction
    )
    for prev, cur, ip, ic in zip(feats, feats[1:], infos, infos[1:]):
        step = ic.reduction // ip.reduction
        assert cur.shape[-2:] == tuple(math.ceil(s / step) for s in prev.shape[-2:])


@pytest.mark.parametrize("name", SUITE)
def test_state_dict_round_trip_and_eval_determinism(name: str) -> None:
    a = _build(name, seed=0).eval()
    b = _build(name, seed=1).eval()
    (h, w), _ = _sizes(a)
    x = torch.randn(1, 3, h, w)
    with torch.no_grad():
        ya = a(x)["out"]
        assert torch.equal(ya, a(x)["out"])
        assert not torch.equal(ya, b(x)["out"])  # different seeds -> different weights
        b.load_state_dict(a.state_dict())
        assert torch.equal(ya, b(x)["out"])


@pytest.mark.parametrize("name", SUITE)
def test_binary_mode_has_one_channel(name: str) -> None:
    model = _build(name, num_classes=1, in_channels=1).eval()
    assert model.num_classes == 1 and model.in_channels == 1
    (h, w), (oh, ow) = _sizes(model)
    with torch.no_grad():
        out = model(torch.randn(1, 1, h, w))["out"]
    assert out.shape == (1, 1, oh, ow)


def test_unknown_model_option_is_config_error() -> None:
    with pytest.raises(ConfigError, match="bogus"):
        create_model("unet", num_classes=2, bogus=1)
    with pytest.raises(ConfigError, match="padding"):
        create_model("unet", num_classes=2, padding="full")


# ---------------------------------------------------------------- U-Net


@pytest.fixture(scope="module")
def paper_unet() -> UNet:
    torch.manual_seed(0)
    return UNet(num_classes=2, in_channels=1, padding="valid")


def test_unet_paper_parameter_count_and_layers(paper_unet: UNet) -> None:
    assert sum(p.numel() for p in paper_unet.parameters()) == 31_030_658
    convs = [m for m in paper_unet.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    assert len(convs) == 23  # "In total the network has 23 convolutional layers."
    assert not any(isinstance(m, nn.BatchNorm2d) for m in paper_unet.modules())
    assert max(m.out_channels for m in convs) == 1024


def test_unet_he_normal_init(paper_unet: UNet) -> None:
    first = paper_unet.encoder[0][0].conv  # 1 -> 64, 3x3: N = 9
    deep = paper_unet.encoder[4][1].conv  # 1024 -> 1024, 3x3: N = 9216
    up = paper_unet.upsamplers[0]  # 1024 -> 512, 2x2 stride 2: N = 1024 per output pixel
    for module, fan_in, tol in ((first, 9, 0.1), (deep, 9 * 1024, 0.01), (up, 1024, 0.01)):
        std = module.weight.std().item()
        assert abs(std / math.sqrt(2.0 / fan_in) - 1) < tol
        assert abs(module.weight.mean().item()) < 3 * std / math.sqrt(module.weight.numel())
        assert torch.count_nonzero(module.bias) == 0


def test_unet_572_gives_388() -> None:
    # Size arithmetic does not depend on the width, so a thin net keeps this fast.
    model = UNet(num_classes=2, in_channels=1, base_channels=4, padding="valid").eval()
    assert model.output_size(572) == 388
    with torch.no_grad():
        assert model(torch.zeros(1, 1, 572, 572))["out"].shape == (1, 2, 388, 388)


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
def test_unet_valid_size_arithmetic(depth: int) -> None:
    # Context lost at input scale: two 3x3 convs per level on both paths (4 * 2**k px each) plus
    # the bottleneck (4 * 2**depth); the pooling needs (size + 4) divisible by 2**depth.
    shrink = 8 * (2**depth - 1) + 4 * 2**depth
    valid = [s for s in range(1, 420) if (s + 4) % 2**depth == 0 and s - shrink > 0]
    for s in range(1, 420):
        if s in valid:
            assert unet_output_size(s, depth) == s - shrink
        else:
            with pytest.raises(ConfigError):
                unet_output_size(s, depth)
        expected = next(v for v in valid + [10**9] if v >= s)
        if expected < 420:
            assert unet_valid_input_size(s, depth) == expected
    assert unet_output_size(97, depth, padding="same") == 97


def test_unet_invalid_size_names_nearest_sizes() -> None:
    with pytest.raises(ValueError, match="556 or 572"):
        unet_output_size(570)
    model = UNet(num_classes=2, in_channels=1, base_channels=2, depth=2, padding="valid")
    with pytest.raises(ConfigError, match="padding='same'"):
        model(torch.zeros(1, 1, 65, 64))  # rows invalid (61 is odd), columns valid


def _symmetrise_horizontally(model: nn.Module) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                m.weight.copy_((m.weight + m.weight.flip(-1)) / 2)


@pytest.mark.parametrize(("padding", "size"), [("valid", (52, 76)), ("same", (21, 26))])
def test_unet_crops_are_centred(padding: str, size: tuple[int, int]) -> None:
    # With left-right symmetric kernels the net commutes with a horizontal flip exactly when every
    # skip crop and the final crop take the centre (an off-centre crop breaks the symmetry).
    torch.manual_seed(0)
    model = UNet(num_classes=2, in_channels=1, base_channels=4, depth=2, padding=padding).eval()
    _symmetrise_horizontally(model)
    x = torch.randn(1, 1, *size, dtype=torch.float64)
    model = model.double()
    with torch.no_grad():
        y = model(x)["out"]
        y_flip = model(x.flip(-1))["out"]
    torch.testing.assert_close(y_flip, y.flip(-1))


def test_unet_same_padding_any_size() -> None:
    model = UNet(num_classes=2, in_channels=3, base_channels=2, depth=3).eval()
    assert model.padding == "same" and model.valid_input_size(5) == 5
    with torch.no_grad():
        for h, w in [(1, 1), (3, 5), (8, 16), (17, 9)]:
            assert model(torch.randn(1, 3, h, w))["out"].shape == (1, 2, h, w)


def test_unet_dropout_only_in_training() -> None:
    torch.manual_seed(0)
    model = UNet(num_classes=2, base_channels=4, depth=2, dropout=0.5)
    x = torch.randn(1, 3, 16, 16)
    assert not torch.equal(model.train()(x)["out"], model(x)["out"])
    model.eval()
    assert torch.equal(model(x)["out"], model(x)["out"])


def test_unet_batch_norm_option() -> None:
    model = UNet(num_classes=2, base_channels=4, depth=2, batch_norm=True)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 2 * (2 * 2 + 1)  # two per double conv, depth*2+1 double convs
    # A conv followed by BatchNorm needs no bias.
    assert model.encoder[0][0].conv.bias is None


# ---------------------------------------------------------------- per-pixel classifier


def test_pixelwise_output_depends_only_on_its_pixel() -> None:
    torch.manual_seed(0)
    model = PixelwiseClassifier(num_classes=4, in_channels=3, hidden=(16, 16)).eval()
    x = torch.randn(1, 3, 9, 11)
    x2 = x.clone()
    x2[0, :, 4, 7] += 3.0
    with torch.no_grad():
        diff = (model(x2)["out"] - model(x)["out"]).abs().sum(dim=1)[0]  # (H, W)
    assert diff[4, 7] > 0
    diff[4, 7] = 0
    assert torch.count_nonzero(diff) == 0


def test_pixelwise_layers_are_1x1() -> None:
    model = PixelwiseClassifier(num_classes=2, hidden=(8, 8, 8))
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 4 and all(m.kernel_size == (1, 1) for m in convs)
    linear = PixelwiseClassifier(num_classes=2, hidden=())
    assert sum(p.numel() for p in linear.parameters()) == 3 * 2 + 2
