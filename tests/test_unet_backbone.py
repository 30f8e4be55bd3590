"""U-Net on a backbone (`unet`, backbone=...; shorthands `unet_resnet18/34/50`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from denseseg import create_model
from denseseg.backbones import create_backbone
from denseseg.errors import ConfigError
from denseseg.models.unet_backbone import BackboneUNet


def test_shorthand_is_the_architecture_with_its_backbone() -> None:
    torch.manual_seed(0)
    a = create_model("unet_resnet34", num_classes=5, backbone_kwargs={"width": 0.25})
    torch.manual_seed(0)
    b = create_model("unet", num_classes=5, backbone="resnet34", backbone_kwargs={"width": 0.25})
    assert isinstance(a, BackboneUNet)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_decoder_reads_the_backbone_levels_and_skips() -> None:
    model = create_model("unet_resnet18", num_classes=3, backbone_kwargs={"width": 0.25})
    info = model.backbone.feature_info
    assert [f.reduction for f in info] == [2, 4, 8, 16, 32]
    # Each block takes the deeper output plus the skip of its stride; the last has no skip.
    skips = [f.channels for f in reversed(info[:-1])] + [0]
    ins = [info[-1].channels, 256, 128, 64, 32]
    for block, c_in, skip in zip(model.blocks, ins, skips):
        assert block.conv1[0].in_channels == c_in + skip
    assert model.head.out_channels == 3


@pytest.mark.parametrize("size", [(97, 131), (64, 64), (33, 47)])
def test_output_at_input_resolution(size: tuple[int, int]) -> None:
    model = create_model(
        "unet_resnet50", num_classes=4, in_channels=1, backbone_kwargs={"width": 0.25}
    )
    out = model(torch.randn(2, 1, *size))["out"]
    assert out.shape == (2, 4, *size)


def test_backbone_weights_from_a_classifier_file(tmp_path: Path) -> None:
    src = create_backbone("resnet18")
    torch.save(src.state_dict(), tmp_path / "r18.pt")
    model = create_model("unet_resnet18", num_classes=2, backbone_weights=str(tmp_path / "r18.pt"))
    assert torch.equal(model.backbone.conv1.weight, src.conv1.weight)


def test_options_that_do_not_apply_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="has no option 'depth'"):
        create_model("unet", num_classes=2, backbone="resnet18", depth=3)
    with pytest.raises(ConfigError, match="need backbone"):
        create_model("unet", num_classes=2, decoder_channels=[8, 8])
    with pytest.raises(ConfigError, match="decoder_channels has 2 values"):
        create_model("unet_resnet18", num_classes=2, decoder_channels=[8, 8])
