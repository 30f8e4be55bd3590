"""Bringing your own weights: checkpoints, safetensors, torchvision files and names, backbones."""

from __future__ import annotations

import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision
import torchvision.models.segmentation as tvseg
from safetensors.torch import save_file

from denseseg.checkpoint import (
    LoadReport,
    atomic_save,
    load_backbone_weights,
    load_model_weights,
)
from denseseg.errors import CheckpointError, ConfigError
from denseseg.models import create_model

TINY = {"backbone": "resnet18", "backbone_kwargs": {"width": 0.25}, "aspp_channels": 8}


def _tiny(num_classes: int = 3, seed: int = 0, **kwargs: object) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model("deeplabv3", num_classes=num_classes, **{**TINY, **kwargs}).eval()


def _trained(seed: int = 7, **kwargs: object) -> torch.nn.Module:
    """A model whose batch-norm statistics moved, as after training."""
    model = _tiny(seed=seed, **kwargs).train()
    with torch.no_grad():
        model(torch.randn(2, 3, 40, 40))
    return model.eval()


def _same_outputs(a: torch.nn.Module, b: torch.nn.Module) -> None:
    x = torch.randn(1, 3, 37, 45)
    with torch.no_grad():
        torch.testing.assert_close(a(x)["out"], b(x)["out"])


def test_denseseg_checkpoint_and_safetensors_round_trip(tmp_path: Path) -> None:
    src = _trained()
    ckpt = tmp_path / "best.pt"
    atomic_save({"model": src.state_dict(), "step": 10, "model_name": "deeplabv3"}, ckpt)
    st = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(st))
    for path in (ckpt, st):
        loaded = create_model("deeplabv3", num_classes=3, weights=str(path), **TINY).eval()
        _same_outputs(src, loaded)
    report = load_model_weights(_tiny(), st)
    assert report.loaded == len(src.state_dict()) and not report.skipped and not report.missing


def test_another_class_count_skips_only_the_classifiers(tmp_path: Path) -> None:
    src = _trained(aux_loss=True)
    path = tmp_path / "voc.pth"
    torch.save(src.state_dict(), path)
    fresh = _tiny(num_classes=5, seed=3, aux_loss=True)
    init = {k: v.clone() for k, v in fresh.state_dict().items()}
    report = load_model_weights(fresh, path)
    classifier = ["head.classifier.weight", "head.classifier.bias"]
    aux = ["aux_head.classifier.weight", "aux_head.classifier.bias"]
    assert sorted(report.skipped) == sorted(classifier + aux) and not report.missing
    state = fresh.state_dict()
    for key, value in state.items():
        if key in report.skipped:
            assert torch.equal(value, init[key])  # the class-score layers keep their init
        else:
            assert torch.equal(value, src.state_dict()[key]), key
    assert "head.classifier.weight" in str(report)
    # Through create_model too: a 5-class model from 3-class weights.
    model = create_model("deeplabv3", num_classes=5, aux_loss=True, weights=str(path), **TINY)
    assert model.head.classifier.out_channels == 5


def test_weights_that_do_not_fit_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "r34.pt"
    other = create_model("deeplabv3", num_classes=3, **{**TINY, "backbone": "resnet34"})
    torch.save(other.state_dict(), path)
    with pytest.raises(CheckpointError, match="r34.pt"):
        create_model("deeplabv3", num_classes=3, weights=str(path), **TINY)
    with pytest.raises(CheckpointError, match="not found"):
        create_model("deeplabv3", num_classes=3, weights=str(tmp_path / "nope.pt"), **TINY)


class _Payload:
    """Not a tensor: ``weights_only`` loading must refuse to build it."""


def test_files_are_not_unpickled(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "x": _Payload()}, path)
    with pytest.raises(CheckpointError, match="evil.pt"):
        load_model_weights(_tiny(), path)


