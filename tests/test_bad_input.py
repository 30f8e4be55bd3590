"""The bad-input matrix of issue 11, in-process through ``denseseg.cli.main``.

Every error a user can cause (a bad recipe value or text, a broken image, mask, split list or
class list, a bad command-line option or output folder, a damaged, malicious or misfitting
checkpoint, an impossible run folder) ends in exit status 2 and one ``denseseg: error:`` line
naming the file, key or option: no traceback, no usage text, and no existing file changed.
``check-data`` reports as a problem (exit 1) what ``train`` would stop on. Alongside: the inputs
that must simply keep working (image modes, odd file names, a folder named like a model).
"""

from __future__ import annotations

import csv
import errno
import io
import json
import logging
import os
import pickle
import random
import shutil
import struct
import sys
import zlib
from collections.abc import Callable, Collection
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import save_em_checkpoint, tiny_recipe, write_folder_dataset
from denseseg.checkpoint import atomic_save, load_checkpoint
from denseseg.cli import main
from denseseg.config import RECIPE_DIR, load_config
from denseseg.data.folder import FolderDataset
from denseseg.data.io import show_path, write_image, write_mask
from denseseg.errors import CheckpointError, DataError
from denseseg.metrics import SegmentationMetrics, save_results
from denseseg.pretrained import ENV_VAR, PACKAGE_DIR, pack
from denseseg.viz import plot_confusion_matrix, plot_per_class_iou

# =================================================================================================
# Shared helpers
# =================================================================================================


def run_cli(args: list[str], capsys) -> str:
    """Run ``denseseg`` in-process; assert exit status 2, no traceback, no usage text, and exactly
    one ``denseseg: error:`` line, the last one on stderr; return that line."""
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and "usage:" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("denseseg: error: ")]
    assert len(lines) == 1, err
    assert err.splitlines()[-1] == lines[0], err
    return lines[0]


# The one file a refused run may rewrite in its run folder: the lock, which records the PID of
# each start and is taken before anything else is read (pass ``ignore=LOCK`` to ``snapshot``).
LOCK = frozenset({".lock"})


def _content(path: Path) -> bytes:
    """A file's bytes; a symbolic link's target path (the link is not followed)."""
    if path.is_symlink():
        return b"-> " + os.fsencode(os.readlink(path))
    return path.read_bytes()


def snapshot(*folders: Path, ignore: Collection[str] = ()) -> dict[Path, bytes]:
    """Every file and symbolic link under ``folders`` but those named in ``ignore``."""
    paths = (p for f in folders for p in sorted(f.rglob("*")))
    return {
        p: _content(p) for p in paths if (p.is_symlink() or p.is_file()) and p.name not in ignore
    }


def assert_unchanged(before: dict[Path, bytes]) -> None:
    """No file of ``before`` changed or went (new files may have appeared)."""
    for path, data in before.items():
        assert (path.is_symlink() or path.is_file()) and _content(path) == data, f"{path} changed"


def train_args(root: Path, out: Path, *extra: str) -> list[str]:
    """``denseseg train`` of the tiny U-Net recipe on ``root`` into ``out``, then ``extra``."""
    return ["train", "unet_demo", *tiny_recipe(root, out), *extra]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> tuple[Path, Path]:
    """(dataset, run folder): a clean 3-class dataset and a finished 8-step tiny U-Net run on it
    (``last.pt``), trained once for the module. Tests that change either use ``run_copy``."""
    base = tmp_path_factory.mktemp("trained")
    root = write_folder_dataset(base / "data", n_train=3, n_val=1)
    assert main(train_args(root, base / "run")) == 0
    torch.use_deterministic_algorithms(False)  # the run switched it on for the whole process
    return root, base / "run"


@pytest.fixture
def run_copy(trained_run, tmp_path) -> tuple[Path, Path]:
    """Copies of ``trained_run``'s dataset and run folder: ``tmp_path/data``, ``tmp_path/run``."""
    root, run = trained_run
    shutil.copytree(root, tmp_path / "data")
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "data", tmp_path / "run"


# =================================================================================================
# Recipes: values out of range and broken text end in one line naming the file or the dotted key
# and the allowed range, before any data is read and without touching a file
# =================================================================================================

# (key, value as YAML text): one row per range rule; each is tried in a recipe file and as a
# command-line override.
BAD_VALUES = [
    ("optim.lr", "0"),
    ("optim.lr", "-0.1"),
    ("optim.lr", "abc"),
    ("optim.lr", ".nan"),
    ("optim.lr", "1e400"),
    ("optim.lr", "true"),
    ("optim.grad_clip", "-1"),
    ("optim.grad_clip", "-1e-3"),
    ("optim.grad_clip", ".inf"),
    ("optim.grad_clip", "abc"),
    ("optim.weight_decay", "-1e-4"),
    ("optim.momentum", "1"),
    ("optim.momentum", "-0.1"),
    ("optim.betas", "[0.9]"),
    ("optim.betas", "[0.9, 1.0]"),
    ("optim.backbone_lr_mult", "-1"),
    ("optim.nesterov", "1"),
    ("optim.name", "''"),
    ("data.batch_size", "0"),
    ("data.batch_size", "-1"),
    ("data.batch_size", "2.5"),
    ("data.batch_size", "two"),
    ("data.eval_batch_size", "0"),
    ("data.num_workers", "-1"),
    ("data.crop_size", "abc"),
    ("data.crop_size", "[0, 24]"),
    ("data.crop_size", "[24]"),
    ("data.crop_size", "[24, 2.5]"),
    ("data.scale_range", "[2.0, 0.5]"),
    ("data.scale_range", "[0, 1]"),
    ("data.scale_range", "[1]"),
    ("data.base_size", "0"),
    ("data.eval_resize", "[1, 2, 3]"),
    ("data.cat_max_ratio", "0"),
    ("data.cat_max_ratio", "1.5"),
    ("data.mean", "[a, b]"),
    ("data.mean", "[]"),
    ("data.std", "[0.5, 0]"),
    ("data.hflip", "1"),
    ("data.elastic", "3"),
    ("data.options", "[a]"),
    ("data.demo", "3"),
    ("data.dataset", "''"),
    ("loss.dice_weight", "-1"),
    ("loss.aux_weight", "-0.5"),
    ("loss.class_weights", "[1, -1]"),
    ("loss.weight_map", "3"),
    ("schedule.warmup_steps", "-1"),
    ("schedule.power", "-1"),
    ("schedule.warmup_factor", "0"),
    ("schedule.warmup_factor", "2"),
    ("schedule.min_lr", "-1"),
    ("schedule.gamma", "0"),
    ("schedule.milestones", "[0.5, 0.2]"),
    ("schedule.milestones", "[0.5, 1.0]"),
    ("schedule.milestones", "0.5"),
    ("train.max_steps", "0"),
    ("train.log_every", "0"),
    ("train.eval_every", "-1"),
    ("train.ckpt_every", "-1"),
    ("train.keep_last", "-1"),
    ("train.precise_bn", "-1"),
    ("train.seed", "-1"),
    ("train.seed", "4294967296"),
    ("train.amp", "1"),
    ("train.precision", "fp8"),
    ("train.precision", "true"),
    ("train.channels_last", "yes please"),
    ("train.compile", "2"),
    ("train.accumulate", "0"),
    ("train.accumulate", "1.5"),
    ("train.ema", "1"),
    ("train.ema", "0"),
    ("train.ema", "fast"),
    ("train.device", "gpu"),
    ("train.device", "cuda:x"),
    ("train.out_dir", "''"),
    ("train.out_dir", "'  '"),
    ("model.name", "''"),
    ("model.name", "3"),
    ("model.kwargs", "[1, 2]"),
    ("model.kwargs", "abc"),
    ("model.weights", "''"),
]


def absent_data_overrides(tmp_path: Path) -> list[str]:
    # The data folder does not exist: the recipe must be refused before it is looked for.
    return tiny_recipe(tmp_path / "absent", tmp_path / "run")


def _id(row: tuple[str, str]) -> str:
    return f"{row[0]}={row[1]}"


