"""Sliding windows (mmsegmentation's ``slide`` test mode) and the row strips that let a
:class:`~denseseg.inference.segmenter.Segmenter` segment an image of any size in bounded memory.

Windows of ``crop`` pixels start every ``stride`` pixels along each axis, the last one aligned to
the image's end (as mmsegmentation's ``slide_inference``); along an axis shorter than the crop the
window is the whole side, so an image no larger than the crop is one window: the whole-image
result. Each pixel's logits are the weighted mean of the windows covering it, with uniform
weights or Gaussian weights falling off toward each window's border (``sigma = crop / 8``, as
nnU-Net), which damps the border artefacts of a network that sees only part of the scene.

:func:`slide_strips` produces the result row strip by row strip: windows are taken one row of
windows at a time, and the rows no later window touches are divided by their weight and handed
out at once. Only one strip of accumulated logits ``(N, K, crop_h, W)`` is ever alive, so a
caller that arg-maxes each strip (:meth:`Segmenter.predict_large`) never holds logits for the
whole image. :func:`tile_rows` does the same for overlap-tile inference of valid-padding networks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from numbers import Integral
from typing import Any

import numpy as np
import torch
from torch import Tensor

from denseseg.errors import ConfigError

__all__ = [
    "WEIGHTINGS",
    "ImageRows",
    "StreamedRows",
    "check_window",
    "gaussian_weights",
    "reflect_index",
    "slide_strips",
    "tile_rows",
    "window_starts",
]

WEIGHTINGS = ("uniform", "gaussian")

# A strip is handed out in blocks of about this many bytes of logits, so that the temporary
# tensors of the caller (division, softmax, arg-max) stay small next to the accumulator.
_BLOCK_BYTES = 1 << 21


def _block_rows(logits_per_row: int) -> int:
    return max(1, _BLOCK_BYTES // max(1, 4 * logits_per_row))


Fetch = Callable[[int, int, int, int], Tensor]
"""``fetch(top, left, height, width)`` -> the normalised window ``(N, C, height, width)``."""
Forward = Callable[[Tensor], Tensor]
"""``forward(x (B, C, h, w))`` -> logits ``(B, K, h, w)``, float32."""


def _pair(value: Any, name: str) -> tuple[int, int]:
    """``value`` (an int, or one or two ints in a list or tuple) as ``(height, width)``."""
    sides = [value] if isinstance(value, Integral) else value
    ok = isinstance(sides, list | tuple) and len(sides) in (1, 2)
    ok = ok and all(isinstance(s, Integral) and not isinstance(s, bool) and s >= 1 for s in sides)
    if not ok:
        raise ConfigError(
            f"{name}={value!r} must be an integer or (height, width), each at least 1"
        )
    return (int(sides[0]), int(sides[-1]))


def check_window(
    crop_size: int | Sequence[int] | None, stride: int | Sequence[int] | None
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Validate the sliding window; returns ``(crop, stride)`` as ``(height, width)`` pairs.

    Args:
        crop_size: the window side, an int or ``(height, width)`` (list or tuple).
        stride: the step between windows, likewise; ``None`` for two thirds of the window
            (rounded), the overlap of mmsegmentation's Cityscapes recipes (769 / 513).

    Raises:
        ConfigError: a missing window, a side below 1, or a stride larger than the window
            (which would leave pixels no window covers).
    """
    if crop_size is None:
        raise ConfigError(
            "mode='slide' needs crop_size, the window side (e.g. crop_size=512 or (512, 1024); "
            "--crop-size on the command line)"
        )
    crop = _pair(crop_size, "crop_size")
    if stride is None:
        return crop, (max(1, round(crop[0] * 2 / 3)), max(1, round(crop[1] * 2 / 3)))
    step = _pair(stride, "stride")
    if step[0] > crop[0] or step[1] > crop[1]:
        raise ConfigError(
            f"stride={stride!r} is larger than crop_size={crop_size!r}: pixels between the "
            "windows would not be segmented; use a stride of at most the crop size"
        )
    return crop, step


def window_starts(size: int, crop: int, stride: int) -> list[int]:
    """Starts of the windows along one axis of ``size`` pixels (``crop <= size``).

    As mmsegmentation: ``ceil((size - crop) / stride) + 1`` windows at ``0, stride, ...``, the
    last one moved back to end at the image's end.
    """
    count = max(size - crop + stride - 1, 0) // stride + 1
    return [min(i * stride, size - crop) for i in range(count)]


def gaussian_weights(height: int, width: int) -> Tensor:
    """nnU-Net's importance map for a window: a Gaussian centred on the window.

    ``exp(-d^2 / (2 sigma^2))`` per axis with ``sigma = side / 8``, centred at ``(side - 1) / 2``
    so that the map is exactly symmetric (mirrored windows weigh the same), scaled to peak 1.
    At a window's border it is about ``exp(-8)`` of the peak (``exp(-16)`` in the corners):
    small, never zero, so every pixel of the image has weight.

    Returns:
        Weights ``(height, width)``, float32.
    """

    return (_gaussian_axis(height)[:, None] * _gaussian_axis(width)[None, :]).float()


