"""DeepLab v2, v3 and v3+ in the papers' layout: ASPP, rates, multi-grid, decoder, aux, names."""

from __future__ import annotations

import math
import sys

import pytest
import torch
import torch.nn as nn

from denseseg.errors import ConfigError
from denseseg.layers import ASPP, ASPPPooling, ASPPv2
from denseseg.models import create_model, get_model_entry, list_models
from denseseg.models.base import SegmentationModel
from denseseg.models.tv_layouts import TorchvisionLayoutModel

TINY = {"backbone": "resnet18", "backbone_kwargs": {"width": 0.25}}


def _meta(name: str, **kwargs: object) -> SegmentationModel:
    """Build on the meta device: structure without memory or initialisation cost."""
    with torch.device("meta"):
        return create_model(name, **kwargs)


# ---------------------------------------------------------------- layers


def test_aspp_v2_sums_four_atrous_class_scores() -> None:
    torch.manual_seed(0)
    aspp = ASPPv2(8, 5)
    assert [(b.kernel_size, b.dilation) for b in aspp.branches] == [
        ((3, 3), (r, r)) for r in (6, 12, 18, 24)
    ]
    assert all(b.out_channels == 5 and b.bias is not None for b in aspp.branches)
    assert all(torch.count_nonzero(b.bias) == 0 for b in aspp.branches)
    assert abs(torch.cat([b.weight.flatten() for b in aspp.branches]).std().item() - 0.01) < 0.002
    x = torch.randn(1, 8, 30, 31)
    with torch.no_grad():
        torch.testing.assert_close(aspp(x), sum(b(x) for b in aspp.branches))
        assert aspp(x).shape == (1, 5, 30, 31)


def test_aspp_v3_branches() -> None:
    aspp = ASPP(32, 16, (6, 12, 18))
    kinds = [(b.conv.kernel_size, b.conv.dilation, b.conv.out_channels) for b in aspp.branches]
    assert kinds == [((1, 1), (1, 1), 16)] + [((3, 3), (r, r), 16) for r in (6, 12, 18)] + [
        ((1, 1), (1, 1), 16)
    ]
    assert isinstance(aspp.branches[-1], ASPPPooling)
    assert all(isinstance(b.norm, nn.BatchNorm2d) and b.conv.bias is None for b in aspp.branches)
    assert aspp.project.conv.in_channels == 5 * 16
    x = torch.randn(2, 32, 9, 11)
    with torch.no_grad():
        assert aspp.eval()(x).shape == (2, 16, 9, 11)
        # Image pooling: one value per channel, computed from the global mean.
        pooled = aspp.branches[-1](x)
        torch.testing.assert_close(pooled, pooled[..., :1, :1].expand_as(pooled))
        branch = aspp.branches[-1]
        want = branch.act(branch.norm(branch.conv(x.mean(dim=(2, 3), keepdim=True))))
        torch.testing.assert_close(pooled[..., :1, :1], want)


# ---------------------------------------------------------------- DeepLab v2


def test_deeplabv2_is_aspp_l_on_dilated_resnet101() -> None:
    model = _meta("deeplabv2", num_classes=21)
    assert model.backbone.name == "resnet101"
    assert model.backbone.feature_info[-1].reduction == 8
    assert isinstance(model.head, ASPPv2) and model.head.rates == (6, 12, 18, 24)
    assert all(b.in_channels == 2048 for b in model.head.branches)
    head = sum(p.numel() for p in model.head.parameters())
    assert head == 4 * (2048 * 9 * 21 + 21)
    # No multi-grid in v2: layer4 follows torchvision's dilation rule at output stride 8.
    assert [b.conv2.dilation[0] for b in model.backbone.layer4] == [2, 4, 4]
    assert model.aux_head is None


# ---------------------------------------------------------------- DeepLab v3


@pytest.mark.parametrize(
    ("output_stride", "rates", "grid"),
    [(16, (6, 12, 18), [2, 4, 8]), (8, (12, 24, 36), [4, 8, 16])],
)
def test_deeplabv3_rates_double_at_output_stride_8(
    output_stride: int, rates: tuple[int, ...], grid: list[int]
) -> None:
    model = _meta("deeplabv3", num_classes=21, backbone="resnet101", output_stride=output_stride)
    assert model.backbone.feature_info[-1].reduction == output_stride
    assert model.head.aspp.rates == rates
    assert [b.conv2.dilation[0] for b in model.backbone.layer4] == grid  # multi-grid (1, 2, 4)
    assert all(b.conv.out_channels == 256 for b in model.head.aspp.branches)
    assert isinstance(model.head.conv, nn.Identity)  # the paper has no conv after ASPP
    assert model.head.classifier.in_channels == 256 and model.head.classifier.kernel_size == (1, 1)


