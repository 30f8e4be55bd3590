"""``load_model``: a ready :class:`Segmenter` from a checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch

from denseseg.engine.checkpoint import load_checkpoint, unwrap_state_dict
from denseseg.errors import CheckpointError
from denseseg.inference.segmenter import Segmenter, resolve_device
from denseseg.models import create_model


def load_model(
    path: str | Path, device: str | torch.device = "auto", **segmenter_kwargs
) -> Segmenter:
    """Build the model stored in a denseseg checkpoint and wrap it in a :class:`Segmenter`.

    The checkpoint carries everything inference needs: model name and kwargs, class names,
    palette, normalisation and input channels.

    Args:
        path: a checkpoint written by ``denseseg train`` (``last.pt``, ``best.pt``).
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        **segmenter_kwargs: passed on to :class:`Segmenter` (e.g. ``threshold``).

    Returns:
        A Segmenter in eval mode.
    """
    ckpt = load_checkpoint(path)
    missing = [k for k in ("model_name", "model_kwargs", "mean", "std") if k not in ckpt]
    if missing:
        raise CheckpointError(
            f"{path} lacks {', '.join(missing)}: it is a bare state_dict, not a denseseg "
            "checkpoint; give it as model.weights in a recipe instead"
        )
    model = create_model(ckpt["model_name"], **ckpt["model_kwargs"])
    model.load_state_dict(unwrap_state_dict(ckpt))
    return Segmenter(
        model,
        mean=ckpt["mean"],
        std=ckpt["std"],
        class_names=ckpt.get("class_names"),
        palette=ckpt.get("palette"),
        ignore_index=ckpt.get("ignore_index", 255),
        device=resolve_device(device),
        meta={
            "model_name": ckpt["model_name"],
            "model_kwargs": ckpt["model_kwargs"],
            "checkpoint": str(path),
            "step": ckpt.get("step"),
        },
        **segmenter_kwargs,
    )
