"""Turn a torchvision classification network into a fully convolutional one (FCN, section 3.1).

The paper's "convolutionalize" step: a classifier's fully connected layers are convolutions
whose kernel covers their whole input. VGG-16's fc6 sees pool5 as 512x7x7, so it becomes a 7x7
convolution; fc7 and the 1000-way classifier become 1x1 convolutions (AlexNet: 256x6x6, a 6x6
fc6). The weights are the same numbers reshaped. On a 224x224 image the result gives a 1x1 map
equal to the classifier's logits; on a larger image it slides and gives a map of class scores
(a coarse "heatmap", one score vector per 32-pixel step).

torchvision's classifiers put an ``AdaptiveAvgPool2d`` (7x7 for VGG, 6x6 for AlexNet) between the
features and the classifier so any input size yields one prediction. At 224x224 the pooled map is
already 7x7 (6x6), so the pool is an identity there and the converted net matches exactly; at
other sizes the classifier resamples pool5 to 7x7 while the converted net slides instead. The
pool is dropped: sliding is the point.
"""

from __future__ import annotations

from pathlib import Path

import torch.nn as nn

from denseseg.backbones.vgg import CLASSIFIER_LAYOUT
from denseseg.checkpoint import read_weights
from denseseg.errors import CheckpointError, ConfigError
from denseseg.models.fcn import FCNTrunk


def convert_classifier_to_fcn(
    classifier: nn.Module | str | Path,
    arch: str = "vgg16",
    *,
    first_padding: int | None = None,
    ceil_mode: bool = False,
) -> FCNTrunk:
    """Convolutionalise a torchvision VGG-16 (-BN) or AlexNet classifier.

    Args:
        classifier: a torchvision classification module (``torchvision.models.vgg16(...)``), a
            local file holding its state_dict (read with ``weights_only=True``), or a
            torchvision weights name of ``arch`` (``"IMAGENET1K_V1"``, needs a network or
            torch.hub's cache).
        arch: ``"vgg16"``, ``"vgg16_bn"`` or ``"alexnet"``: the classifier's architecture.
        first_padding: padding of the first convolution; ``None`` keeps torchvision's (1 for
            VGG, 2 for AlexNet), which makes the 224x224 output a single position; the FCN models
            use 100 (:data:`denseseg.models.fcn.CAFFE_FIRST_PADDING`).
        ceil_mode: pooling rounds sizes up (Caffe); torchvision rounds down.

    Returns:
        An :class:`FCNTrunk` in eval mode: ``(N, 3, H, W) -> scores (N, K, h, w)`` with K the
        classifier's class count; for VGG-16, ``h = floor(H / 32) - 6`` (1 at 224).

    Raises:
        ConfigError: unknown ``arch``.
        CheckpointError: the file or module is not a torchvision classifier of ``arch``.
    """
    if arch not in CLASSIFIER_LAYOUT:
        raise ConfigError(f"unknown arch {arch!r}; choose one of {', '.join(CLASSIFIER_LAYOUT)}")
    if isinstance(classifier, nn.Module):
        state = classifier.state_dict()
        where = f"the {type(classifier).__name__} module"
    else:
        state = read_weights(classifier, arch)[0]
        where = str(classifier)
    fc_key = CLASSIFIER_LAYOUT[arch].fc6 + ".weight"
    score_key = CLASSIFIER_LAYOUT[arch].score + ".weight"
    if score_key not in state or fc_key not in state:
        raise CheckpointError(
            f"{where} is not a torchvision {arch} classifier (no {fc_key} / {score_key}); "
            f"give torchvision.models.{arch}(...) or its state_dict"
        )
    num_classes, fc_channels = (int(n) for n in state[score_key].shape)
    trunk = FCNTrunk(
        num_classes,
        arch,
        fc_channels=fc_channels,
        first_padding=first_padding,
        ceil_mode=ceil_mode,
    )
    try:
        trunk.load_classifier_state_dict(state)
    except CheckpointError as exc:
        raise CheckpointError(f"{where}: {exc}") from None
    return trunk.eval()
