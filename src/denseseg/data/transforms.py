"""Joint image + mask transforms on torchvision.transforms.v2.

The image is wrapped as ``tv_tensors.Image`` and the target as ``tv_tensors.Mask``, so every
geometric step moves both the same way, images are interpolated bilinearly and masks by nearest
neighbour (labels are never blended), and padding fills the image with 0 and the mask with
``ignore_index``. All randomness comes from torch's global RNG, so ``torch.manual_seed`` makes
a pipeline reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from denseseg.errors import ConfigError

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "RandomScale", "build_transforms", "default_mean_std"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def default_mean_std(in_channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Normalisation constants in 0-1 units: ImageNet's for RGB, 0.5/0.5 for grayscale.

    Args:
        in_channels: 1 or 3.

    Returns:
        ``(mean, std)``, each with ``in_channels`` values.
    """
    if in_channels == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    if in_channels == 1:
        return (0.5,), (0.5,)
    raise ConfigError(f"no default mean/std for {in_channels} channels; give mean and std")


class RandomScale(v2.Transform):
    """Resize by one random ratio drawn uniformly from ``scale_range`` (aspect ratio kept).

    Unlike ``v2.RandomResize`` or ``v2.ScaleJitter`` the ratio is relative to the input's own
    size, as in the DeepLab and FCN training recipes. Images are resized bilinearly (with
    antialiasing), masks by nearest neighbour at pixel centres.

    Args:
        scale_range: ``(low, high)`` ratios, ``0 < low <= high``.
    """

    def __init__(self, scale_range: tuple[float, float]) -> None:
        super().__init__()
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        low, high = self.scale_range
        ratio = low + (high - low) * float(torch.rand(()))
        height, width = v2.query_size(flat_inputs)
        size = [max(1, round(height * ratio)), max(1, round(width * ratio))]
        return {"size": size}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if isinstance(inpt, tv_tensors.Mask):
            # NEAREST_EXACT samples at pixel centres like the bilinear image resize; plain
            # NEAREST (torchvision's mask default) shifts labels by up to half an input pixel.
            mode = v2.InterpolationMode.NEAREST_EXACT
            return self._call_kernel(F.resize, inpt, params["size"], interpolation=mode)
        return self._call_kernel(F.resize, inpt, params["size"], antialias=True)


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and v > 0 for v in pair):
        raise ConfigError(f"{name} must be a positive int or (height, width), got {value!r}")
    return pair  # type: ignore[return-value]


class SegmentationTransforms:
    """Callable ``(image, target) -> (image, target)``; see :func:`build_transforms`."""

    def __init__(
        self,
        train: bool,
        crop_size: int | Sequence[int] | None,
        scale_range: Sequence[float] | None,
        hflip: bool,
        mean: Sequence[float] | None,
        std: Sequence[float] | None,
        ignore_index: int,
    ) -> None:
        if (mean is None) != (std is None):
            raise ConfigError("give both mean and std, or neither for the defaults")
        if mean is not None and std is not None:
            if len(mean) != len(std) or not mean:
                raise ConfigError(f"mean {tuple(mean)} and std {tuple(std)} differ in length")
            if any(s <= 0 for s in std):
                raise ConfigError(f"std values must be > 0, got {tuple(std)}")
        self.mean = tuple(float(m) for m in mean) if mean is not None else None
        self.std = tuple(float(s) for s in std) if std is not None else None
        self.train = train
        steps: list[Any] = []
        if train:
            if scale_range is not None:
                low, high = (float(v) for v in scale_range)
                if not 0 < low <= high:
                    raise ConfigError(
                        f"scale_range must satisfy 0 < low <= high, got {scale_range}"
                    )
                if (low, high) != (1.0, 1.0):
                    steps.append(RandomScale((low, high)))
            if crop_size is not None:
                fill = {tv_tensors.Image: 0, tv_tensors.Mask: ignore_index}
                steps.append(
                    v2.RandomCrop(_pair(crop_size, "crop_size"), pad_if_needed=True, fill=fill)
                )
            if hflip:
                steps.append(v2.RandomHorizontalFlip(p=0.5))
        self.geometric = v2.Compose(steps) if steps else None

    def __call__(
        self, image: torch.Tensor, target: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if image.ndim != 3 or target.ndim != 2 or image.shape[1:] != target.shape:
            raise ValueError(
                f"expected image (C, H, W) and target (H, W) of one size, got "
                f"{tuple(image.shape)} and {tuple(target.shape)}"
            )
        channels = image.shape[0]
        if self.mean is None:
            mean, std = default_mean_std(channels)
        elif len(self.mean) != channels:
            raise ConfigError(
                f"mean/std have {len(self.mean)} values but the image has {channels} channel(s); "
                "give one value per channel"
            )
        else:
            mean, std = self.mean, self.std
        img: Any = tv_tensors.Image(image)
        mask: Any = tv_tensors.Mask(target)
        if self.geometric is not None:
            img, mask = self.geometric(img, mask)
        img = F.normalize(F.to_dtype(img, torch.float32, scale=True), list(mean), list(std))
        return img.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor).long()

    def __repr__(self) -> str:
        return f"SegmentationTransforms(train={self.train}, steps={self.geometric})"


def build_transforms(
    train: bool,
    *,
    crop_size: int | Sequence[int] | None = None,
    scale_range: Sequence[float] | None = (0.5, 2.0),
    hflip: bool = True,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    ignore_index: int = 255,
) -> SegmentationTransforms:
    """Build the joint transform for training or evaluation.

    Training: random scale by a ratio in ``scale_range``, random crop to ``crop_size`` (padding
    with 0 for the image and ``ignore_index`` for the mask where the scaled image is smaller),
    random horizontal flip, then to float in ``[0, 1]`` and normalise. Evaluation: to float and
    normalise only; no resizing, as evaluation runs at the original resolution.

    Args:
        train: Training (random augmentation) or evaluation pipeline.
        crop_size: ``int`` or ``(height, width)`` of the training crop; ``None`` keeps the
            scaled size (then batches need equal-sized images). Ignored for evaluation.
        scale_range: ``(low, high)`` scale ratios; ``None`` or ``(1, 1)`` for no scaling.
        hflip: Flip horizontally with probability 0.5 in training.
        mean: Per-channel mean in 0-1 units; ``None`` uses :func:`default_mean_std`.
        std: Per-channel std in 0-1 units; given together with ``mean``.
        ignore_index: Mask fill value for padding.

    Returns:
        Callable ``(image uint8 (C, H, W), target int64 (H, W)) ->
        (image float32 (C, H', W'), target int64 (H', W'))``. A ``mean`` whose length differs
        from the image's channel count raises :class:`ConfigError` when called.
    """
    return SegmentationTransforms(train, crop_size, scale_range, hflip, mean, std, ignore_index)
