"""Any timm model as a backbone, through timm's ``features_only`` (timm is an optional extra).

``create_backbone("timm", model_name="convnext_tiny")`` builds
``timm.create_model(model_name, features_only=True, ...)``, whose forward already returns one map
per level and whose ``feature_info`` knows their channels and strides; this wrapper only turns the
latter into denseseg's :class:`FeatureInfo` list. Without timm installed the builder raises a
:class:`ConfigError` naming the extra ``denseseg[timm]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch.nn as nn
from torch import Tensor

from denseseg.backbones._registry import FeatureInfo, register_backbone
from denseseg.errors import ConfigError, require_extra


def _import_timm() -> Any:
    return require_extra(
        "timm", "timm", "a timm backbone", "(or pick a built-in backbone such as resnet50)"
    )


class TimmBackbone(nn.Module):
    """A timm ``features_only`` model with denseseg's ``feature_info``.

    Args:
        model_name: a timm model name (``timm.list_models()``).
        output_stride: 32, 16 or 8, for models that support dilation in timm.
        in_channels: input channels (timm's ``in_chans``).
        out_indices: which of the model's levels to return (timm's default: all).
        pretrained: let timm load its own pretrained weights (needs the network or timm's cache).
        **timm_kwargs: passed on to ``timm.create_model``.

    Forward:
        ``x (N, C_in, H, W) -> list`` of ``(N, C_i, H / s_i, W / s_i)`` maps ordered by stride.
    """

    def __init__(
        self,
        model_name: str,
        *,
        output_stride: int = 32,
        in_channels: int = 3,
        out_indices: Sequence[int] | None = None,
        pretrained: bool = False,
        **timm_kwargs: Any,
    ) -> None:
        super().__init__()
        timm = _import_timm()
        kwargs: dict[str, Any] = {"features_only": True, "pretrained": pretrained, **timm_kwargs}
        kwargs["in_chans"] = in_channels
        if output_stride != 32:
            kwargs["output_stride"] = output_stride
        if out_indices is not None:
            kwargs["out_indices"] = tuple(out_indices)
        try:
            self.model = timm.create_model(model_name, **kwargs)
        except (RuntimeError, ValueError, TypeError, AssertionError) as exc:
            raise ConfigError(f"timm backbone {model_name!r}: {str(exc)[:200]}") from None
        self.name = f"timm:{model_name}"
        self.output_stride = output_stride
        info = self.model.feature_info
        self.feature_info = [
            FeatureInfo(int(c), int(r), str(n))
            for c, r, n in zip(info.channels(), info.reduction(), info.module_name())
        ]
        self._in_channels = in_channels

    @property
    def in_channels(self) -> int:
        """Input channels the model was built for."""
        return self._in_channels

    def forward(self, x: Tensor) -> list[Tensor]:
        """Return the model's feature maps ordered by stride."""
        return list(self.model(x))


@register_backbone("timm")
def timm_backbone(model_name: str, **kwargs: Any) -> TimmBackbone:
    """Any timm model as a backbone (the extra ``denseseg[timm]``); see :class:`TimmBackbone`.

    Args:
        model_name: a timm model name, e.g. ``"convnext_tiny"``.
        **kwargs: :class:`TimmBackbone` options (``output_stride``, ``in_channels``, ...).

    Returns:
        The backbone.
    """
    return TimmBackbone(model_name, **kwargs)
