"""Built-in models name no folder of the machine they were packed on: the shipped JSONs hold no
absolute path, and ``pack`` cuts every absolute path it would write to its last component."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import save_em_checkpoint
from denseseg.checkpoint import atomic_save, load_checkpoint
from denseseg.pretrained import ABSOLUTE_PATH, ENV_VAR, PACKAGE_DIR, pack, portable, read_meta

SHIPPED = sorted(PACKAGE_DIR.glob("*.json"))


def _strings(obj: Any, where: str = "") -> Iterator[tuple[str, str]]:
    """Every string of a JSON value, keys included, with where it lies."""
    if isinstance(obj, str):
        yield where, obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield f"{where}.{key}", str(key)
            yield from _strings(value, f"{where}.{key}")
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            yield from _strings(value, f"{where}[{i}]")


def _absolute(obj: Any) -> list[str]:
    return [f"{where}: {text}" for where, text in _strings(obj) if _looks_absolute(text)]


def _looks_absolute(text: str) -> bool:
    # Independent of the pattern under test: POSIX, home, Windows drive and UNC paths.
    return text.startswith(("/", "~", "\\\\")) or (
        len(text) > 2 and text[0].isalpha() and text[1] == ":" and text[2] in "\\/"
    )


def test_packages_ship_the_models() -> None:
    assert {p.stem for p in SHIPPED} >= {"camvid", "isbi2012"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_json_holds_no_absolute_path(path: Path) -> None:
    found = _absolute(json.loads(path.read_text(encoding="utf-8")))
    assert not found, f"{path.name} holds absolute paths:\n" + "\n".join(found)


def test_shipped_json_keeps_the_dataset_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    for name in ("camvid", "isbi2012"):
        data = read_meta(name)["provenance"]["recipe"]["data"]
        assert data["dataset"] == name and data["root"] == name


def test_pack_writes_no_absolute_path(tmp_path: Path) -> None:
    ckpt_path = save_em_checkpoint(tmp_path / "last.pt", "unet", base_channels=4, depth=2)
    ckpt = load_checkpoint(ckpt_path)
    ckpt["config"] = {
        "data": {"dataset": "folder", "root": str(tmp_path / "data" / "cells"), "options": {}},
        "train": {"out_dir": str(tmp_path / "runs" / "cells"), "max_steps": 7},
        "model": {"weights": "C:\\Users\\me\\init.pt", "kwargs": {}},
    }
    atomic_save(ckpt, ckpt_path)
    files = pack(
        ckpt_path,
        "cells",
        out_dir=tmp_path / "models",
        extra_meta={"provenance": {"note": "~/notes/cells.md", "source": "\\\\lab\\share\\x"}},
    )
    meta = json.loads(files["json"].read_text())
    assert not _absolute(meta), _absolute(meta)
    recipe = meta["provenance"]["recipe"]
    assert recipe["data"]["root"] == "cells" and recipe["train"]["out_dir"] == "cells"
    assert recipe["model"]["weights"] == "init.pt" and recipe["train"]["max_steps"] == 7
    assert meta["provenance"]["note"] == "cells.md" and meta["provenance"]["source"] == "x"
    assert meta["provenance"]["checkpoint"] == "last.pt"


@pytest.mark.parametrize(
    ("value", "kept"),
    [
        ("/work/shared/data/camvid", "camvid"),
        ("/work/runs/exp/", "exp"),
        ("~", ""),
        ("/", ""),
        ("D:/data/voc", "voc"),
        ("relative/data", "relative/data"),
        ("https://example.org/a", "https://example.org/a"),
        ("camvid", "camvid"),
    ],
)
def test_portable_cuts_absolute_paths_only(value: str, kept: str) -> None:
    assert portable({"a": [value, 1, None, {"b": value}]}) == {"a": [kept, 1, None, {"b": kept}]}
    assert bool(ABSOLUTE_PATH.match(value)) == _looks_absolute(value)
