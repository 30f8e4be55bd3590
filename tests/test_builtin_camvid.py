"""The shipped `camvid` model: loads with no download, is the default of `denseseg predict`, and
evaluates any CamVid copy through `denseseg eval --json`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from denseseg import load_model, pretrained
from denseseg.cli import main
from denseseg.data.datasets.camvid import CAMVID_CLASSES

PRETRAINED = Path(pretrained.__file__).parent


def _frame(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(360, 480, 3), dtype=np.uint8)


def test_builtin_camvid_loads_with_its_classes() -> None:
    seg = load_model("camvid", device="cpu")
    assert seg.class_names == list(CAMVID_CLASSES)
    assert seg.palette[3] == (128, 64, 128)  # Road, as in the SegNet layout
    label = seg.predict(torch.from_numpy(_frame(0)).permute(2, 0, 1))
    assert label.shape == (360, 480) and 0 <= int(label.min()) and int(label.max()) < 11
    fast = load_model("camvid", device="cpu", fast=True)
    # The fast path `denseseg benchmark --save` stored: channels-last with batch norm folded, in
    # bfloat16 where that met the deployment thresholds (arg-max agreement with eager float32
    # >= 99.5 % in bf16, >= 99.99 % in float32: near-ties flip, nothing more).
    bf16 = json.loads((PRETRAINED / "camvid.json").read_text())["fast"]["precision"] == "bf16"
    fast_label = fast.predict(torch.from_numpy(_frame(0)).permute(2, 0, 1))
    assert (fast_label != label).float().mean().item() < (5e-3 if bf16 else 1e-4)


def test_predict_uses_camvid_by_default(tmp_path: Path) -> None:
    Image.fromarray(_frame(1)).save(tmp_path / "street.png")
    assert main(["predict", str(tmp_path / "street.png"), "--out", str(tmp_path / "out")]) == 0
    mask = Image.open(tmp_path / "out" / "street.png")
    assert mask.mode == "P" and mask.size == (480, 360)
    assert (tmp_path / "out" / "street_overlay.png").is_file()


def test_eval_writes_the_metrics_json(tmp_path: Path) -> None:
    root = tmp_path / "CamVid"
    for split in ("test", "testannot"):
        (root / split).mkdir(parents=True)
    labels = np.random.default_rng(2).integers(0, 12, size=(360, 480), dtype=np.uint8)
    Image.fromarray(_frame(2)).save(root / "test" / "0001TP_008550.png")
    Image.fromarray(labels, "L").save(root / "testannot" / "0001TP_008550.png")
    out = tmp_path / "m.json"
    args = ["eval", "--model", "camvid", "--dataset", "camvid", "--root", str(root)]
    assert main([*args, "--split", "test", "--out", str(tmp_path / "e"), "--json", str(out)]) == 0
    metrics = json.loads(out.read_text())
    for key in ("aAcc", "mAcc", "mIoU", "fwIoU", "mDice", "mFscore", "IoU", "Acc", "Fscore"):
        assert key in metrics
    assert len(metrics["IoU"]) == 11 and 0.0 <= metrics["aAcc"] <= 1.0


def _keys(tree: object, prefix: str = "") -> dict[str, object]:
    """Every leaf of nested mappings as ``a.b.c -> value``."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, object] = {}
    for key, value in tree.items():
        out.update(_keys(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def test_builtin_camvid_was_trained_from_scratch() -> None:
    """The CamVid issue's rule: no ImageNet (or any) weights behind the shipped model; its
    provenance recipe names no model.weights and no backbone_weights anywhere."""
    meta = json.loads((PRETRAINED / "camvid.json").read_text())
    recipe = meta["provenance"]["recipe"]
    assert recipe["model"].get("weights") is None
    named = [k for k, v in _keys(recipe).items() if k.endswith("weights") and v is not None]
    assert named == ["loss.class_weights"]  # median frequency: class weights, not model weights
    assert "backbone_weights" not in json.dumps(meta["model_kwargs"])
