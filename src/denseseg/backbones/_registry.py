"""Backbone registry: feature extractors that return ``list[Tensor]`` ordered by stride and
describe themselves through ``feature_info`` so decoders never hard-code channel counts."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from denseseg.errors import ConfigError


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
