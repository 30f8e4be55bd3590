"""Optimiser with parameter groups, and the step-based learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from denseseg.errors import ConfigError, DensesegError


def param_groups(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    backbone_lr_mult: float = 1.0,
    no_decay_norm_bias: bool = True,
) -> list[dict]:
    """Split trainable parameters into groups.

    Biases and normalisation weights (every parameter with fewer than two dimensions) get no
    weight decay when ``no_decay_norm_bias``; parameters under ``model.backbone`` (or
    ``model.encoder``) get ``lr * backbone_lr_mult``.

    Returns:
        Groups for a torch optimiser; each carries ``lr_mult`` so schedules keep the ratio.
    """
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_backbone = name.startswith(("backbone.", "encoder."))
        no_decay = no_decay_norm_bias and p.ndim <= 1
        groups.setdefault((is_backbone, no_decay), []).append(p)
    out = []
    for (is_backbone, no_decay), params in groups.items():
        mult = backbone_lr_mult if is_backbone else 1.0
        out.append(
            {
                "params": params,
                "lr": lr * mult,
                "lr_mult": mult,
                "weight_decay": 0.0 if no_decay else weight_decay,
            }
        )
    return out


def build_optimizer(
    model: nn.Module,
    name: str,
    *,
    lr: float,
    weight_decay: float,
    momentum: float = 0.9,
    nesterov: bool = False,
    betas: tuple[float, float] = (0.9, 0.999),
    backbone_lr_mult: float = 1.0,
    no_decay_norm_bias: bool = True,
) -> torch.optim.Optimizer:
    """SGD with momentum (the papers' choice), or AdamW / Adam."""
    groups = param_groups(
        model,
        lr=lr,
        weight_decay=weight_decay,
        backbone_lr_mult=backbone_lr_mult,
        no_decay_norm_bias=no_decay_norm_bias,
    )
    if not groups:
        raise ConfigError("the model has no trainable parameters (is everything frozen?)")
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas))
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr, betas=tuple(betas))
    raise ConfigError(f"unknown optimiser optim.name={name!r}; choose sgd, adamw or adam")


def lr_factor(
    step: int,
    max_steps: int,
    *,
    name: str = "poly",
    power: float = 0.9,
    warmup_steps: int = 0,
    warmup_factor: float = 0.001,
    min_ratio: float = 0.0,
    milestones: Sequence[float] = (),
    gamma: float = 0.1,
) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based).

    Linear warm-up from ``warmup_factor`` to 1 over ``warmup_steps``, then ``poly``
    ``(1 - t)^power`` (DeepLab), ``cosine``, ``constant``, or ``multistep`` (times ``gamma`` at
    each milestone passed, milestones given as fractions of ``max_steps``: Mask R-CNN's
    ``[0.667, 0.889]`` drops the lr tenfold at 60k and 80k of 90k steps), never below
    ``min_ratio``.
    """
    if name == "multistep" and (not milestones or any(not 0 < m < 1 for m in milestones)):
        raise ConfigError(
            f"schedule.milestones={list(milestones)!r}: the multistep schedule needs fractions "
            "of train.max_steps between 0 and 1, e.g. [0.667, 0.889]"
        )
    if step < warmup_steps:
        alpha = step / max(1, warmup_steps)
        return warmup_factor * (1 - alpha) + alpha
    t = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    if name == "poly":
        f = (1 - t) ** power
    elif name == "cosine":
        f = 0.5 * (1 + math.cos(math.pi * t))
    elif name == "constant":
        f = 1.0
    elif name == "multistep":
        f = gamma ** sum(step >= m * max_steps for m in milestones)
    else:
        raise ConfigError(
            f"unknown schedule schedule.name={name!r}; choose poly, cosine, constant, multistep"
        )
    return min_ratio + (1 - min_ratio) * f


def backward_and_step(
    loss: torch.Tensor,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    grad_clip: float | None,
) -> float:
    """Backward through ``loss`` (scaled for mixed precision), optional gradient clipping, one
    optimiser step; returns the loss value and stops on NaN (``last.pt`` is kept)."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    optimizer_step(model, optimizer, scaler, grad_clip)
    return finite(float(loss.detach()))


def optimizer_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    grad_clip: float | None,
) -> None:
    """Optional gradient clipping (of the unscaled gradients), the step, the scaler's update."""
    if grad_clip:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()


def finite(loss: float) -> float:
    """``loss``, or one clear error if it is NaN."""
    if loss != loss:
        raise DensesegError(
            "the loss became NaN; lower optim.lr, lengthen schedule.warmup_steps or set "
            "optim.grad_clip (last.pt is kept)"
        )
    return loss