@pytest.fixture(scope="module")
def tv_mobilenet() -> torch.nn.Module:
    torch.manual_seed(0)
    model = tvseg.deeplabv3_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=21, aux_loss=True
    )
    with torch.no_grad():  # non-trivial batch-norm statistics
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def test_torchvision_state_dict_is_converted(tmp_path: Path, tv_mobilenet: torch.nn.Module) -> None:
    path = tmp_path / "deeplabv3_mobilenet_v3_large_coco.pth"
    torch.save(tv_mobilenet.state_dict(), path)
    ours = create_model(
        "deeplabv3_mobilenet_v3_large", num_classes=21, aux_loss=True, weights=str(path)
    ).eval()
    x = torch.randn(1, 3, 48, 56)
    with torch.no_grad():
        want, got = tv_mobilenet(x), ours(x)
    for key in ("out", "aux"):
        torch.testing.assert_close(got[key], want[key])
    # Without the aux head, and for 4 classes: the aux head and the classifier are skipped.
    model = create_model("deeplabv3_mobilenet_v3_large", num_classes=4)
    report = load_model_weights(model, path)
    assert set(report.skipped) == {
        k
        for k in model.convert_torchvision_state_dict(tv_mobilenet.state_dict())
        if k.startswith(("aux_head.", "head.classifier."))
    }


def test_backbone_weights_from_an_imagenet_classifier(tmp_path: Path) -> None:
    torch.manual_seed(0)
    classifier = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18-imagenet.pth"
    torch.save(classifier.state_dict(), path)
    model = create_model(
        "deeplabv3", num_classes=3, backbone="resnet18", backbone_weights=str(path)
    )
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, classifier.state_dict()[key]), key
    report = load_backbone_weights(model, path)
    assert sorted(report.skipped) == ["fc.bias", "fc.weight"]
    # A grey-scale model: conv1's RGB filters are summed.
    grey = create_model("deeplabv3", num_classes=3, in_channels=1, backbone="resnet18")
    report = load_backbone_weights(grey, path)
    assert report.adapted == ["conv1.weight"]
    torch.testing.assert_close(
        grey.backbone.conv1.weight, classifier.conv1.weight.sum(dim=1, keepdim=True)
    )
    with pytest.raises(CheckpointError, match="resnet18-imagenet.pth"):
        create_model("deeplabv3", num_classes=3, backbone="resnet34", backbone_weights=str(path))
    with pytest.raises(ConfigError, match="no backbone"):
        create_model("unet", num_classes=2, backbone_weights=str(path))


def test_mobilenet_backbone_weights_from_a_segmentation_file(
    tmp_path: Path, tv_mobilenet: torch.nn.Module
) -> None:
    path = tmp_path / "seg.pth"
    torch.save(tv_mobilenet.state_dict(), path)  # keys "backbone.<i>...", "classifier..."
    model = create_model("deeplabv3plus", num_classes=3, backbone="mobilenet_v3_large")
    report = load_backbone_weights(model, path)
    assert report.loaded == len(model.backbone.state_dict()) and not report.skipped
    assert torch.equal(model.backbone.features[16][0].weight, tv_mobilenet.backbone["16"][0].weight)


def test_weights_names_without_network_say_to_pass_a_file(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def offline(url: str, **kwargs: object) -> dict:
        calls.append(url)
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(CheckpointError, match="COCO_WITH_VOC_LABELS_V1") as err:
        create_model("lraspp_mobilenet_v3_large", num_classes=21, weights="COCO_WITH_VOC_LABELS_V1")
    assert "local path" in str(err.value) and "lraspp_mobilenet_v3_large-d234d4ea.pth" in str(
        err.value
    )
    assert calls and calls[0].endswith("lraspp_mobilenet_v3_large-d234d4ea.pth")
    with pytest.raises(ConfigError, match="IMAGENET1K_V1"):  # the names it does have
        create_model("deeplabv3", num_classes=3, backbone_weights="BOGUS_V9", **TINY)
    with pytest.raises(ConfigError, match="local file"):  # the paper's models have no such names
        create_model("deeplabv3", num_classes=3, weights="COCO_WITH_VOC_LABELS_V1", **TINY)


def test_weights_names_resolve_through_torch_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    served = torchvision.models.resnet18(weights=None).state_dict()
    urls = []

    def cached(url: str, **kwargs: object) -> dict:
        urls.append((url, kwargs.get("weights_only")))
        return served

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", cached)
    model = create_model(
        "deeplabv3", num_classes=3, backbone="resnet18", backbone_weights="DEFAULT"
    )
    assert urls == [(torchvision.models.ResNet18_Weights.DEFAULT.url, True)]
    assert torch.equal(model.backbone.conv1.weight, served["conv1.weight"])
    report = load_backbone_weights(model.backbone, "ResNet18_Weights.IMAGENET1K_V1")
    assert isinstance(report, LoadReport) and report.source.startswith("torchvision resnet18")
