"""Recipe inheritance (``base:``), the built-in recipes built on it, ``train --print-config``."""

from __future__ import annotations

import itertools
import tomllib
from fnmatch import fnmatch
from pathlib import Path

import pytest
import yaml

from denseseg.cli import main
from denseseg.config import (
    BASE_KEY,
    RECIPE_DIR,
    _base_path,
    load_config,
    merge_recipes,
    read_recipe,
    resolve_recipe_path,
    save_config,
)
from denseseg.errors import ConfigError

BUILTIN = sorted(RECIPE_DIR.glob("*.yaml"))
BASES = sorted((RECIPE_DIR / "_base").glob("*.yaml"))


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def one_line_error(path: Path | str, overrides: list[str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    assert "\n" not in str(info.value)
    return str(info.value)


# ----------------------------------------------------------------------------- merging
def test_merge_is_key_by_key_and_lists_are_replaced() -> None:
    base = {"model": {"kwargs": {"a": 1, "b": {"x": 1, "y": 2}}}, "data": {"crop_size": [8, 8]}}
    child = {"model": {"kwargs": {"b": {"y": 3}, "c": 4}}, "data": {"crop_size": [16]}}
    merged = merge_recipes(base, child)
    assert merged == {
        "model": {"kwargs": {"a": 1, "b": {"x": 1, "y": 3}, "c": 4}},
        "data": {"crop_size": [16]},
    }
    assert base["model"]["kwargs"]["b"] == {"x": 1, "y": 2}  # neither argument changes


def test_child_wins_and_overrides_come_last(tmp_path: Path) -> None:
    write(
        tmp_path / "base.yaml",
        "model:\n  kwargs: {base_channels: 8, depth: 2}\ndata:\n  crop_size: [8, 8]\n"
        "optim:\n  lr: 0.1\n  momentum: 0.5\ntrain:\n  max_steps: 9\n",
    )
    child = write(
        tmp_path / "child.yaml",
        "base: base.yaml\nmodel:\n  kwargs: {depth: 3}\ndata:\n  crop_size: null\n"
        "optim:\n  lr: 0.2\ntrain:\n",
    )
    cfg = load_config(child)
    assert cfg.model.kwargs == {"base_channels": 8, "depth": 3}
    assert cfg.data.crop_size is None  # null replaces the base's value
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.train.max_steps) == (0.2, 0.5, 9)
    cfg = load_config(child, ["optim.lr=0.3", "model.kwargs.depth=4"])
    assert cfg.optim.lr == 0.3 and cfg.model.kwargs == {"base_channels": 8, "depth": 4}
    # An override replaces the whole value it names, mappings included.
    assert load_config(child, ["model.kwargs={depth: 5}"]).model.kwargs == {"depth": 5}


def test_chain_with_relative_paths(tmp_path: Path) -> None:
    write(tmp_path / "common" / "root.yaml", "optim:\n  lr: 0.1\n  weight_decay: 0.5\n")
    write(tmp_path / "common" / "mid.yaml", "base: root.yaml\noptim:\n  lr: 0.2\n")
    leaf = write(tmp_path / "runs" / "leaf.yaml", "base: ../common/mid\ntrain:\n  max_steps: 3\n")
    cfg = load_config(leaf)
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.train.max_steps) == (0.2, 0.5, 3)
    raw, origins = read_recipe(leaf)
    assert BASE_KEY not in raw
    assert Path(origins["optim.weight_decay"]).name == "root.yaml"
    assert Path(origins["optim.lr"]).name == "mid.yaml"
    assert Path(origins["train.max_steps"]).name == "leaf.yaml"


def test_builtin_base_by_name_and_local_file_first(tmp_path: Path) -> None:
    mine = write(tmp_path / "mine.yaml", "base: unet_demo\ntrain:\n  max_steps: 5\n")
    cfg = load_config(mine)
    assert cfg.train.max_steps == 5 and cfg.model.kwargs == load_config("unet_demo").model.kwargs
    camvid = write(tmp_path / "camvid.yaml", "base: _base/camvid.yaml\n")
    assert load_config(camvid).loss.class_weights == "median_frequency"
    # A file beside the recipe is preferred to a built-in recipe of the same name.
    write(tmp_path / "unet_demo.yaml", "train:\n  max_steps: 7\n")
    assert load_config(mine).model.name == "unet" and load_config(mine).model.kwargs == {}


def test_cycle_is_refused_in_one_line(tmp_path: Path) -> None:
    a = write(tmp_path / "a.yaml", "base: b.yaml\n")
    write(tmp_path / "b.yaml", "base: a.yaml\n")
    message = one_line_error(a)
    assert "cycle" in message and "a.yaml -> " in message and "b.yaml -> " in message
    assert "cycle" in one_line_error(write(tmp_path / "self.yaml", "base: self.yaml\n"))


def test_missing_or_bad_base_is_one_line(tmp_path: Path) -> None:
    child = write(tmp_path / "child.yaml", "base: nowhere.yaml\n")
    message = one_line_error(child)
    assert "child.yaml" in message and "'nowhere.yaml' not found" in message
    assert "base must be" in one_line_error(write(tmp_path / "n.yaml", "base: 3\n"))
    write(tmp_path / "broken.yaml", "optim:\n  lrr: 1\n")
    message = one_line_error(write(tmp_path / "uses.yaml", "base: broken.yaml\n"))
    assert "broken.yaml: unknown option optim.lrr" in message  # names the file that has it


def test_saved_recipe_stands_alone(tmp_path: Path) -> None:
    cfg = load_config("deeplabv3_mobilenet_v3_large_camvid", ["optim.lr=1e-3"])
    save_config(cfg, tmp_path / "config.yaml")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert BASE_KEY not in saved and load_config(tmp_path / "config.yaml") == cfg