def _gaussian_axis(n: int) -> Tensor:
    d = torch.arange(n, dtype=torch.float64) - (n - 1) / 2
    g = torch.exp(-(d**2) / (2 * (n / 8) ** 2))
    return g / g.max()


def _weight_sum(size: int, side: int, starts: Sequence[int], gaussian: bool) -> Tensor:
    """Along one axis, the sum of the window weights over the windows covering each pixel.

    The windows form a grid and their weights are products of one weight per axis, so the
    weight sum of a pixel is the product of the two axes' sums: no image-sized sum is kept.
    """
    axis = _gaussian_axis(side) if gaussian else torch.ones(side, dtype=torch.float64)
    total = torch.zeros(size, dtype=torch.float64)
    for start in starts:
        total[start : start + side] += axis
    return total


def slide_strips(
    fetch: Fetch,
    forward: Forward,
    size: tuple[int, int],
    crop: tuple[int, int],
    stride: tuple[int, int],
    *,
    gaussian: bool = False,
    window_batch: int = 4,
    mirror: bool = False,
) -> Iterator[tuple[int, Tensor]]:
    """Sliding-window logits of an ``(H, W)`` image, handed out top to bottom in row blocks.

    The windows of one row of windows go through ``forward`` ``window_batch`` at a time (each
    call sees ``window_batch * N`` windows of one size). After each row of windows, the rows above
    the next row's top are complete: they are divided by their weight sum and yielded, and the
    accumulator moves down. With ``mirror``, the windows are those of the mirrored image (its
    window grid, each window flipped before the model and its logits flipped back), placed in
    this image's coordinates: the result is ``flip(slide(flip(image)))`` without ever flipping the
    image, the same numbers in the same order of summation.

    Args:
        fetch: the normalised window of the image at ``(top, left, height, width)``.
        forward: the model, windows -> logits of the windows' size.
        size: the image's ``(H, W)``.
        crop: the window ``(height, width)``; shortened to a side of the image when larger.
        stride: the step ``(height, width)``.
        gaussian: Gaussian weights (:func:`gaussian_weights`) instead of uniform ones.
        window_batch: windows per forward call.
        mirror: the windows of the mirrored image (horizontal flip test-time augmentation).

    Yields:
        ``(top, logits)``: logits ``(N, K, r, W)`` float32 of image rows ``top .. top + r - 1``;
        the blocks follow each other and cover every row once. A single window is yielded as
        the model gave it, so that it equals the whole-image result exactly.
    """
    height, width = size
    ch, cw = min(crop[0], height), min(crop[1], width)
    tops, lefts = window_starts(height, ch, stride[0]), window_starts(width, cw, stride[1])
    if mirror:  # the mirrored image's grid, in this image's coordinates, in the same order
        lefts = [width - cw - left for left in lefts]
    weight = gaussian_weights(ch, cw) if gaussian else None
    row_sum = _weight_sum(height, ch, tops, gaussian)
    col_sum = _weight_sum(width, cw, lefts, gaussian)
    acc = None
    for i, top in enumerate(tops):
        for j in range(0, len(lefts), window_batch):
            group = lefts[j : j + window_batch]
            x = torch.cat([fetch(top, left, ch, cw) for left in group])
            y = forward(x.flip(-1) if mirror else x)
            y = y.flip(-1) if mirror else y
            if len(tops) == len(lefts) == 1:
                yield 0, y
                return
            if acc is None:  # the first window tells the batch size, classes and device
                n = y.shape[0] // len(group)
                acc = y.new_zeros((n, y.shape[1], ch, width))
                weight = None if weight is None else weight.to(y.device)
                col_sum = col_sum.to(y.device)
            for g, left in enumerate(group):
                part = y[g * n : (g + 1) * n]
                acc[..., left : left + cw] += part if weight is None else part * weight
        done = (tops[i + 1] if i + 1 < len(tops) else height) - top  # rows no window adds to
        step = _block_rows(acc[:, :, 0].numel())
        for r in range(0, done, step):
            rows = slice(r, min(r + step, done))
            total = row_sum[top + rows.start : top + rows.stop, None].to(acc.device) * col_sum
            yield top + r, acc[..., rows, :] / total.float()
        # Move the unfinished rows up, ``done`` rows at a time (source and target never overlap,
        # so no temporary copy of the strip); the freed rows start the next row at zero.
        for r in range(0, ch - done, done):
            n_rows = min(done, ch - done - r)
            acc[..., r : r + n_rows, :] = acc[..., r + done : r + done + n_rows, :]
        acc[..., ch - done :, :] = 0


def reflect_index(positions: Tensor, size: int) -> Tensor:
    """Indices into an axis of ``size`` pixels for positions beyond it, mirrored at its ends
    (without repeating the edge pixel, as ``F.pad(mode="reflect")`` applied as often as needed;
    one pixel is repeated). The index form of :func:`denseseg.inference.segmenter._reflect_pad`.
    """
    if size == 1:
        return torch.zeros_like(positions)
    period = 2 * (size - 1)
    p = positions.remainder(period)
    return torch.where(p < size, p, period - p)


