"""Optimiser groups, schedules, the Segmenter's modes, and training options end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import tiny_recipe, write_folder_dataset
from denseseg import Segmenter, create_model, load_model
from denseseg.checkpoint import load_checkpoint
from denseseg.config import load_config
from denseseg.engine.optim import build_optimizer, lr_factor, param_groups
from denseseg.engine.trainer import train
from denseseg.errors import ConfigError


def test_poly_schedule_with_warmup() -> None:
    f = [
        lr_factor(s, 100, name="poly", power=0.9, warmup_steps=10, warmup_factor=0.1)
        for s in range(101)
    ]
    assert f[0] == pytest.approx(0.1) and f[5] == pytest.approx(0.55)
    assert f[10] == pytest.approx(1.0)
    assert f[55] == pytest.approx((1 - 45 / 90) ** 0.9)
    assert f[100] == pytest.approx(0.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))
    assert lr_factor(50, 100, name="cosine") == pytest.approx(0.5)
    assert lr_factor(100, 100, name="poly", min_ratio=0.1) == pytest.approx(0.1)
    with pytest.raises(ConfigError, match="step"):
        lr_factor(1, 10, name="step")


def test_multistep_schedule_matches_torch_multisteplr() -> None:
    """Mask R-CNN's schedule (lr / 10 at 60k and 80k of 90k steps), milestones as fractions."""
    max_steps, milestones = 90, [60 / 90, 80 / 90]
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    ref = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[60, 80], gamma=0.1)
    expected = []
    for _ in range(max_steps):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        ref.step()
    ours = [lr_factor(s, max_steps, name="multistep", milestones=milestones) for s in range(90)]
    assert ours == pytest.approx(expected)
    assert ours[59] == 1.0 and ours[60] == pytest.approx(0.1) and ours[85] == pytest.approx(0.01)
    # warm-up first, as detectron2's WarmupMultiStepLR
    w = lr_factor(5, max_steps, name="multistep", milestones=milestones, warmup_steps=10)
    assert w == pytest.approx(0.001 * 0.5 + 0.5)
    for bad in ([], [60, 80], [0.0, 0.5]):
        with pytest.raises(ConfigError, match="schedule.milestones"):
            lr_factor(0, max_steps, name="multistep", milestones=bad, warmup_steps=10)


def test_param_groups_decay_and_backbone_multiplier() -> None:
    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
            self.head = torch.nn.Conv2d(4, 2, 1)

    groups = param_groups(Net(), lr=0.1, weight_decay=1e-4, backbone_lr_mult=0.1)
    by_key = {
        (round(g["lr"], 6), g["weight_decay"]): sum(p.numel() for p in g["params"]) for g in groups
    }
    assert by_key == {
        (0.01, 1e-4): 4 * 3 * 3 * 3,  # backbone conv weight
        (0.01, 0.0): 4 + 4 + 4,  # backbone conv bias, BN weight and bias
        (0.1, 1e-4): 2 * 4,  # head weight
        (0.1, 0.0): 2,  # head bias
    }
    decayed = [g for g in groups if g["weight_decay"] > 0]
    assert all(p.ndim > 1 for g in decayed for p in g["params"])
    with pytest.raises(ConfigError, match="lion"):
        build_optimizer(Net(), "lion", lr=0.1, weight_decay=0)


def test_valid_unet_segmenter_covers_whole_image() -> None:
    torch.manual_seed(0)
    model = create_model(
        "unet", num_classes=3, in_channels=1, base_channels=4, depth=2, padding="valid"
    )
    seg = Segmenter(model, mean=[0.5], std=[0.5], device="cpu")
    image = torch.randint(0, 256, (1, 37, 53), dtype=torch.uint8)
    labels = seg.predict(image)
    assert labels.shape == (37, 53)
    probs = seg.predict_proba(image)
    assert probs.shape == (3, 37, 53)
    torch.testing.assert_close(probs.sum(0), torch.ones(37, 53))


