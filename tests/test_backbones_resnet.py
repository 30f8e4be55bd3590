"""ResNet / MobileNetV3 / timm backbones: feature_info against real shapes, dilation, multi-grid."""

from __future__ import annotations

import math
import sys

import pytest
import torch
import torch.nn as nn
import torchvision

from denseseg.backbones import FeatureInfo, create_backbone
from denseseg.backbones.mobilenet import MobileNetV3Backbone
from denseseg.backbones.resnet import ResNetBackbone
from denseseg.errors import ConfigError


def _check_feature_info(backbone: nn.Module, size: tuple[int, int]) -> list[torch.Tensor]:
    """Every level's channels and stride agree with the map the forward returns."""
    h, w = size
    with torch.no_grad():
        feats = backbone.eval()(torch.randn(1, backbone.in_channels, h, w))
    assert len(feats) == len(backbone.feature_info)
    for f, info in zip(feats, backbone.feature_info):
        assert isinstance(info, FeatureInfo)
        # Every stride-2 layer here pads so that it maps n to ceil(n / 2).
        assert f.shape[1:] == (
            info.channels,
            math.ceil(h / info.reduction),
            math.ceil(w / info.reduction),
        ), info
    reductions = [i.reduction for i in backbone.feature_info]
    assert reductions == sorted(reductions)
    return feats


CHANNELS = {
    18: (64, 64, 128, 256, 512),
    34: (64, 64, 128, 256, 512),
    50: (64, 256, 512, 1024, 2048),
    101: (64, 256, 512, 1024, 2048),
}


@pytest.mark.parametrize(
    ("depth", "output_stride"),
    [(18, 32), (18, 16), (18, 8), (34, 16), (50, 32), (50, 16), (50, 8), (101, 8)],
)
def test_resnet_feature_info_matches_shapes(depth: int, output_stride: int) -> None:
    backbone = create_backbone(f"resnet{depth}", output_stride=output_stride)
    _check_feature_info(backbone, (45, 61))
    info = backbone.feature_info
    assert tuple(i.channels for i in info) == CHANNELS[depth]
    assert [i.reduction for i in info] == [min(r, output_stride) for r in (2, 4, 8, 16, 32)]
    assert [i.name for i in info] == ["stem", "layer1", "layer2", "layer3", "layer4"]


def test_resnet_width_and_input_channels() -> None:
    backbone = create_backbone("resnet50", output_stride=8, width=0.25, in_channels=1)
    assert backbone.in_channels == 1
    _check_feature_info(backbone, (33, 40))
    assert [i.channels for i in backbone.feature_info] == [16, 64, 128, 256, 512]


@pytest.mark.parametrize("output_stride", [16, 8])
def test_resnet_dilation_equals_torchvision(output_stride: int) -> None:
    replace = [False, output_stride == 8, True]
    with torch.device("meta"):  # structure only: no weights needed
        ref = torchvision.models.resnet50(weights=None, replace_stride_with_dilation=replace)
        ours = ResNetBackbone(50, output_stride=output_stride)
    ref_convs = {n: m for n, m in ref.named_modules() if isinstance(m, nn.Conv2d)}
    our_convs = {n: m for n, m in ours.named_modules() if isinstance(m, nn.Conv2d)}
    assert our_convs.keys() == ref_convs.keys()
    for name, conv in our_convs.items():
        r = ref_convs[name]
        assert (conv.stride, conv.dilation, conv.padding) == (r.stride, r.dilation, r.padding), name
    # Same keys as a torchvision classification state_dict without its fc.
    assert set(ours.state_dict()) == {k for k in ref.state_dict() if not k.startswith("fc.")}


@pytest.mark.parametrize("depth", [18, 50])
def test_dilated_resnet_is_the_strided_one_densely_evaluated(depth: int) -> None:
    # "Atrous" evaluation: with the same weights, the output-stride-8 net computes the
    # output-stride-32 net's map on a 4x finer grid, so sub-sampling it gives the latter exactly.
    torch.manual_seed(0)
    # float64, so that the two nets' different summation orders do not blur the comparison.
    strided = ResNetBackbone(depth, width=0.25).eval().double()
    dense = ResNetBackbone(depth, output_stride=8, width=0.25).eval().double()
    dense.load_state_dict(strided.state_dict())
    x = torch.randn(1, 3, 70, 53, dtype=torch.float64)
    with torch.no_grad():
        s, d = strided(x), dense(x)
    torch.testing.assert_close(d[3][..., ::2, ::2], s[3])
    torch.testing.assert_close(d[4][..., ::4, ::4], s[4])


