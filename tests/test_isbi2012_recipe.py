"""ISBI 2012: held-out slices through data.options, and the recipe end to end on a tiny copy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from denseseg.config import load_config
from denseseg.data.registry import get_dataset
from denseseg.engine.trainer import train
from denseseg.errors import DataError
from denseseg.metrics.isbi import evaluate_isbi


def _write_isbi(root: Path, n: int = 6, size: int = 64) -> Path:
    """Slices of cells on a grid of 2-pixel membranes (label 0 membrane, 255 cell)."""
    (root / "image").mkdir(parents=True)
    (root / "label").mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        label = np.full((size, size), 255, np.uint8)
        step = 12 + i % 3
        for k in range(i % 4, size, step):
            label[k : k + 2] = 0
            label[:, k : k + 2] = 0
        image = np.where(label == 0, 60, 190) + rng.normal(0, 10, label.shape)
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8), "L").save(root / f"image/{i}.png")
        Image.fromarray(label, "L").save(root / f"label/{i}.png")
    return root


def test_val_slices_hold_out_slices(tmp_path: Path) -> None:
    root = _write_isbi(tmp_path / "isbi")
    val = get_dataset("isbi2012", root, "val", val_slices=[1, "4.png"])
    train_ds = get_dataset("isbi2012", root, "train", val_slices=[1, 4])
    assert [p[0].stem for p in val.files] == ["1", "4"]
    assert [p[0].stem for p in train_ds.files] == ["0", "2", "3", "5"]
    assert len(get_dataset("isbi2012", root, "all", val_slices=[1])) == 6
    with pytest.raises(DataError, match="data.options.val_slices"):
        get_dataset("isbi2012", root, "val")
    with pytest.raises(DataError, match="val_slices names 9"):
        get_dataset("isbi2012", root, "val", val_slices=[9])
    with pytest.raises(DataError, match="all 6 slices"):
        get_dataset("isbi2012", root, "train", val_slices=list(range(6)))
    (root / "val.txt").write_text("2\n")
    with pytest.raises(DataError, match="one or the other"):
        get_dataset("isbi2012", root, "val", val_slices=[1])


def test_recipe_trains_with_weight_map_and_holdout(tmp_path: Path) -> None:
    root = _write_isbi(tmp_path / "isbi")
    cfg = load_config(
        "unet_isbi2012",
        [
            f"data.root={root}",
            "data.options={val_slices: [1, 4]}",
            "model.kwargs={base_channels: 4, depth: 2, batch_norm: true}",
            "data.crop_size=[60, 60]",  # a size a depth-2 valid U-Net takes (output 20)
            "train.max_steps=2",
            "train.eval_every=2",
            "train.tensorboard=false",
            "train.progress=false",
            f"train.out_dir={tmp_path / 'run'}",
        ],
    )
    assert cfg.loss.weight_map == {"name": "unet", "w0": 10, "sigma": 5}
    result = train(cfg)
    assert result["step"] == 2 and result["metrics"] is not None

    from denseseg.api import load_model

    seg = load_model(tmp_path / "run" / "last.pt", device="cpu", mode="overlap_tile", tile_size=60)
    out = evaluate_isbi(seg, get_dataset("isbi2012", root, "val", val_slices=[1, 4]))
    assert out["slices"] == 2
    assert 0.0 <= out["pixel_error"] <= 1.0 and 0.0 <= out["rand_error"] <= 1.0

    # The command line takes the held-out slices as a reader option.
    from denseseg.cli import main

    args = ["eval", "--model", str(tmp_path / "run" / "last.pt"), "--dataset", "isbi2012"]
    args += ["--root", str(root), "--out", str(tmp_path / "eval"), "--device", "cpu"]
    assert main([*args, "--option", "val_slices=[1, 4]"]) == 0
    assert (tmp_path / "eval" / "metrics.json").is_file()
    assert main(args) == 2  # without held-out slices, val is refused