# ----------------------------------------------------------------------------- built-in recipes
def _settings(data: dict, prefix: str = "") -> dict[str, str]:
    """Dotted key -> value (as text) of every setting a recipe file writes, ``base`` aside."""
    out = {}
    for key, value in data.items():
        if key == BASE_KEY and not prefix:
            continue
        if isinstance(value, dict) and value:
            out.update(_settings(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = repr(value)
    return out


def _ancestors(file: Path) -> list[Path]:
    chain = []
    while (base := yaml.safe_load(file.read_text()).get(BASE_KEY)) is not None:
        file = _base_path(base, file)
        chain.append(file.resolve())
    return chain


def test_bases_are_not_trainable_recipes_and_each_is_used() -> None:
    assert len(BUILTIN) == 13 and BASES
    with pytest.raises(ConfigError, match="not found"):
        resolve_recipe_path("camvid")  # _base/camvid.yaml is no built-in recipe
    used = {a for f in BUILTIN for a in _ancestors(f)}
    assert {b.resolve() for b in BASES} <= used


@pytest.mark.parametrize("file", BUILTIN + BASES, ids=lambda f: f.relative_to(RECIPE_DIR).stem)
def test_no_recipe_restates_its_base(file: Path) -> None:
    chain = _ancestors(file)
    if not chain:
        return
    inherited, _ = read_recipe(chain[0])
    flat = _settings(inherited)
    mine = _settings(yaml.safe_load(file.read_text()))
    assert not {k for k, v in mine.items() if flat.get(k) == v}


def test_no_two_recipe_files_repeat_each_other() -> None:
    # Before recipes could inherit, the two MobileNetV3 CamVid recipes shared 21 settings, the
    # DeepLab ones 14 and the Mask R-CNN ones 12; now what they share lives in a base.
    files = {f: _settings(yaml.safe_load(f.read_text())) for f in BUILTIN + BASES}
    for a, b in itertools.combinations(files, 2):
        shared = {k for k, v in files[a].items() if files[b].get(k) == v}
        assert len(shared) <= 5, f"{a.name} and {b.name} both set {sorted(shared)}"


def test_builtin_recipes_keep_their_values() -> None:
    lraspp = load_config("lraspp_mobilenet_v3_large_camvid").to_dict()
    deeplab = load_config("deeplabv3_mobilenet_v3_large_camvid").to_dict()
    lraspp["model"]["name"] = "deeplabv3_mobilenet_v3_large"
    lraspp["data"]["train_split"] = "train"
    lraspp["train"].update(
        max_steps=1600,
        eval_every=200,
        ckpt_every=200,
        out_dir="runs/deeplabv3_mobilenet_v3_large_camvid",
    )
    assert deeplab == lraspp
    assert lraspp["loss"]["class_weights"] == "median_frequency"
    assert lraspp["optim"]["name"] == "adamw" and lraspp["optim"]["lr"] == 0.002
    city = load_config("deeplabv3plus_resnet101_cityscapes")
    assert city.model.kwargs == {
        "backbone": "resnet101",
        "output_stride": 16,
        "multi_grid": [1, 2, 4],
        "backbone_weights": "IMAGENET1K_V1",
    }
    assert (city.optim.lr, city.optim.momentum, city.optim.weight_decay) == (0.01, 0.9, 4e-5)
    assert (city.data.eval_batch_size, city.data.num_workers, city.train.log_every) == (1, 4, 50)
    coco = load_config("maskrcnn_resnet18_fpn_coco")
    assert coco.data.options == {"target": "instance", "category_map": "file"}
    assert coco.model.kwargs["pooler"] == "roialign" and coco.data.crop_size is None
    demo = load_config("pixelwise_demo")
    assert (demo.data.demo, demo.optim.name, demo.data.eval_batch_size) == (
        {"seed": 0},
        "adamw",
        32,
    )


def test_every_recipe_file_is_packaged() -> None:
    pyproject = Path(__file__).parents[1] / "pyproject.toml"
    patterns = tomllib.loads(pyproject.read_text())["tool"]["setuptools"]["package-data"]
    package = RECIPE_DIR.parent
    for file in BUILTIN + BASES:
        rel = file.relative_to(package).as_posix()
        assert any(
            fnmatch(rel, p) and rel.count("/") == p.count("/") for p in patterns["denseseg"]
        ), f"{rel} is not in pyproject's package-data"


# ----------------------------------------------------------------------------- --print-config
def test_print_config(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    args = ["train", "unet_camvid", "optim.lr=1e-3", f"train.out_dir={out}", "--print-config"]
    assert main(args) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert BASE_KEY not in printed and printed["optim"]["lr"] == 1e-3
    expected = load_config("unet_camvid", ["optim.lr=1e-3", f"train.out_dir={out}"])
    assert printed == expected.to_dict() and not out.exists()
    assert main(["train", "unet_camvid", "optim.lr=abc", "--print-config"]) == 2
    assert "optim.lr must be" in capsys.readouterr().err


def test_print_config_refuses_what_training_refuses(capsys) -> None:
    # Each value is valid alone; together they are not (OHEM ranks cross-entropy per pixel):
    # the recipe is refused as it is read, by --print-config as by training.
    args = ["train", "ddrnet23_slim_camvid", "loss.name=ce+dice", "loss.ohem_thresh=0.7"]
    assert main([*args, "--print-config"]) == 2
    err = capsys.readouterr().err.strip()
    assert "loss.ohem_thresh needs loss.name ce" in err and "'ce+dice'" in err
    assert len(err.splitlines()) == 1 and "ddrnet23_slim_camvid" in err
    assert main(["train", "ddrnet23_slim_camvid", "loss.ohem_thresh=0.7", "--print-config"]) == 0
