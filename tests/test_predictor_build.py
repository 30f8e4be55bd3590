"""One way from a model and its checkpoint metadata to a predictor (checkpoints, built-in models,
the trainer), and the library's evaluation and prediction that the CLI calls."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import denseseg
from conftest import write_folder_dataset
from denseseg.checkpoint import atomic_save
from denseseg.engine.evaluate import run_eval
from denseseg.engine.predict import predict_folder
from denseseg.errors import ConfigError
from denseseg.inference.build import PREDICTOR_META, build_predictor
from denseseg.inference.instance_segmenter import InstanceSegmenter
from denseseg.inference.segmenter import Segmenter
from denseseg.models import create_model
from denseseg.pretrained import ENV_VAR, pack, read_meta

TINY_MASKRCNN = {
    "num_classes": 3,
    "norm": "gn",
    "backbone_width": 0.25,
    "fpn_channels": 16,
    "representation_size": 32,
    "mask_head_channels": 8,
    "min_size": 64,
    "max_size": 96,
}
CLASSES = ["background", "bright", "dark"]
PALETTE = [[0, 0, 0], [250, 250, 250], [40, 40, 40]]


def _semantic_meta() -> dict:
    """The metadata the trainer keeps (and saves in every checkpoint) for a semantic model."""
    return {
        "model_name": "unet",
        "model_kwargs": {"num_classes": 3, "base_channels": 4, "depth": 2},
        "class_names": CLASSES,
        "palette": PALETTE,
        "mean": [0.5, 0.5, 0.5],
        "std": [0.25, 0.25, 0.25],
        "in_channels": 3,
        "num_classes": 3,
        "ignore_index": 7,
        "class_weights": None,
    }


def _instance_meta() -> dict:
    return {
        "model_name": "maskrcnn_resnet18_fpn",
        "model_kwargs": TINY_MASKRCNN,
        "class_names": CLASSES,
        "palette": PALETTE,
        "mean": [0.0] * 3,
        "std": [1.0] * 3,
        "in_channels": 3,
        "num_classes": 3,
        "ignore_index": 255,
        "category_ids": [0, 11, 12],
        "dataset": "coco",
        "data_options": {"target": "instance"},
    }


def _model(meta: dict) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(meta["model_name"], **meta["model_kwargs"])


def test_build_predictor_picks_the_task_from_the_model() -> None:
    meta = _semantic_meta()
    seg = build_predictor(_model(meta), meta, "cpu", tta="hflip")
    assert isinstance(seg, Segmenter) and seg.tta == "hflip"
    assert seg.class_names == CLASSES and seg.palette == [tuple(p) for p in PALETTE]
    assert seg.ignore_index == 7 and seg.mean.flatten().tolist() == meta["mean"]
    assert seg.meta == {"model_name": "unet", "model_kwargs": meta["model_kwargs"]}

    meta = _instance_meta()
    inst = build_predictor(_model(meta), {**meta, "checkpoint": "x.pt", "step": 3}, "cpu")
    assert isinstance(inst, InstanceSegmenter) and inst.class_names == CLASSES
    assert set(inst.meta) <= set(PREDICTOR_META)
    assert inst.meta["category_ids"] == [0, 11, 12] and inst.meta["step"] == 3
    with pytest.raises(ConfigError, match=r"x\.pt is an instance model.*fast, tta"):
        build_predictor(_model(meta), {**meta, "checkpoint": "x.pt"}, "cpu", fast=True, tta="d4")


def test_an_instance_builtin_loads_like_its_checkpoint(tmp_path: Path, monkeypatch) -> None:
    meta = _instance_meta()
    ckpt = tmp_path / "inst.pt"
    atomic_save({**meta, "model": _model(meta).state_dict(), "step": 5}, ckpt)
    pack(ckpt, "tinyinst", out_dir=tmp_path / "models", fp16=False)
    assert read_meta("tinyinst", tmp_path / "models")["category_ids"] == [0, 11, 12]
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "models"))

    ref = denseseg.load_model(ckpt, device="cpu")
    seg = denseseg.load_model("tinyinst", device="cpu")
    assert isinstance(seg, InstanceSegmenter) and seg.class_names == ref.class_names
    assert seg.meta["builtin"] == "tinyinst" and seg.meta["step"] == 5
    for key in ("category_ids", "dataset", "data_options"):
        assert seg.meta[key] == ref.meta[key], key
    for (k, a), b in zip(seg.model.state_dict().items(), ref.model.state_dict().values()):
        assert torch.equal(a, b), k
    for predictor in (seg, ref):
        predictor.model.roi_heads.score_thresh = 0.0  # an untrained model scores low
    image = torch.randint(0, 256, (3, 64, 80), dtype=torch.uint8, generator=torch.Generator())
    got, want = seg.predict(image), ref.predict(image)
    assert all(torch.equal(got[k], want[k]) for k in want)
    with pytest.raises(ConfigError, match="tinyinst is an instance model.*tta"):
        denseseg.load_model("tinyinst", device="cpu", tta="d4")


def test_pack_refuses_semantic_settings_for_an_instance_model(tmp_path: Path) -> None:
    meta = _instance_meta()
    ckpt = tmp_path / "inst.pt"
    atomic_save({**meta, "model": _model(meta).state_dict()}, ckpt)
    with pytest.raises(ConfigError, match="semantic models only"):
        pack(ckpt, "x", out_dir=tmp_path / "m", extra_meta={"segmenter": {"tta": "hflip"}})
    assert not (tmp_path / "m").exists()


def test_eval_and_predict_are_library_calls(tmp_path: Path) -> None:
    data = write_folder_dataset(tmp_path / "data", n_train=1, n_val=2)
    meta = _semantic_meta() | {"ignore_index": 255}
    seg = build_predictor(_model(meta), {**meta, "checkpoint": "tiny.pt"}, "cpu")
    printed: list[str] = []
    out = tmp_path / "eval"
    written = run_eval(
        seg, "folder", str(data), "val", out, json_path=tmp_path / "m.json", say=printed.append
    )
    assert list(written) == ["json", "csv", "copy", "confusion", "iou"]
    assert all(path.is_file() for path in written.values()) and "mIoU" in printed[0]
    assert json.loads((tmp_path / "m.json").read_text())["class_names"] == CLASSES

    pred = tmp_path / "pred"
    done = predict_folder(seg, data / "images", pred, probs=True)
    assert [p.name for p in done.inputs] == sorted(p.name for p in (data / "images").iterdir())
    assert done.results is None and len(done.written) == 3 * len(done.inputs)
    assert all(path.is_file() for path in done.written)
    label = np.asarray(Image.open(done.written[0]))
    assert label.shape == Image.open(done.inputs[0]).size[::-1]
    with pytest.raises(ConfigError, match="input folder"):
        predict_folder(seg, data / "images", data / "images" / "out")
