"""``denseseg models``: the registered architectures with their description and parameter count,
and the built-in trained models with what they were measured to do.

Parameters are counted on the meta device (no memory, no weights), with the in-place weight
initialisers of ``torch.nn.init`` skipped while counting: on the meta device they only cost time.
The table is kept in the cache folder, keyed by the model sources, so that only the first call
after an install or a change imports torch (about 6 s on a two-core machine; the counting itself
about 1 s); later calls take a fraction of a second.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import inspect
import json
import os
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

COUNT_CLASSES = 21
"""Classes of the models counted when their builder has no default (PASCAL VOC's 21)."""

PRETRAINED_ENV = "DENSESEG_PRETRAINED_DIR"
"""Folders of packed models besides the package's own (``denseseg.pretrained.ENV_VAR``)."""

_PACKAGE = Path(__file__).parent
# The sources that decide the registry's names, descriptions and parameter counts.
_SOURCES = ("models", "backbones", "layers", "ops")


def cache_dir() -> Path:
    """``$DENSESEG_CACHE`` if set, else ``~/.cache/denseseg``."""
    env = os.environ.get("DENSESEG_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "denseseg"


def _fingerprint() -> str:
    """What the architecture table depends on: denseseg's version and model sources (their
    modification times and sizes), torch's and torchvision's versions."""
    from denseseg import __version__

    h = hashlib.sha256(__version__.encode())
    for dist in ("torch", "torchvision"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            h.update(f"{dist}={metadata.version(dist)}".encode())
    for sub in _SOURCES:
        for path in sorted((_PACKAGE / sub).rglob("*.py")):
            st = path.stat()
            h.update(f"{path.relative_to(_PACKAGE)}:{st.st_mtime_ns}:{st.st_size}".encode())
    return h.hexdigest()[:20]


@contextlib.contextmanager
def _no_init() -> Iterator[None]:
    """``torch.nn.init``'s in-place initialisers as no-ops (restored afterwards)."""
    import torch

    names = [n for n in dir(torch.nn.init) if n.endswith("_") and not n.startswith("_")]
    saved = {n: getattr(torch.nn.init, n) for n in names}
    try:
        for n in names:
            setattr(torch.nn.init, n, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for n, fn in saved.items():
            setattr(torch.nn.init, n, fn)


def _count_all() -> list[dict[str, Any]]:
    """Every registered architecture: name, task, description, classes counted, parameters."""
    import torch

    from denseseg.models import create_model, get_model_entry, list_models

    rows = []
    with torch.device("meta"), _no_init():
        for name in list_models():
            entry = get_model_entry(name)
            default = inspect.signature(entry.builder).parameters.get("num_classes")
            has_default = default is not None and default.default is not inspect.Parameter.empty
            classes = int(default.default) if has_default else COUNT_CLASSES
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


def _cached_rows(key: str) -> list[dict[str, Any]] | None:
    path = cache_dir() / "models_table.json"
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return stored.get("rows") if isinstance(stored, dict) and stored.get("key") == key else None


def _store_rows(key: str, rows: list[dict[str, Any]]) -> None:
    """Keep the table for the next call (best effort: a read-only home only costs time)."""
    folder = cache_dir()
    tmp = folder / f".models_table.{os.getpid()}.json"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"key": key, "rows": rows}), encoding="utf-8")
        os.replace(tmp, folder / "models_table.json")
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()


def architectures(pattern: str | None = None, cache: bool = True) -> list[dict[str, Any]]:
    """Per registered name matching ``pattern`` (fnmatch, e.g. ``"*resnet*"``): name, task,
    description, the classes counted and the parameter count. The table is counted once per
    version of the model sources and kept in :func:`cache_dir` (``cache=False``: count now),
    so that later calls load no torch."""
    key = _fingerprint()
    rows = _cached_rows(key) if cache else None
    if rows is None:
        rows = _count_all()
        if cache:
            _store_rows(key, rows)
    return [r for r in rows if pattern is None or fnmatch.fnmatch(r["name"], pattern)]


def _builtin_jsons() -> dict[str, Path]:
    """``NAME -> NAME.json`` of the packed models (``denseseg.pretrained.list_builtin``'s
    folders, read without torch: the first folder holding a name wins)."""
    dirs = [Path(p) for p in os.environ.get(PRETRAINED_ENV, "").split(os.pathsep) if p]
    found: dict[str, Path] = {}
    for d in [*dirs, _PACKAGE / "pretrained"]:
        if d.is_dir():
            for p in sorted(d.glob("*.json")):
                if p.with_suffix(".safetensors").is_file():
                    found.setdefault(p.stem, p)
    return dict(sorted(found.items()))


def builtin_models(pattern: str | None = None) -> list[dict[str, Any]]:
    """Per built-in trained model matching ``pattern``: name, architecture, classes and the
    accuracy stored in its JSON (``accuracy``; empty when none was recorded)."""
    rows = []
    for name, path in _builtin_jsons().items():
        if pattern is not None and not fnmatch.fnmatch(name, pattern):
            continue
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            meta = {}
        meta = meta if isinstance(meta, dict) else {}
        rows.append(
            {
                "name": name,
                "architecture": str(meta.get("model_name", "?")),
                "classes": len(meta.get("classes") or []),
                "accuracy": str(meta.get("accuracy", "")),
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
