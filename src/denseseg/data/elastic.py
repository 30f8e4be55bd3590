"""U-Net's elastic deformation (Ronneberger, Fischer & Brox, MICCAI 2015, section 3.1).

"We generate smooth deformations using random displacement vectors on a coarse 3 by 3 grid. The
displacements are sampled from a Gaussian distribution with 10 pixels standard deviation.
Per-pixel displacements are then computed using bicubic interpolation."

The grid's points sit on the image's corners, edge midpoints and centre (``align_corners``), so
a 3x3 grid bends the whole picture with a handful of smooth waves. Output pixel ``(y, x)`` takes
the input at ``(y + dy, x + dx)``: images by bilinear (or bicubic) interpolation, masks by
nearest neighbour so labels are never blended. torchvision's ``ElasticTransform`` is another
scheme (a Gaussian-smoothed per-pixel random field, Simard et al. 2003), hence this module.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as nnf
from torchvision import tv_tensors
from torchvision.transforms import v2

from denseseg.errors import ConfigError

__all__ = ["ElasticDeformation", "displacement_field", "warp"]

_INTERPOLATIONS = ("bilinear", "bicubic")
_PADDING_MODES = ("reflection", "border", "zeros")


def displacement_field(
    height: int,
    width: int,
    sigma: float = 10.0,
    grid: int = 3,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw a smooth per-pixel displacement field as the U-Net paper describes.

    Args:
        height: Image height ``H``.
        width: Image width ``W``.
        sigma: Standard deviation of the grid displacements, in pixels (10 in the paper).
        grid: Control points per side (3 in the paper).
        generator: Optional RNG; torch's global one otherwise.

    Returns:
        ``float32 (2, H, W)``: ``(dy, dx)`` in pixels, bicubically interpolated from the
        ``(2, grid, grid)`` control displacements, which it equals at the control points.
    """
    coarse = torch.randn(1, 2, grid, grid, generator=generator) * sigma
    return nnf.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=True)[0]


def warp(
    x: torch.Tensor,
    field: torch.Tensor,
    mode: str = "bilinear",
    padding_mode: str = "reflection",
    fill: float = 0.0,
) -> torch.Tensor:
    """Resample ``x`` so that output pixel ``(y, x)`` reads the input at ``(y + dy, x + dx)``.

    Args:
        x: ``(..., H, W)`` tensor of any dtype (integers are sampled as floats and cast back).
        field: ``(2, H, W)`` displacements ``(dy, dx)`` in pixels.
        mode: ``"bilinear"``, ``"bicubic"`` or ``"nearest"`` (the latter for label maps).
        padding_mode: What lies outside the input: ``"reflection"``, ``"border"`` or
            ``"zeros"`` (then ``fill``).
        fill: Value of pixels sampled from outside the input when ``padding_mode="zeros"``.

    Returns:
        Tensor shaped and typed like ``x``; integer outputs are rounded and clipped to the
        input dtype's range.
    """
    height, width = x.shape[-2:]
    lead = x.shape[:-2]
    yy, xx = torch.meshgrid(
        torch.arange(height, dtype=torch.float32),
        torch.arange(width, dtype=torch.float32),
        indexing="ij",
    )
    sy, sx = yy + field[0], xx + field[1]
    # align_corners=True: -1 and 1 are the centres of the first and last pixels.
    gx, gy = 2 * sx / max(width - 1, 1) - 1, 2 * sy / max(height - 1, 1) - 1
    grid = torch.stack((gx, gy), dim=-1)[None]
    flat = x.reshape(1, -1, height, width).float()
    out = nnf.grid_sample(flat, grid, mode=mode, padding_mode=padding_mode, align_corners=True)
    if padding_mode == "zeros" and fill != 0:
        outside = (sy < -0.5) | (sy > height - 0.5) | (sx < -0.5) | (sx > width - 0.5)
        out[:, :, outside] = fill
    out = out.reshape(*lead, height, width)
    if x.dtype.is_floating_point:
        return out.to(x.dtype)
    info = torch.iinfo(x.dtype)
    return out.round().clamp(info.min, info.max).to(x.dtype)


class ElasticDeformation(v2.Transform):
    """U-Net's elastic deformation as a ``torchvision.transforms.v2`` transform.

    One displacement field (:func:`displacement_field`) per call warps the image and every mask
    alike. Outside the picture the image and masks are mirrored (``padding_mode="reflection"``,
    matching the mirrored borders of U-Net's overlap-tile input); with ``"zeros"`` the image
    gets 0, a semantic mask ``(H, W)`` ``ignore_index`` and instance masks ``(N, H, W)`` 0.
    Boxes cannot follow a non-linear warp: transforming ``BoundingBoxes`` raises a TypeError
    (:class:`~denseseg.data.transforms.SegmentationTransforms` rebuilds them from the warped
    instance masks instead).

    Args:
        sigma: Displacement standard deviation in pixels (10, the paper's).
        grid: Control points per side (3, the paper's).
        p: Probability of deforming a sample (1.0: every sample).
        interpolation: Image sampling, ``"bilinear"`` or ``"bicubic"``.
        padding_mode: ``"reflection"``, ``"border"`` or ``"zeros"``.
        ignore_index: Label of semantic-mask pixels taken from outside with ``"zeros"``.
    """

    def __init__(
        self,
        sigma: float = 10.0,
        grid: int = 3,
        p: float = 1.0,
        interpolation: str = "bilinear",
        padding_mode: str = "reflection",
        ignore_index: int = 255,
    ) -> None:
        super().__init__()
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or sigma < 0:
            raise ConfigError(f"elastic sigma must be a number >= 0 (pixels), got {sigma!r}")
        if isinstance(grid, bool) or not isinstance(grid, int) or grid < 2:
            raise ConfigError(f"elastic grid must be an integer >= 2, got {grid!r}")
        if not 0.0 <= p <= 1.0:
            raise ConfigError(f"elastic p must be in [0, 1], got {p!r}")
        if interpolation not in _INTERPOLATIONS:
            raise ConfigError(
                f"elastic interpolation {interpolation!r}: use {' or '.join(_INTERPOLATIONS)}"
            )
        if padding_mode not in _PADDING_MODES:
            raise ConfigError(
                f"elastic padding_mode {padding_mode!r}: use one of {', '.join(_PADDING_MODES)}"
            )
        self.sigma, self.grid, self.p = float(sigma), grid, float(p)
        self.interpolation, self.padding_mode = interpolation, padding_mode
        self.ignore_index = ignore_index

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        if self.p < 1.0 and float(torch.rand(())) >= self.p:
            return {"field": None}
        height, width = v2.query_size(flat_inputs)
        return {"field": displacement_field(height, width, self.sigma, self.grid)}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        field = params["field"]
        if isinstance(inpt, tv_tensors.BoundingBoxes):
            raise TypeError(
                "ElasticDeformation cannot move boxes; warp the instance masks and rebuild the "
                "boxes from them (SegmentationTransforms does)"
            )
        if field is None:
            return inpt
        plain = inpt.as_subclass(torch.Tensor)
        if isinstance(inpt, tv_tensors.Mask):
            fill = self.ignore_index if inpt.ndim == 2 else 0
            out = warp(plain, field, "nearest", self.padding_mode, fill)
        else:
            out = warp(plain, field, self.interpolation, self.padding_mode, 0.0)
        return tv_tensors.wrap(out, like=inpt) if isinstance(inpt, tv_tensors.TVTensor) else out
