"""torchvision's pretrained weights by name, fetched through torch.hub's cache.

The one module of :mod:`denseseg.checkpoint` that imports torchvision: it needs torchvision's
table of weights names (``ResNet50_Weights.IMAGENET1K_V2``, ...) to find a file's address.
torchvision is a dependency of denseseg like torch, and knows nothing of denseseg, so the
bottom of the package still points nowhere up.
"""

from __future__ import annotations

import urllib.error

import torch
import torchvision
from torch import Tensor

from denseseg.errors import CheckpointError, ConfigError

__all__ = ["fetch_torchvision_state_dict"]


def fetch_torchvision_state_dict(tv_name: str, weights_name: str) -> dict[str, Tensor]:
    """torchvision's pretrained weights ``weights_name`` of model ``tv_name``, via torch.hub.

    torch.hub looks in its cache (``torch.hub.get_dir()/checkpoints``) before downloading.

    Args:
        tv_name: a torchvision builder name, e.g. ``"deeplabv3_resnet50"``, ``"resnet50"``.
        weights_name: e.g. ``"COCO_WITH_VOC_LABELS_V1"``, ``"DEFAULT"`` or
            ``"ResNet50_Weights.IMAGENET1K_V2"``.

    Returns:
        The state_dict (torchvision's keys).

    Raises:
        ConfigError: torchvision has no such weights.
        CheckpointError: the download failed (no network): the message names the file.
    """
    try:
        enum = torchvision.models.get_model_weights(tv_name)
    except (ValueError, KeyError):
        raise ConfigError(
            f"torchvision has no pretrained weights for {tv_name!r}; pass a local weights file"
        ) from None
    short = weights_name.split(".")[-1]
    try:
        weights = enum[short]
    except KeyError:
        names = ", ".join(w.name for w in enum)
        raise ConfigError(
            f"{weights_name!r} is neither a file nor a torchvision weights name of {tv_name} "
            f"({names}, DEFAULT)"
        ) from None
    filename = weights.url.rsplit("/", 1)[-1]
    try:
        return torch.hub.load_state_dict_from_url(
            weights.url, map_location="cpu", progress=False, check_hash=True, weights_only=True
        )
    except (urllib.error.URLError, OSError, RuntimeError, ValueError) as exc:
        raise CheckpointError(
            f"cannot download torchvision weights {tv_name} {weights.name} ({weights.url}: "
            f"{str(exc)[:120]}); fetch {filename} where a network is available and pass its "
            "local path instead of the name"
        ) from None
