"""Bringing your own weights: whole models and backbones, from local files or torchvision names.

``create_model(name, num_classes=..., weights=..., backbone_weights=...)`` calls the two loaders
here. A source is one of

* a local file: a denseseg checkpoint (its ``model`` entry), a bare state_dict (``.pt``/``.pth``,
  read with ``torch.load(weights_only=True)`` through :func:`~denseseg.checkpoint.load_checkpoint`,
  so no arbitrary object is unpickled), or a ``.safetensors`` file;
* a torchvision weights name such as ``"COCO_WITH_VOC_LABELS_V1"`` or ``"IMAGENET1K_V2"``
  (``"DEFAULT"`` too), looked up for the model's (backbone's) torchvision name and fetched through
  torch.hub's cache; without a network the loader raises a :class:`CheckpointError` that names
  the file to fetch and says to pass it as a local path;
* a state_dict already in memory.

A torchvision state_dict of a torchvision-layout model (:mod:`denseseg.models.tv_layouts`) is
converted to denseseg's keys automatically. Weights trained for another class count load
everything except the class-score layers (the model's ``classifier_prefixes``), whose tensors keep
the model's own values: freshly initialised when the model comes from ``create_model``. The
loaders log and return a :class:`LoadReport` naming every key they skipped.

The loaders know models and backbones only through attributes they may define:
``classifier_prefixes``, ``optional_prefixes``, ``convert_torchvision_state_dict`` and
``tv_name`` of a model; ``feature_info``, ``adapt_state_dict`` and ``tv_name`` of a backbone.
So they sit below both and import neither.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from denseseg.checkpoint.serialization import load_checkpoint, unwrap_state_dict
from denseseg.checkpoint.torchvision_weights import fetch_torchvision_state_dict
from denseseg.errors import CheckpointError, ConfigError

__all__ = [
    "LoadReport",
    "WeightsSource",
    "load_backbone_weights",
    "load_model_weights",
    "read_state_dict",
    "read_weights",
]

log = logging.getLogger(__name__)

WeightsSource = str | Path | Mapping[str, Tensor]
_WEIGHTS_NAME = re.compile(r"^(?:\w+_Weights\.)?[A-Z][A-Z0-9_]*$")


@dataclass
class LoadReport:
    """What a loader did.

    Attributes:
        source: the file, torchvision name or ``"<state_dict>"``.
        loaded: number of tensors loaded.
        skipped: keys of the source not loaded (another class count, an auxiliary head the
            model lacks, a classifier's ``fc.*`` when loading a backbone).
        missing: keys of the model the source lacks (left as they were).
        adapted: keys loaded after reshaping (a first convolution for other input channels).
    """

    source: str
    loaded: int = 0
    skipped: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        parts = [f"{self.source}: loaded {self.loaded} tensors"]
        for what, keys in (
            ("skipped", self.skipped),
            ("missing", self.missing),
            ("adapted", self.adapted),
        ):
            if keys:
                parts.append(
                    f"{what} {len(keys)} ({', '.join(keys[:4])}{', ...' * (len(keys) > 4)})"
                )
        return "; ".join(parts)


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a weights file: safetensors, a denseseg checkpoint, or a state_dict.

    Args:
        path: the file.

    Returns:
        ``{key: tensor}``.

    Raises:
        CheckpointError: the file is missing or unreadable.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise CheckpointError(f"weights file {path} not found; give the path of a file")
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"weights file {path} cannot be read ({exc})") from None
    return dict(unwrap_state_dict(load_checkpoint(path)))


def read_weights(source: WeightsSource, tv_name: str) -> tuple[dict[str, Tensor], str]:
    """The tensors of a file, a state_dict, or a torchvision weights name of ``tv_name``.

    Anything that is not an existing file is taken for a weights name.

    Args:
        source: a local file (torchvision state_dict, denseseg checkpoint, safetensors), a
            state_dict, or a torchvision weights name of ``tv_name`` (``"IMAGENET1K_V1"``,
            downloaded through torch.hub's cache when a network is available).
        tv_name: the torchvision model name (``"vgg16"``, ``"resnet50"``, ...).

    Returns:
        ``(state_dict, where)``: the tensors under the source's own keys, and the source as
        messages name it.

    Raises:
        CheckpointError: unreadable file, or no network for a name.
        ConfigError: neither an existing file nor a weights name of ``tv_name``.
    """
    if isinstance(source, Mapping):
        return dict(source), "<state_dict>"
    if Path(str(source)).exists():
        return read_state_dict(source), str(source)
    return fetch_torchvision_state_dict(tv_name, str(source)), f"torchvision {source}"


def _resolve(source: WeightsSource, tv_name: str | None, what: str) -> tuple[dict, str]:
    """Read ``source`` (file, torchvision weights name or state_dict) into a state_dict."""
    if isinstance(source, Mapping):
        return dict(source), "<state_dict>"
    text = str(source)
    if not Path(text).exists() and _WEIGHTS_NAME.match(text):
        if tv_name is None:
            raise ConfigError(
                f"{what} {text!r}: torchvision weights names apply to the torchvision-layout "
                "models and backbones; this one has no torchvision counterpart, pass a local file"
            )
        return fetch_torchvision_state_dict(tv_name, text), f"torchvision {tv_name} {text}"
    return read_state_dict(text), text


def _strip(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix) :]: v for k, v in state.items()}
    return state


def _class_layer(model: nn.Module, key: str, shape: torch.Size) -> bool:
    """Whether ``key`` belongs to a class-score layer of ``model`` (skippable on a mismatch)."""
    prefixes = getattr(model, "classifier_prefixes", None)
    if prefixes is not None:
        return key.startswith(tuple(prefixes))
    # Models that do not list their classifiers: a tensor with the class count in its first two
    # dimensions (a conv or transposed conv to the classes, or its bias) is one.
    return getattr(model, "num_classes", None) in tuple(shape[:2])


def load_model_weights(model: nn.Module, weights: WeightsSource) -> LoadReport:
    """Load whole-model weights into ``model`` (see the module docstring for the sources).

    Args:
        model: a denseseg model.
        weights: a file, a torchvision weights name, or a state_dict.

    Returns:
        What was loaded and skipped.

    Raises:
        CheckpointError: the weights do not fit the model beyond its class-score layers and
            optional auxiliary head.
    """
    state, where = _resolve(weights, getattr(model, "tv_name", None), "weights")
    state = _strip(state, "module.")  # saved from DistributedDataParallel
    convert = getattr(model, "convert_torchvision_state_dict", None)
    if convert is not None and any(k.startswith("classifier.") for k in state):
        state = convert(state)
    own = model.state_dict()
    optional = tuple(getattr(model, "optional_prefixes", ()))
    report = LoadReport(where)
    bad: list[str] = []
    for key, value in state.items():
        if key not in own:
            (report.skipped if key.startswith(optional) else bad).append(key)
        elif own[key].shape != value.shape:
            (report.skipped if _class_layer(model, key, own[key].shape) else bad).append(key)
    for key in own:
        if key not in state:
            (report.missing if key.startswith(optional) else bad).append(key)
    if bad:
        first = bad[0]
        detail = (
            f"{tuple(state[first].shape)} in the file, {tuple(own[first].shape)} in the model"
            if first in state and first in own
            else ("not in the model" if first in state else "missing from the file")
        )
        raise CheckpointError(
            f"weights {where} do not fit {type(model).__name__}: {len(bad)} keys differ beyond "
            f"the class-score layers (first: {first}, {detail}); check the architecture and "
            "backbone options"
        )
    usable = {k: v for k, v in state.items() if k in own and k not in report.skipped}
    model.load_state_dict(usable, strict=False)
    report.loaded = len(usable)
    _log(report)
    return report


def load_backbone_weights(target: nn.Module, weights: WeightsSource) -> LoadReport:
    """Load backbone weights, e.g. an ImageNet classifier's, into a backbone or a model's.

    The source may be a torchvision classification state_dict (its ``fc.*`` / ``classifier.*``
    keys are skipped), a whole segmentation model's file (its ``backbone.*`` part is used), or a
    torchvision weights name for the backbone (``"IMAGENET1K_V1"``). A first convolution for
    another number of input channels is adapted: summed over RGB for one channel, otherwise
    repeated and rescaled (as timm does).

    Args:
        target: a backbone (has ``feature_info``) or a model with a ``backbone`` attribute.
        weights: a file, a torchvision weights name, or a state_dict.

    Returns:
        What was loaded and skipped.

    Raises:
        ConfigError: ``target`` has no backbone.
        CheckpointError: a backbone tensor is missing from the source or has another shape.
    """
    backbone = target if hasattr(target, "feature_info") else getattr(target, "backbone", None)
    if backbone is None:
        raise ConfigError(
            f"{type(target).__name__} has no backbone to load backbone_weights into; use weights="
        )
    state, where = _resolve(weights, getattr(backbone, "tv_name", None), "backbone_weights")
    state = _strip(state, "module.")
    if any(k.startswith("backbone.") for k in state):
        state = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
    adapt = getattr(backbone, "adapt_state_dict", None)
    if adapt is not None:
        state = adapt(state)
    own = backbone.state_dict()
    report = LoadReport(where)
    first_conv = next(k for k, v in own.items() if v.ndim == 4)
    if first_conv in state and state[first_conv].shape[1] != own[first_conv].shape[1]:
        state[first_conv] = _adapt_input_conv(state[first_conv], own[first_conv].shape[1])
        report.adapted.append(first_conv)
    bad = [k for k in own if k not in state or state[k].shape != own[k].shape]
    if bad:
        raise CheckpointError(
            f"backbone_weights {where} do not fit backbone {getattr(backbone, 'name', '?')}: "
            f"{len(bad)} tensors missing or of another shape (first: {bad[0]}); give weights of "
            "the same architecture"
        )
    backbone.load_state_dict({k: state[k] for k in own})
    report.loaded = len(own)
    report.skipped = [k for k in state if k not in own]
    _log(report, expected_skips=True)
    return report


def _adapt_input_conv(weight: Tensor, in_channels: int) -> Tensor:
    """RGB first-layer filters ``(C_out, 3, k, k)`` for ``in_channels`` inputs."""
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    reps = -(-in_channels // weight.shape[1])
    return weight.repeat(1, reps, 1, 1)[:, :in_channels] * (weight.shape[1] / in_channels)


def _log(report: LoadReport, expected_skips: bool = False) -> None:
    # A classifier's fc layers are always left out of a backbone: no reason to warn about them.
    unusual = report.missing or (report.skipped and not expected_skips)
    level = logging.WARNING if unusual else logging.INFO
    log.log(level, "%s", report)