def _rates(backbone: ResNetBackbone) -> list[int]:
    return [b.conv2.dilation[0] for b in backbone.layer4]


def test_multi_grid_multiplies_the_stage_dilation() -> None:
    with torch.device("meta"):
        assert _rates(ResNetBackbone(101, output_stride=16)) == [1, 2, 2]  # torchvision's rule
        assert _rates(ResNetBackbone(101, output_stride=16, multi_grid=(1, 2, 4))) == [2, 4, 8]
        assert _rates(ResNetBackbone(50, output_stride=8, multi_grid=(1, 2, 4))) == [4, 8, 16]
        assert _rates(ResNetBackbone(50, output_stride=32, multi_grid=(1, 2, 4))) == [1, 2, 4]
        basic = ResNetBackbone(18, output_stride=16, multi_grid=(1, 2))
        assert [(b.conv1.dilation[0], b.conv2.dilation[0]) for b in basic.layer4] == [
            (2, 2),
            (4, 4),
        ]
    for conv in (
        m for m in basic.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)
    ):
        assert conv.padding == conv.dilation  # 3x3 convolutions keep the size


def test_resnet_bad_options_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="multi_grid"):
        ResNetBackbone(18, output_stride=16, multi_grid=(1, 2, 4))  # layer4 has two units
    with pytest.raises(ConfigError, match="output_stride"):
        create_backbone("resnet50", output_stride=4)
    with pytest.raises(ConfigError, match="depth"):
        ResNetBackbone(152)
    with pytest.raises(ConfigError, match="unknown backbone"):
        create_backbone("resnet152")


@pytest.mark.parametrize("output_stride", [32, 16, 8])
def test_mobilenet_feature_info_matches_shapes(output_stride: int) -> None:
    backbone = create_backbone("mobilenet_v3_large", output_stride=output_stride)
    _check_feature_info(backbone, (45, 61))
    assert [i.channels for i in backbone.feature_info] == [16, 24, 40, 112, 960]
    assert [i.reduction for i in backbone.feature_info] == [
        min(r, output_stride) for r in (2, 4, 8, 16, 32)
    ]


def test_mobilenet_dilation_equals_torchvision_segmentation_backbone() -> None:
    with torch.device("meta"):
        ref = torchvision.models.mobilenet_v3_large(weights=None, dilated=True).features
    ours = MobileNetV3Backbone(output_stride=16)
    ref_convs = {n: m for n, m in ref.named_modules() if isinstance(m, nn.Conv2d)}
    our_convs = {
        n.removeprefix("features."): m for n, m in ours.named_modules() if isinstance(m, nn.Conv2d)
    }
    assert our_convs.keys() == ref_convs.keys()
    for name, conv in our_convs.items():
        r = ref_convs[name]
        assert (conv.stride, conv.dilation, conv.padding) == (r.stride, r.dilation, r.padding), name
    # torchvision's segmentation taps: the first strided block of stride 8, and the last layer.
    starts = ours.stage_starts()
    assert (starts[-4], starts[-1]) == (4, 16)
    ours.set_out_indices((4, 16))
    feats = _check_feature_info(ours, (64, 64))
    assert [f.shape[1] for f in feats] == [40, 960]


def test_mobilenet_width_in_channels_and_bad_indices() -> None:
    backbone = create_backbone("mobilenet_v3_large", width_mult=0.5, in_channels=2, output_stride=8)
    _check_feature_info(backbone, (37, 50))
    with pytest.raises(ConfigError, match="out_indices"):
        MobileNetV3Backbone(out_indices=(6, 3))
    with pytest.raises(ConfigError, match="output_stride"):
        MobileNetV3Backbone(output_stride=4)


def test_timm_backbone_without_timm_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)  # an import of timm now fails
    with pytest.raises(ConfigError, match=r"pip install .denseseg\[timm\]"):
        create_backbone("timm", model_name="resnet18")
