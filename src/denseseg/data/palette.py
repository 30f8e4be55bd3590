"""The package's one colour palette and the functions that paint label maps with it.

The default is PASCAL VOC's colour map, built by spreading the bits of the class index over the
high bits of R, G and B: index 0 is black, 1 is (128, 0, 0), 2 is (0, 128, 0), ... and index 255
(the usual ignore label) is (224, 224, 192), VOC's cream "border" colour. Palette PNGs written
with it open in any viewer with the familiar VOC colours.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = [
    "IGNORE_COLOR",
    "colorize",
    "default_palette",
    "overlay",
    "palette_to_flat",
    "parse_palette",
]

Color = tuple[int, int, int]
PaletteLike = Sequence[Sequence[int]]

IGNORE_COLOR: Color = (224, 224, 192)
"""Colour of ignored pixels (PASCAL VOC's border colour, which is also its palette entry 255)."""


def _voc_color(index: int) -> Color:
    r = g = b = 0
    c = index
    for j in range(8):
        r |= ((c >> 0) & 1) << (7 - j)
        g |= ((c >> 1) & 1) << (7 - j)
        b |= ((c >> 2) & 1) << (7 - j)
        c >>= 3
    return (r, g, b)


def default_palette(n: int = 256) -> list[Color]:
    """PASCAL VOC's bit-interleaving colour map.

    Args:
        n: Number of colours. Colours are distinct for any ``n`` up to 2**24.

    Returns:
        ``[(r, g, b), ...]`` of length ``n``; entry 0 is black, 1 is (128, 0, 0), 255 is
        (224, 224, 192).
    """
    if n < 0:
        raise ValueError(f"palette size must be >= 0, got {n}")
    return [_voc_color(i) for i in range(n)]


def parse_palette(palette: PaletteLike | Sequence[int]) -> list[Color]:
    """Normalise a palette to a list of ``(r, g, b)`` tuples.

    Args:
        palette: ``[(r, g, b), ...]`` or a flat ``[r, g, b, r, g, b, ...]`` list.

    Returns:
        ``[(r, g, b), ...]`` of ints.

    Raises:
        ValueError: An entry is not three values in ``0..255``.
    """
    items = list(palette)
    if items and not isinstance(items[0], Sequence | np.ndarray):
        if len(items) % 3:
            raise ValueError(f"a flat palette needs a multiple of 3 values, got {len(items)}")
        items = [items[i : i + 3] for i in range(0, len(items), 3)]
    colors: list[Color] = []
    for i, c in enumerate(items):
        c = [int(v) for v in c]
        if len(c) != 3 or not all(0 <= v <= 255 for v in c):
            raise ValueError(f"palette entry {i} must be 3 values in 0..255, got {c}")
        colors.append((c[0], c[1], c[2]))
    return colors


def palette_to_flat(palette: PaletteLike | Sequence[int]) -> list[int]:
    """Flatten a palette to the 768 values ``PIL.Image.putpalette`` takes.

    Entries past the end of ``palette`` are filled from :func:`default_palette`, so index 255
    still shows as the ignore colour.

    Args:
        palette: Up to 256 colours ``[(r, g, b), ...]`` (or an already flat list).

    Returns:
        ``[r0, g0, b0, r1, ...]``, 768 ints.
    """
    colors = parse_palette(palette)
    if len(colors) > 256:
        raise ValueError(f"a PNG palette holds at most 256 colours, got {len(colors)}")
    colors = colors + default_palette(256)[len(colors) :]
    return [v for c in colors for v in c]


def _mask_array(mask: torch.Tensor | np.ndarray) -> np.ndarray:
    arr = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    if arr.ndim != 2:
        raise ValueError(f"mask must be (H, W), got shape {arr.shape}")
    return arr.astype(np.int64, copy=False)


def colorize(
    mask: torch.Tensor | np.ndarray,
    palette: PaletteLike | None = None,
    ignore_index: int | None = 255,
) -> np.ndarray:
    """Paint a label map with a palette.

    Args:
        mask: Integer ``(H, W)`` tensor or array of class indices.
        palette: Colours ``[(r, g, b), ...]``, one per class; ``None`` takes
            :func:`default_palette` long enough for the mask.
        ignore_index: Label painted :data:`IGNORE_COLOR` whatever the palette; ``None`` for none.

    Returns:
        ``uint8`` array ``(H, W, 3)``.

    Raises:
        ValueError: A label (other than ``ignore_index``) is negative or has no colour.
    """
    arr = _mask_array(mask)
    ignored = arr == ignore_index if ignore_index is not None else np.zeros(arr.shape, bool)
    valid = arr[~ignored]
    top = int(valid.max()) if valid.size else -1
    if palette is None:
        palette = default_palette(top + 1)
    lut = np.asarray(parse_palette(palette), dtype=np.uint8).reshape(-1, 3)
    if valid.size and (int(valid.min()) < 0 or top >= len(lut)):
        bad = np.unique(valid[(valid < 0) | (valid >= len(lut))])
        raise ValueError(
            f"labels {bad[:10].tolist()} have no colour in a {len(lut)}-colour palette"
        )
    out = np.empty((*arr.shape, 3), dtype=np.uint8)
    out[~ignored] = lut[valid]
    out[ignored] = IGNORE_COLOR
    return out


def overlay(
    image: torch.Tensor | np.ndarray,
    mask: torch.Tensor | np.ndarray,
    palette: PaletteLike | None = None,
    alpha: float = 0.5,
    ignore_index: int | None = 255,
) -> np.ndarray:
    """Blend a coloured label map over an image.

    Args:
        image: ``uint8`` tensor ``(C, H, W)`` or array ``(H, W, 3)`` / ``(H, W)``; one channel is
            shown as gray.
        mask: Integer ``(H, W)`` label map of the same size.
        palette: As for :func:`colorize`.
        alpha: Weight of the label colour, 0 (image only) to 1 (labels only).
        ignore_index: Pixels with this label keep the image unchanged.

    Returns:
        ``uint8`` array ``(H, W, 3)``: ``round((1 - alpha) * image + alpha * colour)``.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if isinstance(image, torch.Tensor):
        img = image.detach().cpu().numpy()
        img = img.transpose(1, 2, 0) if img.ndim == 3 else img
    else:
        img = np.asarray(image)
    if img.ndim == 2:
        img = img[:, :, None]
    if img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    if img.dtype != np.uint8 or img.shape[2] != 3:
        raise ValueError(f"image must be uint8 with 1 or 3 channels, got {img.shape} {img.dtype}")
    arr = _mask_array(mask)
    if arr.shape != img.shape[:2]:
        raise ValueError(f"mask size {arr.shape} differs from image size {img.shape[:2]}")
    colors = colorize(arr, palette, ignore_index).astype(np.float32)
    blend = (1.0 - alpha) * img.astype(np.float32) + alpha * colors
    out = np.clip(np.rint(blend), 0, 255).astype(np.uint8)
    if ignore_index is not None:
        keep = arr == ignore_index
        out[keep] = img[keep]
    return out
