"""Model registry: public names -> builder functions (one registration line per model).

An architecture's builder is registered with the decorator :func:`register_model`; a variant of
it (the same builder with other settings: ``<arch>_<backbone>`` shorthands, FCN-32s/16s/8s,
``unet_valid``, torchvision's names) with :func:`register_variant`, the one way to do so.

Each registration may declare a tiny ``test_cfg`` (keyword arguments that make the model small
enough for the CPU test suite) so that one parametrised suite runs over every registered model.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn

from denseseg.checkpoint import load_backbone_weights, load_model_weights
from denseseg.errors import ConfigError


@dataclass(frozen=True)
class ModelEntry:
    """What the registry knows about one public model name."""

    name: str
    builder: Callable[..., nn.Module]
    test_cfg: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    # "semantic" (forward returns {"out": logits}) or "instance" (torchvision's detection
    # convention: loss dict in training, a list of per-image dicts in eval mode).
    task: str = "semantic"
    # Traceable to a static graph (TorchScript trace, ONNX): the fast inference path and the
    # exporters take only models flagged so, and the test suite checks the flag.
    exportable: bool = True


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(
    name: str | None = None,
    *,
    test_cfg: dict[str, Any] | None = None,
    description: str = "",
    task: str = "semantic",
    exportable: bool | None = None,
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering a builder under ``name`` (default: the function's name); ``task``
    is ``"semantic"`` or ``"instance"``; ``exportable`` defaults to True for semantic models
    (instance models return per-image lists of varying length)."""

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = name or fn.__name__
        if key in _REGISTRY:
            raise ValueError(f"model {key!r} is registered twice")
        doc = description or (fn.__doc__ or "").strip().splitlines()[0:1]
        desc = doc if isinstance(doc, str) else (doc[0] if doc else "")
        export = task == "semantic" if exportable is None else exportable
        _REGISTRY[key] = ModelEntry(key, fn, dict(test_cfg or {}), desc, task, export)
        return fn

    return wrap


def register_variant(
    name: str,
    of: Callable[..., nn.Module],
    *,
    defaults: Mapping[str, Any] | None = None,
    fixed: Mapping[str, Any] | None = None,
    test_cfg: dict[str, Any] | None = None,
    description: str = "",
    doc: str | None = None,
) -> Callable[..., nn.Module]:
    """Register ``name`` as the builder ``of`` with other settings.

    Args:
        name: the public name, e.g. ``"deeplabv3plus_resnet50"``.
        of: the builder the variant calls (registered or not); a registered one lends its
            ``task`` and ``exportable`` flags.
        defaults: keyword arguments the variant sets and a caller may override (a DeepLab
            shorthand's default backbone).
        fixed: keyword arguments that make the variant what it is; passing one is a
            :class:`ConfigError` (``unet_resnet34``'s backbone, ``unet_valid``'s padding).
        test_cfg: as :func:`register_model`.
        description: as :func:`register_model`.
        doc: the variant's docstring (default: one line naming ``of`` and the settings).

    Returns:
        The variant's builder; its signature is ``of``'s without ``fixed`` and with ``defaults``.
    """
    defaults, fixed = dict(defaults or {}), dict(fixed or {})
    base = next((e for e in _REGISTRY.values() if e.builder is of), None)

    def build(*args: Any, **kwargs: Any) -> nn.Module:
        clash = [k for k in kwargs if k in fixed]
        if clash:
            key, arch = clash[0], base.name if base else ""
            how = f": it is {arch} with {key}={fixed[key]!r}; use {arch} for another {key}"
            raise ConfigError(f"model {name!r} has no option {key!r}" + (how if arch else ""))
        return of(*args, **{**defaults, **kwargs, **fixed})

    settings = ", ".join(f"{k}={v!r}" for k, v in {**defaults, **fixed}.items())
    build.__name__ = build.__qualname__ = name
    build.__doc__ = doc or f"``{of.__name__}`` with {settings}; options as :func:`{of.__name__}`."
    build.__signature__ = _variant_signature(of, defaults, fixed)  # type: ignore[attr-defined]
    task, exportable = (base.task, base.exportable) if base else ("semantic", None)
    register_model(
        name, test_cfg=test_cfg, description=description, task=task, exportable=exportable
    )(build)
    return build


def _variant_signature(
    of: Callable[..., nn.Module], defaults: dict[str, Any], fixed: dict[str, Any]
) -> inspect.Signature:
    sig = inspect.signature(of)
    params, keyword_only = [], False
    for p in sig.parameters.values():
        if p.name in fixed:
            # What follows a fixed positional parameter can no longer be given by position.
            keyword_only = keyword_only or p.kind == p.POSITIONAL_OR_KEYWORD
            continue
        if keyword_only and p.kind == p.POSITIONAL_OR_KEYWORD:
            p = p.replace(kind=p.KEYWORD_ONLY)
        params.append(p.replace(default=defaults[p.name]) if p.name in defaults else p)
    return sig.replace(parameters=params)


def list_models() -> list[str]:
    """Return the sorted public names of all registered models."""
    return sorted(_REGISTRY)


def get_model_entry(name: str) -> ModelEntry:
    """Return the registry entry for ``name`` or raise :class:`ConfigError` naming the choices."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(
            f"unknown model {name!r}; choose one of: {', '.join(list_models())}"
        ) from None


def create_model(
    name: str, *, weights: Any = None, backbone_weights: Any = None, **kwargs: Any
) -> nn.Module:
    """Build the registered model ``name`` with keyword arguments ``kwargs``.

    Args:
        name: a name from :func:`list_models`, e.g. ``"unet"``.
        weights: whole-model weights: a local file (denseseg checkpoint, state_dict, safetensors;
            a torchvision state_dict for the torchvision-layout models) or a torchvision weights
            name (``"COCO_WITH_VOC_LABELS_V1"``); see :mod:`denseseg.checkpoint.weights`.
        backbone_weights: the same for the backbone alone (e.g. an ImageNet ResNet-50 file).
        **kwargs: the builder's keyword arguments (``num_classes``, ``in_channels``, ...).

    Returns:
        The model; its forward returns ``dict[str, Tensor]`` with ``out`` logits
        ``(N, num_classes, H, W)``.
    """
    entry = get_model_entry(name)
    # A builder that takes these options itself (e.g. FCN converting a classifier's fc layers)
    # handles them; otherwise the generic loaders run on the built model.
    params = inspect.signature(entry.builder).parameters
    deferred = {}
    for key, value in (("backbone_weights", backbone_weights), ("weights", weights)):
        if value is not None:
            if key in params:
                kwargs[key] = value
            else:
                deferred[key] = value
    try:
        model = entry.builder(**kwargs)
    except TypeError as exc:
        # An unknown keyword is a user error: say which model and which option.
        if "unexpected keyword argument" in str(exc):
            bad = str(exc).split("argument")[-1].strip()
            raise ConfigError(f"model {name!r} has no option {bad}") from None
        raise
    if deferred:
        if "backbone_weights" in deferred:
            load_backbone_weights(model, deferred["backbone_weights"])
        if "weights" in deferred:
            load_model_weights(model, deferred["weights"])
    return model