def test_deeplabv3_multi_grid_options() -> None:
    # "auto" applies (1, 2, 4) only where layer4 has three units.
    small = _meta("deeplabv3", num_classes=2, backbone="resnet18")
    assert [b.conv2.dilation[0] for b in small.backbone.layer4] == [2, 2]
    off = _meta("deeplabv3", num_classes=2, backbone="resnet50", multi_grid=None)
    assert [b.conv2.dilation[0] for b in off.backbone.layer4] == [1, 2, 2]
    own = _meta("deeplabv3", num_classes=2, backbone="resnet50", multi_grid=[1, 1, 1])
    assert [b.conv2.dilation[0] for b in own.backbone.layer4] == [2, 2, 2]


def test_deeplabv3_on_mobilenet_reads_channels_from_feature_info() -> None:
    model = _meta("deeplabv3", num_classes=4, backbone="mobilenet_v3_large", aux_loss=True)
    assert model.head.aspp.branches[0].conv.in_channels == 960
    assert model.aux_head.block.conv.in_channels == 112  # the level before the last
    with pytest.raises(ConfigError, match="multi_grid"):
        _meta("deeplabv3", num_classes=4, backbone="mobilenet_v3_large", multi_grid=(1, 2, 4))


# ---------------------------------------------------------------- DeepLab v3+


def test_deeplabv3plus_decoder_layout() -> None:
    model = _meta("deeplabv3plus", num_classes=21, backbone="resnet50")
    head = model.head
    assert model.head_levels[0] == 1 and model.backbone.feature_info[1].reduction == 4
    assert head.low_proj.conv.in_channels == 256 and head.low_proj.conv.out_channels == 48
    assert head.low_proj.conv.kernel_size == (1, 1)
    convs = [m.conv for m in head.fuse]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [
        (256 + 48, 256, (3, 3)),
        (256, 256, (3, 3)),
    ]
    assert head.aspp.rates == (6, 12, 18)


def test_deeplabv3plus_classifies_at_stride_4_and_upsamples_to_the_input() -> None:
    torch.manual_seed(0)
    model = create_model(
        "deeplabv3plus", num_classes=3, aspp_channels=8, decoder_channels=8, **TINY
    ).eval()
    seen = {}
    model.head.classifier.register_forward_hook(lambda m, i, o: seen.update(shape=o.shape))
    h, w = 53, 70
    with torch.no_grad():
        out = model(torch.randn(1, 3, h, w))
    assert seen["shape"][-2:] == (math.ceil(h / 4), math.ceil(w / 4))
    assert out["out"].shape == (1, 3, h, w)


# ---------------------------------------------------------------- aux head, names, errors


@pytest.mark.parametrize("name", ["deeplabv2", "deeplabv3", "deeplabv3plus"])
def test_aux_head_on_layer3(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=3, aux_loss=True, **TINY).eval()
    assert model.backbone.feature_info[model.aux_level].name == "layer3"
    assert model.aux_head.block.conv.in_channels == model.backbone.feature_info[-2].channels
    with torch.no_grad():
        out = model(torch.randn(1, 3, 40, 45))
    assert set(out) == {"out", "aux"} and out["aux"].shape == out["out"].shape == (1, 3, 40, 45)
    assert not torch.equal(out["aux"], out["out"])


def test_names_and_shorthands() -> None:
    names = set(list_models())
    assert {"deeplabv2", "deeplabv3", "deeplabv3plus"} <= names
    assert {"deeplabv2_resnet101", "deeplabv3plus_resnet50", "deeplabv3plus_resnet101"} <= names
    for name, backbone in [
        ("deeplabv3plus_resnet50", "resnet50"),
        ("deeplabv3plus_resnet101", "resnet101"),
        ("deeplabv2_resnet101", "resnet101"),
    ]:
        model = _meta(name, num_classes=21)
        assert model.backbone.name == backbone
        assert not isinstance(model, TorchvisionLayoutModel)
    # deeplabv3_<backbone> is torchvision's layout (see denseseg.models.deeplab's docstring).
    assert isinstance(_meta("deeplabv3_resnet50", num_classes=21), TorchvisionLayoutModel)
    for name in names:
        if name.startswith(("deeplab", "fcn_resnet", "lraspp")):
            assert get_model_entry(name).test_cfg, f"{name} declares no test configuration"


def test_bad_options_are_config_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="output_stride"):
        _meta("deeplabv3", num_classes=2, output_stride=32)
    with pytest.raises(ConfigError, match="cannot be dilated"):
        _meta("deeplabv3plus", num_classes=2, backbone="vgg16")
    with pytest.raises(ConfigError, match="has no option"):
        _meta("deeplabv3plus", num_classes=2, bogus=1)
    monkeypatch.setitem(sys.modules, "timm", None)  # timm missing, even where it is installed
    with pytest.raises(ConfigError, match=r"pip install .denseseg\[timm\]"):
        _meta("deeplabv3", num_classes=2, backbone="timm:resnet50")
