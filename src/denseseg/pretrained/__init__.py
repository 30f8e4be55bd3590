"""Built-in models: trained weights shipped inside the package, loadable by name.

Each built-in model ``NAME`` is two files in this folder:

* ``NAME.safetensors``: the model's weights (float16 or float32). Safetensors holds bare tensors,
  so loading it runs no code (no pickle).
* ``NAME.json``: everything :func:`denseseg.load_model` needs besides the weights: the registered
  model name and its keyword arguments, class names, palette, normalisation (mean/std),
  ``ignore_index``, input channels, the :class:`~denseseg.inference.Segmenter` mode, tile
  size, and provenance (recipe, steps, validation metrics, date, source checkpoint, sha256 of
  the weights file); once measured, the fastest torch inference path (``fast``: path,
  precision, and the machine it was measured on; :func:`store_fast`, ``denseseg benchmark
  --save``), which ``fast=True`` then takes.

``pack(checkpoint, name)`` writes both from a checkpoint of ``denseseg train`` (the ``denseseg
pack`` command); ``denseseg.load_model("NAME")`` and ``--model NAME`` on the command line load
them, with no download and no dataset.

Folders searched, in order: the ``directory`` argument where a function takes one, the folders
in the environment variable ``DENSESEG_PRETRAINED_DIR`` (``os.pathsep``-separated; ``pack``
writes into the first), then this package folder. ``pack`` never writes into the installed
package unasked: without ``out_dir`` it needs the variable. A user model named like a model
shipped in the package (``camvid``) is packed only with ``force=True``, and loading it logs a
warning naming the file used. Loading checks the weights against the sha256 stored in the JSON.

A ``NAME.json`` names no folder of the machine it was packed on: every absolute path in it (the
recipe's ``data.root`` and ``train.out_dir``, a note) is cut to its last component
(``/data/camvid`` -> ``camvid``, see :func:`portable`), so the shipped files say which dataset a
model was trained on but not where it lay.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from denseseg.checkpoint import atomic_write
from denseseg.errors import CheckpointError, ConfigError
from denseseg.inference.build import (
    Predictor,
    build_predictor,
    first_line,
    model_from_checkpoint,
    model_from_state,
)
from denseseg.inference.fast import PATHS, PRECISIONS
from denseseg.inference.segmenter import MODES, TTA
from denseseg.inference.slide import WEIGHTINGS, check_window

log = logging.getLogger("denseseg")

__all__ = [
    "ENV_VAR",
    "MAX_BYTES",
    "PACKAGE_DIR",
    "builtin_files",
    "list_builtin",
    "load_builtin",
    "pack",
    "portable",
    "read_meta",
    "store_fast",
    "unknown_model_message",
]

PACKAGE_DIR = Path(__file__).resolve().parent
ENV_VAR = "DENSESEG_PRETRAINED_DIR"
MAX_BYTES = 25 * 1024 * 1024
"""Largest weights file ``pack`` writes (25 MiB): the package must stay small to install."""
FORMAT = "denseseg-pretrained/1"

_NAME = re.compile(r"^[a-z0-9][a-z0-9_\-]{0,63}$")
# An absolute path: POSIX (/...), a home folder (~...), Windows (C:\..., C:/..., \\server\...).
ABSOLUTE_PATH = re.compile(r"^(?:/|~|[A-Za-z]:[\\/]|\\\\)")
# Checkpoint entries copied into the JSON as they are (all plain lists, numbers and strings);
# the last three are an instance model's (COCO category ids, the reader and its options).
_META_KEYS = (
    "model_name",
    "model_kwargs",
    "mean",
    "std",
    "in_channels",
    "num_classes",
    "category_ids",
    "dataset",
    "data_options",
)
# Keys a NAME.json must hold, with the type each must have.
_REQUIRED = {"model_name": str, "model_kwargs": dict, "mean": list, "std": list, "sha256": str}


def _search_dirs(directory: str | os.PathLike | None = None) -> list[Path]:
    dirs = [Path(directory)] if directory is not None else []
    dirs += [Path(p) for p in os.environ.get(ENV_VAR, "").split(os.pathsep) if p]
    dirs.append(PACKAGE_DIR)
    return dirs


def list_builtin(directory: str | os.PathLike | None = None) -> list[str]:
    """Names of the built-in models (those with both ``NAME.json`` and ``NAME.safetensors``).

    Args:
        directory: an extra folder searched first (see the module docstring).

    Returns:
        Sorted names, e.g. ``["camvid", "isbi2012"]``.
    """
    names: set[str] = set()
    for d in _search_dirs(directory):
        if d.is_dir():
            names |= {p.stem for p in d.glob("*.json") if p.with_suffix(".safetensors").is_file()}
    return sorted(names)


def builtin_files(
    name: str, directory: str | os.PathLike | None = None
) -> tuple[Path, Path] | None:
    """``(NAME.json, NAME.safetensors)`` of a built-in model, or None when there is none.

    Args:
        name: the built-in name.
        directory: an extra folder searched first.
    """
    if not _NAME.match(str(name)):
        return None
    for d in _search_dirs(directory):
        meta, weights = d / f"{name}.json", d / f"{name}.safetensors"
        if meta.is_file() and weights.is_file():
            return meta, weights
    return None


def read_meta(name: str, directory: str | os.PathLike | None = None) -> dict[str, Any]:
    """The ``NAME.json`` of a built-in model as a dict.

    Raises:
        CheckpointError: no built-in model has that name, its JSON is unreadable, or it lacks a
            key loading needs (``model_name``, ``model_kwargs``, ``mean``, ``std``, ``sha256``).
    """
    files = builtin_files(name, directory)
    if files is None:
        raise CheckpointError(unknown_model_message(name, directory))
    path = files[0]
    try:
        meta = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError) as exc:  # ValueError: bad JSON or bad UTF-8
        raise CheckpointError(
            f"built-in model file {path} is unreadable ({exc}); pack the model again"
        ) from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"built-in model file {path} does not hold a JSON object")
    for key, kind in _REQUIRED.items():
        if not isinstance(meta.get(key), kind):
            what = "lacks" if key not in meta else f"needs a {kind.__name__} as"
            raise CheckpointError(
                f"built-in model file {path} {what} key {key!r}; pack the model again"
            )
    return meta


def unknown_model_message(name: str, directory: str | os.PathLike | None = None) -> str:
    """The one-line error for a ``--model`` that is neither a file nor a built-in name."""
    known = ", ".join(list_builtin(directory)) or "none installed"
    return (
        f"checkpoint {name} not found; give the path of a .pt file or a built-in model name "
        f"({known})"
    )


# ------------------------------------------------------------------------------- pack
def pack(
    checkpoint_path: str | os.PathLike,
    name: str,
    out_dir: str | os.PathLike | None = None,
    fp16: bool = True,
    extra_meta: Mapping[str, Any] | None = None,
    max_bytes: int = MAX_BYTES,
    precise_bn: int = 0,
    data_root: str | os.PathLike | None = None,
    force: bool = False,
    ema: bool = False,
) -> dict[str, Path]:
    """Turn a training checkpoint into the built-in model ``name`` (two files).

    Float tensors are stored in float16 when ``fp16`` (halving the size; they are cast back to
    float32 on loading); integer buffers (e.g. batch norm's ``num_batches_tracked``) are kept.

    Args:
        checkpoint_path: ``best.pt`` / ``last.pt`` written by ``denseseg train``.
        name: the built-in name (lower case letters, digits, ``_`` and ``-``).
        out_dir: folder to write to; default the first folder of ``$DENSESEG_PRETRAINED_DIR``
            (never the installed package unasked: pass the package folder to update a shipped
            model).
        fp16: store float weights as float16.
        extra_meta: merged into the JSON; ``{"segmenter": {"mode": "overlap_tile",
            "tile_size": 572, "tta": "d4"}}`` sets the inference mode and test-time
            augmentation, ``{"provenance": {...}}`` adds to the
            provenance (e.g. the recipe command).
        max_bytes: refuse a weights file larger than this (25 MiB).
        precise_bn: recompute the batch-norm statistics over this many batches of the
            checkpoint's own training recipe first (PreciseBN, :mod:`denseseg.engine.precise_bn`;
            the weights stay as trained); 0 packs the statistics as saved.
        data_root: the training data's folder for ``precise_bn``, when not the recipe's.
        force: replace an existing ``NAME.json``/``NAME.safetensors`` in the folder, and allow
            a name shipped in the package (``camvid``) in another folder, which then shadows it.
        ema: pack the moving average of the weights the run kept (``train.ema``).

    Returns:
        ``{"json": Path, "weights": Path}``.

    Raises:
        ConfigError: a bad name or segmenter setting, no folder to write to, or files or a
            shipped name that only ``force`` may replace or shadow.
        CheckpointError: the checkpoint is not a denseseg checkpoint, or the weights exceed
            ``max_bytes``.
        DataError: the folder cannot be written (the files there are left as they were).
    """
    if not _NAME.match(str(name)):
        raise ConfigError(
            f"built-in name {name!r} must be lower case letters, digits, '_' or '-' (e.g. camvid)"
        )
    out = _pack_folder(out_dir)
    _refuse_replacing(out, name, force)
    # Build the model once: weights that do not fit are refused now, not when loading.
    ckpt, model = model_from_checkpoint(
        checkpoint_path,
        "pack needs a checkpoint written by denseseg train, not a bare state_dict",
        ema=ema,
    )
    state = model.state_dict()
    if precise_bn:
        state = _precise_bn_state(ckpt, model, precise_bn, data_root)
    tensors = {
        k: (v.half() if fp16 and v.is_floating_point() else v).detach().cpu().contiguous()
        for k, v in state.items()
    }
    blob = st_save(tensors, metadata={"format": FORMAT, "name": name})
    if len(blob) > max_bytes:
        raise CheckpointError(
            f"weights of {checkpoint_path} take {len(blob) / 2**20:.1f} MiB as {name}.safetensors"
            f", more than the {max_bytes / 2**20:.0f} MiB a built-in model may take; train a "
            "smaller model (fewer channels) or pack with fp16"
        )
    meta = _meta_from_checkpoint(ckpt, name, checkpoint_path, fp16, ema)
    if precise_bn:
        meta["provenance"]["precise_bn_batches"] = int(precise_bn)
    meta["sha256"] = hashlib.sha256(blob).hexdigest()
    for key, value in dict(extra_meta or {}).items():
        if isinstance(value, Mapping) and isinstance(meta.get(key), dict):
            meta[key].update(value)
        else:
            meta[key] = value
    _check_segmenter_settings(meta["segmenter"], name, getattr(model, "task", "semantic"))
    meta = portable(meta)

    out.mkdir(parents=True, exist_ok=True)
    weights_path, json_path = out / f"{name}.safetensors", out / f"{name}.json"
    _write(weights_path, blob, "built-in weights")
    _write(json_path, (json.dumps(_plain(meta), indent=2) + "\n").encode(), "built-in model file")
    return {"json": json_path, "weights": weights_path}


def _pack_folder(out_dir: str | os.PathLike | None) -> Path:
    """The folder pack writes to: ``out_dir``, else the first of ``$DENSESEG_PRETRAINED_DIR``."""
    if out_dir is not None:
        return Path(out_dir)
    dirs = [p for p in os.environ.get(ENV_VAR, "").split(os.pathsep) if p]
    if not dirs:
        raise ConfigError(
            f"pack needs a folder to write to: set {ENV_VAR} (your models' folder) or pass --out "
            "DIR; it does not write into the installed package unasked"
        )
    return Path(dirs[0])


def _refuse_replacing(out: Path, name: str, force: bool) -> None:
    """Refuse, unless ``force``, to replace packed files or to shadow a shipped model."""
    if force:
        return
    shipped = PACKAGE_DIR / f"{name}.json"
    if shipped.is_file() and out.resolve() != PACKAGE_DIR:
        raise ConfigError(
            f"{name} is the name of a model shipped in the package ({shipped}); packed in {out} "
            "it would shadow it: choose another name, or pass --force to shadow it"
        )
    for path in (out / f"{name}.json", out / f"{name}.safetensors"):
        if path.exists() or path.is_symlink():
            raise ConfigError(f"{path} exists; pass --force to replace it, or choose another name")


def _precise_bn_state(
    ckpt: dict[str, Any], model: torch.nn.Module, batches: int, root: str | os.PathLike | None
) -> dict[str, Any]:
    from denseseg.config import config_from_dict
    from denseseg.engine.precise_bn import recipe_batches, recompute_bn_stats

    if not ckpt.get("config"):
        raise CheckpointError("precise_bn needs the training recipe saved in the checkpoint")
    data = config_from_dict(ckpt["config"]).data
    stream = recipe_batches(
        data,
        batches,
        mean=list(ckpt["mean"]),
        std=list(ckpt["std"]),
        root=None if root is None else str(root),
    )
    recompute_bn_stats(model, stream, "cpu")
    return model.state_dict()


def _meta_from_checkpoint(
    ckpt: dict[str, Any], name: str, source: str | os.PathLike, fp16: bool, ema: bool = False
) -> dict[str, Any]:
    meta: dict[str, Any] = {"format": FORMAT, "name": name}
    meta.update({k: ckpt[k] for k in _META_KEYS if k in ckpt})
    meta["in_channels"] = int(ckpt.get("in_channels", len(ckpt["mean"])))
    meta["classes"] = list(ckpt.get("class_names") or [])
    meta["palette"] = [list(map(int, p)) for p in ckpt.get("palette") or []]
    meta["ignore_index"] = int(ckpt.get("ignore_index", 255))
    meta["dtype"] = "float16" if fp16 else "float32"
    meta["segmenter"] = {"mode": "whole", "tile_size": None, "tta": "none"}
    config = ckpt.get("config") or {}
    metrics = ckpt.get("metrics") or {}
    if ema:  # the scores of the weights packed: the moving average's
        metrics = metrics.get("ema") if isinstance(metrics.get("ema"), dict) else {}
    meta["provenance"] = {
        "checkpoint": Path(source).name,
        "weights": f"EMA (train.ema: {ckpt['ema'].get('decay')})" if ema else "trained",
        "steps": ckpt.get("step"),
        "recipe": config,
        "val_metrics": {k: v for k, v in metrics.items() if isinstance(v, int | float)},
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    return meta


def _check_segmenter_settings(seg: Any, name: str, task: str = "semantic") -> None:
    # ``name``: the built-in name when packing, the JSON file when loading.
    if (
        not isinstance(seg, Mapping)
        or seg.get("mode", "whole") not in MODES
        or seg.get("tta", "none") not in TTA
        or seg.get("weighting", "uniform") not in WEIGHTINGS
    ):
        raise ConfigError(
            f"built-in {name}: segmenter settings {seg!r} need mode in {', '.join(MODES)}, "
            f"tta in {', '.join(TTA)} and weighting in {', '.join(WEIGHTINGS)}"
        )
    if task != "semantic" and _semantic_settings(seg):
        raise ConfigError(
            f"built-in {name}: segmenter settings {seg!r} apply to semantic models only; this is "
            f"an {task} model: pack it without --mode, --crop-size, --stride and --tta"
        )
    if seg.get("mode") == "slide":  # the window a packed model slides (mmsegmentation's test_cfg)
        try:
            check_window(seg.get("crop_size"), seg.get("stride"))
        except ConfigError as exc:
            raise ConfigError(f"built-in {name}: {exc}") from None


def _semantic_settings(seg: Mapping[str, Any]) -> dict[str, Any]:
    """The settings that differ from the Segmenter's defaults (whole image, no TTA)."""
    defaults = {"mode": "whole", "tile_size": None, "tta": "none", "weighting": "uniform"}
    return {k: v for k, v in seg.items() if v is not None and v != defaults.get(k)}


