"""Errors a user can cause end in one clear line naming the file or key, exit status 2, no
traceback, and no lost checkpoint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import tiny_recipe, write_folder_dataset
from denseseg.cli import main


def run_cli(args: list[str], capsys) -> str:
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("denseseg: error: ")
    return last


def train_args(root: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "unet_demo", *tiny_recipe(root, out), *extra]


def test_missing_paths(tmp_path: Path, capsys) -> None:
    assert "nope.yaml" in run_cli(["train", str(tmp_path / "nope.yaml")], capsys)
    msg = run_cli(train_args(tmp_path / "absent", tmp_path / "run"), capsys)
    assert "absent" in msg and "does not exist" in msg
    assert "m.pt" in run_cli(
        ["predict", str(tmp_path / "x.png"), "--model", str(tmp_path / "m.pt")], capsys
    )


def test_unknown_yaml_option(tmp_path: Path, capsys) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  max_step: 3\n")
    msg = run_cli(["train", str(recipe)], capsys)
    assert "r.yaml" in msg and "train.max_step" in msg


def test_truncated_image_keeps_checkpoint(tiny_dataset: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    assert main(train_args(tiny_dataset, run)) == 0
    before = (run / "last.pt").read_bytes()
    img = tiny_dataset / "images" / "train_002.png"
    img.write_bytes(img.read_bytes()[:200])
    msg = run_cli(train_args(tiny_dataset, run, "train.max_steps=16", "--resume"), capsys)
    assert "train_002.png" in msg
    assert (run / "last.pt").read_bytes() == before


def test_mask_size_mismatch(tiny_dataset: Path, tmp_path: Path, capsys) -> None:
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(tiny_dataset / "masks" / "train_001.png")
    msg = run_cli(train_args(tiny_dataset, tmp_path / "run"), capsys)
    assert "train_001.png" in msg and "size" in msg


def test_label_out_of_range(tiny_dataset: Path, tmp_path: Path, capsys) -> None:
    mask = np.zeros((32, 40), np.uint8)
    mask[0, 0] = 7
    Image.fromarray(mask).save(tiny_dataset / "masks" / "train_000.png")
    msg = run_cli(train_args(tiny_dataset, tmp_path / "run"), capsys)
    assert "train_000.png" in msg and "7" in msg


def test_empty_dataset(tmp_path: Path, capsys) -> None:
    root = tmp_path / "empty"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    msg = run_cli(train_args(root, tmp_path / "run"), capsys)
    assert "empty" in msg or "no images" in msg


def test_bad_checkpoint_and_predict_input(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "m.pt"
    bad.write_bytes(b"not a checkpoint")
    assert "m.pt" in run_cli(["eval", "--model", str(bad), "--root", str(tmp_path)], capsys)
    root = write_folder_dataset(tmp_path / "d", n_train=2, n_val=1)
    run = tmp_path / "run"
    assert main(train_args(root, run, "train.max_steps=2")) == 0
    msg = run_cli(["predict", str(tmp_path / "x.png"), "--model", str(run / "last.pt")], capsys)
    assert "x.png" in msg


@pytest.mark.parametrize("override", ["model.name=unett", "optim.name=lion", "loss.name=focal2"])
def test_bad_option_values(tiny_dataset: Path, tmp_path: Path, capsys, override: str) -> None:
    msg = run_cli(train_args(tiny_dataset, tmp_path / "run", override), capsys)
    assert override.split("=")[1] in msg
