"""From saved weights and their metadata to a ready predictor: the one path for checkpoints,
built-in models and the trainer.

A checkpoint of ``denseseg train``, a built-in model's JSON and the trainer's own checkpoint
metadata all describe a model the same way: the registered ``model_name`` and its
``model_kwargs``, ``class_names``, ``palette``, normalisation (``mean``, ``std``) and
``ignore_index``; instance models add ``category_ids``, ``dataset`` and ``data_options``.
:func:`model_from_state` builds the model and loads its weights, refusing misfits in one line;
:func:`build_predictor` wraps the model in the predictor of its task (``model.task``):
:class:`Segmenter` for semantic models, :class:`InstanceSegmenter` for instance ones.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from denseseg.checkpoint import load_checkpoint, unwrap_state_dict
from denseseg.errors import CheckpointError, ConfigError, DensesegError
from denseseg.inference.instance_segmenter import InstanceSegmenter
from denseseg.inference.segmenter import Segmenter
from denseseg.models import create_model

__all__ = [
    "PREDICTOR_META",
    "build_predictor",
    "model_from_checkpoint",
    "model_from_state",
    "source_name",
]

CHECKPOINT_KEYS = ("model_name", "model_kwargs", "mean", "std")
"""Entries a checkpoint needs besides its weights to rebuild its model and predictor."""

PREDICTOR_META = (
    "model_name",
    "model_kwargs",
    "builtin",
    "checkpoint",
    "step",
    "provenance",
    "category_ids",
    "dataset",
    "data_options",
)
"""Metadata entries a predictor keeps as its ``meta`` (when present)."""

Predictor = Segmenter | InstanceSegmenter


def model_from_state(
    model_name: Any, model_kwargs: Any, state: Mapping[str, Any], source: str | os.PathLike
) -> nn.Module:
    """Build the registered model ``model_name`` and load ``state`` into it.

    Args:
        model_name: the registered name stored beside the weights.
        model_kwargs: the builder's keyword arguments stored beside them.
        state: the weights (a state_dict).
        source: the file they come from, named in the errors.

    Raises:
        CheckpointError: the name is unknown, the options are not the builder's, or the weights
            do not fit the model they build.
    """
    if not isinstance(model_kwargs, Mapping):
        raise CheckpointError(f"{source}: model_kwargs is not a mapping ({model_kwargs!r})")
    try:
        model = create_model(str(model_name), **dict(model_kwargs))
    except (DensesegError, TypeError, ValueError) as exc:
        raise CheckpointError(
            f"{source}: model {model_name!r} cannot be built from the options stored with it "
            f"({first_line(exc)})"
        ) from None
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise CheckpointError(
            f"{source}: the weights do not fit model {model_name!r} with the options stored "
            f"with them ({first_line(exc)}); the file was changed or mixes two runs"
        ) from None
    return model


def model_from_checkpoint(
    path: str | Path, hint: str, ema: bool = False
) -> tuple[dict[str, Any], nn.Module]:
    """Read a checkpoint of ``denseseg train`` and build its model with its weights.

    Args:
        path: the checkpoint file.
        hint: what to do when it is a bare state_dict (it lacks the model's name and options),
            appended to the error naming the missing entries.
        ema: take the moving average of the weights the run kept (``train.ema``) instead of
            the weights themselves.

    Returns:
        The checkpoint dict and the model (on the CPU, in training mode).

    Raises:
        CheckpointError: the file is unreadable or damaged, lacks an entry of
            :data:`CHECKPOINT_KEYS`, or its weights do not fit its model.
    """
    if Path(path).suffix.lower() in (".json", ".safetensors"):
        raise CheckpointError(
            f"{path} is one of a packed model's two files, not a checkpoint; give the model's "
            "name (its folder in DENSESEG_PRETRAINED_DIR) or a .pt checkpoint"
        )
    ckpt = load_checkpoint(path)
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}: {hint}")
    try:
        state = _ema_state(ckpt, path) if ema else unwrap_state_dict(ckpt)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    return ckpt, model_from_state(ckpt["model_name"], ckpt["model_kwargs"], state, path)


def _ema_state(ckpt: Mapping[str, Any], path: str | Path) -> Mapping[str, Any]:
    ema = ckpt.get("ema")
    if not isinstance(ema, Mapping) or not isinstance(ema.get("model"), Mapping):
        raise CheckpointError(
            "it holds no moving average of the weights (train with train.ema: DECAY to keep "
            "one); leave out --ema"
        )
    return ema["model"]


def build_predictor(
    model: nn.Module,
    meta: Mapping[str, Any],
    device: str | torch.device = "auto",
    **options: Any,
) -> Predictor:
    """The predictor of ``model``'s task, set up from its checkpoint metadata.

    Args:
        model: a built model with its weights; ``model.task`` (default ``"semantic"``) picks the
            predictor.
        meta: the checkpoint metadata: ``model_name``, ``model_kwargs``, ``class_names``,
            ``palette``, ``mean``, ``std`` (semantic models), ``ignore_index``; optional
            entries of :data:`PREDICTOR_META` (``checkpoint``, ``step``, ``builtin``,
            ``category_ids``, ...) are kept as the predictor's ``meta``. A checkpoint dict of
            ``denseseg train`` (or the trainer's metadata dict) can be passed as it is.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        **options: passed on to the predictor (``threshold``, ``mode``, ``tile_size``, ``tta``,
            ``fast``, ... for :class:`Segmenter`; ``threshold``, ``score_threshold`` for
            :class:`InstanceSegmenter`).

    Returns:
        A :class:`Segmenter` or :class:`InstanceSegmenter` in eval mode on ``device``.

    Raises:
        ConfigError: ``options`` name a setting the task's predictor does not have (semantic
            inference options given for an instance model).
    """
    kwargs = {
        "class_names": meta.get("class_names") or None,
        "palette": meta.get("palette") or None,
        "device": device,
        "meta": {k: meta[k] for k in PREDICTOR_META if k in meta},
    }
    if getattr(model, "task", "semantic") == "instance":
        _refuse_semantic_options(meta, options)
        return InstanceSegmenter(model, **kwargs, **options)
    return Segmenter(
        model,
        mean=meta["mean"],
        std=meta["std"],
        ignore_index=meta.get("ignore_index", 255),
        **kwargs,
        **options,
    )


def _refuse_semantic_options(meta: Mapping[str, Any], options: Mapping[str, Any]) -> None:
    """Name the options only a Segmenter takes (``fast``, ``tta``, ``mode``, ...), in one line."""
    accepted = inspect.signature(InstanceSegmenter).parameters
    semantic_only = sorted(set(options) - set(accepted))
    if semantic_only:
        raise ConfigError(
            f"{source_name(meta)} is an instance model (Mask R-CNN): {', '.join(semantic_only)} "
            "apply to semantic models only; leave them out"
        )


def source_name(meta: Mapping[str, Any]) -> str:
    """The name the user gave the model: built-in name, else checkpoint path, else model name."""
    return str(meta.get("builtin") or meta.get("checkpoint") or meta.get("model_name"))


def first_line(exc: BaseException) -> str:
    """The first two lines of an exception's message as one line, at most 300 characters."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    text = " ".join(lines[:2]) if lines else type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."
