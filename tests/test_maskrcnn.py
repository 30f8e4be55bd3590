"""Mask R-CNN: torchvision's layout and outputs, every RoI pooler, norms, weights, and the suite
every registered instance model runs (the semantic suite is in test_models.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from denseseg.errors import CheckpointError, ConfigError
from denseseg.models import create_model, get_model_entry, list_models
from denseseg.ops import POOLER_KINDS, MultiScaleRoIPool

INSTANCE_MODELS = [n for n in list_models() if get_model_entry(n).task == "instance"]
TINY = get_model_entry("maskrcnn_resnet50_fpn").test_cfg
# Few proposals and RoIs keep a training step cheap on two CPU cores.
FEW_ROIS = {"rpn_post_nms_top_n_train": 100, "box_batch_size_per_image": 32}


def _targets(sizes: list[tuple[int, int]]) -> list[dict[str, torch.Tensor]]:
    """Per image: two boxes with rectangular masks of classes 1 and 2 (the last image: none)."""
    out = []
    for i, (h, w) in enumerate(sizes):
        if i == len(sizes) - 1 and len(sizes) > 1:
            out.append(
                {
                    "boxes": torch.zeros(0, 4),
                    "labels": torch.zeros(0, dtype=torch.int64),
                    "masks": torch.zeros(0, h, w, dtype=torch.uint8),
                }
            )
            continue
        boxes = torch.tensor([[4.0, 6.0, w / 2, h / 2], [w / 3, h / 3, w - 3.0, h - 5.0]])
        masks = torch.zeros(2, h, w, dtype=torch.uint8)
        for k, (x0, y0, x1, y1) in enumerate(boxes.round().int().tolist()):
            masks[k, y0:y1, x0:x1] = 1
        out.append({"boxes": boxes, "labels": torch.tensor([1, 2]), "masks": masks})
    return out


def test_torchvision_layout_parameter_count() -> None:
    model = create_model("maskrcnn_resnet50_fpn")  # weights=None: nothing is downloaded
    assert sum(p.numel() for p in model.parameters()) == 44_401_393
    assert model.num_classes == 91 and model.task == "instance"
    assert isinstance(model.backbone.body.bn1, FrozenBatchNorm2d)
    trainable = {n.split(".")[2] for n, p in model.named_parameters() if p.requires_grad}
    assert {"layer2", "layer3", "layer4"} <= trainable and not {"conv1", "layer1"} & trainable
    assert isinstance(model.roi_heads.box_roi_pool, MultiScaleRoIPool)
    assert model.roi_heads.mask_roi_pool.kind == "roialign"


def test_same_outputs_as_torchvision_given_its_state_dict(tmp_path: Path) -> None:
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    # Few detections keep the (float64) mask head cheap; the options go to both models.
    opts = {"min_size": 64, "max_size": 80, "box_score_thresh": 0.0, "box_detections_per_img": 5}
    opts["rpn_post_nms_top_n_test"] = 100
    torch.manual_seed(0)
    tv = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, **opts).eval()
    with torch.no_grad():  # running statistics that do something
        for m in tv.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
    path = tmp_path / "tv_maskrcnn.pth"
    torch.save(tv.state_dict(), path)
    # The registry's weights mechanism loads the torchvision file directly.
    ours = create_model("maskrcnn_resnet50_fpn", weights=str(path), **opts).eval()
    # float64: in float32, BatchNorm and its frozen twin round differently, and with random
    # weights near-tied scores then reorder the detections.
    tv.double()
    ours.double()
    x = torch.rand(3, 60, 75, dtype=torch.float64)
    with torch.no_grad():
        expected, got = tv([x])[0], ours([x])[0]
    assert len(expected["boxes"]) == 5
    for key in ("boxes", "labels", "scores", "masks"):
        torch.testing.assert_close(got[key], expected[key], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kind", POOLER_KINDS)
def test_every_pooler_trains(kind: str) -> None:
    torch.manual_seed(0)
    model = create_model("maskrcnn_resnet50_fpn", num_classes=3, pooler=kind, **TINY, **FEW_ROIS)
    assert model.roi_heads.box_roi_pool.kind == model.roi_heads.mask_roi_pool.kind == kind
    assert model.roi_heads.mask_roi_pool.output_size == (14, 14)
    sizes = [(60, 80), (70, 64)]
    losses = model.train()([torch.rand(3, *s) for s in sizes], _targets(sizes))
    assert set(losses) == {
        "loss_classifier",
        "loss_box_reg",
        "loss_mask",
        "loss_objectness",
        "loss_rpn_box_reg",
    }
    sum(losses.values()).backward()
    mask_conv = model.roi_heads.mask_head[0][0].weight
    box_fc = model.roi_heads.box_head.fc6.weight
    for p in (mask_conv, box_fc, model.backbone.body.conv1.weight):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


@pytest.mark.parametrize("norm", ["bn", "gn"])
def test_from_scratch_norms(norm: str) -> None:
    model = create_model("maskrcnn_resnet50_fpn", num_classes=5, norm=norm)
    kind = nn.BatchNorm2d if norm == "bn" else nn.GroupNorm
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in model.modules())
    body = [m for m in model.backbone.body.modules() if isinstance(m, kind)]
    assert len(body) == 53  # ResNet-50: one per convolution, downsampling ones included
    assert any(isinstance(m, kind) for m in model.backbone.fpn.modules())
    assert any(isinstance(m, kind) for m in model.roi_heads.mask_head.modules())
    # Nothing frozen when training from scratch.
    assert all(p.requires_grad for p in model.parameters())


def test_bad_options_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="roipool"):
        create_model("maskrcnn_resnet50_fpn", pooler="roi_magic")
    with pytest.raises(ConfigError, match="norm"):
        create_model("maskrcnn_resnet50_fpn", norm="ln")
    with pytest.raises(ConfigError, match="in_channels"):
        create_model("maskrcnn_resnet50_fpn", in_channels=1)
    with pytest.raises(ConfigError, match="has no option"):
        create_model("maskrcnn_resnet18_fpn", bogus=1)


def test_backbone_weights_and_other_class_counts(tmp_path: Path) -> None:
    torch.manual_seed(0)
    trunk = torchvision.models.resnet18()
    path = tmp_path / "resnet18.pth"
    torch.save(trunk.state_dict(), path)  # a classifier's file: fc.* is left out
    opts = {**get_model_entry("maskrcnn_resnet18_fpn").test_cfg}
    model = create_model("maskrcnn_resnet18_fpn", num_classes=4, backbone_weights=str(path), **opts)
    torch.testing.assert_close(
        model.backbone.body.layer3[1].conv2.weight, trunk.layer3[1].conv2.weight
    )
    # Whole-model weights of another class count: everything but the class layers loads.
    other = create_model("maskrcnn_resnet18_fpn", num_classes=7, **opts)
    file = tmp_path / "other.pth"
    torch.save(other.state_dict(), file)
    again = create_model("maskrcnn_resnet18_fpn", num_classes=4, weights=str(file), **opts)
    torch.testing.assert_close(again.rpn.head.conv[0][0].weight, other.rpn.head.conv[0][0].weight)
    assert again.roi_heads.box_predictor.cls_score.out_features == 4
    with pytest.raises(CheckpointError, match="do not fit"):  # no running stats for GroupNorm
        create_model("maskrcnn_resnet18_fpn", backbone_weights=str(path), **{**opts, "norm": "gn"})


# ---------------------------------------------------------------- every registered instance model


@pytest.mark.parametrize("name", INSTANCE_MODELS)
def test_instance_suite(name: str) -> None:
    entry = get_model_entry(name)
    torch.manual_seed(0)
    a = create_model(name, num_classes=3, in_channels=3, **entry.test_cfg, **FEW_ROIS)
    assert a.task == "instance" and a.num_classes == 3 and a.in_channels == 3
    sizes = [(50, 70), (64, 48)]
    losses = a.train()([torch.rand(3, *s) for s in sizes], _targets(sizes))
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    for pname, p in a.named_parameters():
        if p.requires_grad and not pname.startswith("roi_heads.box_predictor"):
            assert p.grad is not None, f"{pname} gets no gradient"
    # Eval: one dict per image at the image's own size; deterministic; weights round-trip.
    a.eval()
    a.roi_heads.score_thresh = 0.0
    x = [torch.rand(3, 45, 61)]
    with torch.no_grad():
        out = a(x)[0]
        assert torch.equal(out["scores"], a(x)[0]["scores"])
    n = len(out["boxes"])
    assert n > 0 and out["boxes"].shape == (n, 4) and out["labels"].shape == out["scores"].shape
    assert out["masks"].shape == (n, 1, 45, 61)
    assert ((out["labels"] >= 1) & (out["labels"] < 3)).all()
    torch.manual_seed(1)
    b = create_model(name, num_classes=3, in_channels=3, **entry.test_cfg).eval()
    b.load_state_dict(a.state_dict())
    b.roi_heads.score_thresh = 0.0
    with torch.no_grad():
        torch.testing.assert_close(b(x)[0]["masks"], out["masks"])
