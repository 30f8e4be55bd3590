"""The end-to-end CLI path: train a few steps, resume, eval, predict; and reproducibility."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from conftest import tiny_recipe
from denseseg.checkpoint import load_checkpoint
from denseseg.cli import main
from denseseg.config import load_config
from denseseg.engine.trainer import train

CKPT_KEYS = {
    "model",
    "optimizer",
    "scheduler",
    "scaler",
    "step",
    "epoch",
    "pos",
    "rng",
    "config",
    "model_name",
    "model_kwargs",
    "class_names",
    "palette",
    "mean",
    "std",
    "in_channels",
    "num_classes",
    "ignore_index",
    "best_mIoU",
}


def test_train_resume_eval_predict(tiny_dataset: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    assert main(["train", "unet_demo", *tiny_recipe(tiny_dataset, run)]) == 0
    for name in ("last.pt", "best.pt", "log.csv", "config.yaml", "step_0000008.pt"):
        assert (run / name).is_file(), name
    assert not (run / "step_0000004.pt").exists() or (run / "step_0000008.pt").exists()
    ckpt = load_checkpoint(run / "last.pt")
    assert CKPT_KEYS <= set(ckpt)
    assert ckpt["step"] == 8 and ckpt["class_names"] == ["background", "bright", "dark"]
    assert ckpt["config"]["train"]["max_steps"] == 8
    said = capsys.readouterr()
    assert "tiny" not in said.err
    # The end of training names the run folder's key files, the curves drawn as a picture.
    assert (run / "curves.png").stat().st_size > 5000
    for name in ("best.pt", "last.pt", "log.csv", "curves.png", "config.yaml"):
        assert f"\n  {name} " in said.out, said.out

    # Refuses to overwrite a run; resumes and extends it to 12 steps.
    assert main(["train", "unet_demo", *tiny_recipe(tiny_dataset, run)]) == 2
    assert "--resume" in capsys.readouterr().err
    assert (
        main(
            [
                "train",
                "unet_demo",
                *tiny_recipe(tiny_dataset, run),
                "--resume",  # its optional CKPT does not swallow the override after it
                "train.max_steps=12",
            ]
        )
        == 0
    )
    assert load_checkpoint(run / "last.pt")["step"] == 12
    steps = [int(line.split(",")[0]) for line in (run / "log.csv").read_text().splitlines()[1:]]
    assert steps == sorted(steps) and steps[-1] == 12

    # eval at original resolution (val images have three different sizes)
    out = tmp_path / "eval"
    js = tmp_path / "m.json"
    assert (
        main(
            [
                "eval",
                "--model",
                str(run / "best.pt"),
                "--root",
                str(tiny_dataset),
                "--split",
                "val",
                "--out",
                str(out),
                "--json",
                str(js),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "mIoU" in printed and "bright" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["mIoU"] <= 1.0 and len(metrics["IoU"]) == 3
    assert json.loads(js.read_text())["mIoU"] == metrics["mIoU"]
    for pic in ("confusion_matrix.png", "per_class_iou.png"):
        assert Image.open(out / pic).size[0] > 100
    # A second evaluation replaces the first one's files only with --overwrite.
    again = ["eval", "--model", str(run / "best.pt"), "--root", str(tiny_dataset)]
    before = {p.name: p.read_bytes() for p in [*out.iterdir(), js]}
    assert main([*again, "--out", str(out)]) == 2
    assert "metrics.json exists" in capsys.readouterr().err
    assert main([*again, "--out", str(tmp_path / "eval2"), "--json", str(js)]) == 2
    assert f"--json {js} exists" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in [*out.iterdir(), js]} == before
    assert not (tmp_path / "eval2").exists()
    assert main([*again, "--out", str(out), "--json", str(js), "--overwrite"]) == 0

    # predict on a folder: palette label PNGs at each image's own size, overlays, probabilities
    pred = tmp_path / "pred"
    assert (
        main(
            [
                "predict",
                str(tiny_dataset / "images"),
                "--model",
                str(run / "last.pt"),
                "--out",
                str(pred),
                "--probs",
                "--batch-size",
                "4",
            ]
        )
        == 0
    )
    images = sorted((tiny_dataset / "images").iterdir())
    for img in images:
        label = Image.open(pred / f"{img.stem}.png")
        assert label.mode == "P" and label.size == Image.open(img).size
        assert np.asarray(label).max() < 3
        assert Image.open(pred / f"{img.stem}_overlay.png").mode == "RGB"
        probs = np.load(pred / f"{img.stem}_probs.npy")
        assert probs.shape == (3, label.size[1], label.size[0])
        np.testing.assert_allclose(probs.astype(np.float32).sum(0), 1.0, atol=5e-3)
        assert (probs.argmax(0) == np.asarray(label)).mean() > 0.99


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run / "last.pt")["model"]


def test_two_deterministic_runs_are_bit_identical(tiny_dataset: Path, tmp_path: Path) -> None:
    runs = []
    for k in range(2):
        over = tiny_recipe(tiny_dataset, tmp_path / f"r{k}") + [
            "train.max_steps=20",
            "train.eval_every=0",
            "train.ckpt_every=0",
            "train.deterministic=true",
            "train.seed=3",
        ]
        train(load_config("unet_demo", over))
        runs.append(_weights(tmp_path / f"r{k}"))
    assert runs[0].keys() == runs[1].keys()
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    torch.use_deterministic_algorithms(False)
