"""``load_model``: a ready predictor from a checkpoint or a built-in model name."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from denseseg.errors import CheckpointError
from denseseg.inference.build import Predictor, build_predictor, model_from_checkpoint
from denseseg.pretrained import builtin_files, load_builtin, unknown_model_message

log = logging.getLogger("denseseg")


def load_model(
    path: str | Path, device: str | torch.device = "auto", ema: bool = False, **segmenter_kwargs
) -> Predictor:
    """A :class:`Segmenter` for a denseseg checkpoint or a built-in model.

    The checkpoint carries everything inference needs: model name and kwargs, class names,
    palette, normalisation and input channels. When ``path`` is not an existing file but the
    name of a built-in model (:func:`denseseg.pretrained.list_builtin`, e.g. ``"camvid"``), the
    packaged weights are loaded instead (safetensors, cast to float32), with the inference mode
    they were packed with. Only an existing regular file wins over a built-in name: a folder
    named ``camvid`` in the working directory does not hide the built-in ``camvid``.

    Both go through :func:`denseseg.inference.build.build_predictor`, as the trainer does.

    Args:
        path: a checkpoint written by ``denseseg train`` (``last.pt``, ``best.pt``), a
            built-in model name, or an ONNX file written by ``denseseg export`` (run with
            ONNX Runtime, or OpenVINO with ``backend="openvino"``; its stored inference
            defaults apply).
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        ema: use the moving average of the weights a checkpoint keeps (``train.ema``).
        **segmenter_kwargs: passed on to :class:`Segmenter` (e.g. ``threshold``, ``mode``).

    Returns:
        A Segmenter in eval mode; for an instance model (Mask R-CNN) an
        :class:`~denseseg.inference.instance_segmenter.InstanceSegmenter`.

    Raises:
        CheckpointError: ``path`` is neither a readable checkpoint nor a built-in name, or its
            weights do not fit the model options stored beside them.
        ConfigError: semantic inference options given for an instance model.
    """
    start = time.perf_counter()
    predictor = _load(path, device, ema, **segmenter_kwargs)
    log.debug(
        "loaded %s in %.2f s: %r (options %s)",
        path,
        time.perf_counter() - start,
        predictor,
        segmenter_kwargs or "none",
    )
    return predictor


def _load(path: str | Path, device: str | torch.device, ema: bool, **segmenter_kwargs) -> Predictor:
    if str(path).lower().endswith(".onnx") and Path(path).is_file():
        return _load_onnx(path, device, ema, **segmenter_kwargs)
    if not _is_checkpoint_file(path):
        if ema:
            raise CheckpointError(
                f"{path} is a packed model: it has one set of weights, no EMA; leave out --ema"
            )
        return load_builtin(str(path), device=device, **segmenter_kwargs)
    ckpt, model = model_from_checkpoint(
        path,
        "it is a bare state_dict, not a denseseg checkpoint; give it as model.weights in a "
        "recipe instead",
        ema=ema,
    )
    return build_predictor(model, {**ckpt, "checkpoint": str(path)}, device, **segmenter_kwargs)


def _load_onnx(path: str | Path, device: str | torch.device, ema: bool, **options) -> Predictor:
    """A Segmenter running an ONNX file of ``denseseg export`` (ONNX Runtime or OpenVINO)."""
    from denseseg.inference.onnx_backends import load_onnx

    if ema:
        raise CheckpointError(
            f"{path} is an exported ONNX file: it has one set of weights, no EMA; leave out --ema"
        )
    return load_onnx(path, device, **options)


def _is_checkpoint_file(path: str | Path) -> bool:
    """Whether ``path`` names a checkpoint file rather than a built-in model.

    Raises:
        CheckpointError: ``path`` is neither an existing file nor a built-in name.
    """
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
