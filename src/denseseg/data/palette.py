"""The package's one colour palette and the functions that paint label maps with it.

The default is PASCAL VOC's colour map, built by spreading the bits of the class index over the
high bits of R, G and B: index 0 is black, 1 is (128, 0, 0), 2 is (0, 128, 0), ... and index 255
(the usual ignore label) is (224, 224, 192), VOC's cream "border" colour. Palette PNGs written
with it open in any viewer with the familiar VOC colours.

Overlays (:func:`overlay`) get a class legend from :func:`draw_legend`: the classes present, a
swatch and a name each, in the picture's bottom-left corner (the picture keeps its size);
:func:`draw_legend_band` draws the same pixels on the last rows of a picture written strip by
strip.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "IGNORE_COLOR",
    "LEGEND_MAX_ROWS",
    "LegendLayout",
    "classes_present",
    "colorize",
    "default_palette",
    "draw_legend",
    "draw_legend_band",
    "legend_layout",
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


LEGEND_MAX_ROWS = 20
"""Most rows a legend has; further classes are summed up in its last row as ``+N more``."""


@dataclass(frozen=True)
class LegendLayout:
    """Where the rows of a legend go in a picture of a given size (:func:`legend_layout`): the
    box sits in the bottom-left corner, one row (swatch and name) per class."""

    font: Any
    side: int  # swatch side = text height
    pad: int
    fit: int  # rows that fit (0: the picture is too small for a legend)
    text_offset: tuple[int, int]  # the font's (left, top) bearing of the text "Ag"

    @property
    def row(self) -> int:
        return self.side + self.pad

    def box_height(self, classes: int) -> int:
        """Rows of pixels the box of a legend of ``classes`` classes takes (0 for none)."""
        n = min(classes, self.fit)
        return self.pad + n * self.row if n else 0


def legend_layout(height: int, width: int) -> LegendLayout:
    """The legend's font (Pillow's default, sized to the picture) and rows."""
    font = _legend_font(max(10, min(24, min(height, width) // 36)))
    left, top, _, bottom = font.getbbox("Ag")
    side = bottom - top
    pad = max(2, side // 3)
    fit = min(LEGEND_MAX_ROWS, max(0, (height - pad) // (side + pad)))
    return LegendLayout(font, side, pad, fit, (left, top))


def draw_legend(
    picture: np.ndarray,
    labels: torch.Tensor | np.ndarray,
    palette: PaletteLike | None = None,
    class_names: Sequence[str] | None = None,
    ignore_index: int | None = 255,
) -> np.ndarray:
    """A copy of ``picture`` with a class legend in its bottom-left corner (the size is kept).

    For each class present in ``labels``, in index order, a swatch of its colour (the palette's,
    unblended) and its name are drawn on a darkened box with Pillow's default font, sized to
    the picture. Classes beyond :data:`LEGEND_MAX_ROWS` or the rows that fit are summed up as
    ``+N more``; a picture too small for one row is returned unchanged.

    Args:
        picture: ``uint8`` ``(H, W, 3)``, e.g. from :func:`overlay`.
        labels: Integer ``(H, W)`` label map the picture shows.
        palette: As for :func:`colorize`.
        class_names: Names by class index (``class <i>`` where missing).
        ignore_index: Label left out of the legend; ``None`` for none.

    Returns:
        ``uint8`` array ``(H, W, 3)``.
    """
    picture = np.asarray(picture)
    if picture.ndim != 3 or picture.shape[2] != 3:
        raise ValueError(f"picture must be (H, W, 3), got shape {picture.shape}")
    present = classes_present(_mask_array(labels), ignore_index)
    return draw_legend_band(picture, 0, picture.shape[0], present, palette, class_names)


def classes_present(labels: np.ndarray, ignore_index: int | None = 255) -> list[int]:
    """Sorted class indices in ``labels`` (``ignore_index`` and negative values left out)."""
    values = np.asarray(labels).ravel()
    values = values[values >= 0].astype(np.int64, copy=False)
    counts = np.bincount(values) if values.size else np.zeros(0, np.int64)
    return [int(i) for i in np.flatnonzero(counts) if i != ignore_index]


def draw_legend_band(
    band: np.ndarray,
    top: int,
    height: int,
    classes: Sequence[int],
    palette: PaletteLike | None = None,
    class_names: Sequence[str] | None = None,
) -> np.ndarray:
    """:func:`draw_legend` on the rows ``top .. top + len(band)`` of a picture of ``height``
    rows: the same pixels there as on the whole picture, for pictures written strip by strip
    (the band must hold the box's rows, :meth:`LegendLayout.box_height`, to show all of it).

    Args:
        band: ``uint8`` ``(h, W, 3)`` rows of the picture (not changed).
        top: the band's first row in the picture.
        height: the picture's height.
        classes: the class indices the legend names (those present in the whole picture).
        palette, class_names: as for :func:`draw_legend`.
    """
    out = np.array(band, dtype=np.uint8, copy=True)
    layout = legend_layout(height, out.shape[1])
    if not classes or not layout.fit:
        return out
    top_classes = max(classes) + 1
    colors = parse_palette(palette) if palette is not None else default_palette(top_classes)
    names = list(class_names or [])
    entries: list[tuple[Color | None, str]] = [
        (colors[i], names[i] if i < len(names) else f"class {i}") for i in classes
    ]
    if len(entries) > layout.fit:
        rest = len(entries) - layout.fit + 1
        entries = [*entries[: layout.fit - 1], (None, f"+{rest} more")]
    box_top = height - layout.box_height(len(entries)) - top  # in the band's rows
    return _draw_entries(out, entries, layout, box_top)


def _legend_font(size: int) -> Any:
    """Pillow's default font at ``size`` pixels (its fixed bitmap font on Pillow < 10.1)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: no size
        return ImageFont.load_default()


def _legend_text(name: object, font: Any) -> str:
    text = " ".join(str(name).split())[:32]  # one line, not too long
    if not isinstance(font, ImageFont.FreeTypeFont):  # the bitmap font draws Latin-1 only
        text = text.encode("latin-1", "replace").decode("latin-1")
    return text


def _draw_entries(
    out: np.ndarray, entries: list[tuple[Color | None, str]], layout: LegendLayout, box_top: int
) -> np.ndarray:
    """Draw ``(colour, name)`` rows in a darkened box whose first row is ``box_top`` of
    ``out`` (negative: above the band; what falls outside the band is not drawn)."""
    font, side, pad = layout.font, layout.side, layout.pad
    texts = [_legend_text(name, font) for _, name in entries]
    box_w = min(out.shape[1], int(3 * pad + side + max(font.getlength(t) for t in texts) + 1))
    rows = slice(max(0, box_top), max(0, box_top + layout.box_height(len(entries))))
    out[rows, :box_w] = (out[rows, :box_w] * 0.3).astype(np.uint8)
    img = Image.fromarray(out)
    draw = ImageDraw.Draw(img)
    left, top = layout.text_offset
    for k, ((color, _), text) in enumerate(zip(entries, texts)):
        y = box_top + pad + k * layout.row
        if color is not None:  # "+N more" has no swatch
            draw.rectangle([pad, y, pad + side - 1, y + side - 1], fill=color, outline="white")
        draw.text((2 * pad + side - left, y - top), text, fill="white", font=font)
    return np.asarray(img).copy()
