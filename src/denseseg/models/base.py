"""What the models share: :class:`SegmentationModel` and the check of their integer options.

:class:`SegmentationModel` is backbone, head and optional auxiliary head, logits bilinearly
up-sampled to the input size and returned as ``{"out": ..., "aux": ...}``. The papers' DeepLab
(:mod:`denseseg.models.deeplab`) and torchvision's layouts (:mod:`denseseg.models.tv_layouts`) are
built on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from denseseg.errors import ConfigError

__all__ = ["SegmentationModel", "check_positive_ints"]


def check_positive_ints(model: str, **options: Any) -> None:
    """Refuse the first of ``options`` that is not an integer >= 1.

    Args:
        model: the model as the message names it (``"U-Net"``).
        **options: option name -> value, checked in order.

    Raises:
        ConfigError: naming the model, the option and its value.
    """
    for key, value in options.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{model} option {key}={value!r} must be an integer >= 1")


class SegmentationModel(nn.Module):
    """Backbone, head and optional auxiliary head, with logits up-sampled to the input size.

    Args:
        backbone: returns ``list[Tensor]`` ordered by stride, described by ``feature_info``.
        head: called with the backbone levels ``head_levels`` (in that order), returns logits.
        num_classes: classes K.
        head_levels: indices into the backbone's levels (negative counts from the last).
        aux_head: optional head on level ``aux_level`` (its logits are returned under ``aux``).
        aux_level: the level the auxiliary head reads.
        classifier_prefixes: state-dict prefixes of the class-score layers: weights trained for
            another class count skip exactly these (:mod:`denseseg.checkpoint.weights`).

    Forward:
        ``x (N, C_in, H, W) -> {"out": (N, K, H, W)}`` plus ``"aux": (N, K, H, W)`` with an
        auxiliary head.
    """

    optional_prefixes: tuple[str, ...] = ("aux_head.",)

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module,
        *,
        num_classes: int,
        head_levels: Sequence[int] = (-1,),
        aux_head: nn.Module | None = None,
        aux_level: int = -2,
        classifier_prefixes: Sequence[str] = ("head.classifier.", "aux_head.classifier."),
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.backbone = backbone
        self.head = head
        self.aux_head = aux_head
        self.head_levels = tuple(head_levels)
        self.aux_level = aux_level
        self.classifier_prefixes = tuple(classifier_prefixes)

    @property
    def in_channels(self) -> int:
        """Input image channels (the backbone's)."""
        return int(self.backbone.in_channels)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Logits at the input's resolution (see the class docstring)."""
        size = x.shape[-2:]
        feats = self.backbone(x)
        out = self.head(*(feats[i] for i in self.head_levels))
        result = {"out": F.interpolate(out, size=size, mode="bilinear", align_corners=False)}
        if self.aux_head is not None:
            aux = self.aux_head(feats[self.aux_level])
            result["aux"] = F.interpolate(aux, size=size, mode="bilinear", align_corners=False)
        return result