def portable(obj: Any) -> Any:
    """A copy of the JSON-ready ``obj`` with every string that is an absolute path
    (:data:`ABSOLUTE_PATH`) cut to its last component: ``"/work/data/camvid"`` -> ``"camvid"``,
    ``"C:\\runs\\exp\\"`` -> ``"exp"``; other values are kept as they are."""
    if isinstance(obj, str):
        if not ABSOLUTE_PATH.match(obj):
            return obj
        parts = [p for p in re.split(r"[\\/]+", obj) if p not in ("", "~")]
        return parts[-1] if parts and not ABSOLUTE_PATH.match(parts[-1] + "/") else ""
    if isinstance(obj, Mapping):
        return {k: portable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [portable(v) for v in obj]
    return obj


def _plain(obj: Any) -> Any:
    """JSON-ready copy: tensors to lists, tuples to lists, NaN/inf to None."""
    if isinstance(obj, torch.Tensor):
        return _plain(obj.tolist())
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _write(path: Path, data: bytes, what: str) -> None:
    with atomic_write(path, what) as fh:
        fh.write(data)


# ------------------------------------------------------------------------------- load
def load_builtin(
    name: str,
    device: str | torch.device = "auto",
    directory: str | os.PathLike | None = None,
    **segmenter_kwargs: Any,
) -> Predictor:
    """Build the built-in model ``name`` in float32 and wrap it in its predictor.

    The predictor is built as for a checkpoint (:func:`denseseg.inference.build.build_predictor`):
    a Segmenter for a semantic model, an InstanceSegmenter for an instance model.

    Args:
        name: a name from :func:`list_builtin`.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        directory: an extra folder searched first.
        **segmenter_kwargs: passed on to the predictor; they override the stored ``mode``,
            ``tile_size`` and ``tta``. ``fast=True`` takes the stored fast path and its
            precision (unless ``precision`` is given), else the Segmenter's default.

    Returns:
        A :class:`~denseseg.inference.Segmenter` (or InstanceSegmenter) in eval mode.

    Raises:
        CheckpointError: unknown name, or files that do not fit the model they describe.
    """
    files = builtin_files(name, directory)
    if files is None:
        raise CheckpointError(unknown_model_message(name, directory))
    meta = read_meta(name, directory)
    _warn_if_shadowing(name, files[1])
    state = _read_weights(files[1], meta["sha256"])
    source = f"{files[1]} (with {files[0].name})"
    model = model_from_state(meta["model_name"], meta["model_kwargs"], state, source)
    options = {**_segmenter_options(meta, files[0]), **segmenter_kwargs}
    if options.get("fast") is True:  # the path measured fastest, when one was stored
        options.update(_stored_fast(meta, files[0], "precision" in segmenter_kwargs))
    described = {
        **meta,
        "class_names": meta.get("classes"),
        "builtin": name,
        "checkpoint": str(files[1]),
        "step": (meta.get("provenance") or {}).get("steps"),
    }
    try:
        return build_predictor(model, described, device, **options)
    except (TypeError, ValueError) as exc:  # e.g. a palette or mean of the wrong shape
        raise CheckpointError(
            f"built-in model file {files[0]} holds settings the model cannot use "
            f"({first_line(exc)}); pack the model again"
        ) from None


def _warn_if_shadowing(name: str, weights: Path) -> None:
    shipped = PACKAGE_DIR / f"{name}.safetensors"
    if shipped.is_file() and weights.resolve().parent != PACKAGE_DIR:
        log.warning(
            "model %s: using %s, which shadows the model of that name shipped in %s",
            name,
            weights,
            PACKAGE_DIR,
        )


def _read_weights(path: Path, sha256: str) -> dict[str, torch.Tensor]:
    """The float32 tensors of a ``NAME.safetensors`` whose sha256 matches its JSON's."""
    try:
        blob = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"built-in weights {path} cannot be read ({exc.strerror})") from None
    if hashlib.sha256(blob).hexdigest() != sha256.lower():
        raise CheckpointError(
            f"built-in weights {path} do not match the sha256 stored in "
            f"{path.with_suffix('.json').name} (damaged or replaced); pack the model again"
        )
    try:
        state = st_load(blob)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"built-in weights {path} cannot be read ({exc})") from None
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def _segmenter_options(meta: dict[str, Any], path: Path) -> dict[str, Any]:
    """The stored inference settings that differ from the predictor's defaults."""
    settings = meta.get("segmenter") or {}
    _check_segmenter_settings(settings, str(path))
    seg_opts = _semantic_settings(settings)
    if isinstance(seg_opts.get("tile_size"), list):
        seg_opts["tile_size"] = tuple(seg_opts["tile_size"])
    return seg_opts


