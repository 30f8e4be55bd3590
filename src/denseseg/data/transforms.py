"""Joint image + target transforms on torchvision.transforms.v2.

The image is wrapped as ``tv_tensors.Image`` and the target as ``tv_tensors.Mask`` (a semantic
label map) or, for instance targets, a dict holding ``tv_tensors.BoundingBoxes`` and an
instance ``tv_tensors.Mask`` ``(N, H, W)``, so every geometric step moves all of them the same
way. Images are interpolated bilinearly, masks always by nearest neighbour at pixel centres
(``NEAREST_EXACT``: labels are never blended), and padding fills the image with 0, a semantic
mask with ``ignore_index`` and instance masks with 0. All randomness comes from torch's global
RNG, so ``torch.manual_seed`` makes a pipeline reproducible.

The training pipeline follows mmsegmentation's order: random resize, random crop (optionally
re-drawn while one class dominates, ``cat_max_ratio``), horizontal flip, photometric distortion,
pad to the crop size, normalise. U-Net's elastic deformation (:mod:`denseseg.data.elastic`) runs
after the resize and before the crop, so the crop sees warped context rather than mirrored
borders.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.ops import masks_to_boxes
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from denseseg.data.elastic import ElasticDeformation
from denseseg.errors import ConfigError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PadTo",
    "PhotoMetricDistortion",
    "RandomCrop",
    "RandomScale",
    "ResizeKeepAspect",
    "SegmentationTransforms",
    "build_transforms",
    "default_mean_std",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

SizeSpec = int | Sequence[int]
"""A target size that keeps the aspect ratio: an ``int`` is the short side; a pair
``(long, short)`` bounds both sides, as mmsegmentation's ``scale`` with ``keep_ratio=True``
(the image is made as large as possible with its long side <= ``long`` and its short side <=
``short``)."""


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


def _size_spec(value: SizeSpec, name: str) -> tuple[int, ...]:
    spec = (value,) if isinstance(value, int) else tuple(value)
    if len(spec) not in (1, 2) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in spec
    ):
        raise ConfigError(
            f"{name} must be a positive int (short side) or [long, short], got {value!r}"
        )
    return spec


def keep_ratio_factor(height: int, width: int, size: Sequence[int]) -> float:
    """Scale factor that brings ``(height, width)`` to ``size`` keeping the aspect ratio.

    Args:
        height: Input height.
        width: Input width.
        size: ``(short,)`` or ``(long, short)``; see :data:`SizeSpec`.

    Returns:
        The factor: ``short / min(h, w)``, or ``min(long / max(h, w), short / min(h, w))``.
    """
    short_side, long_side = min(height, width), max(height, width)
    if len(size) == 1:
        return size[0] / short_side
    return min(size[0] / long_side, size[1] / short_side)


def _resize(transform: v2.Transform, inpt: Any, size: list[int]) -> Any:
    # A tiny ratio on a small image: at least 2 pixels (0 fails; uint8 to 1x1 trips a torch assert).
    size = [max(2, int(s)) for s in size]
    if isinstance(inpt, tv_tensors.Mask):
        # NEAREST_EXACT samples at pixel centres like the bilinear image resize; plain
        # NEAREST (torchvision's mask default) shifts labels by up to half an input pixel.
        mode = v2.InterpolationMode.NEAREST_EXACT
        return transform._call_kernel(F.resize, inpt, size, interpolation=mode)
    return transform._call_kernel(F.resize, inpt, size, antialias=True)


class RandomScale(v2.Transform):
    """Resize by one random ratio drawn uniformly from ``scale_range`` (aspect ratio kept).

    Without ``base_size`` the ratio is relative to the input's own size, as in the DeepLab and
    FCN training recipes. With ``base_size`` it is relative to that size, as mmsegmentation's
    ``RandomResize(scale=base_size, ratio_range=scale_range, keep_ratio=True)``: the image is
    first fitted to ``base_size`` (see :data:`SizeSpec`) and then scaled by the ratio. Images
    are resized bilinearly (with antialiasing), masks by nearest neighbour at pixel centres.

    Args:
        scale_range: ``(low, high)`` ratios, ``0 < low <= high``.
        base_size: ``None``, a short side, or ``(long, short)``.
    """

    def __init__(self, scale_range: tuple[float, float], base_size: SizeSpec | None = None) -> None:
        super().__init__()
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.base_size = None if base_size is None else _size_spec(base_size, "base_size")

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        low, high = self.scale_range
        ratio = low + (high - low) * float(torch.rand(()))
        height, width = v2.query_size(flat_inputs)
        if self.base_size is not None:
            ratio *= keep_ratio_factor(height, width, self.base_size)
        return {"size": [max(1, round(height * ratio)), max(1, round(width * ratio))]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return _resize(self, inpt, params["size"])


class ResizeKeepAspect(v2.Transform):
    """Deterministic resize to ``size`` keeping the aspect ratio (for evaluation).

    Args:
        size: A short side, or ``(long, short)`` (see :data:`SizeSpec`), e.g. ``(2048, 512)``
            for ADE20K as mmsegmentation tests it.
    """

    def __init__(self, size: SizeSpec) -> None:
        super().__init__()
        self.size = _size_spec(size, "eval_resize")

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        factor = keep_ratio_factor(height, width, self.size)
        return {"size": [max(1, round(height * factor)), max(1, round(width * factor))]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return _resize(self, inpt, params["size"])


def _semantic_mask(flat_inputs: list[Any]) -> torch.Tensor | None:
    for inpt in flat_inputs:
        if isinstance(inpt, tv_tensors.Mask) and inpt.ndim == 2:
            return inpt
    return None


class RandomCrop(v2.Transform):
    """Random crop of at most ``size``; no padding (see :class:`PadTo`).

    With ``cat_max_ratio < 1`` the crop is re-drawn, up to 10 times, while a single class covers
    ``cat_max_ratio`` or more of the crop's non-ignored pixels or the crop holds only one class
    (mmsegmentation's ``RandomCrop``; after 10 draws the next one is kept whatever it holds).
    A side shorter than the crop is kept whole.

    Args:
        size: ``(height, width)`` of the crop.
        cat_max_ratio: Largest share one class may take; ``1.0`` disables the check.
        ignore_index: Label left out of the shares.
    """

    def __init__(
        self, size: tuple[int, int], cat_max_ratio: float = 1.0, ignore_index: int = 255
    ) -> None:
        super().__init__()
        self.size = (int(size[0]), int(size[1]))
        if not 0.0 < cat_max_ratio <= 1.0:
            raise ConfigError(f"cat_max_ratio must be in (0, 1], got {cat_max_ratio}")
        self.cat_max_ratio = float(cat_max_ratio)
        self.ignore_index = ignore_index

    def _draw(self, height: int, width: int) -> dict[str, int]:
        crop_h, crop_w = min(height, self.size[0]), min(width, self.size[1])
        top = int(torch.randint(0, height - crop_h + 1, ()))
        left = int(torch.randint(0, width - crop_w + 1, ()))
        return {"top": top, "left": left, "height": crop_h, "width": crop_w}

    def _dominated(self, mask: torch.Tensor, p: dict[str, int]) -> bool:
        window = mask[p["top"] : p["top"] + p["height"], p["left"] : p["left"] + p["width"]]
        labels = window[window != self.ignore_index]
        if labels.numel() == 0:
            return True
        counts = torch.unique(labels, return_counts=True)[1]
        return len(counts) < 2 or float(counts.max()) / float(counts.sum()) >= self.cat_max_ratio

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        params = self._draw(height, width)
        mask = _semantic_mask(flat_inputs)
        if self.cat_max_ratio < 1.0 and mask is not None:
            for _ in range(10):
                if not self._dominated(mask, params):
                    break
                params = self._draw(height, width)
        return params

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.crop, inpt, **params)


class PadTo(v2.Transform):
    """Pad at the bottom and right up to ``size`` (sides already as large are left alone).

    The image is filled with 0, a semantic mask ``(H, W)`` with ``ignore_index`` and instance
    masks ``(N, H, W)`` with 0 (background); boxes keep their coordinates.

    Args:
        size: ``(height, width)`` to reach.
        ignore_index: Fill of semantic masks.
    """

    def __init__(self, size: tuple[int, int], ignore_index: int = 255) -> None:
        super().__init__()
        self.size = (int(size[0]), int(size[1]))
        self.ignore_index = ignore_index

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        return {"padding": [0, 0, max(0, self.size[1] - width), max(0, self.size[0] - height)]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not any(params["padding"]):
            return inpt
        fill = 0
        if isinstance(inpt, tv_tensors.Mask) and inpt.ndim == 2:
            fill = self.ignore_index
        return self._call_kernel(F.pad, inpt, padding=params["padding"], fill=fill)


def _scale_saturation(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """Multiply HSV saturation by ``alpha`` (clipped to 1), keeping hue and value.

    For fixed hue and value every RGB channel is affine in the saturation: ``c = V - S * V *
    f_c(H)``. So scaling S is a blend towards the per-pixel maximum ``V``, with the factor
    capped where S would pass 1, which is what OpenCV's HSV round trip in mmsegmentation does.
    """
    value = x.amax(dim=0, keepdim=True)
    spread = value - x.amin(dim=0, keepdim=True)
    cap = torch.where(spread > 0, value / spread.clamp_min(1e-6), torch.full_like(value, alpha))
    return value - torch.minimum(torch.full_like(value, alpha), cap) * (value - x)


def _shift_hue(x: torch.Tensor, degrees: float) -> torch.Tensor:
    """Rotate the HSV hue of ``(3, H, W)`` RGB values by ``degrees``, keeping S and V.

    The HSV round trip in closed form (hue in sextants; channel ``n`` of the result is
    ``V - C * clamp(min(k, 4 - k), 0, 1)`` with ``k = (n + H) mod 6``, ``n = 5, 3, 1`` for
    R, G, B and chroma ``C = max - min``): the same numbers as converting to HSV and back, at a
    fraction of torchvision's ``adjust_hue`` cost.
    """
    r, g, b = x.unbind(0)
    value = x.amax(dim=0)
    chroma = value - x.amin(dim=0)
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    hue = torch.where(
        value == r,
        torch.remainder((g - b) / safe, 6.0),
        torch.where(value == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0),
    )
    hue = torch.remainder(hue + degrees / 60.0, 6.0)
    n = torch.tensor([5.0, 3.0, 1.0], dtype=x.dtype, device=x.device).view(3, 1, 1)
    k = torch.remainder(n + hue, 6.0)
    return value - chroma * torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0)


class PhotoMetricDistortion(v2.Transform):
    """mmsegmentation's ``PhotoMetricDistortion`` on ``uint8`` images; masks pass through.

    Each step runs with probability 0.5, on the 0-255 scale: brightness (add a value from
    ``[-brightness_delta, brightness_delta]``), contrast (multiply by a factor from
    ``contrast_range``; before the colour steps or after them, chosen at random), saturation
    (multiply HSV saturation by a factor from ``saturation_range``), hue (shift by an integer
    from ``[-hue_delta, hue_delta)`` in OpenCV's 180-step hue circle, i.e. 2 degrees a step,
    half-open as numpy's ``randint``), each result clipped to 0-255. Unlike mmsegmentation the
    image is not rounded to ``uint8`` between steps, only at the end. One-channel images get
    brightness and contrast only.

    Args:
        brightness_delta: Largest brightness offset (32).
        contrast_range: Contrast factors ``(low, high)`` ((0.5, 1.5)).
        saturation_range: Saturation factors ``(low, high)`` ((0.5, 1.5)).
        hue_delta: Largest hue shift in OpenCV hue steps (18, i.e. 36 degrees).
    """

    def __init__(
        self,
        brightness_delta: float = 32,
        contrast_range: Sequence[float] = (0.5, 1.5),
        saturation_range: Sequence[float] = (0.5, 1.5),
        hue_delta: int = 18,
    ) -> None:
        super().__init__()
        for name, rng in (
            ("contrast_range", contrast_range),
            ("saturation_range", saturation_range),
        ):
            if len(rng) != 2 or not 0 <= rng[0] <= rng[1]:
                raise ConfigError(f"photometric {name} must be [low, high] with 0 <= low <= high")
        if brightness_delta < 0 or not isinstance(hue_delta, int) or not 0 <= hue_delta < 90:
            raise ConfigError(
                "photometric brightness_delta must be >= 0 and hue_delta an integer in [0, 90)"
            )
        self.brightness_delta = float(brightness_delta)
        self.contrast_range = (float(contrast_range[0]), float(contrast_range[1]))
        self.saturation_range = (float(saturation_range[0]), float(saturation_range[1]))
        self.hue_delta = hue_delta

    @staticmethod
    def _uniform(low: float, high: float) -> float:
        return low + (high - low) * float(torch.rand(()))

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        coin = torch.randint(0, 2, (5,)).tolist()
        d = self.brightness_delta
        return {
            "beta": self._uniform(-d, d) if coin[0] else None,
            "contrast_first": bool(coin[1]),
            "alpha": self._uniform(*self.contrast_range) if coin[2] else None,
            "saturation": self._uniform(*self.saturation_range) if coin[3] else None,
            # numpy's randint, as mmsegmentation draws it: [-delta, delta), half-open.
            "hue": int(torch.randint(-self.hue_delta, self.hue_delta, ()))
            if coin[4] and self.hue_delta
            else None,
        }

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if isinstance(inpt, (tv_tensors.Mask, tv_tensors.BoundingBoxes)):
            return inpt
        if inpt.dtype != torch.uint8:
            raise TypeError(f"PhotoMetricDistortion expects a uint8 image, got {inpt.dtype}")
        x = inpt.as_subclass(torch.Tensor).float()
        if params["beta"] is not None:
            x = (x + params["beta"]).clamp(0, 255)
        if params["contrast_first"] and params["alpha"] is not None:
            x = (x * params["alpha"]).clamp(0, 255)
        if x.shape[-3] == 3:
            if params["saturation"] is not None:
                x = _scale_saturation(x, params["saturation"]).clamp(0, 255)
            if params["hue"] is not None:
                x = _shift_hue(x, 2.0 * params["hue"])
        if not params["contrast_first"] and params["alpha"] is not None:
            x = (x * params["alpha"]).clamp(0, 255)
        out = x.round().clamp(0, 255).to(torch.uint8)
        return tv_tensors.wrap(out, like=inpt) if isinstance(inpt, tv_tensors.TVTensor) else out


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and v > 0 for v in pair):
        raise ConfigError(f"{name} must be a positive int or (height, width), got {value!r}")
    return pair  # type: ignore[return-value]


_ELASTIC_KEYS = ("sigma", "grid", "p", "interpolation", "padding_mode")
_PHOTOMETRIC_KEYS = ("brightness_delta", "contrast_range", "saturation_range", "hue_delta")


def _options(value: bool | Mapping[str, Any] | None, name: str, keys: Sequence[str]) -> dict | None:
    """``None``/``False`` -> off, ``True`` -> defaults, a mapping -> its (checked) keys."""
    if value is None or value is False:
        return None
    if value is True:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{name} must be true/false or a mapping with keys {', '.join(keys)}")
    unknown = sorted(set(value) - set(keys))
    if unknown:
        raise ConfigError(f"{name} has unknown keys {unknown}; allowed: {', '.join(keys)}")
    return dict(value)


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
        base_size: SizeSpec | None = None,
        cat_max_ratio: float = 1.0,
        photometric: bool | Mapping[str, Any] = False,
        elastic: bool | Mapping[str, Any] | None = None,
        eval_resize: SizeSpec | None = None,
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
        self.ignore_index = ignore_index
        steps: list[Any] = []
        if train:
            steps += self._train_steps(
                crop_size, scale_range, hflip, base_size, cat_max_ratio, photometric, elastic
            )
        elif eval_resize is not None:
            steps.append(ResizeKeepAspect(eval_resize))
        self.steps = v2.Compose(steps) if steps else None
        self.elastic = any(isinstance(s, ElasticDeformation) for s in steps)

    def _train_steps(
        self,
        crop_size: int | Sequence[int] | None,
        scale_range: Sequence[float] | None,
        hflip: bool,
        base_size: SizeSpec | None,
        cat_max_ratio: float,
        photometric: bool | Mapping[str, Any],
        elastic: bool | Mapping[str, Any] | None,
    ) -> list[Any]:
        steps: list[Any] = []
        if scale_range is not None:
            low, high = (float(v) for v in scale_range)
            if not 0 < low <= high:
                raise ConfigError(f"scale_range must satisfy 0 < low <= high, got {scale_range}")
            if (low, high) != (1.0, 1.0) or base_size is not None:
                steps.append(RandomScale((low, high), base_size))
        elif base_size is not None:
            steps.append(RandomScale((1.0, 1.0), base_size))
        elastic_opts = _options(elastic, "elastic", _ELASTIC_KEYS)
        if elastic_opts is not None:
            steps.append(ElasticDeformation(**elastic_opts, ignore_index=self.ignore_index))
        crop = _pair(crop_size, "crop_size") if crop_size is not None else None
        if crop is not None:
            steps.append(RandomCrop(crop, cat_max_ratio, self.ignore_index))
        elif cat_max_ratio != 1.0:
            raise ConfigError("cat_max_ratio needs crop_size (it re-draws the training crop)")
        if hflip:
            steps.append(v2.RandomHorizontalFlip(p=0.5))
        photo_opts = _options(photometric, "photometric", _PHOTOMETRIC_KEYS)
        if photo_opts is not None:
            steps.append(PhotoMetricDistortion(**photo_opts))
        if crop is not None:
            steps.append(PadTo(crop, self.ignore_index))
        return steps

    def _mean_std(self, channels: int) -> tuple[Sequence[float], Sequence[float]]:
        if self.mean is None:
            return default_mean_std(channels)
        if len(self.mean) != channels:
            raise ConfigError(
                f"mean/std have {len(self.mean)} values but the image has {channels} channel(s); "
                "give one value per channel"
            )
        return self.mean, self.std  # type: ignore[return-value]

    def __call__(self, image: torch.Tensor, target: Any) -> tuple[torch.Tensor, Any]:
        """Transform one sample.

        Args:
            image: ``uint8 (C, H, W)``.
            target: ``int64 (H, W)`` label map, or an instance dict with ``boxes``
                (``BoundingBoxes``, XYXY), ``masks`` (``(N, H, W)``) and per-instance tensors
                such as ``labels`` (as :class:`~denseseg.data.datasets.coco.CocoDataset` gives).

        Returns:
            ``(image float32 (C, H', W'), target)``: the label map as ``int64 (H', W')``, or the
            instance dict with instances that left the picture dropped and ``area`` recomputed.
        """
        if isinstance(target, Mapping):
            return self._instance_call(image, target)
        if image.ndim != 3 or target.ndim != 2 or image.shape[1:] != target.shape:
            raise ValueError(
                f"expected image (C, H, W) and target (H, W) of one size, got "
                f"{tuple(image.shape)} and {tuple(target.shape)}"
            )
        mean, std = self._mean_std(image.shape[0])
        img: Any = tv_tensors.Image(image)
        mask: Any = tv_tensors.Mask(target)
        if self.steps is not None:
            img, mask = self.steps(img, mask)
        img = F.normalize(F.to_dtype(img, torch.float32, scale=True), list(mean), list(std))
        return img.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor).long()

    def _instance_call(
        self, image: torch.Tensor, target: Mapping[str, Any]
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        mean, std = self._mean_std(image.shape[0])
        target = dict(target)
        masks = target.get("masks")
        if masks is not None and not isinstance(masks, tv_tensors.Mask):
            target["masks"] = masks = tv_tensors.Mask(masks)
        if self.elastic and "boxes" in target:
            if masks is None:
                raise ConfigError(
                    "elastic deformation of boxes needs instance masks to rebuild them"
                )
            boxes = target.pop("boxes")  # warped through the masks, rebuilt below
        else:
            boxes = None
        img: Any = tv_tensors.Image(image)
        if self.steps is not None:
            img, target = self.steps(img, target)
        if boxes is not None:
            target["boxes"] = tv_tensors.BoundingBoxes(
                masks_to_boxes(target["masks"]) if len(target["masks"]) else boxes[:0],
                format="XYXY",
                canvas_size=tuple(img.shape[-2:]),
            )
        target = _drop_lost_instances(target)
        img = F.normalize(F.to_dtype(img, torch.float32, scale=True), list(mean), list(std))
        return img.as_subclass(torch.Tensor), target

    def __repr__(self) -> str:
        return f"SegmentationTransforms(train={self.train}, steps={self.steps})"


def _drop_lost_instances(target: dict[str, Any]) -> dict[str, Any]:
    """Drop instances whose box or mask left the picture; per-instance tensors follow."""
    boxes, masks = target.get("boxes"), target.get("masks")
    n = len(boxes) if boxes is not None else len(masks) if masks is not None else 0
    keep = torch.ones(n, dtype=torch.bool)
    if boxes is not None and n:
        keep &= (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    if masks is not None and n:
        keep &= masks.flatten(1).as_subclass(torch.Tensor).bool().any(dim=1)
    out: dict[str, Any] = {}
    for key, value in target.items():
        if isinstance(value, torch.Tensor) and value.ndim >= 1 and len(value) == n:
            value = value[keep].as_subclass(torch.Tensor)
        out[key] = value
    if masks is not None and "area" in out:
        out["area"] = out["masks"].flatten(1).sum(dim=1).float()
    return out


def build_transforms(
    train: bool,
    *,
    crop_size: int | Sequence[int] | None = None,
    scale_range: Sequence[float] | None = (0.5, 2.0),
    hflip: bool = True,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    ignore_index: int = 255,
    base_size: SizeSpec | None = None,
    cat_max_ratio: float = 1.0,
    photometric: bool | Mapping[str, Any] = False,
    elastic: bool | Mapping[str, Any] | None = None,
    eval_resize: SizeSpec | None = None,
) -> SegmentationTransforms:
    """Build the joint transform for training or evaluation.

    Training, in this order: random scale by a ratio in ``scale_range`` (of the image's own
    size, or of ``base_size``); elastic deformation; random crop to ``crop_size`` (re-drawn
    while one class dominates, ``cat_max_ratio``); horizontal flip; photometric distortion; pad
    to ``crop_size`` (image 0, mask ``ignore_index``) where the scaled image is smaller; to float
    in ``[0, 1]`` and normalise. Evaluation: an optional aspect-keeping resize
    (``eval_resize``), then to float and normalise; by default nothing is resized, as
    evaluation runs at the original resolution.

    Args:
        train: Training (random augmentation) or evaluation pipeline.
        crop_size: ``int`` or ``(height, width)`` of the training crop; ``None`` keeps the
            scaled size (then batches need equal-sized images). Ignored for evaluation.
        scale_range: ``(low, high)`` scale ratios; ``None`` or ``(1, 1)`` for no scaling.
        hflip: Flip horizontally with probability 0.5 in training.
        mean: Per-channel mean in 0-1 units; ``None`` uses :func:`default_mean_std`.
        std: Per-channel std in 0-1 units; given together with ``mean``.
        ignore_index: Mask fill value for padding.
        base_size: Makes ``scale_range`` relative to this size (mmsegmentation's
            ``RandomResize`` ``scale``): a short side, or ``(long, short)``.
        cat_max_ratio: Re-draw the crop (up to 10 times) while one class covers this share of
            its non-ignored pixels; ``1.0`` is off. Needs ``crop_size``.
        photometric: ``True`` for :class:`PhotoMetricDistortion` with mmsegmentation's
            defaults, or a mapping of its arguments.
        elastic: ``True`` for U-Net's elastic deformation with the paper's settings, or a
            mapping of :class:`~denseseg.data.elastic.ElasticDeformation`'s ``sigma``,
            ``grid``, ``p``, ``interpolation``, ``padding_mode``.
        eval_resize: Evaluation only: resize keeping the aspect ratio to a short side or
            ``(long, short)``; the mask follows by nearest neighbour.

    Returns:
        Callable ``(image uint8 (C, H, W), target int64 (H, W)) ->
        (image float32 (C, H', W'), target int64 (H', W'))`` (instance dict targets are
        supported too, see :meth:`SegmentationTransforms.__call__`). A ``mean`` whose length
        differs from the image's channel count raises :class:`ConfigError` when called.
    """
    return SegmentationTransforms(
        train,
        crop_size,
        scale_range,
        hflip,
        mean,
        std,
        ignore_index,
        base_size=base_size,
        cat_max_ratio=cat_max_ratio,
        photometric=photometric,
        elastic=elastic,
        eval_resize=eval_resize,
    )


def build_eval_resize(size: SizeSpec) -> Any:
    """An evaluation-time resize that keeps ``uint8`` images (for raw-item evaluation).

    Args:
        size: A short side or ``(long, short)``.

    Returns:
        Callable ``(image uint8 (C, H, W), target int64 (H, W)) -> (image uint8 (C, H', W'),
        target int64 (H', W'))``, the target resized by nearest neighbour.
    """
    resize = ResizeKeepAspect(size)

    def apply(image: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        img, mask = resize(tv_tensors.Image(image), tv_tensors.Mask(target))
        return img.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor)

    return apply
