"""U-Net's border weight map and the pixel-weighted cross-entropy that uses it.

Ronneberger, Fischer & Brox (MICCAI 2015), section 3: "The weight map is then computed as

    w(x) = w_c(x) + w0 * exp(-(d1(x) + d2(x))^2 / (2 sigma^2))

where w_c is the weight map to balance the class frequencies, d1 denotes the distance to the
border of the nearest cell and d2 the distance to the border of the second nearest cell. In our
experiments we set w0 = 10 and sigma = 5 pixels." The term forces the network to learn "the
small separation borders ... between touching cells".

Choices where the paper leaves room:

* Cells are the 4-connected components of the foreground class (``cell``, class 1 of ISBI
  2012); ``d1``/``d2`` are Euclidean distances between pixel centres to a component's closest
  pixel (:func:`denseseg.ops.components.two_nearest_distances`).
* The border term goes to background (membrane) pixels only: inside a cell ``d1 = 0`` and the
  term would weight cell pixels near every membrane, while the paper's Fig. 3d weights the
  separating background. The common public re-implementations do the same.
* ``w_c``: the given per-class weights (a recipe's ``loss.class_weights``, e.g. median frequency
  over the training set), else per-sample balancing ``w_c(k) = n / (K n_k)`` over the ``K``
  classes present (each class then carries the same total weight). Ignored pixels weigh 0.
* The map is computed per sample on the augmented label map (after elastic deformation and
  crop), inside the data pipeline (:class:`WithWeightMap`), so it always matches the target
  the loss sees. Terms below ``1e-3 * w0`` are dropped, which bounds the distance search to
  ``sigma * sqrt(2 ln 1000)`` (18.6 px for sigma = 5).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from denseseg.errors import ConfigError
from denseseg.losses.cross_entropy import weighted_mean
from denseseg.ops.components import label_components, two_nearest_distances

__all__ = [
    "PixelWeightedCrossEntropy",
    "WithWeightMap",
    "parse_weight_map",
    "unet_weight_map",
]

_REL_TOL = 1e-3


def unet_weight_map(
    target: Tensor,
    w0: float = 10.0,
    sigma: float = 5.0,
    class_weights: Sequence[float] | Tensor | None = None,
    foreground: int = 1,
    ignore_index: int = 255,
    num_classes: int = 2,
) -> Tensor:
    """The U-Net paper's weight map of one label map.

    Args:
        target: int ``(H, W)`` label map (classes, ``ignore_index`` for void).
        w0: border weight (10 in the paper).
        sigma: border width in pixels (5 in the paper).
        class_weights: ``w_c`` per class, ``(num_classes,)``; None balances the classes of this
            label map (see the module docstring).
        foreground: the class whose connected components are the cells.
        ignore_index: label of void pixels (weight 0).
        num_classes: number of classes.

    Returns:
        float32 ``(H, W)`` weights ``w(x)``.
    """
    if target.ndim != 2:
        raise ValueError(f"unet_weight_map expects an (H, W) label map, got {tuple(target.shape)}")
    valid = target != ignore_index
    labels = torch.where(valid, target, 0).long()
    if class_weights is None:
        counts = torch.bincount(labels[valid], minlength=num_classes).float()
        present = counts > 0
        wc = torch.zeros(num_classes)
        wc[present] = valid.sum() / (present.sum() * counts[present])
    else:
        wc = torch.as_tensor(class_weights, dtype=torch.float32).flatten()
        if wc.numel() != num_classes:
            raise ConfigError(f"weight map: {wc.numel()} class weights for {num_classes} classes")
    weights = wc.to(target.device)[labels]
    if w0 > 0 and sigma > 0:
        cells = valid & (target == foreground)
        background = valid & ~cells
        reach = sigma * math.sqrt(2 * math.log(1 / _REL_TOL))
        comp, n = label_components(cells)
        if n >= 2 and background.any():
            d1, d2 = two_nearest_distances(comp, reach, where=background)
            border = w0 * torch.exp(-((d1 + d2) ** 2) / (2 * sigma**2))
            weights = weights + torch.where(background & d2.isfinite(), border, 0.0)
    return torch.where(valid, weights, 0.0).float()


_KEYS = ("name", "w0", "sigma", "foreground")


def parse_weight_map(value: str | Mapping[str, Any] | None) -> dict[str, float] | None:
    """Read a recipe's ``loss.weight_map``: ``null``, ``unet`` (the paper's w0 = 10, sigma = 5)
    or a mapping ``{name: unet, w0: ..., sigma: ..., foreground: ...}`` (``foreground``: the
    class whose components are the cells, 1 by default).

    Returns:
        ``{"w0": ..., "sigma": ..., "foreground": ...}``, or None when the option is off.

    Raises:
        ConfigError: an unknown name, key or value.
    """
    if value is None or value is False:
        return None
    opts: dict[str, Any] = {"name": value} if isinstance(value, str) else dict(value or {})
    if not isinstance(value, str | Mapping):
        raise ConfigError(f"loss.weight_map must be null, 'unet' or a mapping, got {value!r}")
    unknown = sorted(set(opts) - set(_KEYS))
    if unknown:
        raise ConfigError(
            f"loss.weight_map has unknown keys {unknown}; allowed: {', '.join(_KEYS)}"
        )
    if opts.get("name", "unet") != "unet":
        raise ConfigError(f"loss.weight_map {opts['name']!r}: the only weight map is 'unet'")
    out = {"w0": opts.get("w0", 10.0), "sigma": opts.get("sigma", 5.0)}
    for key, val in out.items():
        if isinstance(val, bool) or not isinstance(val, int | float) or val < 0:
            raise ConfigError(f"loss.weight_map.{key} must be a number >= 0, got {val!r}")
    fg = opts.get("foreground", 1)
    if isinstance(fg, bool) or not isinstance(fg, int) or fg < 0:
        raise ConfigError(f"loss.weight_map.foreground must be a class index, got {fg!r}")
    return {"w0": float(out["w0"]), "sigma": float(out["sigma"]), "foreground": fg}


class WithWeightMap:
    """Wrap a joint transform so that each sample also carries its U-Net weight map.

    ``(image, target) -> (image, target, weights)``, the weights computed on the transformed
    target (see :func:`unet_weight_map`), so after elastic deformation and cropping.

    Args:
        transforms: the training transform ``(image, target) -> (image, target)``.
        **kwargs: :func:`unet_weight_map`'s options (``w0``, ``sigma``, ``class_weights``,
            ``foreground``, ``ignore_index``, ``num_classes``).
    """

    def __init__(self, transforms: Callable[[Any, Any], tuple[Tensor, Tensor]], **kwargs: Any):
        self.transforms = transforms
        self.kwargs = kwargs
        if kwargs.get("class_weights") is not None:
            self.kwargs["class_weights"] = torch.as_tensor(kwargs["class_weights"]).float()

    def __call__(self, image: Any, target: Any) -> tuple[Tensor, Tensor, Tensor]:
        image, target = self.transforms(image, target)
        return image, target, unet_weight_map(target, **self.kwargs)


class PixelWeightedCrossEntropy(nn.Module):
    """Cross-entropy weighted per pixel: ``sum_x w(x) l(x) / sum_x w(x)``.

    The U-Net paper's energy ``E = sum_x w(x) log p_l(x)(x)``, normalised by the total weight
    (as PyTorch's class-weighted mean) so the learning rate does not depend on the tile size.

    Args:
        ignore_index: target value of pixels left out (their weight is taken as 0).

    Forward:
        ``logits (N, C, H, W)``, ``target (N, H, W)`` int64, ``weights (N, H, W)`` float
        -> scalar (0 with a graph when every weight is 0).
    """

    num_statistics = 2  # summed weighted loss, summed weight

    def __init__(self, ignore_index: int = 255) -> None:
        super().__init__()
        self.ignore_index = ignore_index

    def forward(self, logits: Tensor, target: Tensor, weights: Tensor) -> Tensor:
        """Return the weighted mean loss (a scalar)."""
        self._check(logits, target, weights)
        valid = target != self.ignore_index
        w = torch.where(valid, weights.to(logits.dtype), 0.0)
        total = w.sum()
        if total <= 0:
            return logits.sum() * 0.0
        losses = F.cross_entropy(logits, torch.where(valid, target, 0).long(), reduction="none")
        return (w * losses).sum() / total

    def statistics(self, logits: Tensor, target: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
        """``(sum_x w(x) l(x), sum_x w(x))``: they add up over batches and processes, and
        :meth:`from_statistics` of their sum is the weighted mean over all of them."""
        self._check(logits, target, weights)
        valid = target != self.ignore_index
        w = torch.where(valid, weights.to(logits.dtype), 0.0)
        losses = F.cross_entropy(logits, torch.where(valid, target, 0).long(), reduction="none")
        return (w * losses).sum(), w.sum()

    @staticmethod
    def from_statistics(stats: Sequence[Tensor]) -> Tensor:
        """The weighted mean of summed :meth:`statistics` (0 when every weight is 0)."""
        return weighted_mean(stats)

    @staticmethod
    def _check(logits: Tensor, target: Tensor, weights: Tensor) -> None:
        if logits.ndim != 4 or target.shape != weights.shape or target.shape[0] != len(logits):
            raise ValueError(
                "PixelWeightedCrossEntropy expects logits (N, C, H, W), target and weights "
                f"(N, H, W); got {tuple(logits.shape)}, {tuple(target.shape)}, "
                f"{tuple(weights.shape)}"
            )