def tile_rows(
    source: ImageRows,
    plans: tuple[Any, Any],
    prepare: Callable[[Tensor], Tensor],
    forward: Forward,
    mirror: bool = False,
) -> Iterator[tuple[int, Tensor]]:
    """Overlap-tile logits of a valid-padding network, handed out top to bottom per tile row.

    Each row of tiles is cut from the mirror-padded image, built with :func:`reflect_index` from
    the rows it needs only (never the padded image), so memory follows one tile row.

    Args:
        source: the image's rows (uint8 ``(C, H, W)``).
        plans: the :class:`~denseseg.inference.segmenter.TilePlan` of the rows and of the columns.
        prepare: uint8 ``(C, h, w)`` -> the normalised batch ``(1, C, h, w)`` on the device.
        forward: the network: a tile -> its valid output ``(1, K, tile_out_h, tile_out_w)``.
        mirror: tile the mirrored image and flip the result back.

    Yields:
        ``(top, logits)``: logits ``(1, K, r, W)`` of image rows ``top .. top + r - 1``.
    """
    rows, cols = plans
    _, height, width = source.shape
    col_index = reflect_index(torch.arange(cols.padded_size) - cols.border, width)
    if mirror:
        col_index = width - 1 - col_index
    done = 0
    for top in rows.starts:
        row_index = reflect_index(torch.arange(top, top + rows.tile_in) - rows.border, height)
        first, last = int(row_index.min()), int(row_index.max()) + 1
        source.release(first)
        strip = source.rows(first, last).index_select(-2, row_index - first)
        x = prepare(strip.index_select(-1, col_index))
        out: Tensor | None = None
        for left in cols.starts:
            y = forward(x[..., left : left + cols.tile_in])
            if out is None:
                out = y.new_empty((*y.shape[:2], rows.tile_out, cols.covered))
            out[..., left : left + cols.tile_out] = y
        assert out is not None
        out = out[..., :width]
        out = out.flip(-1) if mirror else out
        end = min(top + rows.tile_out, height)
        # Neighbouring tiles may cover a few rows twice, with equal values: hand out each once.
        step = _block_rows(out[:, :, 0].numel())
        for r in range(done, end, step):
            yield r, out[..., r - top : min(r + step, end) - top, :]
        done = end


class ImageRows:
    """An image ``(C, H, W)`` as the strip generators read it: by rows, top to bottom.

    Args:
        image: the image, uint8 (any strides: a view of an ``(H, W, C)`` array is fine).

    Attributes:
        shape: ``(C, H, W)``.
    """

    def __init__(self, image: Tensor) -> None:
        self.image = image
        self.shape = (int(image.shape[0]), int(image.shape[1]), int(image.shape[2]))

    def rows(self, start: int, stop: int) -> Tensor:
        """Rows ``start .. stop - 1`` as ``(C, stop - start, W)``: a view, valid until the
        next call (use it or copy it)."""
        return self.image[:, start:stop]

    def release(self, below: int) -> None:
        """No row below ``below`` will be asked for again (a streamed source frees them)."""


class StreamedRows(ImageRows):
    """Rows that arrive top to bottom in chunks (an image file decoded as it is read), of which
    only those not yet released are kept: an image of any height in the memory of a strip.

    Args:
        chunks: uint8 arrays ``(r, W, C)``, top to bottom.
        shape: the image's ``(C, H, W)``.
    """

    def __init__(self, chunks: Iterator[np.ndarray], shape: tuple[int, int, int]) -> None:
        self.shape = shape
        self._chunks = chunks
        self._buffer = np.empty((0, shape[2], shape[0]), dtype=np.uint8)
        # Buffer row 0 is image row _base; rows up to _hi were read, those below _lo released.
        self._base = self._lo = self._hi = 0

    def rows(self, start: int, stop: int) -> Tensor:
        if start < self._lo:
            raise ValueError(f"rows from {start} were released (kept from {self._lo})")
        while self._hi < min(stop, self.shape[1]):
            self._append(next(self._chunks))
        part = self._buffer[start - self._base : stop - self._base]
        return torch.from_numpy(part).permute(2, 0, 1)

    def release(self, below: int) -> None:
        self._lo = max(self._lo, below)

    def _append(self, chunk: np.ndarray) -> None:
        first = min(self._lo, self._hi)  # the first row still needed
        keep, count = self._hi - first, chunk.shape[0]
        if self._hi - self._base + count > len(self._buffer):
            # Move the kept rows to the front (numpy copies overlapping ranges correctly), and
            # grow the buffer only when the kept rows and the chunk do not fit.
            start = first - self._base
            if keep + count > len(self._buffer):
                grown = np.empty((2 * (keep + count), *self._buffer.shape[1:]), np.uint8)
                grown[:keep] = self._buffer[start : start + keep]
                self._buffer = grown
            else:
                self._buffer[:keep] = self._buffer[start : start + keep]
            self._base = first
        at = self._hi - self._base
        self._buffer[at : at + count] = chunk.reshape(count, *self._buffer.shape[1:])
        self._hi += count