def test_mixed_size_batch_matches_single_images() -> None:
    # A per-pixel model must give the same answer alone and inside a padded batch.
    torch.manual_seed(0)
    seg = Segmenter(
        create_model("pixelwise", num_classes=4, hidden=(8,)),
        mean=[0.5] * 3,
        std=[0.25] * 3,
        device="cpu",
    )
    images = [
        torch.randint(0, 256, (3, h, w), dtype=torch.uint8) for h, w in ((20, 30), (33, 17), (8, 8))
    ]
    labels, probs = seg.predict_batch(images, return_probs=True)
    for im, lab, pr in zip(images, labels, probs):
        assert lab.shape == im.shape[1:]
        assert torch.equal(lab, seg.predict(im))
        torch.testing.assert_close(pr, seg.predict_proba(im))


def test_binary_mode_end_to_end(tmp_path: Path) -> None:
    root = write_folder_dataset(tmp_path / "d", n_train=4, n_val=2)
    # Two classes: background and "square" (both kinds of square).
    for m in (root / "masks").iterdir():
        a = np.asarray(Image.open(m))
        Image.fromarray((a > 0).astype(np.uint8)).save(m)
    (root / "classes.yaml").write_text("classes: [background, square]\n")
    run = tmp_path / "run"
    over = tiny_recipe(root, run) + [
        "model.kwargs={base_channels: 4, depth: 2, batch_norm: true, num_classes: 1}",
        "loss.name=bce+dice",
    ]
    result = train(load_config("unet_demo", over))
    assert result["metrics"] is not None and len(result["metrics"]["IoU"]) == 2
    seg = load_model(run / "last.pt", device="cpu")
    assert seg.binary and seg.num_classes == 2 and seg.model.num_classes == 1
    image = torch.randint(0, 256, (3, 20, 24), dtype=torch.uint8)
    labels = seg.predict(image)
    assert set(labels.unique().tolist()) <= {0, 1}
    probs = seg.predict_proba(image)
    assert probs.shape == (2, 20, 24)
    assert torch.equal((probs[1] > 0.5).long(), labels)


