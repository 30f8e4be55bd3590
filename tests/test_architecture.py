"""Imports point down the layers only.

Every module of ``src/denseseg`` is parsed (not imported) and each of its imports, at the top of
the file or inside a function, is checked against the layers of the package:

    checkpoint (with errors)  <  layers, ops, backbones  <  models, data, losses, metrics
    <  inference, engine  <  pretrained, api  <  cli, demo

A failure lists every offending ``file:line -> module`` with the rule it breaks.
"""

from __future__ import annotations

import ast
import importlib.util
import sys
from functools import cache
from pathlib import Path

import pytest

# Found, not imported: an import cycle a new import makes must not hide the report behind it.
SRC = Path(importlib.util.find_spec("denseseg").origin).parent
LOWER = ("layers", "ops", "backbones", "models", "data", "losses", "metrics")
UPPER = ("engine", "cli", "api", "pretrained", "inference", "demo", "serve", "env", "catalog")
# The bottom package reads and writes files with these alone; torchvision only for the table of
# its weights names, in one module.
BOTTOM_THIRD_PARTY = ("numpy", "torch", "safetensors")
BOTTOM_TORCHVISION = "checkpoint/torchvision_weights.py"

Import = tuple[str, int, str, bool]  # (file relative to src/denseseg, line, module, in a function)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(node: ast.ImportFrom, path: Path) -> list[str]:
    """The modules a ``from ... import ...`` names (``from denseseg import x`` may name one)."""
    if node.level:
        package = _module_name(path).split(".")
        if path.name != "__init__.py":
            package = package[:-1]
        base = ".".join(package[: len(package) - node.level + 1])
        module = f"{base}.{node.module}" if node.module else base
    else:
        module = node.module or ""
    if module == "denseseg":  # ``from denseseg import data`` imports the package denseseg.data
        return [
            f"denseseg.{a.name}"
            if (SRC / a.name).is_dir() or (SRC / f"{a.name}.py").is_file()
            # a name of the public API: the top of the house
            else "denseseg"
            for a in node.names
        ]
    return [module]


class _Collector(ast.NodeVisitor):
    def __init__(self, path: Path) -> None:
        self.path = path
        self.depth = 0
        self.found: list[Import] = []

    def _function(self, node: ast.AST) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_Import(self, node: ast.Import) -> None:
        self._add(node, [a.name for a in node.names])

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        self._add(node, _resolve(node, self.path))

    def _add(self, node: ast.stmt, modules: list[str]) -> None:
        rel = self.path.relative_to(SRC).as_posix()
        self.found += [(rel, node.lineno, m, self.depth > 0) for m in modules]


@cache
def _imports() -> tuple[Import, ...]:
    found: list[Import] = []
    for path in sorted(SRC.rglob("*.py")):
        collector = _Collector(path)
        collector.visit(ast.parse(path.read_text(encoding="utf-8"), str(path)))
        found += collector.found
    return tuple(found)


def _package(rel: str) -> str:
    """``models`` for ``models/fcn.py``, ``cli`` for ``cli.py``."""
    return rel.split("/")[0].removesuffix(".py")


def _within(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == f"denseseg.{p}" or module.startswith(f"denseseg.{p}.") for p in packages)


def _violation(rel: str, module: str, in_function: bool) -> str | None:
    """The rule ``rel`` breaks by importing ``module``, or None."""
    layer = _package(rel)
    if layer == "checkpoint":
        return _bottom_violation(rel, module, in_function)
    if layer not in LOWER:
        return None
    if module == "denseseg" or _within(module, UPPER):
        return f"{layer}/ imports no engine, cli, api, pretrained, inference or demo"
    if layer in ("ops", "layers") and _within(module, ("models", "backbones")):
        return "ops/ and layers/ import neither models nor backbones"
    if layer == "backbones" and _within(module, ("models",)):
        return "backbones/ do not import models"
    if in_function and module.startswith("denseseg"):
        return "no denseseg import hidden inside a function: import it at the top of the file"
    return None


def _bottom_violation(rel: str, module: str, in_function: bool) -> str | None:
    root = module.split(".")[0]
    if module.startswith("denseseg"):
        if module == "denseseg.errors" or _within(module, ("checkpoint",)):
            return "no denseseg import hidden inside a function" if in_function else None
        return "checkpoint/ imports only denseseg.errors of the package"
    if root in sys.stdlib_module_names or root in BOTTOM_THIRD_PARTY:
        return None
    if root == "torchvision" and rel == BOTTOM_TORCHVISION:
        return None
    return "checkpoint/ imports only the standard library, numpy, torch and safetensors"


def test_imports_point_down_the_layers() -> None:
    offending = [
        f"{rel}:{line} -> {module}  ({rule})"
        for rel, line, module, in_function in _imports()
        if (rule := _violation(rel, module, in_function)) is not None
    ]
    assert not offending, "imports that break the layering:\n" + "\n".join(offending)


@pytest.mark.parametrize(
    ("rel", "module", "in_function", "broken"),
    [
        ("models/fcn.py", "denseseg.engine.trainer", False, True),
        ("data/io.py", "denseseg.inference.segmenter", True, True),
        ("metrics/confusion.py", "denseseg", False, True),
        ("losses/dice.py", "denseseg.demo", False, True),
        ("data/registry.py", "denseseg.data.demo_scenes", False, False),
        ("ops/poolers.py", "denseseg.models.maskrcnn", False, True),
        ("layers/conv.py", "denseseg.backbones", False, True),
        ("backbones/vgg.py", "denseseg.models.weights", True, True),
        ("backbones/vgg.py", "denseseg.checkpoint", False, False),
        ("models/unet.py", "denseseg.models.unet_backbone", True, True),
        ("models/unet.py", "timm", True, False),
        ("checkpoint/weights.py", "denseseg.models", False, True),
        ("checkpoint/weights.py", "safetensors.torch", False, False),
        ("checkpoint/weights.py", "torchvision", False, True),
        ("checkpoint/torchvision_weights.py", "torchvision", False, False),
        ("engine/trainer.py", "denseseg.cli", False, False),
    ],
)
def test_the_rules_catch_what_they_should(
    rel: str, module: str, in_function: bool, broken: bool
) -> None:
    assert (_violation(rel, module, in_function) is not None) is broken


def test_every_module_is_read() -> None:
    files = {rel for rel, *_ in _imports()}
    assert {"checkpoint/weights.py", "models/fcn.py", "ops/components.py"} <= files


MAX_FUNCTION_LINES = 100


def _code_lines(node: ast.FunctionDef | ast.AsyncFunctionDef, lines: list[str]) -> int:
    """Lines of code of a function: its docstring, comments and blank lines not counted."""
    skip: set[int] = set()
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        if isinstance(body[0].value.value, str):
            skip = set(range(body[0].lineno, body[0].end_lineno + 1))
    span = range(node.lineno, node.end_lineno + 1)
    code = [n for n in span if n not in skip and lines[n - 1].strip()]
    return sum(1 for n in code if not lines[n - 1].strip().startswith("#"))


def test_no_function_is_longer_than_a_screen() -> None:
    """No function in src/denseseg has more than 100 lines of code (argparse builders
    included): a reader sees each one whole."""
    long = []
    for path in sorted(SRC.rglob("*.py")):
        text = path.read_text()
        lines = text.splitlines()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = _code_lines(node, lines)
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, "functions longer than 100 lines of code:\n" + "\n".join(long)
