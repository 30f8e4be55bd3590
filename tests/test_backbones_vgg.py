"""VGG-16, VGG-16-BN and AlexNet trunks: torchvision's layout and names, feature_info, options,
and loading a torchvision classification state_dict from a file."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torchvision
from torchvision.models.vgg import cfgs, make_layers

from denseseg.backbones import create_backbone, list_backbones
from denseseg.errors import CheckpointError, ConfigError

NAMES = ("vgg16", "vgg16_bn", "alexnet")


def _torchvision_features(name: str) -> nn.Sequential:
    with torch.device("meta"):  # layout only: no memory, no initialisation
        return getattr(torchvision.models, name)(weights=None).features


@pytest.mark.parametrize("name", NAMES)
def test_names_and_shapes_follow_torchvision(name: str) -> None:
    assert name in list_backbones()
    with torch.device("meta"):
        ours = create_backbone(name).state_dict()
    theirs = {f"features.{k}": v for k, v in _torchvision_features(name).state_dict().items()}
    assert list(ours) == list(theirs)
    assert all(ours[k].shape == theirs[k].shape for k in ours)


def test_vgg16_parameter_count() -> None:
    with torch.device("meta"):
        model = create_backbone("vgg16")
    assert sum(p.numel() for p in model.parameters()) == 14_714_688


def _pool_out(n: int, kernel: int, stride: int, ceil: bool) -> int:
    f = math.ceil if ceil else math.floor
    return int(f((n - kernel) / stride)) + 1


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("ceil_mode", [False, True])
def test_feature_info_agrees_with_outputs(name: str, ceil_mode: bool) -> None:
    model = create_backbone(name, width=1 / 8, in_channels=1, ceil_mode=ceil_mode).eval()
    size = (97, 131)
    with torch.no_grad():
        feats = model(torch.randn(2, 1, *size))
    assert len(feats) == len(model.feature_info)
    strides = [f.reduction for f in model.feature_info]
    assert strides == ([2, 4, 8, 16, 32] if name != "alexnet" else [8, 16, 32])
    full = {"vgg16": [64, 128, 256, 512, 512], "alexnet": [64, 192, 256]}
    assert [f.channels for f in model.feature_info] == [
        c // 8 for c in full[name.removesuffix("_bn")]
    ]
    for feat, info in zip(feats, model.feature_info):
        assert feat.shape[:2] == (2, info.channels)
    # The spatial sizes follow the layer arithmetic: VGG's 2x2 pools halve (floor or ceil);
    # AlexNet's conv1 (11x11 stride 4, pad 2) and 3x3 stride-2 pools shrink a little more.
    for axis, n in enumerate(size):
        if name == "alexnet":
            n = (n + 4 - 11) // 4 + 1
            expected = []
            for _ in range(3):
                n = _pool_out(n, 3, 2, ceil_mode)
                expected.append(n)
        else:
            f = math.ceil if ceil_mode else math.floor
            expected = [int(f(n / s)) for s in strides]
        assert [t.shape[2 + axis] for t in feats] == expected


@pytest.mark.parametrize("name", NAMES)
def test_outputs_match_torchvision_features(name: str) -> None:
    torch.manual_seed(0)
    if name == "alexnet":
        theirs = torchvision.models.alexnet(weights=None).features.eval()
    else:  # what torchvision.models.vgg16(_bn) builds, without the costly classifier
        theirs = make_layers(cfgs["D"], batch_norm=name == "vgg16_bn").eval()
        for m in theirs.modules():
            if isinstance(m, nn.BatchNorm2d):  # non-trivial statistics
                nn.init.uniform_(m.running_mean)
                nn.init.uniform_(m.running_var, 0.5, 2.0)
    ours = create_backbone(name).eval()
    ours.load_state_dict({f"features.{k}": v for k, v in theirs.state_dict().items()})
    x = torch.randn(1, 3, 67, 75)
    with torch.no_grad():
        feats = ours(x)
        taps = []
        y = x
        for m in theirs:
            y = m(y)
            if isinstance(m, nn.MaxPool2d):
                taps.append(y)
    assert len(taps) == len(feats)
    for a, b in zip(feats, taps):
        torch.testing.assert_close(a, b)


def test_options_first_padding_width_in_channels() -> None:
    model = create_backbone("vgg16", first_padding=100, ceil_mode=True, width=1 / 16, in_channels=4)
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    assert convs[0].padding == (100, 100) and convs[0].in_channels == 4
    assert [c.out_channels for c in convs][::3] == [4, 8, 16, 32, 32]
    assert all(m.ceil_mode for m in model.features if isinstance(m, nn.MaxPool2d))
    with torch.no_grad():
        assert model(torch.randn(1, 4, 1, 1))[-1].shape == (1, 32, 7, 7)  # Caffe FCN: 1 -> 7
    with pytest.raises(ConfigError, match="width"):
        create_backbone("vgg16", width=0)
    with pytest.raises(ConfigError, match="in_channels"):
        create_backbone("alexnet", in_channels=0)


@pytest.fixture(scope="module")
def vgg16_file(tmp_path_factory: pytest.TempPathFactory):
    """A torchvision VGG-16 classification state_dict (features and classifier), as downloaded
    ImageNet files are, written by the test (random weights)."""
    torch.manual_seed(0)
    classifier = torchvision.models.vgg16(weights=None).eval()
    path = tmp_path_factory.mktemp("weights") / "vgg16.pth"
    torch.save(classifier.state_dict(), path)
    yield path, classifier.features
    path.unlink()


def test_weights_load_a_torchvision_file(vgg16_file: tuple[Path, nn.Module]) -> None:
    path, features = vgg16_file
    model = create_backbone("vgg16", weights=path).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x)[-1], features(x))
    # The same file with the FCN's Caffe geometry: same parameters, another layout.
    caffe = create_backbone("vgg16", weights=str(path), first_padding=100, ceil_mode=True)
    torch.testing.assert_close(caffe.features[0].weight, features[0].weight)
    # One input channel: the loader sums conv1_1's RGB filters.
    grey = create_backbone("vgg16", weights=path, in_channels=1)
    torch.testing.assert_close(grey.features[0].weight, features[0].weight.sum(1, keepdim=True))


def test_weights_errors(vgg16_file: tuple[Path, nn.Module], tmp_path: Path) -> None:
    path, _ = vgg16_file
    with pytest.raises(CheckpointError, match="vgg16_bn"):
        create_backbone("vgg16_bn", weights=path)  # BN layers are missing from the file
    with pytest.raises(ConfigError, match="width=1"):
        create_backbone("vgg16", weights=path, width=0.5)
    with pytest.raises(CheckpointError, match="not found"):
        create_backbone("vgg16", weights=tmp_path / "missing.pth")
