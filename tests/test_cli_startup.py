"""The command line starts quickly: ``import denseseg`` and every ``--help`` load no torch (the
public names are imported on first use), ``--version``, ``-v`` / ``-q``, ``denseseg env``."""

from __future__ import annotations

import subprocess
import sys

import pytest

from denseseg.cli import build_parser, main

COMMANDS = sorted(build_parser()._subparsers._group_actions[0].choices)  # type: ignore[union-attr]


def _run_python(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    return done.stdout


def test_import_denseseg_loads_no_torch_until_a_name_is_used() -> None:
    out = _run_python(
        "import sys, denseseg\n"
        "print('torch' in sys.modules, denseseg.__version__)\n"
        "denseseg.create_model\n"
        "print('torch' in sys.modules, 'load_model' in dir(denseseg))"
    )
    assert out.split("\n")[:2] == ["False 0.1.0", "True True"]


def test_every_help_loads_no_torch() -> None:
    """Every sub-command's --help in one process: none imports torch, numpy or tqdm (what makes
    ``denseseg --help`` take seconds), so each answers in well under a second."""
    assert {"train", "predict", "serve", "env", "export", "benchmark"} <= set(COMMANDS)
    code = (
        "import sys\n"
        "from denseseg.cli import main\n"
        f"for c in [[], *[[c] for c in {COMMANDS!r}]]:\n"
        "    assert main([*c, '--help']) == 0\n"
        "print(sorted(m for m in ('torch', 'numpy', 'tqdm', 'PIL') if m in sys.modules))"
    )
    assert _run_python(code).strip().splitlines()[-1] == "[]"


def test_version(capsys) -> None:
    import denseseg

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"denseseg {denseseg.__version__}"


def test_verbose_and_quiet_exclude_each_other(capsys) -> None:
    assert main(["-v", "-q", "env"]) == 2
    assert "not allowed with" in capsys.readouterr().err


def test_verbose_logs_what_loads(tmp_path) -> None:
    from PIL import Image

    from conftest import save_em_checkpoint

    ckpt = save_em_checkpoint(tmp_path / "em.pt", "unet", base_channels=4, depth=2)
    Image.new("L", (16, 16)).save(tmp_path / "a.png")
    cmd = [sys.executable, "-m", "denseseg", "-v", "predict", str(tmp_path / "a.png")]
    cmd += ["--model", str(ckpt), "--out", str(tmp_path / "out")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "denseseg -v predict" in done.stderr
    assert f"loaded {ckpt} in " in done.stderr and "Segmenter(" in done.stderr


def test_env_names_versions_and_cpu(capsys) -> None:
    import torch

    assert main(["env"]) == 0
    out = capsys.readouterr().out
    rows = dict(line.split("  ", 1) for line in out.splitlines())
    rows = {k.strip(): v.strip() for k, v in rows.items()}
    assert torch.__version__.startswith(rows["torch"])
    for row in ("Python", "CPU features", "torchvision", "onnxruntime", "CUDA devices"):
        assert row in out


@pytest.mark.parametrize(
    ("light", "table"),
    [
        ("BENCHMARK_PATHS", "denseseg.engine.benchmark:PATHS"),
        ("DEFAULT_BENCHMARK_PATHS", "denseseg.engine.benchmark:DEFAULT_PATHS"),
        ("DATASETS", "denseseg.data.registry:DATASETS"),
        ("EXPORT_FORMATS", "denseseg.inference.export:FORMATS"),
    ],
)
def test_the_parsers_choices_are_the_implementations(light: str, table: str) -> None:
    import importlib

    from denseseg import choices

    module, name = table.split(":")
    assert tuple(getattr(importlib.import_module(module), name)) == getattr(choices, light)


def test_models_table_counts_parameters_on_the_meta_device(capsys) -> None:
    import torch

    from denseseg.catalog import architectures
    from denseseg.models import create_model

    rows = {r["name"]: r for r in architectures("*", cache=False)}
    for name in ("unet", "lraspp_mobilenet_v3_large", "fcn8s"):
        model = create_model(name, num_classes=rows[name]["classes"])  # on the CPU, initialised
        assert rows[name]["params"] == sum(p.numel() for p in model.parameters())
    assert rows["maskrcnn_resnet50_fpn"]["classes"] == 91  # the builder's own default
    assert torch.nn.init.normal_.__module__ == "torch.nn.init"  # the initialisers restored
    assert main(["models", "--filter", "*mobilenet*"]) == 0
    out = capsys.readouterr().out
    assert "| lraspp_mobilenet_v3_large | semantic | 3.22 M (21 classes) |" in out
    assert "| unet |" not in out and "camvid" not in out


def test_models_lists_the_built_in_trained_models(capsys) -> None:
    assert main(["models", "--filter", "camvid*"]) == 0
    out = capsys.readouterr().out
    assert "| camvid | ddrnet23_slim | 11 | " in out
    assert "| camvid_lraspp | lraspp_mobilenet_v3_large | 11 | the built-in camvid until" in out
    assert main(["models", "--names"]) == 0
    names = capsys.readouterr().out.split()
    assert names[:3] == ["camvid", "camvid_lraspp", "isbi2012"] and "unet" in names
    assert main(["models", "--filter", "nothing*"]) == 2
    assert "no model name matches --filter 'nothing*'" in capsys.readouterr().err


def test_quiet_prints_no_progress_bar_and_no_log(tmp_path) -> None:
    from PIL import Image

    from conftest import save_em_checkpoint

    ckpt = save_em_checkpoint(tmp_path / "em.pt", "unet", base_channels=4, depth=2)
    (tmp_path / "in").mkdir()
    for i in range(3):
        Image.new("L", (16, 16), 40 * i).save(tmp_path / "in" / f"{i}.png")
    base = [sys.executable, "-m", "denseseg"]
    args = ["predict", str(tmp_path / "in"), "--model", str(ckpt), "--out", str(tmp_path / "out")]
    loud = subprocess.run([*base, *args], capture_output=True, text=True, timeout=120)
    assert loud.returncode == 0 and "predict" in loud.stderr  # the bar
    quiet = subprocess.run(
        [*base, "-q", *args, "--overwrite"], capture_output=True, text=True, timeout=120
    )
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stderr == ""
    assert "wrote the label maps" in quiet.stdout  # the result is still said


def test_models_table_is_kept_so_later_calls_load_no_torch(tmp_path, monkeypatch) -> None:
    import json
    import os

    from denseseg import catalog
    from denseseg.pretrained import list_builtin

    monkeypatch.setenv("DENSESEG_CACHE", str(tmp_path))
    first = catalog.architectures()
    kept = json.loads((tmp_path / "models_table.json").read_text())
    assert kept["rows"] == first and kept["key"] == catalog._fingerprint()
    code = (
        "import sys\n"
        "from denseseg.cli import main\n"
        "assert main(['models', '--filter', 'unet*']) == 0\n"
        "print('torch' in sys.modules)"
    )
    env = {**os.environ, "DENSESEG_CACHE": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 0, done.stderr
    assert "| unet_valid | semantic | 31.03 M (21 classes) |" in done.stdout
    assert done.stdout.strip().splitlines()[-1] == "False"
    # Another version of the sources: counted again, not read from the stale table.
    monkeypatch.setattr(catalog, "_fingerprint", lambda: "another")
    monkeypatch.setattr(catalog, "_count_all", lambda: [{"name": "fresh"}])
    assert catalog.architectures() == [{"name": "fresh"}]
    assert [r["name"] for r in catalog.builtin_models()] == list_builtin()