def test_median_frequency_weights_in_training(tiny_dataset: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(
        load_config(
            "unet_demo",
            tiny_recipe(tiny_dataset, run)
            + [
                "loss.class_weights=median_frequency",
                "train.max_steps=2",
                "train.tensorboard=true",
            ],
        )
    )
    ckpt = load_checkpoint(run / "last.pt")
    w = ckpt["class_weights"]
    assert len(w) == 3 and w[0] < w[1] and w[0] < w[2]  # background is the most frequent
    assert any(p.name.startswith("events.out.tfevents") for p in (run / "tb").iterdir())
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["loss"]["class_weights"] == "median_frequency"


def test_loader_workers_do_not_change_training(tiny_dataset: Path, tmp_path: Path) -> None:
    weights = []
    for workers in (0, 2):
        run = tmp_path / f"w{workers}"
        train(
            load_config(
                "unet_demo",
                tiny_recipe(tiny_dataset, run)
                + [
                    f"data.num_workers={workers}",
                    "train.max_steps=3",
                    "train.eval_every=0",
                    "data.scale_range=[0.5, 2.0]",
                ],
            )
        )
        weights.append(load_checkpoint(run / "last.pt")["model"])
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_freeze_backbone(tiny_dataset: Path, tmp_path: Path) -> None:
    # The U-Net's contracting path is its encoder: frozen, it keeps its initial weights.
    run = tmp_path / "r"
    over = tiny_recipe(tiny_dataset, run) + [
        "optim.freeze_backbone=true",
        "train.max_steps=2",
        "train.seed=5",
        "train.eval_every=0",
    ]
    train(load_config("unet_demo", over))
    torch.manual_seed(5)
    init = create_model(
        "unet", num_classes=3, in_channels=3, base_channels=4, depth=2, batch_norm=True
    ).state_dict()
    trained = load_checkpoint(run / "last.pt")["model"]
    enc = [
        k
        for k in init
        if k.startswith("encoder.") and "running" not in k and "num_batches" not in k
    ]
    assert enc and all(torch.equal(init[k], trained[k]) for k in enc)
    assert not torch.equal(init["head.weight"], trained["head.weight"])
    with pytest.raises(ConfigError, match="no backbone"):
        train(
            load_config(
                "pixelwise_demo",
                tiny_recipe(tiny_dataset, tmp_path / "p")
                + [
                    "model.name=pixelwise",
                    "model.kwargs={hidden: [4]}",
                    "optim.freeze_backbone=true",
                ],
            )
        )


def test_training_evaluation_matches_saved_checkpoint(tiny_dataset: Path, tmp_path: Path) -> None:
    # The trainer evaluates in eval mode (batch norm running statistics), so the mIoU that picks
    # `best.pt` is what evaluating that checkpoint afterwards gives, and evaluating mid-training
    # leaves the running statistics alone.
    from denseseg.data.registry import get_dataset
    from denseseg.engine.evaluate import evaluate

    run = tmp_path / "r"
    over = tiny_recipe(tiny_dataset, run) + ["train.max_steps=4", "train.eval_every=2"]
    result = train(load_config("unet_demo", over))
    seg = load_model(run / "last.pt", device="cpu")
    val = get_dataset("folder", str(tiny_dataset), "val")
    again = evaluate(seg, val, batch_size=2, progress=False).compute()
    assert result["metrics"]["mIoU"] == pytest.approx(again["mIoU"], abs=1e-12)
    assert load_checkpoint(run / "last.pt")["metrics"]["aAcc"] == pytest.approx(again["aAcc"])


def test_segmenter_restores_training_mode() -> None:
    model = create_model("unet", num_classes=2, base_channels=4, depth=2, batch_norm=True)
    seg = Segmenter(model, mean=[0.5] * 3, std=[0.25] * 3)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seg.predict(torch.randint(0, 255, (3, 16, 16), dtype=torch.uint8))
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def _deeplab_recipe(data: Path, run: Path, *extra: str) -> list[str]:
    return tiny_recipe(data, run) + [
        "model.name=deeplabv3",
        "model.kwargs={backbone: resnet18, backbone_kwargs: {width: 0.25}, aspp_channels: 16, "
        "multi_grid: [1, 2], aux_loss: true}",
        "train.max_steps=2",
        "train.eval_every=0",
        *extra,
    ]


def test_auxiliary_head_is_trained_with_its_weight(tiny_dataset: Path, tmp_path: Path) -> None:
    # torchvision's recipe adds 0.5 x the auxiliary head's loss; with weight 0 the aux head
    # receives no gradient and keeps its initial weights.
    heads = {}
    for w in (0.0, 0.5):
        run = tmp_path / f"aux{w}"
        train(load_config("unet_demo", _deeplab_recipe(tiny_dataset, run, f"loss.aux_weight={w}")))
        heads[w] = load_checkpoint(run / "last.pt")["model"]["aux_head.classifier.weight"]
    torch.manual_seed(0)
    init = create_model(
        "deeplabv3",
        num_classes=3,
        backbone="resnet18",
        backbone_kwargs={"width": 0.25},
        aspp_channels=16,
        multi_grid=(1, 2),
        aux_loss=True,
    ).state_dict()["aux_head.classifier.weight"]
    assert torch.equal(heads[0.0], init)
    assert not torch.equal(heads[0.5], init)


def test_initial_weights_are_not_needed_to_reload(tiny_dataset: Path, tmp_path: Path) -> None:
    # A run initialised from a local backbone file saves the trained weights; the checkpoint
    # rebuilds without that file (it is not part of the model's options).
    from denseseg.backbones import create_backbone

    src = tmp_path / "backbone.pt"
    torch.save(create_backbone("resnet18", width=0.25).state_dict(), src)
    run = tmp_path / "r"
    over = _deeplab_recipe(tiny_dataset, run)
    over[-3] = over[-3].replace("aux_loss: true}", f"aux_loss: true, backbone_weights: {src}}}")
    train(load_config("unet_demo", over))
    kwargs = load_checkpoint(run / "last.pt")["model_kwargs"]
    assert "backbone_weights" not in kwargs and "weights" not in kwargs
    src.unlink()
    assert load_model(run / "last.pt", device="cpu").num_classes == 3


def test_reader_options_reach_the_dataset(tiny_dataset: Path, tmp_path: Path) -> None:
    over = tiny_recipe(tiny_dataset, tmp_path / "r") + ["data.options={mask_dir: SegObj}"]
    with pytest.raises(ConfigError, match="dataset 'folder' takes no options"):
        train(load_config("unet_demo", over))
