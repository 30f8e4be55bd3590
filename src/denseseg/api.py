"""``load_model``: a ready :class:`Segmenter` from a checkpoint or a built-in model name."""

from __future__ import annotations

import inspect
from pathlib import Path

import torch

from denseseg.engine.checkpoint import load_checkpoint, unwrap_state_dict
from denseseg.errors import CheckpointError, ConfigError
from denseseg.inference.segmenter import Segmenter, resolve_device


def load_model(
    path: str | Path, device: str | torch.device = "auto", **segmenter_kwargs
) -> Segmenter:
    """A :class:`Segmenter` for a denseseg checkpoint or a built-in model.

    The checkpoint carries everything inference needs: model name and kwargs, class names,
    palette, normalisation and input channels. When ``path`` is not an existing file but the
    name of a built-in model (:func:`denseseg.pretrained.list_builtin`, e.g. ``"camvid"``), the
    packaged weights are loaded instead (safetensors, cast to float32), with the inference mode
    they were packed with. Only an existing regular file wins over a built-in name: a folder
    named ``camvid`` in the working directory does not hide the built-in ``camvid``.

    Args:
        path: a checkpoint written by ``denseseg train`` (``last.pt``, ``best.pt``) or a
            built-in model name.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        **segmenter_kwargs: passed on to :class:`Segmenter` (e.g. ``threshold``, ``mode``).

    Returns:
        A Segmenter in eval mode; for an instance model (Mask R-CNN) an
        :class:`~denseseg.inference.instance.InstanceSegmenter`.

    Raises:
        CheckpointError: ``path`` is neither a readable checkpoint nor a built-in name, or its
            weights do not fit the model options stored beside them.
    """
    from denseseg.pretrained import model_from_state

    if not _is_checkpoint_file(path):
        from denseseg.pretrained import load_builtin

        return load_builtin(str(path), device=device, **segmenter_kwargs)
    ckpt = load_checkpoint(path)
    missing = [k for k in ("model_name", "model_kwargs", "mean", "std") if k not in ckpt]
    if missing:
        raise CheckpointError(
            f"{path} lacks {', '.join(missing)}: it is a bare state_dict, not a denseseg "
            "checkpoint; give it as model.weights in a recipe instead"
        )
    try:
        state = unwrap_state_dict(ckpt)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    model = model_from_state(ckpt["model_name"], ckpt["model_kwargs"], state, path)
    if getattr(model, "task", "semantic") == "instance":
        from denseseg.inference.instance import InstanceSegmenter

        accepted = inspect.signature(InstanceSegmenter).parameters
        semantic_only = sorted(set(segmenter_kwargs) - set(accepted))
        if semantic_only:
            raise ConfigError(
                f"{path} is an instance model (Mask R-CNN): {', '.join(semantic_only)} apply to "
                "semantic models only; leave them out"
            )

        return InstanceSegmenter(
            model,
            class_names=ckpt.get("class_names"),
            palette=ckpt.get("palette"),
            device=resolve_device(device),
            meta={
                "model_name": ckpt["model_name"],
                "model_kwargs": ckpt["model_kwargs"],
                "checkpoint": str(path),
                "step": ckpt.get("step"),
                **{k: ckpt.get(k) for k in ("category_ids", "dataset", "data_options")},
            },
            **segmenter_kwargs,
        )
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


def _is_checkpoint_file(path: str | Path) -> bool:
    """Whether ``path`` names a checkpoint file rather than a built-in model.

    Raises:
        CheckpointError: ``path`` is neither an existing file nor a built-in name.
    """
    from denseseg.pretrained import builtin_files, unknown_model_message

    if not str(path).strip():
        raise CheckpointError("the model path is empty; give a .pt file or a built-in model name")
    p = Path(path)
    if p.is_file():
        return True
    if builtin_files(str(path)) is not None:
        return False
    if p.exists():
        kind = "a folder" if p.is_dir() else "not a regular file"
        raise CheckpointError(
            f"{path} is not a checkpoint file ({kind}); give the path of a .pt file or a "
            "built-in model name"
        )
    raise CheckpointError(unknown_model_message(str(path)))
