"""convert_classifier_to_fcn: a torchvision classifier in convolutional form gives its logits at
224x224 and a map of class scores on larger images; FCN models start from such a file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torchvision

from denseseg.errors import CheckpointError, ConfigError
from denseseg.models import create_model
from denseseg.models.convert import convert_classifier_to_fcn
from denseseg.models.fcn import FCNTrunk


@pytest.fixture(scope="module")
def vgg16(tmp_path_factory: pytest.TempPathFactory):
    """A torchvision VGG-16 classifier (random weights) and its state_dict written to a file,
    as an ImageNet download would be."""
    torch.manual_seed(0)
    model = torchvision.models.vgg16(weights=None).eval()
    # torchvision's initialisation leaves the biases at zero; make them matter.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.bias.uniform_(-0.05, 0.05)
    path = tmp_path_factory.mktemp("weights") / "vgg16-imagenet.pth"
    torch.save(model.state_dict(), path)
    yield model, path
    path.unlink()  # 550 MB: do not leave it to pytest's temporary-folder rotation


def test_vgg16_224_gives_the_classifier_logits(vgg16: tuple[nn.Module, Path]) -> None:
    classifier, path = vgg16
    trunk = convert_classifier_to_fcn(path, "vgg16")
    assert isinstance(trunk, FCNTrunk) and not trunk.training
    assert trunk.fc6.weight.shape == (4096, 512, 7, 7) and trunk.score_fr.out_channels == 1000
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        logits = classifier(x)
        scores = trunk(x)
    assert scores.shape == (2, 1000, 1, 1)
    torch.testing.assert_close(
        scores[:, :, 0, 0], logits, rtol=1e-4, atol=1e-4 * logits.abs().max()
    )


def test_vgg16_larger_image_gives_a_score_map(vgg16: tuple[nn.Module, Path]) -> None:
    classifier, _ = vgg16
    trunk = convert_classifier_to_fcn(classifier)  # from the module itself
    x = torch.randn(1, 3, 320, 384)
    with torch.no_grad():
        heat = trunk(x)
        # Each position is the classifier seeing a 224x224 window of the pool5 grid: the first
        # (top-left) one shares its 7x7 pool5 input with the classifier on the top-left crop,
        # up to the crop's border pixels (zero padding there, image pixels here).
        feat = trunk.backbone(x)[-1]
        logits = classifier.classifier(feat[:, :, :7, :7].flatten(1))
    # stride-32 arithmetic: pool5 is floor(H / 32) x floor(W / 32) = 10 x 12, fc6 (7x7) -> 4 x 6
    assert heat.shape == (1, 1000, 320 // 32 - 6, 384 // 32 - 6)
    torch.testing.assert_close(heat[0, :, 0, 0], logits[0], rtol=1e-4, atol=1e-4)
    assert heat.std(dim=(2, 3)).mean() > 0  # positions differ: a map, not one vector repeated


def test_alexnet_224_gives_the_classifier_logits(tmp_path: Path) -> None:
    torch.manual_seed(0)
    classifier = torchvision.models.alexnet(weights=None).eval()
    with torch.no_grad():
        for m in classifier.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.bias.uniform_(-0.05, 0.05)
    trunk = convert_classifier_to_fcn(classifier, "alexnet")
    assert trunk.fc6.kernel_size == (6, 6)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        logits = classifier(x)
        scores = trunk(x)
        assert scores.shape == (2, 1000, 1, 1)
        torch.testing.assert_close(scores[:, :, 0, 0], logits, rtol=1e-4, atol=1e-5)
        # AlexNet: pool5 is 6x6 at 224 ((224 + 4 - 11) // 4 + 1 = 55 -> 27 -> 13 -> 6); at 351
        # it is 10x10, so fc6 (6x6) slides over 5x5 positions.
        assert trunk(torch.randn(1, 3, 351, 351)).shape == (1, 1000, 5, 5)


def test_conversion_errors(vgg16: tuple[nn.Module, Path], tmp_path: Path) -> None:
    classifier, path = vgg16
    with pytest.raises(CheckpointError, match="alexnet"):
        convert_classifier_to_fcn(classifier, "alexnet")
    with pytest.raises(CheckpointError, match="vgg16_bn"):
        convert_classifier_to_fcn(classifier, "vgg16_bn")
    with pytest.raises(ConfigError, match="resnet"):
        convert_classifier_to_fcn(path, "resnet50")
    with pytest.raises(ConfigError, match="neither a file nor a torchvision weights name"):
        convert_classifier_to_fcn(tmp_path / "nothing.pth")
    bogus = tmp_path / "bogus.pth"
    torch.save({"features.0.weight": torch.zeros(3)}, bogus)
    with pytest.raises(CheckpointError, match="bogus.pth"):
        convert_classifier_to_fcn(bogus)


def test_fcn_starts_from_an_imagenet_file(vgg16: tuple[nn.Module, Path]) -> None:
    # The paper's initialisation: conv1-conv5 as they are, fc6/fc7 convolutionalised, the
    # 1000-way layer dropped (the class count differs), score layers at zero.
    classifier, path = vgg16
    model = create_model("fcn32s", num_classes=21, backbone_weights=path)
    ref = classifier.state_dict()
    torch.testing.assert_close(model.backbone.features[28].weight, ref["features.28.weight"])
    torch.testing.assert_close(model.fc6.weight.flatten(1), ref["classifier.0.weight"])
    torch.testing.assert_close(model.fc7.weight.flatten(1), ref["classifier.3.weight"])
    torch.testing.assert_close(model.fc7.bias, ref["classifier.3.bias"])
    assert torch.count_nonzero(model.score_fr.weight) == 0
    assert model.backbone.features[0].padding == (100, 100)  # the FCN geometry is kept
    with pytest.raises(ConfigError, match="width=1"):
        create_model("fcn8s", num_classes=21, backbone_weights=path, width=0.5)