@pytest.mark.parametrize("key,value", BAD_VALUES, ids=map(_id, BAD_VALUES))
@pytest.mark.parametrize("where", ["recipe", "override"])
def test_bad_value_names_the_key(where: str, key: str, value: str, tmp_path, capsys) -> None:
    sec, name = key.split(".")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"{sec}:\n  {name}: {value}\n" if where == "recipe" else "")
    args = ["train", str(recipe), *absent_data_overrides(tmp_path)]
    args = [a for a in args if not a.startswith(f"{key}=")]
    if where == "override":
        args.append(f"{key}={value}")
    before = snapshot(tmp_path)
    line = run_cli(args, capsys)
    assert key in line and "recipe.yaml" in line and "must be" in line
    assert ("command line" in line) == (where == "override")
    assert snapshot(tmp_path) == before and not (tmp_path / "run").exists()


BAD_TEXT = {
    "not-utf8": b"optim:\n  lr: 0.01 # caf\xe9\n",
    "top-level-list": b"- model\n- data\n",
    "top-level-string": b"just some words\n",
    "top-level-number": b"3\n",
    "section-not-mapping": b"optim: 3\n",
    "unknown-section": b"optimiser:\n  lr: 0.1\n",
    "invalid-yaml": b"model: [unclosed\n",
}


@pytest.mark.parametrize("content", BAD_TEXT.values(), ids=BAD_TEXT.keys())
def test_bad_recipe_text_names_the_file(content: bytes, tmp_path, capsys) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_bytes(content)
    before = snapshot(tmp_path)
    line = run_cli(["train", str(recipe), *absent_data_overrides(tmp_path)], capsys)
    assert "recipe.yaml" in line
    if content is BAD_TEXT["not-utf8"]:
        assert "not UTF-8 text" in line
    assert snapshot(tmp_path) == before and not (tmp_path / "run").exists()


def test_unknown_yaml_option(tmp_path: Path, capsys) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  max_step: 3\n")
    msg = run_cli(["train", str(recipe)], capsys)
    assert "r.yaml" in msg and "train.max_step" in msg


@pytest.mark.parametrize(
    "override",
    [
        "model.name=unett",
        "optim.name=lion",
        "loss.name=focal2",
        "train.precision=fp16",  # needs CUDA; this machine trains on its CPU
        "train.accumulate=64",  # more batches per step than the split holds
    ],
)
def test_bad_option_values(tiny_dataset: Path, tmp_path: Path, capsys, override: str) -> None:
    msg = run_cli(train_args(tiny_dataset, tmp_path / "run", "train.device=cpu", override), capsys)
    assert override.split("=")[1] in msg


def test_yaml_tag_never_runs(tmp_path, capsys) -> None:
    marker = tmp_path / "pwned"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f'!!python/object/apply:os.system ["touch {marker}"]\n')
    line = run_cli(["train", str(recipe)], capsys)
    assert "recipe.yaml" in line
    override = f'model.kwargs=!!python/object/apply:os.system ["touch {marker}"]'
    line = run_cli(["train", "unet_demo", *absent_data_overrides(tmp_path), override], capsys)
    assert "model.kwargs" in line
    assert not marker.exists()


@pytest.mark.parametrize(
    "override", ["optim.grad_clip=0", "optim.grad_clip=null", "optim.grad_clip=1e-3"]
)
def test_good_values_reach_the_data(override: str, tmp_path, capsys) -> None:
    # Accepted: the run goes on to look for the (absent) data folder.
    line = run_cli(["train", "unet_demo", *absent_data_overrides(tmp_path), override], capsys)
    assert "absent" in line


