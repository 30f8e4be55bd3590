"""An exponential moving average of the weights (``train.ema: DECAY``), as timm's ModelEmaV2
and torchvision's classification references keep one, on :class:`torch.optim.swa_utils.
AveragedModel`: after each optimiser step ``ema = decay * ema + (1 - decay) * weights``, batch-norm
statistics included. The trainer evaluates it beside the raw weights and saves it in each
checkpoint under ``ema``; ``denseseg eval/predict --ema`` use it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

__all__ = ["WeightEMA"]


class WeightEMA:
    """The moving average of ``model``'s parameters and buffers, a copy on the same device."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.averaged = AveragedModel(
            model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True
        )
        self.averaged.requires_grad_(False)

    @property
    def module(self) -> nn.Module:
        """The averaged model (an ``nn.Module`` like the trained one)."""
        return self.averaged.module

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold ``model``'s current weights in (the first call copies them)."""
        self.averaged.update_parameters(model)

    def state_dict(self) -> dict[str, Any]:
        return {
            "decay": self.decay,
            "updates": int(self.averaged.n_averaged),
            "model": self.module.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["model"])
        self.averaged.n_averaged.fill_(int(state["updates"]))
