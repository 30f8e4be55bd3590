"""tensorboard, pycocotools and timm are extras (denseseg[tb], [coco], [timm]), not requirements.

The package imports and trains without them (checked in a fresh interpreter whose import system
refuses them, the most honest way to have them missing), and each feature that needs one says in
one line which extra to install.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import tiny_recipe
from denseseg.errors import ConfigError, MissingExtraError, require_extra

ROOT = Path(__file__).resolve().parents[1]
OPTIONAL = ("tensorboard", "pycocotools", "timm")
RUNTIME_EXTRAS = {"tb", "coco", "timm", "onnx", "openvino", "video", "serve"}

# Run in a fresh interpreter: the optional packages cannot be imported there, installed or not.
_WITHOUT_EXTRAS = textwrap.dedent(
    """
    import importlib.abc, json, logging, sys

    BLOCKED = {blocked!r}

    class Refuse(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
            return None

    sys.meta_path.insert(0, Refuse())
    logging.basicConfig(level=logging.WARNING, format="LOG %(message)s")

    import denseseg

    cfg = denseseg.load_config("unet_demo", json.loads(sys.argv[1]))
    result = denseseg.train(cfg)
    seg = denseseg.load_model(cfg.train.out_dir + "/last.pt", device="cpu")
    import torch
    assert seg.predict(torch.zeros(3, 20, 24, dtype=torch.uint8)).shape == (20, 24)
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    print("RESULT", json.dumps({{"loaded": loaded, "metrics": result["metrics"] is not None}}))
    """
)


def test_package_imports_and_trains_without_the_optional_packages(
    tiny_dataset: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    overrides = tiny_recipe(tiny_dataset, run) + [
        "train.max_steps=2",
        "train.eval_every=2",
        "train.tensorboard=true",  # the default: skipped with one line, not an error
    ]
    proc = subprocess.run(
        [sys.executable, "-c", _WITHOUT_EXTRAS.format(blocked=OPTIONAL), json.dumps(overrides)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert result == {"loaded": [], "metrics": True}
    assert (run / "last.pt").is_file() and (run / "log.csv").is_file()
    assert not (run / "tb").exists()
    notes = [line for line in proc.stderr.splitlines() if "TensorBoard" in line]
    assert len(notes) == 1 and "pip install 'denseseg[tb]'" in notes[0], proc.stderr[-2000:]


def _one_line_naming(exc: pytest.ExceptionInfo[BaseException], extra: str) -> None:
    message = str(exc.value)
    assert isinstance(exc.value, ConfigError) and "\n" not in message
    assert f"pip install 'denseseg[{extra}]'" in message


@pytest.fixture
def no_pycocotools(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m.split(".")[0] == "pycocotools"]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "pycocotools", None)  # an import of it now fails


def test_coco_evaluation_without_pycocotools_names_the_extra(no_pycocotools: None) -> None:
    from denseseg.metrics.coco import CocoInstanceMetrics, encode_masks

    with pytest.raises(MissingExtraError) as exc:
        CocoInstanceMetrics(["background", "cell"])  # before any prediction is made
    _one_line_naming(exc, "coco")
    with pytest.raises(MissingExtraError) as exc:
        encode_masks(torch.ones(1, 4, 4, dtype=torch.bool))  # instance results of predict
    _one_line_naming(exc, "coco")


def test_coco_data_without_pycocotools_names_the_extra(
    no_pycocotools: None, tmp_path: Path
) -> None:
    import numpy as np

    from denseseg.data.coco_export import write_coco_split
    from denseseg.data.registry import get_dataset
    from denseseg.engine.tasks import InstanceTask

    (tmp_path / "val").mkdir()
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_val.json").write_text("{}")
    with pytest.raises(MissingExtraError) as exc:
        get_dataset("coco", tmp_path, "val", target="instance")
    _one_line_naming(exc, "coco")
    with pytest.raises(MissingExtraError) as exc:
        write_coco_split(tmp_path, "train", [np.zeros((4, 4), np.uint8)], [[]], {1: "cell"})
    _one_line_naming(exc, "coco")
    with pytest.raises(MissingExtraError) as exc:  # training Mask R-CNN: refused at the start
        InstanceTask().check(None, None)  # type: ignore[arg-type]
    _one_line_naming(exc, "coco")


def test_timm_backbone_without_timm_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from denseseg.backbones import create_backbone

    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(MissingExtraError) as exc:
        create_backbone("timm", model_name="resnet18")
    _one_line_naming(exc, "timm")


def test_tensorboard_missing_is_skipped_with_one_line(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    from denseseg.engine.hooks import _open_tensorboard

    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with caplog.at_level(logging.INFO, logger="denseseg"):
        assert _open_tensorboard(tmp_path, True) is None
        assert _open_tensorboard(tmp_path, False) is None  # asked for none: nothing said
    assert len(caplog.records) == 1 and caplog.records[0].levelno == logging.WARNING
    assert "pip install 'denseseg[tb]'" in caplog.records[0].getMessage()
    assert "train.tensorboard=false" in caplog.records[0].getMessage()
    assert not (tmp_path / "tb").exists()


def test_require_extra_returns_the_module_or_one_line() -> None:
    assert require_extra("json", "x", "JSON") is json
    with pytest.raises(MissingExtraError, match=r"^the thing needs the extra denseseg\[zz\]: pip "):
        require_extra("denseseg_no_such_module", "zz", "the thing", "(or not)")


def test_pyproject_declares_the_extras() -> None:
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    required = " ".join(project["dependencies"])
    assert not any(name in required for name in OPTIONAL)
    extras = project["optional-dependencies"]
    assert extras["tb"] == ["tensorboard>=2.21"] and extras["coco"] == ["pycocotools>=2.0.11"]
    assert extras["timm"] == ["timm>=0.9"]
    assert RUNTIME_EXTRAS <= set(extras)
    (everything,) = extras["all"]
    assert set(everything.removeprefix("denseseg[").removesuffix("]").split(",")) == RUNTIME_EXTRAS
    (dev_extras,) = [d for d in extras["dev"] if d.startswith("denseseg[")]
    assert {"tb", "coco"} <= set(dev_extras.removeprefix("denseseg[").removesuffix("]").split(","))