def test_conversions(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("optim:\n  grad_clip: 1e-3\n  lr: 2e-4\ntrain:\n  max_steps: 3.0\n")
    cfg = load_config(recipe)
    assert type(cfg.optim.grad_clip) is float and cfg.optim.grad_clip == 1e-3
    assert type(cfg.optim.lr) is float and cfg.optim.lr == 2e-4
    assert type(cfg.train.max_steps) is int and cfg.train.max_steps == 3  # whole floats: ints
    cfg = load_config(recipe, ["optim.grad_clip=1e-3", "train.max_steps=1e5"])
    assert type(cfg.optim.grad_clip) is float and cfg.optim.grad_clip == 1e-3
    assert cfg.train.max_steps == 100_000
    assert load_config(None, ["optim.grad_clip=0"]).optim.grad_clip == 0
    assert load_config(None, ["optim.grad_clip=null"]).optim.grad_clip is None
    # One side is a square crop; path keys keep the text as typed.
    cfg = load_config(None, ["data.crop_size=32", "train.out_dir=2024-01-01", "data.root=010"])
    assert cfg.data.crop_size == [32, 32]
    assert cfg.train.out_dir == "2024-01-01" and cfg.data.root == "010"
    assert load_config(None, ["train.device=cuda:1"]).train.device == "cuda:1"


def test_empty_recipe_and_empty_section_take_defaults(tmp_path: Path) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config(empty) == load_config(None)
    section = tmp_path / "section.yaml"
    section.write_text("train:\n")
    assert load_config(section, ["train.max_steps=5"]).train.max_steps == 5


BUILTIN = sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def test_all_builtin_recipes_load() -> None:
    assert len(BUILTIN) == 13
    for name in BUILTIN:
        load_config(name)


# =================================================================================================
# Images and dataset files: broken images and masks, split lists, class lists, file names: one
# line naming the file (check-data: the same file as a problem, exit 1); image formats that work
# keep working
# =================================================================================================

ODD = os.fsdecode(b"\xff.png")  # a name whose byte 0xff does not decode: a lone surrogate


def problems(args: list[str], capsys) -> str:
    """Run check-data; assert exit 1 (problems found) and no error line; return stdout."""
    code = main(args)
    out, err = capsys.readouterr()
    assert code == 1, out + err
    assert "Traceback" not in err and "denseseg: error" not in err
    return out.split("problem(s):", 1)[1]


def check_args(root: Path, tmp_path: Path, plot: str = "hist.png") -> list[str]:
    return ["check-data", "--dataset", "folder", "--root", str(root), "--no-progress",
            "--plot", str(tmp_path / plot)]  # fmt: skip


def bomb_png(width: int = 20000, height: int = 20000) -> bytes:
    """A PNG of a few dozen bytes whose header claims ``width x height`` grayscale pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))  # fmt: skip


@pytest.fixture
def no_plot(monkeypatch) -> None:
    """check-data without its histogram (0.4 s each); the plot has tests of its own."""
    monkeypatch.setattr("denseseg.data.check.plot_class_histogram", lambda report, path: path)


# -------------------------------------------------------------------- what train stops on
def test_truncated_image_keeps_checkpoint(run_copy, capsys) -> None:
    root, run = run_copy
    before = (run / "last.pt").read_bytes()
    img = root / "images" / "train_002.png"
    img.write_bytes(img.read_bytes()[:200])
    msg = run_cli(train_args(root, run, "train.max_steps=16", "--resume"), capsys)
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


# ------------------------------------------- what train stops on, check-data reports (exit 1)
def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:120])


def _mask_as(mode: str, fmt: str) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        Image.new("RGB", (40, 32), (1, 1, 1)).convert(mode).save(path, format=fmt)

    return write


def _label_7(path: Path) -> None:
    mask = np.zeros((32, 40), np.uint8)
    mask[3, 4] = 7  # classes.yaml declares three classes
    Image.fromarray(mask).save(path)


BROKEN: dict[str, tuple[str, Callable[[Path], None]]] = {
    "truncated-first-image": ("images/train_000.png", _truncate),
    "zero-byte-first-image": ("images/train_000.png", lambda p: p.write_bytes(b"")),
    "text-named-png-first": ("images/train_000.png", lambda p: p.write_text("not an image\n")),
    "truncated-image": ("images/train_001.png", _truncate),
    "zero-byte-mask": ("masks/train_001.png", lambda p: p.write_bytes(b"")),
    "missing-mask": ("masks/train_001.png", Path.unlink),
    "size-mismatch": ("masks/train_001.png", lambda p: Image.new("L", (5, 5)).save(p)),
    "label-outside-classes": ("masks/train_002.png", _label_7),
    "bomb-first-image": ("images/train_000.png", lambda p: p.write_bytes(bomb_png())),
    "bomb-image": ("images/train_001.png", lambda p: p.write_bytes(bomb_png())),
    "bomb-mask": ("masks/train_001.png", lambda p: p.write_bytes(bomb_png())),
    "rgb-mask": ("masks/train_001.png", _mask_as("RGB", "PNG")),
    "rgba-mask": ("masks/train_001.png", _mask_as("RGBA", "PNG")),
    "cmyk-mask-jpeg": ("masks/train_001.png", _mask_as("CMYK", "JPEG")),
    "cmyk-mask-tiff": ("masks/train_001.png", _mask_as("CMYK", "TIFF")),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_check_data_reports_what_train_refuses(
    run_copy, tmp_path, capsys, no_plot, case: str
) -> None:
    root, run = run_copy
    name, breaks = BROKEN[case]
    breaks(root / name)
    found = problems(check_args(root, tmp_path), capsys)
    assert Path(name).name in found
    before = snapshot(root, run, ignore=LOCK)  # the refused resume takes the lock
    line = run_cli(train_args(root, run, "train.max_steps=16", "--resume"), capsys)
    assert str(root / name) in line
    if case.startswith("bomb"):
        assert "400,000,000 pixels" in line and "89,478,485" in line
        assert "DENSESEG_MAX_PIXELS" in line
    assert_unchanged(before)


# ---------------------------------------------------------------- decompression bombs elsewhere
def test_bomb_refused_by_eval_and_predict(trained_run, tmp_path, capsys) -> None:
    root, run = trained_run
    data = tmp_path / "data"
    shutil.copytree(root, data)
    ckpt = run / "last.pt"
    for kind in ("masks", "images"):  # a mask is read in the loop, the first image on opening
        (data / kind / "val_000.png").write_bytes(bomb_png())
        line = run_cli(["eval", "--model", str(ckpt), "--root", str(data),
                        "--out", str(tmp_path / "eval")], capsys)  # fmt: skip
        assert f"{data / kind / 'val_000.png'} claims" in line and "DENSESEG_MAX_PIXELS" in line
    bomb = tmp_path / "inputs" / "bomb.png"
    bomb.parent.mkdir()
    bomb.write_bytes(bomb_png())
    before = snapshot(bomb.parent)
    line = run_cli(["predict", str(bomb), "--model", str(ckpt),
                    "--out", str(tmp_path / "pred")], capsys)  # fmt: skip
    assert "bomb.png" in line and "400,000,000" in line and "DENSESEG_MAX_PIXELS" in line
    assert_unchanged(before)


def test_pixel_limit_is_set_by_the_environment(tmp_path, capsys, monkeypatch, no_plot) -> None:
    root = write_folder_dataset(tmp_path / "data", n_train=2, n_val=1)  # 32x40 = 1280 pixels
    monkeypatch.setenv("DENSESEG_MAX_PIXELS", "100")
    found = problems(check_args(root, tmp_path), capsys)
    assert "40x32 = 1,280 pixels" in found and "limit of 100" in found
    line = run_cli(train_args(root, tmp_path / "run", "train.max_steps=2"), capsys)
    assert "train_000.png" in line and "DENSESEG_MAX_PIXELS=1280" in line
    monkeypatch.setenv("DENSESEG_MAX_PIXELS", "1280")
    assert main(check_args(root, tmp_path)) == 0
    monkeypatch.delenv("DENSESEG_MAX_PIXELS")
    assert main(check_args(root, tmp_path)) == 0
    capsys.readouterr()


@pytest.mark.parametrize("value", ["abc", "0", "-5", "1e9", "12.5"])
def test_bad_pixel_limit_value(tmp_path, capsys, monkeypatch, value: str) -> None:
    root = write_folder_dataset(tmp_path / "data", n_train=1, n_val=1)
    monkeypatch.setenv("DENSESEG_MAX_PIXELS", value)
    line = run_cli(check_args(root, tmp_path), capsys)
    assert "DENSESEG_MAX_PIXELS" in line and repr(value) in line


# ----------------------------------------------------------------------------------- text
@pytest.mark.parametrize("command", ["train", "check-data"])
@pytest.mark.parametrize("name", ["train.txt", "classes.yaml"])
def test_non_utf8_text_files(tmp_path, capsys, no_plot, command: str, name: str) -> None:
    root = write_folder_dataset(tmp_path / "data", n_train=2, n_val=1)
    path = root / name
    path.write_bytes(
        path.read_bytes().replace(b"train_001", b"train_\xff01").replace(b"bri", b"\xe9")
    )
    before = snapshot(root)
    args = check_args(root, tmp_path) if command == "check-data" else train_args(root, tmp_path)
    if command == "check-data" and name == "train.txt":  # a split that fails: a problem
        found = problems(args, capsys)
        assert f"{path} is not UTF-8" in found
    else:
        line = run_cli(args, capsys)
        assert f"{path} is not UTF-8" in line and "line" in line
    assert_unchanged(before)


MATH = ["$\\alpha$", "$", "a_b^c", "=SUM(A1)", "+1", "-x", "@cmd", "$\\undefinedmacro{$"]


def test_class_names_that_break_mathtext(trained_run, tmp_path, capsys) -> None:
    root, run = trained_run
    data = tmp_path / "data"
    shutil.copytree(root, data)
    names = ", ".join(f"'{n}'" for n in MATH[:3])
    (data / "classes.yaml").write_text(f"classes: [{names}]\n")
    assert main(check_args(data, tmp_path)) == 0
    assert Image.open(tmp_path / "hist.png").size[0] > 300
    ckpt = load_checkpoint(run / "last.pt")
    ckpt["class_names"] = [MATH[0], MATH[7], MATH[3]]
    atomic_save(ckpt, tmp_path / "odd.pt")
    out = tmp_path / "eval"
    code = main(["eval", "--model", str(tmp_path / "odd.pt"), "--root", str(data),
                 "--out", str(out)])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert (out / "confusion_matrix.png").is_file() and (out / "per_class_iou.png").is_file()
    rows = list(csv.reader((out / "per_class.csv").open(encoding="utf-8")))
    assert [r[0] for r in rows[1:]] == [MATH[0], MATH[7], "'=SUM(A1)"]
    capsys.readouterr()


def test_legends_and_titles_draw_odd_names(tmp_path) -> None:
    from denseseg.viz import save_image_grid

    pic = np.zeros((4, 4, 3), np.uint8)
    path = save_image_grid([[pic, pic]], tmp_path / "g.png", titles=MATH[:2],
                           palette=[(0, 0, 0)] * 8, class_names=MATH)  # fmt: skip
    assert path.is_file()
    plot_per_class_iou([0.5] * 8, MATH, tmp_path / "iou.png", title=MATH[0])
    plot_confusion_matrix(np.eye(8), MATH, tmp_path / "cm.png", title="$x$ " + ODD)


def _split_folders(root: Path) -> Path:
    """Turn write_folder_dataset's list-file layout into train/ and val/ sub-folders."""
    for split in ("train", "val"):
        for kind in ("images", "masks"):
            (root / split / kind).mkdir(parents=True)
            for f in (root / kind).glob(f"{split}_*.png"):
                f.rename(root / split / kind / f.name)
        (root / f"{split}.txt").unlink()
    shutil.rmtree(root / "images")
    shutil.rmtree(root / "masks")
    return root


ODD_NAMES = [ODD, "..png", "a\nb.png", "$x$.png"]


def test_odd_file_names_train_and_check(tmp_path, capsys) -> None:
    root = _split_folders(write_folder_dataset(tmp_path / "data", n_train=2, n_val=1))
    for name in ODD_NAMES:
        for kind in ("images", "masks"):
            shutil.copy(root / "train" / kind / "train_000.png", root / "train" / kind / name)
    assert main(check_args(root, tmp_path)) == 0
    assert "train: 6 images, 0 with problems" in capsys.readouterr().out
    assert main(train_args(root, tmp_path / "run", "train.max_steps=2")) == 0
    capsys.readouterr()


@pytest.mark.parametrize(
    "name", ODD_NAMES, ids=["undecodable-byte", "dot-dot-png", "newline", "dollars"]
)
def test_odd_file_name_in_an_error(tmp_path, capsys, no_plot, name: str) -> None:
    root = _split_folders(write_folder_dataset(tmp_path / "data", n_train=2, n_val=1))
    for kind in ("images", "masks"):
        shutil.copy(root / "train" / kind / "train_000.png", root / "train" / kind / name)
    _truncate(root / "train" / "images" / name)
    shown = show_path(name)
    found = problems(check_args(root, tmp_path), capsys)
    assert shown in found and shown.isprintable()
    before = snapshot(root)
    line = run_cli(train_args(root, tmp_path / "run", "train.max_steps=4"), capsys)
    assert shown in line
    assert_unchanged(before)


# --------------------------------------------------------------------------- stray labels
@pytest.fixture
def denseseg_log(monkeypatch):
    # cli.main stops the "denseseg" logger propagating; let caplog see it again.
    monkeypatch.setattr(logging.getLogger("denseseg"), "propagate", True)


def test_stray_label_warns_how_many_classes_were_inferred(tmp_path, caplog, denseseg_log) -> None:
    root = write_folder_dataset(tmp_path / "data", n_train=3, n_val=1)
    (root / "classes.yaml").unlink()
    with caplog.at_level(logging.INFO, logger="denseseg"):
        assert FolderDataset(root, "train").num_classes == 3
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert "inferred 3 classes" in caplog.text
    caplog.clear()
    mask = np.array(Image.open(root / "masks" / "val_000.png"))
    mask[5, 6] = 200
    Image.fromarray(mask).save(root / "masks" / "val_000.png")
    with caplog.at_level(logging.WARNING, logger="denseseg"):
        assert FolderDataset(root, "train").num_classes == 201
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "inferred 201 classes" in warning and "largest label is 200 (1 pixel(s)" in warning
    assert "val_000.png" in warning and "only 4 of the labels" in warning
    assert "classes.yaml" in warning and "num_classes" in warning


def test_unknown_plot_suffix(tmp_path, capsys) -> None:
    root = write_folder_dataset(tmp_path / "data", n_train=1, n_val=1)
    line = run_cli(check_args(root, tmp_path, plot="hist.xyz"), capsys)
    assert "hist.xyz" in line


def test_check_data_when_no_split_opens(tmp_path, capsys) -> None:
    root = write_folder_dataset(tmp_path / "data", n_train=1, n_val=1)
    (root / "images" / "train_000.png").write_bytes(b"")
    (root / "masks" / "val_000.png").unlink()
    found = problems(check_args(root, tmp_path), capsys)
    assert "train: image" in found and "train_000.png" in found
    assert "val: image" in found and "val_000.png has no mask" in found
    assert (tmp_path / "hist.png").is_file()


# --------------------------------------------------------- image formats that already work
def _convert_images(root: Path, mode: str, suffix: str) -> None:
    for path in sorted((root / "images").glob("*.png")):
        rgb = Image.open(path).convert("RGB")
        if mode == "I;16":
            img = Image.fromarray(np.asarray(rgb.convert("L"), np.uint16) * 257)
        elif mode == "P":
            img = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
        else:
            img = rgb.convert(mode)
        path.unlink()
        img.save(path.with_suffix(suffix))


@pytest.mark.parametrize(
    ("mode", "suffix"),
    [("CMYK", ".jpg"), ("CMYK", ".tif"), ("I;16", ".png"), ("P", ".png"), ("RGBA", ".png")],
    ids=["cmyk-jpeg", "cmyk-tiff", "16-bit-gray", "palette", "rgba"],
)
def test_image_modes_train(tmp_path, capsys, mode: str, suffix: str) -> None:
    root = write_folder_dataset(tmp_path / "data", n_train=2, n_val=1)
    _convert_images(root, mode, suffix)
    assert main(train_args(root, tmp_path / "run", "train.max_steps=2")) == 0
    assert (tmp_path / "run" / "last.pt").is_file()
    capsys.readouterr()


# =================================================================================================
# Command-line options and outputs (predict, eval, pack, models): one line naming the path or
# option; outputs never over an input, never through a planted link, never into the package
# =================================================================================================

Setup = Callable[[Path, pytest.MonkeyPatch], None]


def _png(path: Path, value: int = 120, size: tuple[int, int] = (20, 24)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(size, value, np.uint8)).save(path, format="PNG")
    return path


@pytest.fixture(scope="module")
def em_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained one-channel, two-class tiny U-Net checkpoint (no training run needed)."""
    return save_em_checkpoint(
        tmp_path_factory.mktemp("ckpt") / "m.pt", "unet", base_channels=4, depth=2
    )


@pytest.fixture(scope="module")
def packed_tiny(em_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The checkpoint packed as the user model ``tiny``: a folder with its JSON and weights."""
    folder = tmp_path_factory.mktemp("packed")
    pack(em_checkpoint, "tiny", out_dir=folder)
    return folder


@pytest.fixture
def workspace(tmp_path: Path, em_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Working directory: ``m.pt``, one-channel images ``in/a.png`` and ``in/b.png``, no
    ``$DENSESEG_PRETRAINED_DIR``."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(ENV_VAR, raising=False)
    shutil.copy(em_checkpoint, tmp_path / "m.pt")
    _png(tmp_path / "in" / "a.png")
    _png(tmp_path / "in" / "b.png", value=30)
    return tmp_path


def _models(packed: Path) -> Setup:
    """Copy the packed ``tiny`` into ./models, the $DENSESEG_PRETRAINED_DIR."""

    def setup(ws: Path, mp: pytest.MonkeyPatch) -> None:
        shutil.copytree(packed, ws / "models")
        mp.setenv(ENV_VAR, str(ws / "models"))

    return setup


def test_missing_paths(tmp_path: Path, em_checkpoint: Path, monkeypatch, capsys) -> None:
    # Each path missing on its own: whatever order a command checks them in, the line names it.
    monkeypatch.chdir(tmp_path)
    recipe = tmp_path / "nope.yaml"
    assert str(recipe) in run_cli(["train", str(recipe)], capsys)
    msg = run_cli(train_args(tmp_path / "absent", tmp_path / "run"), capsys)
    assert str(tmp_path / "absent") in msg and "does not exist" in msg
    image = tmp_path / "x.png"
    msg = run_cli(["predict", str(image), "--model", str(em_checkpoint)], capsys)
    assert str(image) in msg and "does not exist" in msg
    model = tmp_path / "m.pt"
    msg = run_cli(["predict", str(_png(image)), "--model", str(model)], capsys)
    assert str(model) in msg and "not found" in msg


# ------------------------------------------------------------------------ setups for the table
def _edit_json(change: Callable[[dict], None]) -> Callable[[Path, pytest.MonkeyPatch], None]:
    def setup(ws: Path, mp: pytest.MonkeyPatch) -> None:
        meta = json.loads((ws / "models" / "tiny.json").read_text())
        change(meta)
        (ws / "models" / "tiny.json").write_text(json.dumps(meta))

    return setup


def _flip_weights_byte(ws: Path, mp: pytest.MonkeyPatch) -> None:
    path = ws / "models" / "tiny.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))


def _bad_ckpt(**change: object) -> Setup:
    def setup(ws: Path, mp: pytest.MonkeyPatch) -> None:
        obj = torch.load(ws / "m.pt", weights_only=True)
        obj.update(change)
        atomic_save(obj, ws / "bad.pt")

    return setup


def _write(rel: str, data: bytes) -> Setup:
    def setup(ws: Path, mp: pytest.MonkeyPatch) -> None:
        (ws / rel).parent.mkdir(parents=True, exist_ok=True)
        (ws / rel).write_bytes(data)

    return setup


def _fail_writes(func: str, code: int) -> Setup:
    # Root ignores permissions: a read-only or full folder is simulated at the writer.
    def setup(ws: Path, mp: pytest.MonkeyPatch) -> None:
        def refuse(path, *args, **kwargs) -> None:
            raise OSError(code, os.strerror(code), str(path))

        mp.setattr(f"denseseg.data.io.{func}", refuse)

    return setup


def _link_out_to_input(ws: Path, mp: pytest.MonkeyPatch) -> None:
    (ws / "out").symlink_to(ws / "in", target_is_directory=True)


def _plant_symlink(ws: Path, mp: pytest.MonkeyPatch) -> None:
    (ws / "out").mkdir()
    (ws / "out" / "a.png").symlink_to(ws / "in" / "a.png")


def _plant_hardlink(ws: Path, mp: pytest.MonkeyPatch) -> None:
    (ws / "out").mkdir()
    os.link(ws / "in" / "b.png", ws / "out" / "b_overlay.png")


def _twin(name: str) -> Setup:
    return lambda ws, mp: _png(ws / "in" / name, value=200) and None


def _folder(name: str) -> Setup:
    return lambda ws, mp: (ws / name).mkdir() or None


PRED = ["predict", "in", "--model", "m.pt", "--out", "out"]
TINY = ["predict", "in/a.png", "--model", "tiny", "--out", "out"]
BAD = ["predict", "in/a.png", "--model", "bad.pt", "--out", "out"]
EVAL = ["eval", "--model", "m.pt", "--root", "in"]

# id, setup (or "models": the packed tiny in $DENSESEG_PRETRAINED_DIR), argv, words in the line
CASES: list[tuple[str, object, list[str], list[str]]] = [
    # 1. an output folder that is, or lies inside, an input folder; never an input overwritten
    ("out-is-input-folder", None, [*PRED[:-1], "in"], ["--out in ", "input folder in"]),
    ("out-inside-input", None, [*PRED[:-1], "in/sub"], ["--out in/sub", "input folder in"]),
    (
        "out-is-file-folder",
        None,
        ["predict", "in/a.png", "--model", "m.pt", "--out", "in"],
        ["--out in ", "in/a.png"],
    ),
    ("out-symlink-to-input", _link_out_to_input, PRED, ["--out out", "input folder in"]),
    ("planted-symlink-to-input", _plant_symlink, PRED, ["out/a.png", "in/a.png"]),
    ("planted-hardlink-to-input", _plant_hardlink, PRED, ["out/b_overlay.png", "in/b.png"]),
    # 2. two inputs mapping to one output name
    ("same-stem", _twin("a.jpg"), PRED, ["in/a.jpg", "in/a.png", "out/a.png"]),
    ("stem-overlay", _twin("b_overlay.png"), PRED, ["in/b.png", "in/b_overlay.png"]),
    # 3. options
    ("predict-batch-0", None, [*PRED, "--batch-size", "0"], ["--batch-size", ">= 1"]),
    ("predict-batch-neg", None, [*PRED, "--batch-size", "-1"], ["--batch-size", "-1"]),
    ("eval-batch-0", None, [*EVAL, "--batch-size", "0"], ["--batch-size", ">= 1"]),
    ("eval-workers-neg", None, [*EVAL, "--workers", "-1"], ["--workers", ">= 0"]),
    ("alpha-above-1", None, [*PRED, "--alpha", "1.5"], ["--alpha", "0 to 1"]),
    ("alpha-nan", None, [*PRED, "--alpha", "nan"], ["--alpha", "nan"]),
    ("threshold-neg", None, [*PRED, "--threshold", "-0.1"], ["--threshold", "0 to 1"]),
    ("json-is-folder", None, [*EVAL, "--json", "in"], ["--json", "'in'", "not a file path"]),
    ("json-under-file", None, [*EVAL, "--json", "m.pt/x.json"], ["--json", "m.pt is a file"]),
    (
        "tile-size-0",
        None,
        ["pack", "m.pt", "x", "--out", "o", "--tile-size", "0"],
        ["--tile-size", ">= 1"],
    ),
    ("bad-type", None, [*PRED, "--batch-size", "four"], ["--batch-size", "'four'"]),
    ("unknown-option", None, [*PRED, "--bogus"], ["--bogus"]),
    ("missing-argument", None, ["predict"], ["input"]),
    ("missing-option-value", None, [*PRED, "--alpha"], ["--alpha"]),
    ("empty-out", None, [*PRED[:-1], ""], ["--out", "empty"]),
    ("empty-json", None, [*EVAL, "--json", ""], ["--json", "empty"]),
    ("empty-model", None, ["predict", "in", "--model", "", "--out", "out"], ["model", "empty"]),
    ("out-under-file", None, [*PRED[:-1], "m.pt/sub"], ["--out m.pt/sub", "m.pt is a file"]),
    ("eval-out-under-file", None, [*EVAL, "--out", "m.pt/e"], ["--out m.pt/e", "m.pt is a"]),
    (
        "read-only-out",
        _fail_writes("write_mask", errno.EROFS),
        PRED,
        ["out/a.png", "Read-only file system"],
    ),
    (
        "disk-full",
        _fail_writes("write_image", errno.ENOSPC),
        PRED,
        ["out/a_overlay.png", "No space left"],
    ),
    (
        "pack-out-under-file",
        None,
        ["pack", "m.pt", "x", "--out", "m.pt/o"],
        ["m.pt/o", "Not a directory"],
    ),
    # 4. pack never writes into the package unasked, nor shadows or replaces silently
    ("pack-no-out-no-env", None, ["pack", "m.pt", "mine"], [ENV_VAR, "--out"]),
    (
        "pack-shipped-name",
        None,
        ["pack", "m.pt", "camvid", "--out", "models"],
        ["camvid", "--force", "shadow"],
    ),
    ("pack-shipped-name-env", "models", ["pack", "m.pt", "camvid"], ["camvid", "--force"]),
    ("pack-existing-name", "models", ["pack", "m.pt", "tiny"], ["models/tiny.json", "--force"]),
    # 5. built-in files and checkpoints that do not fit together
    ("builtin-sha256", _flip_weights_byte, TINY, ["models/tiny.safetensors", "sha256"]),
    ("builtin-json-key", _edit_json(lambda m: m.pop("mean")), TINY, ["tiny.json", "'mean'"]),
    ("builtin-json-sha-key", _edit_json(lambda m: m.pop("sha256")), TINY, ["tiny.json", "sha"]),
    (
        "builtin-json-kwargs-type",
        _edit_json(lambda m: m.update(model_kwargs=[4])),
        TINY,
        ["tiny.json", "'model_kwargs'"],
    ),
    (
        "builtin-json-broken",
        _write("models/tiny.json", b'{"model_name": '),
        TINY,
        ["models/tiny.json", "unreadable"],
    ),
    (
        "builtin-json-not-utf8",
        _write("models/tiny.json", b'{"\xff": 1}'),
        TINY,
        ["models/tiny.json"],
    ),
    ("builtin-json-list", _write("models/tiny.json", b"[1, 2]"), TINY, ["models/tiny.json"]),
    (
        "builtin-misfit",
        _edit_json(lambda m: m["model_kwargs"].update(base_channels=8)),
        TINY,
        ["tiny.safetensors", "tiny.json", "do not fit"],
    ),
    (
        "builtin-unknown-model",
        _edit_json(lambda m: m.update(model_name="nosuchnet")),
        TINY,
        ["tiny.safetensors", "nosuchnet"],
    ),
    (
        "builtin-bad-segmenter",
        _edit_json(lambda m: m.update(segmenter="x")),
        TINY,
        ["tiny.json", "segmenter"],
    ),
    (
        "ckpt-misfit",
        _bad_ckpt(
            model_kwargs={"num_classes": 2, "in_channels": 1, "base_channels": 8, "depth": 2}
        ),
        BAD,
        ["bad.pt", "do not fit"],
    ),
    ("ckpt-unknown-model", _bad_ckpt(model_name="nosuchnet"), BAD, ["bad.pt", "nosuchnet"]),
    (
        "ckpt-unknown-kwarg",
        _bad_ckpt(model_kwargs={"num_classes": 2, "bogus": 1}),
        BAD,
        ["bad.pt", "bogus"],
    ),
    (
        "ckpt-kwarg-type",
        _bad_ckpt(model_kwargs={"num_classes": 2, "base_channels": "x"}),
        BAD,
        ["bad.pt"],
    ),
    ("ckpt-kwargs-not-mapping", _bad_ckpt(model_kwargs=[2]), BAD, ["bad.pt", "model_kwargs"]),
    # 6. a folder is not a checkpoint
    (
        "folder-given-with-slash",
        _folder("tiny"),
        ["predict", "in/a.png", "--model", "./tiny", "--out", "out"],
        ["./tiny", "not a checkpoint"],
    ),
    (
        "folder-not-a-builtin",
        _folder("mymodel"),
        ["predict", "in/a.png", "--model", "mymodel", "--out", "out"],
        ["mymodel", "not a check"],
    ),
    # 7. names the terminal cannot print, in the one error line
    ("unprintable-name", _write("in/\udcff\udcfe.png", b"not an image"), PRED, ["\\xff\\xfe.png"]),
]


def _ids(cases: list) -> list[str]:
    return [c[0] for c in cases]


@pytest.mark.parametrize(("case", "setup", "argv", "words"), CASES, ids=_ids(CASES))
def test_bad_input_one_line(
    case: str,
    setup: object,
    argv: list[str],
    words: list[str],
    workspace: Path,
    packed_tiny: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys,
) -> None:
    if setup is not None or "tiny" in argv:
        _models(packed_tiny)(workspace, monkeypatch)
    if callable(setup):
        setup(workspace, monkeypatch)
    before, shipped = snapshot(workspace), snapshot(PACKAGE_DIR)
    line = run_cli(argv, capsys)
    for word in words:
        assert word in line, line
    assert_unchanged(before)  # new outputs may stay; no existing file changed or went
    assert snapshot(PACKAGE_DIR) == shipped


# ------------------------------------------------------------------------ what must just work
def test_hidden_and_dot_names_are_skipped_or_renamed(workspace: Path, capsys) -> None:
    for name in ("..png", "...png", ".hidden.png"):
        _png(workspace / "in" / name)
    before = snapshot(workspace / "in")
    assert main(PRED) == 0
    out = capsys.readouterr()
    assert "of 2 image(s)" in out.out and "skipped 3 hidden" in out.err
    assert sorted(p.name for p in (workspace / "out").iterdir()) == [
        "a.png",
        "a_overlay.png",
        "b.png",
        "b_overlay.png",
    ]
    # An input named explicitly: its outputs are visible, and "..png" keeps a suffix.
    assert main(["predict", "in/..png", "--model", "m.pt", "--out", "dots"]) == 0
    assert sorted(p.name for p in (workspace / "dots").iterdir()) == ["_.png", "__overlay.png"]
    assert snapshot(workspace / "in") == before


def test_unprintable_names_work_and_print(workspace: Path, monkeypatch, capsys) -> None:
    _png(workspace / "in" / "\udcff.png")
    _png(workspace / "in" / "\u00e9t\u00e9.png")
    assert main(["predict", "in", "--model", "m.pt", "--out", "out", "--probs"]) == 0
    assert "of 4 image(s)" in capsys.readouterr().out
    assert (workspace / "out" / "\udcff_probs.npy").is_file()
    assert (workspace / "out" / "\u00e9t\u00e9_overlay.png").is_file()
    # An error line naming a file through a terminal that only knows ASCII.
    (workspace / "in" / "\u00e9t\u00e9.png").write_bytes(b"broken")
    err = io.TextIOWrapper(io.BytesIO(), encoding="ascii")
    monkeypatch.setattr(sys, "stderr", err)
    assert main([*PRED, "--overwrite"]) == 2  # a second run into the same --out
    err.flush()
    text = err.buffer.getvalue().decode("ascii")
    assert "denseseg: error:" in text and "\\xe9t\\xe9.png" in text


def test_folder_named_like_a_model_does_not_hide_it(
    workspace: Path, packed_tiny: Path, monkeypatch, capsys
) -> None:
    _models(packed_tiny)(workspace, monkeypatch)
    (workspace / "tiny").mkdir()
    assert main(TINY) == 0
    assert (workspace / "out" / "a.png").is_file()


def test_pack_force_and_shadow_warning(workspace: Path, monkeypatch, capsys) -> None:
    shipped = snapshot(PACKAGE_DIR)
    monkeypatch.setenv(ENV_VAR, str(workspace / "models"))
    assert main(["pack", "m.pt", "camvid", "--force"]) == 0
    first = (workspace / "models" / "camvid.json").read_bytes()
    assert main(["pack", "m.pt", "camvid", "--force", "--note", "again"]) == 0
    assert (workspace / "models" / "camvid.json").read_bytes() != first
    assert not [p for p in (workspace / "models").iterdir() if p.name.endswith(".tmp")]
    capsys.readouterr()
    assert main(["predict", "in/a.png", "--model", "camvid", "--out", "out"]) == 0
    err = capsys.readouterr().err
    assert "models/camvid.safetensors" in err and "shadows" in err
    assert snapshot(PACKAGE_DIR) == shipped


def test_help_still_prints_usage(capsys) -> None:
    assert main(["predict", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "usage:" in out and "STEM_overlay.png" in out and "a.png and a.jpg" in out


def test_interrupt_is_130(workspace: Path, monkeypatch, capsys) -> None:
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("denseseg.api.load_model", interrupted)
    assert main(PRED) == 130
    assert "interrupted" in capsys.readouterr().err


# ------------------------------------------------- files denseseg writes and symbolic links
def _results() -> dict:
    m = SegmentationMetrics(2)
    m.update(torch.tensor([[0, 1], [1, 1]]), torch.tensor([[0, 1], [0, 1]]))
    return m.compute()


WRITERS: dict[str, tuple[str, Callable[[Path], object]]] = {
    "write_mask": ("x.png", lambda out: write_mask(out / "x.png", np.zeros((4, 5), np.int64))),
    "write_image": ("x.jpg", lambda out: write_image(out / "x.jpg", np.zeros((4, 5, 3), np.uint8))),
    "metrics.json": ("metrics.json", lambda out: save_results(_results(), ["a", "b"], out)),
    "per_class.csv": ("per_class.csv", lambda out: save_results(_results(), ["a", "b"], out)),
    "plot": ("x.png", lambda out: plot_per_class_iou([0.5, 0.2], ["a", "b"], out / "x.png")),
}


@pytest.mark.parametrize("writer", list(WRITERS))
def test_outputs_replace_planted_symlinks(tmp_path, writer: str) -> None:
    name, write = WRITERS[writer]
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / name).symlink_to(victim)
    write(out)
    assert victim.read_text() == "precious\n"
    target = out / name
    assert target.is_file() and not target.is_symlink() and target.stat().st_size > 0
    assert not list(out.glob(".*tmp")), "temporary file left behind"
    umask = os.umask(0o022)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask


def _raise(error: OSError) -> Callable[..., None]:
    def fail(*args: object, **kwargs: object) -> None:
        raise error

    return fail


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("disk-full", r"No space left on device; check that the folder is writable"),
        ("read-only-folder", r"Permission denied; check that the folder is writable"),
        ("parent-is-a-file", r".*/afile is a file, not a folder"),
        ("target-is-a-folder", r"a folder of that name is in the way"),
    ],
)
def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch, case: str, message: str) -> None:
    target = tmp_path / "m.png"
    write_mask(target, np.ones((3, 3), np.int64))
    before = snapshot(tmp_path)
    if case == "disk-full":
        monkeypatch.setattr(os, "replace", _raise(OSError(28, "No space left on device")))
    elif case == "read-only-folder":  # we run as root: chmod would not stop us
        monkeypatch.setattr(os, "open", _raise(PermissionError(13, "Permission denied")))
    elif case == "parent-is-a-file":
        (tmp_path / "afile").write_text("x")
        target = tmp_path / "afile" / "sub" / "m.png"
    else:
        (tmp_path / "d.png").mkdir()
        target = tmp_path / "d.png"
    with pytest.raises(DataError, match=rf"cannot write mask .*{target.name} \({message}"):
        write_mask(target, np.zeros((3, 3), np.int64))
    assert_unchanged(before)
    assert not list(tmp_path.rglob("*.tmp"))


