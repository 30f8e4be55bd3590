"""torchvision-layout models: torchvision's parameter counts and, given its weights, its outputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torchvision.models.segmentation as tvseg

from denseseg.errors import ConfigError
from denseseg.models import create_model
from denseseg.models.base import SegmentationModel
from denseseg.models.tv_layouts import TorchvisionLayoutModel

# torchvision's own numbers (its weights' "num_params"), aux head on, 21 classes.
COUNTS = {
    "fcn_resnet50": 35_322_218,
    "fcn_resnet101": 54_314_346,
    "deeplabv3_resnet50": 42_004_074,
    "deeplabv3_resnet101": 60_996_202,
    "deeplabv3_mobilenet_v3_large": 11_029_328,
    "lraspp_mobilenet_v3_large": 3_221_538,
}


def _aux(name: str) -> dict[str, bool]:
    return {} if name.startswith("lraspp") else {"aux_loss": True}


@pytest.mark.parametrize("name", list(COUNTS))
def test_parameter_count_is_torchvisions(name: str) -> None:
    with torch.device("meta"):  # counting needs no memory
        model = create_model(name, num_classes=21, **_aux(name))
    assert isinstance(model, TorchvisionLayoutModel) and model.tv_name == name
    assert sum(p.numel() for p in model.parameters()) == COUNTS[name]


def _randomise(model: nn.Module, x: torch.Tensor) -> None:
    """Random weights and batch-norm statistics a real training run could have produced."""
    torch.manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
                m.momentum = 1.0  # running statistics := those of the batch below
        model.train()(torch.cat([x, x.flip(-1)]))
    model.eval()


PARITY = [
    "fcn_resnet50",
    pytest.param("fcn_resnet101", marks=pytest.mark.slow),
    "deeplabv3_resnet50",
    pytest.param("deeplabv3_resnet101", marks=pytest.mark.slow),
    "deeplabv3_mobilenet_v3_large",
    "lraspp_mobilenet_v3_large",
]


@pytest.mark.parametrize("name", PARITY)
def test_outputs_equal_torchvisions_given_its_weights(name: str) -> None:
    torch.manual_seed(1)
    ref = getattr(tvseg, name)(weights=None, weights_backbone=None, num_classes=21, **_aux(name))
    x = torch.randn(1, 3, 64, 64)
    _randomise(ref, x)
    ours = create_model(name, num_classes=21, **_aux(name)).eval()
    # strict=True: the conversion must produce every key of ours and nothing else.
    ours.load_state_dict(ours.convert_torchvision_state_dict(ref.state_dict()))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want, got = ref(x), ours(x)
    assert set(got) == set(want) == ({"out"} if name.startswith("lraspp") else {"out", "aux"})
    for key in want:
        assert got[key].shape == want[key].shape == (1, 21, 64, 64)
        scale = want[key].abs().max()
        assert scale > 0
        assert (got[key] - want[key]).abs().max() <= 1e-5 * scale, key


def test_layouts_differ_from_the_papers() -> None:
    with torch.device("meta"):
        tv = create_model("deeplabv3_resnet50", num_classes=21)
        paper = create_model("deeplabv3", num_classes=21, backbone="resnet50")
    assert isinstance(paper, SegmentationModel) and not isinstance(paper, TorchvisionLayoutModel)
    # torchvision: output stride 8, rates 12/24/36, an extra 3x3 conv, no multi-grid.
    assert tv.backbone.feature_info[-1].reduction == 8 and tv.head.aspp.rates == (12, 24, 36)
    assert isinstance(tv.head.conv[0], nn.Conv2d) and tv.head.conv[0].kernel_size == (3, 3)
    assert [b.conv2.dilation[0] for b in tv.backbone.layer4] == [2, 4, 4]
    # The paper: output stride 16, rates 6/12/18, no extra conv, multi-grid (1, 2, 4) x 2.
    assert paper.backbone.feature_info[-1].reduction == 16 and paper.head.aspp.rates == (6, 12, 18)
    assert isinstance(paper.head.conv, nn.Identity)
    assert [b.conv2.dilation[0] for b in paper.backbone.layer4] == [2, 4, 8]


def test_lraspp_has_no_aux_head() -> None:
    with pytest.raises(ConfigError, match="aux"):
        create_model("lraspp_mobilenet_v3_large", num_classes=21, aux_loss=True)
