"""Up-sampling by transposed convolution initialised to bilinear interpolation (FCN, section 3.3).

The FCN paper up-samples class scores with "backwards convolution" layers whose filters start as
bilinear interpolation; the released Caffe models keep them fixed (learning rate 0). The kernel
below is the reference implementation's ``upsample_filt``: a separable tent of half-width
``factor = ceil(k / 2)`` centred on the kernel, so a ``2f x 2f`` kernel with stride ``f`` is exact
bilinear interpolation wherever two input samples overlap.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor


def bilinear_kernel(
    in_channels: int, out_channels: int, kernel_size: int, *, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Weight for ``nn.ConvTranspose2d`` that up-samples each channel bilinearly on its own.

    Channel ``c`` of the input feeds only channel ``c`` of the output (the weight is diagonal in
    the two channel axes), as Caffe's ``surgery.interp`` does; with ``out_channels == 1`` every
    input channel feeds the single output.

    Args:
        in_channels: input channels C_in.
        out_channels: output channels; equal to ``in_channels`` or 1.
        kernel_size: square kernel side k (``2 * stride`` for exact interpolation; odd sizes are
            allowed, as in FCN-AlexNet's 63x63).
        dtype: dtype of the returned weight.

    Returns:
        Weight ``(C_in, out_channels, k, k)``.
    """
    if out_channels not in (in_channels, 1):
        raise ValueError(
            f"bilinear_kernel needs out_channels == in_channels or 1, got {in_channels} -> "
            f"{out_channels}"
        )
    if kernel_size < 1:
        raise ValueError(f"bilinear_kernel needs kernel_size >= 1, got {kernel_size}")
    factor = (kernel_size + 1) // 2
    center = factor - 1 if kernel_size % 2 == 1 else factor - 0.5
    og = torch.arange(kernel_size, dtype=torch.float64)
    tent = 1 - (og - center).abs() / factor
    filt = (tent[:, None] * tent[None, :]).to(dtype)
    weight = torch.zeros(in_channels, out_channels, kernel_size, kernel_size, dtype=dtype)
    if out_channels == 1:
        weight[:, 0] = filt
    else:
        idx = torch.arange(in_channels)
        weight[idx, idx] = filt
    return weight


def bilinear_upsampler(
    channels: int, kernel_size: int, stride: int, *, learnable: bool = False
) -> nn.ConvTranspose2d:
    """A bias-free ``ConvTranspose2d(channels, channels, kernel_size, stride)`` set to bilinear.

    The full ``C x C`` weight is kept (not a grouped one) so that the layer, its parameter count
    and its state-dict entry match the reference Caffe models, and so a learnable up-sampler may
    mix classes as theirs could.

    Args:
        channels: channels C (the class count in FCN).
        kernel_size: kernel side (``2 * stride`` in FCN-VGG16).
        stride: up-sampling factor.
        learnable: leave ``requires_grad`` on; by default the weight is frozen (as in the
            released models).

    Returns:
        The layer; ``(N, C, h, w) -> (N, C, (h - 1) * stride + kernel_size, ...)``.
    """
    layer = nn.ConvTranspose2d(channels, channels, kernel_size, stride=stride, bias=False)
    with torch.no_grad():
        layer.weight.copy_(bilinear_kernel(channels, channels, kernel_size))
    layer.weight.requires_grad_(learnable)
    return layer