def test_per_class_csv_escapes_formulas(tmp_path) -> None:
    m = SegmentationMetrics(6)
    m.update(torch.arange(6), torch.arange(6))
    names = ['=HYPERLINK("http://x")', "+1", "-2", "@SUM(A1)", "\tx", "plain"]
    save_results(m.compute(), names, tmp_path)
    rows = list(csv.reader((tmp_path / "per_class.csv").open(encoding="utf-8", newline="")))
    assert [r[0] for r in rows[1:]] == [f"'{n}" for n in names[:5]] + ["plain"]


# =================================================================================================
# Checkpoints and run folders: damaged, malicious or misfitting checkpoints and impossible run
# folders end in one line naming the file; nothing of the user's changed; no checkpoint code runs
# =================================================================================================


def test_bad_checkpoint_and_predict_input(
    trained_run, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # eval's default --out runs/eval: not the caller's folder
    bad = tmp_path / "m.pt"
    bad.write_bytes(b"not a checkpoint")
    root = tmp_path / "data"
    root.mkdir()
    assert "m.pt" in run_cli(["eval", "--model", str(bad), "--root", str(root)], capsys)
    last = trained_run[1] / "last.pt"
    msg = run_cli(["predict", str(tmp_path / "x.png"), "--model", str(last)], capsys)
    assert "x.png" in msg


# ---------------------------------------------------------------------- damaged files: a fuzz
def _damaged(blob: bytes, k: int) -> bytes:
    rng = random.Random(k)
    if k % 2:  # truncation
        return blob[: rng.randrange(len(blob))]
    out = bytearray(blob)
    for _ in range(rng.randint(1, 4)):
        out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
    return bytes(out)


def test_fuzzed_checkpoints_are_refused_or_intact(trained_run, tmp_path: Path) -> None:
    """200 truncations and byte flips of a real last.pt: each is refused with a CheckpointError
    naming the file, or (a flip in bytes nothing reads, e.g. zip padding) loads unchanged.
    torch.load alone loads most flips as silently different weights; the CRC-32 check stops them."""
    blob = (trained_run[1] / "last.pt").read_bytes()
    good = load_checkpoint(trained_run[1] / "last.pt")
    refused = 0
    for k in range(200):
        path = tmp_path / f"fuzz{k}.pt"
        path.write_bytes(_damaged(blob, k))
        try:
            ckpt = load_checkpoint(path)
        except CheckpointError as exc:
            assert str(path) in str(exc) and "\n" not in str(exc)
            refused += 1
            continue
        assert ckpt["model"].keys() == good["model"].keys()
        assert all(torch.equal(v, good["model"][name]) for name, v in ckpt["model"].items())
    assert refused >= 190


def _reading_checkpoint(command: str, ckpt: Path, data: Path, tmp_path: Path) -> list[str]:
    """Command lines of every place a checkpoint is read."""
    return {
        "resume": lambda: train_args(data, tmp_path / "r", f"--resume={ckpt}"),
        "eval": lambda: ["eval", "--model", str(ckpt), "--root", str(data), "--out", str(tmp_path)],
        "predict": lambda: [
            "predict",
            str(data / "images"),
            "--model",
            str(ckpt),
            "--out",
            str(tmp_path),
        ],
        "pack": lambda: ["pack", str(ckpt), "mine", "--out", str(tmp_path / "packed")],
        "model.weights": lambda: train_args(data, tmp_path / "w", f"model.weights={ckpt}"),
    }[command]()


READERS = ["resume", "eval", "predict", "pack", "model.weights"]


@pytest.mark.parametrize("how", ["truncated", "flipped", "zero bytes", "text"])
@pytest.mark.parametrize("command", READERS)
def test_damaged_checkpoint_everywhere(trained_run, tmp_path, capsys, monkeypatch, how, command):
    data, run = trained_run
    bad = tmp_path / "bad.pt"
    blob = (run / "last.pt").read_bytes()
    bad.write_bytes(
        {"truncated": blob[: len(blob) // 2], "flipped": _damaged(blob, 4), "zero bytes": b""}.get(
            how, b"just some text\n"
        )
    )
    monkeypatch.setenv("DENSESEG_PRETRAINED_DIR", str(tmp_path / "packed"))
    before = snapshot(data, run)
    assert str(bad) in run_cli(_reading_checkpoint(command, bad, data, tmp_path), capsys)
    assert snapshot(data, run) == before and not (tmp_path / "packed").exists()


# ---------------------------------------------------------------------- malicious pickles
class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("container", ["torch.save", "plain pickle", "inside a dict"])
@pytest.mark.parametrize("command", READERS)
def test_malicious_pickle_never_runs(
    trained_run, tmp_path, capsys, monkeypatch, container, command
):
    data, run = trained_run
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    payload = _Payload(marker)
    if container == "plain pickle":
        evil.write_bytes(pickle.dumps(payload, protocol=2))
    else:
        good = load_checkpoint(run / "last.pt")
        torch.save({**good, "step": payload} if container == "inside a dict" else payload, evil)
    monkeypatch.setenv("DENSESEG_PRETRAINED_DIR", str(tmp_path / "packed"))
    msg = run_cli(_reading_checkpoint(command, evil, data, tmp_path), capsys)
    assert str(evil) in msg and "could run code" in msg
    assert not marker.exists()


# ---------------------------------------------------------------------- resuming
def _edit(run: Path, tmp_path: Path, change) -> Path:
    ckpt = load_checkpoint(run / "last.pt")
    change(ckpt)
    path = tmp_path / "edited.pt"
    atomic_save(ckpt, path)
    return path


RESUME_CASES = {
    "no optimiser state": (lambda c: c.pop("optimizer"), "lacks optimizer"),
    "bare weights": (
        lambda c: [c.pop(k) for k in list(c) if k not in ("model", "model_name")],
        "lacks",
    ),
    "damaged RNG state": (lambda c: c["rng"].update(numpy=["MT19937", "x"]), "random-number"),
    "RNG state missing a part": (lambda c: c["rng"].pop("torch"), "random-number"),
    "optimiser of another model": (
        lambda c: c["optimizer"]["param_groups"][0]["params"].pop(),
        "optimizer state does not fit",
    ),
    "weights of another shape": (
        lambda c: c["model"].update({"inc.0.weight": torch.zeros(1, 1, 1, 1)}),
        "model state does not fit",
    ),
    "damaged step": (lambda c: c.update(step=-3), "step"),
    "another model": (lambda c: c.update(model_name="fcn8s"), "'fcn8s'"),
}


@pytest.mark.parametrize("case", RESUME_CASES)
def test_resume_from_unfit_checkpoint(trained_run, tmp_path: Path, capsys, case: str) -> None:
    data, run = trained_run
    change, expected = RESUME_CASES[case]
    path = _edit(run, tmp_path, change)
    out = tmp_path / "r"
    msg = run_cli(train_args(data, out, f"--resume={path}"), capsys)
    assert str(path) in msg and expected in msg
    assert not (out / "last.pt").exists()


def test_resume_with_other_model_options(run_copy, capsys) -> None:
    data, run = run_copy
    before = snapshot(run, ignore=LOCK)  # the refused resume takes the lock first
    other = "model.kwargs={base_channels: 4, depth: 2, batch_norm: true, dropout: 0.5}"
    msg = run_cli(train_args(data, run, other, "--resume"), capsys)
    assert str(run / "last.pt") in msg and "dropout" in msg and "model.kwargs" in msg
    assert snapshot(run, ignore=LOCK) == before


# ---------------------------------------------------------------------- the run folder
def test_out_dir_under_a_regular_file(trained_run, tmp_path: Path, capsys) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("mine")
    msg = run_cli(train_args(trained_run[0], blocker / "run"), capsys)
    assert "train.out_dir" in msg and str(blocker) in msg
    assert blocker.read_text() == "mine"


def test_out_dir_is_a_regular_file(trained_run, tmp_path: Path, capsys) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("mine")
    assert "train.out_dir" in run_cli(train_args(trained_run[0], blocker), capsys)
    assert blocker.read_text() == "mine"


@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_unwritable_run_folder_keeps_last(run_copy, capsys, monkeypatch, error) -> None:
    """A full or read-only disk while saving: one line, and the previous last.pt stays valid.
    (We run as root, so the failure is simulated where torch writes the file.)"""
    data, run = run_copy
    before = snapshot(run)

    def fail(*args, **kwargs):
        raise OSError(error, os.strerror(error))

    monkeypatch.setattr(torch, "save", fail)
    msg = run_cli(train_args(data, run, "train.max_steps=12", "--resume"), capsys)
    assert str(run) in msg and os.strerror(error) in msg and "is kept" in msg
    after = snapshot(run)
    assert after[run / "last.pt"] == before[run / "last.pt"]
    assert not list(run.glob(".*.tmp"))


def test_read_only_run_folder(trained_run, tmp_path, capsys, monkeypatch) -> None:
    """The lock file cannot be created in a read-only folder: refused before anything is read."""
    real_open = os.open

    def read_only(path, flags, *args):
        if str(path).endswith(".lock"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", read_only)
    msg = run_cli(train_args(trained_run[0], tmp_path / "ro"), capsys)
    assert str(tmp_path / "ro") in msg and "Read-only" in msg


# ====================================================================== found by hostile probes
# Each case below was found by running denseseg from a shell as a hostile user would.
BOMB = "\n".join(
    [
        "data:",
        "  demo:",
        '    a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]',
        *(f"    {b}: &{b} [{', '.join([f'*{a}'] * 9)}]" for a, b in zip("abcdefghi", "bcdefghij")),
    ]
)


def test_yaml_alias_bomb_recipe(tmp_path: Path, capsys) -> None:
    recipe = tmp_path / "laughs.yaml"
    recipe.write_text(BOMB + "\n")
    msg = run_cli(["train", str(recipe)], capsys)
    assert str(recipe) in msg and "aliases" in msg
    msg = run_cli(["train", "unet_demo", "model.kwargs={a: &a [1, 1, 1], b: [*a, *a]}"], capsys)
    assert "model.kwargs" in msg or "no option" in msg  # small aliases are fine, not a bomb


@pytest.mark.parametrize(
    "content", [BOMB.replace("data:\n  demo:", "palette:") + "\n", "classes: " + "[" * 5000]
)
def test_classes_yaml_bomb_and_deep_nesting(run_copy, capsys, content: str) -> None:
    data, run = run_copy
    (data / "classes.yaml").write_text(content)
    before = snapshot(data, run, ignore=LOCK)
    msg = run_cli(train_args(data, run, "train.max_steps=12", "--resume"), capsys)
    assert "classes.yaml" in msg
    assert snapshot(data, run, ignore=LOCK) == before


def test_huge_ignore_index(run_copy, capsys) -> None:
    data, run = run_copy
    (data / "classes.yaml").write_text("classes: [a, b, c]\nignore_index: 99999999999999999999\n")
    msg = run_cli(train_args(data, run, "train.max_steps=12", "--resume"), capsys)
    assert "classes.yaml" in msg and "ignore_index" in msg


def test_path_overrides_keep_their_text(tmp_path: Path) -> None:
    from denseseg.config import parse_override

    assert parse_override("train.out_dir=runs/a #2")[1] == "runs/a #2"
    assert parse_override("train.out_dir=''")[1] == ""
    assert parse_override("model.weights=null")[1] is None


def test_recipe_copy_replaces_a_planted_symlink(trained_run, tmp_path: Path) -> None:
    data, _ = trained_run
    victim = tmp_path / "precious.txt"
    victim.write_text("mine")
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").symlink_to(victim)
    (out / ".lock").symlink_to(tmp_path / "precious.txt")
    assert main(train_args(data, out)) == 2  # the planted lock link is refused
    (out / ".lock").unlink()
    assert main(train_args(data, out)) == 0
    assert victim.read_text() == "mine" and not (out / "config.yaml").is_symlink()


def test_jpeg_mask_is_refused(run_copy, capsys) -> None:
    data, run = run_copy
    mask = data / "masks" / "train_001.png"
    Image.open(mask).convert("L").save(mask, format="JPEG")  # a lossy file named .png
    msg = run_cli(train_args(data, run, "train.max_steps=12", "--resume"), capsys)
    assert "train_001.png" in msg and "JPEG" in msg
    assert main(["check-data", "--dataset", "folder", "--root", str(data), "--no-progress",
                 "--plot", str(run.parent / "h.png")]) == 1  # fmt: skip


@pytest.mark.parametrize("device", ["bogus", "", "meta", "cuda:7"])
def test_unknown_device(workspace: Path, capsys, device: str) -> None:
    assert repr(device) in run_cli([*PRED, "--device", device], capsys)


def test_predict_never_replaces_files_already_in_out(workspace: Path, capsys) -> None:
    (workspace / "out").mkdir()
    (workspace / "out" / "a.png").write_bytes(b"ground truth")
    msg = run_cli(PRED, capsys)
    assert "--overwrite" in msg and "a.png" in msg
    assert (workspace / "out" / "a.png").read_bytes() == b"ground truth"
    assert main([*PRED, "--overwrite"]) == 0
    assert (workspace / "out" / "a.png").read_bytes() != b"ground truth"


@pytest.mark.parametrize("case", ["out inside root", "empty split"])
def test_eval_out_and_split(trained_run, tmp_path: Path, capsys, case: str) -> None:
    data, run = trained_run
    before = snapshot(data)
    out = data / "masks" if case == "out inside root" else tmp_path / "e"
    split = "" if case == "empty split" else "val"
    args = ["eval", "--model", str(run / "last.pt"), "--root", str(data), "--out", str(out)]
    msg = run_cli([*args, "--split", split], capsys)
    assert ("--split" in msg) if split == "" else (str(data) in msg and "--out" in msg)
    assert snapshot(data) == before


def test_whole_images_of_different_sizes(trained_run, tmp_path: Path, capsys) -> None:
    data, _ = trained_run
    extra = ["data.crop_size=null", "data.scale_range=[0.5, 2.0]"]
    msg = run_cli(train_args(data, tmp_path / "r", *extra), capsys)
    assert "data.crop_size" in msg and "differ in size" in msg


def test_tiny_scale_ratio_trains(trained_run, tmp_path: Path) -> None:
    data, _ = trained_run
    extra = ["data.scale_range=[0.001, 0.001]", "train.max_steps=2"]
    assert main(train_args(data, tmp_path / "r", *extra)) == 0


def test_plots_of_thousands_of_classes_stay_small(tmp_path: Path) -> None:
    from denseseg.viz import plot_confusion_matrix, plot_per_class_iou

    n = 2000
    names = [f"c{i}" for i in range(n)]
    plot_confusion_matrix(np.eye(n, dtype=np.int64), names, tmp_path / "cm.png")
    plot_per_class_iou([0.5] * n, names, tmp_path / "iou.png")
    for name in ("cm.png", "iou.png"):
        with Image.open(tmp_path / name) as img:
            assert max(img.size) < 5000


def test_eval_resize_beyond_any_image(tmp_path: Path, capsys) -> None:
    assert "data.eval_resize" in run_cli(["train", "unet_demo", "data.eval_resize=20000"], capsys)


def test_class_names_cannot_drive_the_terminal() -> None:
    from denseseg.metrics import format_table

    results = {k: [0.5, 0.5] for k in ("IoU", "Acc", "Dice", "Precision", "Recall", "Fscore")}
    results.update({k: 0.5 for k in ("mIoU", "mAcc", "aAcc", "fwIoU", "mDice", "mFscore")})
    table = format_table(results, ["bg", "\x1b[2J\x1b[31mred\nrow"])
    assert "\x1b" not in table and "\\x1b[2J" in table and "red\\nrow" in table


def test_confusion_of_thousands_of_classes_goes_to_npy(tmp_path: Path) -> None:
    from denseseg.metrics import save_results

    n = 300
    results = {k: [0.5] * n for k in ("IoU", "Acc", "Dice", "Precision", "Recall", "Fscore")}
    save_results(results, None, tmp_path, confusion=np.eye(n, dtype=np.int64))
    assert json.loads((tmp_path / "metrics.json").read_text())["confusion"] == "confusion.npy"
    assert np.array_equal(np.load(tmp_path / "confusion.npy"), np.eye(n))


@pytest.mark.parametrize("suffix", [".json", ".safetensors"])
def test_a_packed_models_file_given_as_model(workspace: Path, capsys, suffix: str) -> None:
    (workspace / f"tiny{suffix}").write_text("{}")
    msg = run_cli(["predict", "in", "--model", f"tiny{suffix}", "--out", "o"], capsys)
    assert f"tiny{suffix}" in msg and "packed model" in msg


def test_a_closed_pipe_ends_quietly(monkeypatch) -> None:
    class ClosedPipe(io.StringIO):
        def write(self, text: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert main(["models"]) == 0  # `denseseg models | head -1`
