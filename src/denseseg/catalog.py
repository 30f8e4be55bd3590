"""``denseseg models``: the registered architectures with their description and parameter count,
and the built-in trained models with what they were measured to do.

Parameters are counted on the meta device (no memory, no weights), with the in-place weight
initialisers of ``torch.nn.init`` skipped while counting: on the meta device they only cost time.
"""

from __future__ import annotations

import contextlib
import fnmatch
import inspect
from collections.abc import Iterator
from typing import Any

import torch

from denseseg.models import create_model, get_model_entry, list_models
from denseseg.pretrained import list_builtin, read_meta

COUNT_CLASSES = 21
"""Classes of the models counted when their builder has no default (PASCAL VOC's 21)."""


@contextlib.contextmanager
def _no_init() -> Iterator[None]:
    """``torch.nn.init``'s in-place initialisers as no-ops (restored afterwards)."""
    names = [n for n in dir(torch.nn.init) if n.endswith("_") and not n.startswith("_")]
    saved = {n: getattr(torch.nn.init, n) for n in names}
    try:
        for n in names:
            setattr(torch.nn.init, n, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for n, fn in saved.items():
            setattr(torch.nn.init, n, fn)


def _classes(name: str) -> int:
    default = inspect.signature(get_model_entry(name).builder).parameters.get("num_classes")
    if default is None or default.default is inspect.Parameter.empty:
        return COUNT_CLASSES
    return int(default.default)


def architectures(pattern: str | None = None) -> list[dict[str, Any]]:
    """Per registered name matching ``pattern`` (fnmatch, e.g. ``"*resnet*"``): name, task,
    description, the classes counted and the parameter count."""
    rows = []
    names = [n for n in list_models() if pattern is None or fnmatch.fnmatch(n, pattern)]
    with torch.device("meta"), _no_init():
        for name in names:
            entry, classes = get_model_entry(name), _classes(name)
            model = create_model(name, num_classes=classes)
            params = sum(p.numel() for p in model.parameters())
            rows.append(
                {
                    "name": name,
                    "task": entry.task,
                    "description": entry.description,
                    "classes": classes,
                    "params": params,
                }
            )
    return rows


def builtin_models(pattern: str | None = None) -> list[dict[str, Any]]:
    """Per built-in trained model matching ``pattern``: name, architecture, classes and the
    accuracy stored in its JSON (``accuracy``; empty when none was recorded)."""
    rows = []
    for name in list_builtin():
        if pattern is not None and not fnmatch.fnmatch(name, pattern):
            continue
        meta = read_meta(name)
        rows.append(
            {
                "name": name,
                "architecture": meta["model_name"],
                "classes": len(meta.get("classes", [])),
                "accuracy": meta.get("accuracy", ""),
            }
        )
    return rows


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f} M"


def format_tables(archs: list[dict[str, Any]], builtins: list[dict[str, Any]]) -> str:
    """The two tables as Markdown (readable as plain text)."""
    lines = []
    if builtins:
        lines += ["Built-in trained models (load_model(NAME), --model NAME):", ""]
        lines += ["| name | architecture | classes | measured |", "|---|---|---:|---|"]
        lines += [
            f"| {b['name']} | {b['architecture']} | {b['classes']} | {b['accuracy']} |"
            for b in builtins
        ]
        lines.append("")
    if archs:
        lines += ["Architectures (create_model(NAME), model.name in a recipe):", ""]
        lines += ["| name | task | params | description |", "|---|---|---:|---|"]
        lines += [
            f"| {a['name']} | {a['task']} | {_millions(a['params'])} ({a['classes']} classes) "
            f"| {a['description']} |"
            for a in archs
        ]
    return "\n".join(lines)