# ------------------------------------------------------------------------------- fast path
def store_fast(
    name: str, fast: Mapping[str, Any], directory: str | os.PathLike | None = None
) -> Path:
    """Store the fastest inference configuration measured for the built-in model ``name``
    (``denseseg benchmark --save``) as ``"fast"`` in its ``NAME.json``, which
    ``load_model(name, fast=True)`` then uses. The file is rewritten atomically, in the folder
    it is found in (the package's own for a shipped model).

    Args:
        name: a name from :func:`list_builtin`.
        fast: ``{"path": one of denseseg.inference.fast.PATHS, "precision": "fp32" or
            "bf16", "measured": {...}}`` (:func:`denseseg.engine.benchmark.fastest_config`).
        directory: an extra folder searched first.

    Returns:
        The JSON file written.

    Raises:
        CheckpointError: unknown name or an unreadable JSON.
        ConfigError: ``fast`` names an unknown path or precision.
        DataError: the file cannot be written (it is left as it was).
    """
    files = builtin_files(name, directory)
    if files is None:
        raise CheckpointError(unknown_model_message(name, directory))
    meta = read_meta(name, directory)
    if fast.get("path") not in PATHS or fast.get("precision") not in PRECISIONS:
        raise ConfigError(
            f"fast configuration {dict(fast)!r} needs path in {', '.join(PATHS)} and precision "
            f"in {', '.join(PRECISIONS)}"
        )
    meta["fast"] = _plain(dict(fast))
    text = json.dumps(portable(_plain(meta)), indent=2) + "\n"
    _write(files[0], text.encode(), "built-in model file")
    return files[0]


def _stored_fast(meta: dict[str, Any], path: Path, precision_given: bool) -> dict[str, Any]:
    """``fast=True`` resolved: the stored path, and its precision unless the caller gave one;
    nothing when none is stored (the Segmenter's default fast path then)."""
    fast = meta.get("fast")
    if fast is None:
        return {}
    if (
        not isinstance(fast, Mapping)
        or fast.get("path") not in PATHS
        or fast.get("precision") not in PRECISIONS
    ):
        raise CheckpointError(
            f"built-in model file {path} holds a fast configuration {fast!r} this version does "
            "not know; run denseseg benchmark --save again"
        )
    options: dict[str, Any] = {"fast": fast["path"]}
    if not precision_given:
        options["precision"] = fast["precision"]
    return options
