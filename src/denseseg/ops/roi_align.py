"""RoIAlign in pure PyTorch, with average or max pooling inside each bin.

Mask R-CNN (He et al., ICCV 2017, section 3 and Table 2c) samples each RoI bin at regularly
spaced points with bilinear interpolation instead of quantising the RoI and its bins as RoIPool
does, and pools the samples by average ("RoIAlign avg", the default everywhere) or by maximum
("RoIAlign max"). torchvision ships only the average; this module provides both, plus the
paper's "RoIWarp" (the RoI is first rounded to the feature grid, then sampled bilinearly).

Sampling follows torchvision's CPU kernel exactly, so ``mode="avg"`` reproduces
``torchvision.ops.roi_align``:

* RoI corners are ``box * spatial_scale`` (minus 0.5 when ``aligned``); without ``aligned`` the
  RoI's width and height are clamped to at least 1.
* Each of the ``PH x PW`` bins holds a ``gh x gw`` grid of samples, ``gh = sampling_ratio`` if it
  is positive and ``ceil(roi_h / PH)`` otherwise (likewise ``gw``); the grid may differ per RoI.
* A sample with ``y < -1`` or ``y > H`` (likewise x) reads zero; one in ``[-1, 0]`` reads row 0
  and one beyond the last row reads the last row. It still counts in the average.
* ``avg`` divides the bin's sum by ``gh * gw``; ``max`` takes the largest sample, as mmcv's and
  Detectron's RoIAlign max pooling do, and passes its gradient to a single maximal sample (on
  ties, the first one on CPU). A bin without samples (only possible with ``aligned`` and an RoI
  of non-positive size) is zero.

The op is vectorised over every RoI, bin and sample at once. Samples of RoIs with different grid
sizes are laid out back to back rather than padded to the largest grid, so one huge RoI does not
inflate the work of the others; ``torch.nn.functional.embedding_bag`` then gathers the four
bilinear corners from a channels-last view of the features and sums them with their weights,
which never materialises a ``(samples, C)`` tensor for the average. Gradients flow to the
features and to the box coordinates through ordinary autograd.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from denseseg.errors import ConfigError

ROI_ALIGN_MODES = ("avg", "max")


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        pair = (size, size)
    else:
        pair = tuple(int(s) for s in size)
        if len(pair) == 1:
            pair = (pair[0], pair[0])
    if len(pair) != 2 or min(pair) < 1:
        raise ValueError(f"roi_align: output_size must be a positive int or (h, w), got {size}")
    return pair  # type: ignore[return-value]


def boxes_to_rois(boxes: Tensor | Sequence[Tensor], like: Tensor) -> Tensor:
    """Put boxes into the ``(K, 5)`` ``[batch_index, x1, y1, x2, y2]`` layout.

    Args:
        boxes: ``(K, 5)`` tensor already in that layout, or a list with one ``(K_i, 4)`` tensor of
            ``(x1, y1, x2, y2)`` boxes per image of the batch.
        like: the feature tensor; the result takes its dtype and must share its device.

    Returns:
        RoIs ``(K, 5)`` in the dtype of ``like``.
    """
    if isinstance(boxes, Tensor):
        if boxes.dim() != 2 or boxes.shape[1] != 5:
            raise ValueError(
                f"roi_align: a boxes tensor must be (K, 5) [batch, x1, y1, x2, y2], "
                f"got {tuple(boxes.shape)}"
            )
        rois = boxes
    else:
        parts = []
        for i, b in enumerate(boxes):
            if b.dim() != 2 or b.shape[1] != 4:
                raise ValueError(
                    f"roi_align: boxes[{i}] must be (K_i, 4) [x1, y1, x2, y2], got {tuple(b.shape)}"
                )
            b = b.to(like.dtype)
            parts.append(torch.cat([torch.full_like(b[:, :1], i), b], dim=1))
        if not parts:
            return like.new_zeros((0, 5))
        rois = torch.cat(parts, dim=0)
    if rois.device != like.device:
        raise ValueError(
            f"roi_align: boxes are on {rois.device} but the features are on {like.device}"
        )
    return rois.to(like.dtype)


def _round_half_away(v: Tensor) -> Tensor:
    # C's round(), as torchvision's roi_pool uses; torch.round would send halves to even.
    return torch.sign(v) * torch.floor(v.abs() + 0.5)


def _grid_size(bin_size: Tensor, sampling_ratio: int) -> Tensor:
    if sampling_ratio > 0:
        return torch.full(bin_size.shape, sampling_ratio, dtype=torch.long, device=bin_size.device)
    # Non-positive or NaN bins give an empty grid, as the C++ loops simply do not run.
    grid = torch.nan_to_num(torch.ceil(bin_size.detach()), nan=0.0)
    return grid.clamp_min(0).long()


def _sample_points(
    rois: Tensor,
    pooled: tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
    quantize: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Every sampling point of every bin, laid out bin after bin.

    Returns:
        ``(y, x, sample_bin, bin_start, roi_of_sample, samples_per_roi)``: sample coordinates
        ``(N,)`` on the feature grid, the bin ``(N,)`` (in ``0..K*PH*PW``) each sample belongs
        to, the index of each bin's first sample ``(K*PH*PW,)``, the RoI of each sample ``(N,)``
        and the grid size ``gh * gw`` of each RoI ``(K,)``.
    """
    ph_n, pw_n = pooled
    dtype, device = rois.dtype, rois.device
    coords = rois[:, 1:] * spatial_scale
    if quantize:
        coords = _round_half_away(coords)
    if aligned:
        coords = coords - 0.5
    x1, y1, x2, y2 = coords.unbind(dim=1)
    roi_w, roi_h = x2 - x1, y2 - y1
    if not aligned:
        roi_w, roi_h = roi_w.clamp_min(1.0), roi_h.clamp_min(1.0)
    bin_h, bin_w = roi_h / ph_n, roi_w / pw_n
    grid_h, grid_w = _grid_size(bin_h, sampling_ratio), _grid_size(bin_w, sampling_ratio)

    per_roi = grid_h * grid_w
    bins_per_roi = ph_n * pw_n
    per_bin = per_roi.repeat_interleave(bins_per_roi)
    total = int(per_bin.sum())
    bin_start = per_bin.cumsum(0) - per_bin
    sample_bin = torch.repeat_interleave(
        torch.arange(per_bin.numel(), device=device), per_bin, output_size=total
    )
    j = torch.arange(total, device=device) - bin_start[sample_bin]
    roi = sample_bin // bins_per_roi
    ph = ((sample_bin // pw_n) % ph_n).to(dtype)
    pw = (sample_bin % pw_n).to(dtype)
    gw = grid_w[roi]
    iy = j // gw
    ix = j - iy * gw
    # Same operation order as torchvision's kernel, so float32 results agree to the last bits.
    y = y1[roi] + ph * bin_h[roi] + (iy.to(dtype) + 0.5) * bin_h[roi] / grid_h[roi].to(dtype)
    x = x1[roi] + pw * bin_w[roi] + (ix.to(dtype) + 0.5) * bin_w[roi] / gw.to(dtype)
    return y, x, sample_bin, bin_start, roi, per_roi


def _axis_corners(v: Tensor, size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Low and high neighbour and the fraction towards the high one, on one axis."""
    v = v.clamp_min(0.0)
    low = v.detach().floor().long()
    at_end = low >= size - 1
    low = low.clamp_max(size - 1)
    high = torch.where(at_end, low, low + 1)
    frac = torch.where(at_end, torch.zeros_like(v), v - low.to(v.dtype))
    return low, high, frac


def _bilinear_taps(
    y: Tensor, x: Tensor, batch: Tensor, height: int, width: int
) -> tuple[Tensor, Tensor]:
    """Rows of the ``(B*H*W, C)`` feature table and weights of the four bilinear corners.

    Returns:
        ``(index, weight)``, both ``(N, 4)``; samples outside ``[-1, H] x [-1, W]`` get weight 0.
    """
    # Written as "inside" so that NaN coordinates, failing every comparison, read zero.
    inside = (y >= -1.0) & (y <= height) & (x >= -1.0) & (x <= width)
    y = torch.where(inside, y, torch.zeros_like(y))
    x = torch.where(inside, x, torch.zeros_like(x))
    y_lo, y_hi, ly = _axis_corners(y, height)
    x_lo, x_hi, lx = _axis_corners(x, width)
    hy, hx = 1.0 - ly, 1.0 - lx
    weight = torch.stack([hy * hx, hy * lx, ly * hx, ly * lx], dim=1)
    weight = weight * inside.unsqueeze(1).to(weight.dtype)
    base = batch * (height * width)
    index = torch.stack(
        [
            base + y_lo * width + x_lo,
            base + y_lo * width + x_hi,
            base + y_hi * width + x_lo,
            base + y_hi * width + x_hi,
        ],
        dim=1,
    )
    return index, weight


def _segment_max(samples: Tensor, segment: Tensor, num_segments: int) -> Tensor:
    """Per-segment maximum of ``samples`` ``(N, C)`` whose rows carry sorted segment ids ``(N,)``.

    The winner is picked without autograd and then gathered, so the backward pass scatters each
    gradient onto one sample (the first maximum, as ``Tensor.max(dim)`` and mmcv's kernel do)
    instead of differentiating a scatter-reduce, which compares and counts ties over all ``N``
    samples again. Empty segments give 0.

    Returns:
        ``(num_segments, C)``.
    """
    total, channels = samples.shape
    if total == 0:
        return samples.new_zeros((num_segments, channels))
    seg = segment.unsqueeze(1).expand(-1, channels)
    with torch.no_grad():
        best = samples.new_zeros((num_segments, channels)).scatter_reduce(
            0, seg, samples, reduce="amax", include_self=False
        )
        # NaN wins too, so it propagates as it would through max().
        hit = (samples == best.gather(0, seg)) | samples.isnan()
        row = torch.arange(total, device=samples.device).unsqueeze(1)
        first = torch.full((num_segments, channels), total, device=samples.device).scatter_reduce(
            0, seg, torch.where(hit, row, total), reduce="amin"
        )
    found = first < total
    picked = samples.gather(0, first.clamp_max(total - 1))
    return torch.where(found, picked, torch.zeros_like(picked))


def roi_align(
    input: Tensor,
    boxes: Tensor | Sequence[Tensor],
    output_size: int | Sequence[int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
    mode: str = "avg",
    quantize: bool = False,
) -> Tensor:
    """RoIAlign (Mask R-CNN) with average or max pooling of the bilinear samples in each bin.

    With ``mode="avg"`` this equals ``torchvision.ops.roi_align``; ``mode="max"`` is the paper's
    "RoIAlign max"; ``quantize=True`` with ``mode="max"`` is its "RoIWarp".

    Args:
        input: features ``(B, C, H, W)``, float32 or float64, on any device.
        boxes: ``(K, 5)`` tensor of ``[batch_index, x1, y1, x2, y2]`` or a list of ``B`` tensors
            ``(K_i, 4)`` of ``[x1, y1, x2, y2]``, in image coordinates (before
            ``spatial_scale``), on the device of ``input``.
        output_size: bins per RoI, ``PH`` or ``(PH, PW)``.
        spatial_scale: factor from image to feature coordinates (1/stride).
        sampling_ratio: samples per bin along each axis; ``<= 0`` picks
            ``ceil(roi_size / bins)`` per RoI, as torchvision does.
        aligned: shift the RoI by -0.5 pixel (Detectron2's pixel model) and do not clamp its size.
        mode: ``"avg"`` or ``"max"`` over the samples of a bin.
        quantize: round the scaled RoI corners to the feature grid (C ``round``) before binning.

    Returns:
        Pooled features ``(K, C, PH, PW)``.
    """
    if mode not in ROI_ALIGN_MODES:
        raise ConfigError(f"roi_align: unknown mode {mode!r}; choose one of {ROI_ALIGN_MODES}")
    if input.dim() != 4:
        raise ValueError(f"roi_align: input must be (B, C, H, W), got {tuple(input.shape)}")
    if not input.is_floating_point():
        raise ValueError(f"roi_align: input must be floating point, got {input.dtype}")
    pooled = _pair(output_size)
    rois = boxes_to_rois(boxes, input)
    batch_size, channels, height, width = input.shape
    num_rois = rois.shape[0]
    num_bins = num_rois * pooled[0] * pooled[1]
    if num_rois == 0 and height > 0 and width > 0:
        # An empty slice of the input rather than new zeros keeps the (empty) output in the graph,
        # so the features get a zero gradient, not None, as with torchvision's op.
        return input[:0, :, :1, :1].expand(0, channels, *pooled).clone()
    if num_rois == 0 or channels == 0:
        return input.new_zeros((num_rois, channels, *pooled))

    y, x, sample_bin, bin_start, roi, per_roi = _sample_points(
        rois, pooled, spatial_scale, sampling_ratio, aligned, quantize
    )
    batch = rois[:, 0].detach().long()[roi]
    index, weight = _bilinear_taps(y, x, batch, height, width)
    table = input.permute(0, 2, 3, 1).reshape(batch_size * height * width, channels)

    if mode == "avg":
        count = per_roi.clamp_min(1).to(weight.dtype)[roi]
        pooled_flat = F.embedding_bag(
            index.reshape(-1),
            table,
            bin_start * 4,
            mode="sum",
            per_sample_weights=(weight / count.unsqueeze(1)).reshape(-1),
        )
    else:
        samples = F.embedding_bag(index, table, mode="sum", per_sample_weights=weight)
        if sampling_ratio > 0:
            grid = samples.view(num_bins, sampling_ratio**2, channels)
            pooled_flat = grid.max(dim=1).values
        else:
            pooled_flat = _segment_max(samples, sample_bin, num_bins)
    out = pooled_flat.view(num_rois, pooled[0], pooled[1], channels)
    return out.permute(0, 3, 1, 2).contiguous()


class RoIAlign(nn.Module):
    """Module form of :func:`roi_align`; ``forward(input, boxes)`` gives ``(K, C, PH, PW)``.

    Args:
        output_size: bins per RoI, ``PH`` or ``(PH, PW)``.
        spatial_scale: factor from image to feature coordinates.
        sampling_ratio: samples per bin and axis; ``<= 0`` is adaptive.
        aligned: shift RoIs by -0.5 pixel.
        mode: ``"avg"`` or ``"max"``.
        quantize: round RoIs to the feature grid first (RoIWarp with ``mode="max"``).
    """

    def __init__(
        self,
        output_size: int | Sequence[int],
        spatial_scale: float,
        sampling_ratio: int,
        aligned: bool = False,
        mode: str = "avg",
        quantize: bool = False,
    ) -> None:
        super().__init__()
        if mode not in ROI_ALIGN_MODES:
            raise ConfigError(f"RoIAlign: unknown mode {mode!r}; choose one of {ROI_ALIGN_MODES}")
        self.output_size = _pair(output_size)
        self.spatial_scale = spatial_scale
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned
        self.mode = mode
        self.quantize = quantize

    def forward(self, input: Tensor, boxes: Tensor | Sequence[Tensor]) -> Tensor:
        """Pool ``boxes`` from ``input`` ``(B, C, H, W)``; see :func:`roi_align`."""
        return roi_align(
            input,
            boxes,
            self.output_size,
            self.spatial_scale,
            self.sampling_ratio,
            self.aligned,
            self.mode,
            self.quantize,
        )

    def extra_repr(self) -> str:
        return (
            f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
            f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned}, mode={self.mode!r}, "
            f"quantize={self.quantize}"
        )
