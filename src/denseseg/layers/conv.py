"""Convolution building blocks shared by the models."""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch.nn as nn

NormFactory = Callable[[int], nn.Module]
ActFactory = Callable[[], nn.Module]


class ConvNormAct(nn.Sequential):
    """``Conv2d -> norm -> activation``, with the conv bias dropped when a norm follows.

    Submodules are named ``conv``, ``norm`` and ``act`` (absent ones are left out), so state-dict
    keys read ``block.conv.weight``, ``block.norm.running_mean``.

    Args:
        in_channels: input channels C_in.
        out_channels: output channels C_out.
        kernel_size: square kernel size.
        stride: convolution stride.
        padding: zero padding per side; ``None`` keeps the size at stride 1
            (``dilation * (kernel_size - 1) // 2``), ``0`` gives an unpadded ("valid") conv.
        dilation: kernel dilation (atrous rate).
        groups: convolution groups.
        norm: factory ``num_channels -> module`` (e.g. ``nn.BatchNorm2d``) or ``None`` for none.
        act: factory ``() -> module`` (e.g. ``nn.ReLU``) or ``None`` for a linear output.

    Shapes:
        ``(N, C_in, H, W) -> (N, C_out, H', W')``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        *,
        stride: int = 1,
        padding: int | None = None,
        dilation: int = 1,
        groups: int = 1,
        norm: NormFactory | None = nn.BatchNorm2d,
        act: ActFactory | None = partial(nn.ReLU, inplace=True),
    ) -> None:
        if padding is None:
            padding = dilation * (kernel_size - 1) // 2
        layers: dict[str, nn.Module] = {
            "conv": nn.Conv2d(
                in_channels,
                out_channels,
                kernel_size,
                stride=stride,
                padding=padding,
                dilation=dilation,
                groups=groups,
                # A norm layer's shift makes the conv bias redundant.
                bias=norm is None,
            )
        }
        if norm is not None:
            layers["norm"] = norm(out_channels)
        if act is not None:
            layers["act"] = act()
        super().__init__()
        for key, module in layers.items():
            self.add_module(key, module)


def he_normal_(module: nn.Module) -> None:
    """Initialise every conv / transposed conv below ``module`` from N(0, 2/N), biases to zero.

    N is the number of inputs feeding one output unit (He et al. 2015; the U-Net paper's
    ``sqrt(2/N)``). For ``Conv2d`` that is ``C_in/groups * kh * kw``; for a ``ConvTranspose2d`` each
    output pixel sees only ``(kh/sh) * (kw/sw)`` taps per input channel, which PyTorch's fan-in
    (computed from the weight's shape) does not know, hence the explicit computation.
    Norm layers keep their default (weight 1, bias 0).

    Args:
        module: the module whose submodules are initialised in place.
    """
    for m in module.modules():
        if isinstance(m, nn.ConvTranspose2d):
            kh, kw = m.kernel_size
            sh, sw = m.stride
            fan_in = m.in_channels // m.groups * max(1.0, kh / sh) * max(1.0, kw / sw)
        elif isinstance(m, nn.Conv2d):
            kh, kw = m.kernel_size
            fan_in = m.in_channels // m.groups * kh * kw
        else:
            continue
        nn.init.normal_(m.weight, mean=0.0, std=math.sqrt(2.0 / fan_in))
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def kaiming_init(module: nn.Module) -> None:
    """He initialisation (fan-out, ReLU gain) of every ``Conv2d`` in ``module``, zero biases,
    batch norms at weight 1 and bias 0: torchvision's VGG and ResNet initialisation, which the
    from-scratch models (DDRNet, BiSeNetV2, the VGG trunks) share."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
