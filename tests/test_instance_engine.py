"""Instance models through the same commands: train (and resume), eval, predict, load_model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from coco_fixtures import write_shapes_dataset
from denseseg import load_model
from denseseg.checkpoint import load_checkpoint
from denseseg.cli import main
from denseseg.config import DataCfg
from denseseg.data.registry import get_dataset
from denseseg.engine.tasks.instance import check_instance_data, instance_collate
from denseseg.errors import ConfigError
from denseseg.inference.instance_segmenter import InstanceSegmenter

TINY_MODEL = (
    "model.kwargs={norm: gn, backbone_width: 0.25, fpn_channels: 16, representation_size: 32, "
    "mask_head_channels: 8, min_size: 64, max_size: 96, rpn_post_nms_top_n_train: 100, "
    "box_batch_size_per_image: 32}"
)


def _recipe(root: Path, out: Path, steps: int) -> list[str]:
    return [
        "model.name=maskrcnn_resnet18_fpn",
        TINY_MODEL,
        "data.dataset=coco",
        f"data.root={root}",
        "data.options={target: instance, category_map: file}",
        "data.crop_size=null",
        "data.scale_range=null",
        "data.batch_size=2",
        "data.eval_batch_size=2",
        "optim.lr=0.01",
        f"train.max_steps={steps}",
        "train.eval_every=2",
        "train.ckpt_every=2",
        "train.log_every=1",
        "train.tensorboard=false",
        "train.progress=false",
        f"train.out_dir={out}",
    ]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("instance")
    root = write_shapes_dataset(tmp / "data")
    run = tmp / "run"
    assert main(["train", "maskrcnn_resnet18_fpn_coco", *_recipe(root, run, 2)]) == 0
    return root, run


def test_train_writes_instance_checkpoints(trained: tuple[Path, Path], capsys) -> None:
    root, run = trained
    ckpt = load_checkpoint(run / "last.pt")
    assert ckpt["step"] == 2 and ckpt["model_name"] == "maskrcnn_resnet18_fpn"
    assert ckpt["class_names"] == ["background", "bright", "dark"]
    assert ckpt["category_ids"] == [0, 1, 2] and ckpt["data_options"]["target"] == "instance"
    assert 0.0 <= ckpt["best_segm_AP"] <= 1.0 and "best_mIoU" not in ckpt
    assert set(ckpt["metrics"]) >= {"segm_AP", "segm_AP50", "bbox_AP75", "segm_APl"}
    assert (run / "best.pt").is_file()
    rows = (run / "log.csv").read_text().splitlines()
    assert "val_segm_AP" in rows[0] and len(rows) == 1 + 2 + 1  # header, 2 steps, 1 eval


def test_resume_continues_the_run(trained: tuple[Path, Path], tmp_path: Path) -> None:
    root, run = trained
    # A copy, so the other tests keep the 2-step run.
    copy = tmp_path / "run"
    copy.mkdir()
    for f in ("last.pt", "log.csv", "config.yaml"):
        (copy / f).write_bytes((run / f).read_bytes())
    args = _recipe(root, copy, 3)
    assert main(["train", "maskrcnn_resnet18_fpn_coco", *args, "--resume"]) == 0
    assert load_checkpoint(copy / "last.pt")["step"] == 3


def test_load_model_gives_an_instance_predictor(trained: tuple[Path, Path]) -> None:
    root, run = trained
    seg = load_model(run / "last.pt", device="cpu")
    assert isinstance(seg, InstanceSegmenter) and seg.class_names[1] == "bright"
    seg.model.roi_heads.score_thresh = 0.0  # an untrained model scores low
    image = torch.from_numpy(np.array(Image.open(next((root / "val").iterdir()))))
    out = seg.predict(image.permute(2, 0, 1))
    n = len(out["scores"])
    assert n > 0 and out["boxes"].shape == (n, 4) and out["masks"].shape == (n, 64, 80)
    assert out["masks"].dtype == torch.bool and (out["scores"][:-1] >= out["scores"][1:]).all()
    gray = seg.predict(image.permute(2, 0, 1)[:1])  # grayscale input is expanded
    assert gray["masks"].shape[1:] == (64, 80)
    # Semantic-only inference options are refused in one line, not a TypeError.
    with pytest.raises(ConfigError, match="instance model.*fast, tta"):
        load_model(run / "last.pt", device="cpu", fast=True, tta="d4")


def test_eval_and_predict_commands(trained: tuple[Path, Path], tmp_path: Path) -> None:
    root, run = trained
    ev = tmp_path / "eval"
    args = ["eval", "--model", str(run / "best.pt"), "--dataset", "coco", "--root", str(root)]
    assert (
        main([*args, "--split", "val", "--out", str(ev), "--json", str(tmp_path / "m.json")]) == 0
    )
    metrics = json.loads((ev / "metrics.json").read_text())
    assert metrics == json.loads((tmp_path / "m.json").read_text())
    assert set(metrics) >= {"bbox_AP", "segm_AP50", "segm_AP75", "num_images"}
    assert metrics["num_images"] == 2 and math.isnan(metrics["segm_APl"])  # no large objects
    assert main(["eval", "--model", str(run / "best.pt"), "--root", str(root)]) == 2  # folder

    pred = tmp_path / "pred"
    assert (
        main(["predict", str(root / "val"), "--model", str(run / "last.pt"), "--out", str(pred)])
        == 0
    )
    assert sorted(p.name for p in pred.glob("*.png")) == [
        "val_0001_instances.png",
        "val_0002_instances.png",
    ]
    results = json.loads((pred / "results.json").read_text())
    images = json.loads((pred / "results_images.json").read_text())
    assert [i["file_name"] for i in images] == ["val_0001.png", "val_0002.png"]
    for r in results:
        assert {"image_id", "category_id", "bbox", "score", "segmentation"} <= set(r)
        assert r["category_id"] in (1, 2) and r["segmentation"]["size"] == [64, 80]


def test_instance_recipe_errors(tmp_path: Path) -> None:
    root = write_shapes_dataset(tmp_path / "data", n_train=1, n_val=1)
    semantic = get_dataset("coco", root, "train", category_map="file")
    with pytest.raises(ConfigError, match="target=instance"):
        check_instance_data(semantic, DataCfg(dataset="coco"))
    instance = get_dataset("coco", root, "train", target="instance", category_map="file")
    with pytest.raises(ConfigError, match="image_mean"):
        check_instance_data(instance, DataCfg(dataset="coco", mean=[0.5] * 3, std=[0.2] * 3))
    with pytest.raises(ConfigError, match="min_size"):
        check_instance_data(instance, DataCfg(dataset="coco", eval_resize=512))
    images, targets = instance_collate([instance[0], instance[0]])
    assert len(images) == len(targets) == 2 and targets[0]["masks"].shape[0] == 3
