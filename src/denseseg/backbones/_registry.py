"""Backbone registry: feature extractors that return ``list[Tensor]`` ordered by stride and
describe themselves through ``feature_info`` so decoders never hard-code channel counts."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch.nn as nn

from denseseg.checkpoint import WeightsSource, load_backbone_weights
from denseseg.errors import ConfigError

ModuleT = TypeVar("ModuleT", bound=nn.Module)


@dataclass(frozen=True)
class FeatureInfo:
    """One output level of a backbone: its channels, its stride (reduction) and a name."""

    channels: int
    reduction: int
    name: str = ""


_BACKBONES: dict[str, Callable[..., nn.Module]] = {}


def register_backbone(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering a backbone builder under ``name``."""

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _BACKBONES:
            raise ValueError(f"backbone {name!r} is registered twice")
        _BACKBONES[name] = fn
        return fn

    return wrap


def list_backbones() -> list[str]:
    """Sorted names of the registered backbones."""
    return sorted(_BACKBONES)


def create_backbone(name: str, **kwargs: Any) -> nn.Module:
    """Build backbone ``name``; its forward returns ``list[Tensor]`` ordered by stride and it has
    a ``feature_info: list[FeatureInfo]`` attribute of the same length."""
    if name not in _BACKBONES:
        raise ConfigError(
            f"unknown backbone {name!r}; choose one of: {', '.join(list_backbones())}"
        )
    return _BACKBONES[name](**kwargs)


def with_weights(backbone: ModuleT, weights: WeightsSource | None) -> ModuleT:
    """``backbone`` after loading ``weights`` into it, for a builder's ``weights=`` option.

    Args:
        backbone: a freshly built backbone.
        weights: a file, a torchvision weights name or a state_dict
            (:func:`~denseseg.checkpoint.load_backbone_weights`); ``None`` leaves the backbone as
            it was built.

    Returns:
        ``backbone``.
    """
    if weights is not None:
        load_backbone_weights(backbone, weights)
    return backbone
