"""Images too large for whole-image inference (a 20000 x 20000 slide), file to file, in bounded
memory: the large-image path of ``denseseg predict``.

:func:`predict_large_file` streams: an 8-bit PNG is decoded as the windows need its rows
(:func:`png_rows`: Pillow unfilters a few rows at a time), the Segmenter turns each finished row
strip into labels (:meth:`Segmenter.predict_strips`), and the strip's label rows and overlay rows
are written at once (:class:`PngWriter`, a streaming PNG encoder). Neither the image nor its
labels are ever whole in memory: besides the model, one strip of logits (``K x crop_h x W``
float32, 0.3 GB for the ``camvid`` model's 11 classes at 360 rows and a width of 20000) and a
few rows of the image. Other files (JPEG, TIFF, palette or 16-bit PNG) are read whole, without
the copies ``read_image`` makes (:func:`read_large_image`), and then streamed from memory.

Pillow itself would hold a decoded RGB image at 4 bytes a pixel (1.6 GB for 20000 x 20000), and
its ``getexif`` decodes a whole PNG to look for EXIF, which is why PNG headers are read here
(:func:`_png_header`). The readers' pixel limit (``DENSESEG_MAX_PIXELS``,
:func:`denseseg.data.io.max_pixels`) applies: such an image is above the default limit, which
the user raises. ``benchmarks/large_image.py`` measures the peak memory.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

from denseseg.checkpoint import atomic_write
from denseseg.data import io as data_io
from denseseg.data.palette import (
    classes_present,
    draw_legend_band,
    legend_layout,
    overlay,
    palette_to_flat,
)
from denseseg.errors import DataError
from denseseg.inference.segmenter import Segmenter
from denseseg.inference.slide import ImageRows, StreamedRows

__all__ = [
    "LARGE_IMAGE_PIXELS",
    "PngWriter",
    "is_large",
    "png_rows",
    "predict_large_file",
    "read_large_image",
    "write_png_rows",
]

LARGE_IMAGE_PIXELS = 2048 * 2048
"""Images with more pixels than this are streamed by ``denseseg predict`` when the Segmenter can
(:meth:`Segmenter.streams`); below it the batched path is faster and its memory is no concern."""

_CHUNK_BYTES = 1 << 20  # rows per chunk decoded, blended or encoded: about 1 MB of pixels


def is_large(path: Path, limit: int | None = None) -> bool:
    """Whether the image file ``path`` has more than ``limit`` pixels (read from its header;
    default :data:`LARGE_IMAGE_PIXELS`).

    Raises:
        DataError: the file is missing, unreadable, or above the reader's pixel limit.
    """
    height, width = _checked_size(path)
    return height * width > (LARGE_IMAGE_PIXELS if limit is None else limit)


def _rows_per_chunk(width: int, channels: int) -> int:
    return max(1, _CHUNK_BYTES // max(1, width * channels))


def read_large_image(path: Path) -> Tensor:
    """Read an image as :func:`denseseg.data.io.read_image` does, in less memory.

    ``read_image`` holds Pillow's decoded image, a bytes copy of it, an array and its transposed
    copy at once (about 11 bytes a pixel for RGB, 3.7 times the image). Here an RGB or 8-bit gray
    file is copied out of Pillow's buffer in row chunks into one ``(H, W, C)`` array, returned as
    a ``(C, H, W)`` view of it (7 bytes a pixel at the peak, 3 after). Other modes (palette,
    16-bit, CMYK, ...) go through ``read_image``.

    Returns:
        uint8 ``(C, H, W)`` (C = 1 or 3), a possibly non-contiguous view.

    Raises:
        DataError: as ``read_image``: missing, corrupt, or above the pixel limit.
    """
    _checked_size(path)  # the pixel limit, before anything is decoded
    try:
        with Image.open(path) as img:  # the header only
            mode = img.mode
        if mode not in ("RGB", "L"):
            return data_io.read_image(path)
        with Image.open(path) as img:
            img.load()
            ImageOps.exif_transpose(img, in_place=True)
            width, height = img.size
            channels = 3 if img.mode == "RGB" else 1
            arr = np.empty((height, width, channels), dtype=np.uint8)
            step = _rows_per_chunk(width, 4)
            for top in range(0, height, step):
                part = np.asarray(img.crop((0, top, width, min(top + step, height))))
                arr[top : top + part.shape[0]] = part.reshape(part.shape[0], width, channels)
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error) as exc:
        raise DataError(
            f"image {data_io.show_path(path)} is truncated or corrupt ({exc}); re-export it"
        ) from exc
    return torch.from_numpy(arr).permute(2, 0, 1)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(data, zlib.crc32(kind)) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


# PNG colour types read row by row (8 bits a sample, not interlaced): channels in the file.
_PNG_CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}  # gray, RGB, gray + alpha, RGB + alpha


@dataclass(frozen=True)
class _PngHeader:
    height: int
    width: int
    depth: int
    color: int
    interlace: int
    orientation: int  # EXIF orientation from an eXIf chunk, 1 without one


def _png_header(path: Path) -> _PngHeader | None:
    """The IHDR of a PNG file and the EXIF orientation of its eXIf chunk, from the chunk
    headers alone (Pillow's ``getexif`` decodes a whole PNG to look for EXIF); None for files
    that are no PNG or whose chunks cannot be walked (the whole reader then says why)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(33)
            if len(head) < 33 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
                return None
            width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", head[16:29])
            orientation = 1
            fh.seek(33)
            while len(chunk := fh.read(8)) == 8 and chunk[4:] != b"IEND":
                length = struct.unpack(">I", chunk[:4])[0]
                if chunk[4:] == b"eXIf":
                    exif = Image.Exif()
                    exif.load(fh.read(length))
                    orientation = int(exif.get(0x0112, 1))
                    length = 0
                fh.seek(length + 4, os.SEEK_CUR)
    except (OSError, SyntaxError, ValueError, struct.error):
        return None
    return _PngHeader(height, width, depth, color, interlace, orientation)


def _checked_size(path: Path) -> tuple[int, int]:
    """``(height, width)`` of an image file as read (after EXIF rotation), refused above the
    readers' pixel limit (:func:`denseseg.data.io.max_pixels`) before anything is decoded.

    Raises:
        DataError: missing, unreadable, or over the limit.
    """
    png = _png_header(path)
    if png is None:
        info = data_io.image_info(path)
        return info.height, info.width
    transposed = png.orientation in (5, 6, 7, 8)
    height, width = (png.width, png.height) if transposed else (png.height, png.width)
    limit, pixels = data_io.max_pixels(), png.width * png.height
    if pixels > limit:  # the words of data.io's own refusal
        raise DataError(
            f"image {data_io.show_path(path)} claims {png.width}x{png.height} = {pixels:,} "
            f"pixels, over the limit of {limit:,} (a guard against decompression bombs); if the "
            f"file is genuine, raise the limit with the environment variable "
            f"{data_io.MAX_PIXELS_ENV}={pixels}"
        )
    return height, width


def _idat_pieces(path: Path) -> Iterator[bytes]:
    """The compressed bytes of a PNG's IDAT chunks, in pieces of at most 1 MB."""
    with open(path, "rb") as fh:
        fh.seek(8)
        while True:
            head = fh.read(8)
            if len(head) < 8:
                raise EOFError("the file ends before its IEND chunk")
            length, kind = struct.unpack(">I", head[:4])[0], head[4:]
            if kind == b"IEND":
                return
            if kind != b"IDAT":
                fh.seek(length + 4, os.SEEK_CUR)  # the chunk and its CRC
                continue
            while length:
                piece = fh.read(min(length, 1 << 20))
                if not piece:
                    raise EOFError("the file ends inside an IDAT chunk")
                length -= len(piece)
                yield piece
            fh.seek(4, os.SEEK_CUR)


def _png_scanlines(path: Path, line: int) -> Iterator[bytes]:
    """The PNG's filtered scanlines (filter byte + samples, ``line`` bytes each), inflated as
    the file is read, in bunches of whole lines of a few MB (never the whole image)."""
    inflate, pending = zlib.decompressobj(), bytearray()
    target = max(line, _CHUNK_BYTES)
    for piece in _idat_pieces(path):
        data = inflate.decompress(piece, target)
        while True:
            pending += data
            if len(pending) >= target:
                whole = len(pending) // line * line
                yield bytes(pending[:whole])
                del pending[:whole]
            if not inflate.unconsumed_tail:
                break
            data = inflate.decompress(inflate.unconsumed_tail, target)
    pending += inflate.flush()
    whole = len(pending) // line * line
    if whole:
        yield bytes(pending[:whole])


def png_rows(path: Path) -> StreamedRows | None:
    """An 8-bit PNG's pixels as :class:`~denseseg.inference.slide.StreamedRows`, decoded chunk by
    chunk as they are asked for: the image is never whole in memory.

    The file's deflate stream is inflated as it is read; each chunk of scanlines is unfiltered by
    Pillow itself (it decodes a small PNG of these scanlines, led by the previous chunk's last
    row, which the filters refer to), so the pixels are exactly Pillow's. Alpha is dropped, as
    :func:`denseseg.data.io.read_image` drops it.

    Returns:
        The rows, ``(C, H, W)`` with C = 1 or 3; None when the file is no PNG this reads (16-bit,
        palette, interlaced, rotated by EXIF): read it whole (:func:`read_large_image`).

    Raises:
        DataError: above the pixel limit (checked first, from the header).
    """
    _checked_size(path)  # the pixel limit
    header = _png_header(path)
    if (
        header is None
        or header.depth != 8
        or header.color not in _PNG_CHANNELS
        or header.interlace != 0
        or header.orientation != 1
    ):
        return None
    height, width, color = header.height, header.width, header.color
    samples = _PNG_CHANNELS[color]
    channels = 1 if color in (0, 4) else 3

    def chunks() -> Iterator[np.ndarray]:
        line, previous, done = 1 + width * samples, None, 0
        try:
            for block in _png_scanlines(path, line):
                count = min(len(block) // line, height - done)
                if count <= 0:
                    break
                rows = _unfilter(block[: count * line], previous, (count, width), color)
                previous, done = rows[-1], done + count
                yield np.ascontiguousarray(rows[..., :channels])
        except (OSError, EOFError, zlib.error, ValueError, struct.error) as exc:
            raise DataError(
                f"image {data_io.show_path(path)} is truncated or corrupt ({exc}); re-export it"
            ) from exc
        if done < height:
            raise DataError(
                f"image {data_io.show_path(path)} is truncated ({done} of {height} rows); "
                "re-export it"
            )

    return StreamedRows(chunks(), (channels, height, width))


def _unfilter(
    lines: bytes, previous: np.ndarray | None, size: tuple[int, int], color: int
) -> np.ndarray:
    """Filtered scanlines -> pixels ``(rows, W, samples)``, by Pillow's PNG decoder."""
    count, width = size
    samples = _PNG_CHANNELS[color]
    if previous is not None:  # the row the first line's filter refers to, stored unfiltered
        lines = b"\x00" + previous.tobytes() + lines
        count += 1
    png = (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, count, 8, color, 0, 0, 0))
        + _png_chunk(b"IDAT", zlib.compress(lines, 0))
        + _png_chunk(b"IEND", b"")
    )
    with Image.open(io.BytesIO(png)) as img:
        arr = np.asarray(img).reshape(count, width, samples)
    return arr[1:] if previous is not None else arr


class PngWriter:
    """An 8-bit PNG written row chunk by row chunk, never holding the whole image.

    Rows are filtered with PNG's ``Sub`` filter (each byte minus the one a pixel to its left)
    and deflated as they come.

    Args:
        fh: the binary file to write to.
        size: the image's ``(height, width)``.
        channels: 1 (gray, or palette indices with ``palette``) or 3 (RGB).
        palette: colours of a palette PNG (indices readable by
            :func:`denseseg.data.io.read_mask`, shown in colour).
        level: zlib compression level.
    """

    def __init__(
        self,
        fh: BinaryIO,
        size: tuple[int, int],
        channels: int,
        palette: Sequence[Sequence[int]] | None = None,
        level: int = 6,
    ) -> None:
        self.fh, self.size, self.channels = fh, size, channels
        self.done = 0
        self._packer = zlib.compressobj(level)
        color = 2 if channels == 3 else (3 if palette is not None else 0)
        fh.write(b"\x89PNG\r\n\x1a\n")
        fh.write(_png_chunk(b"IHDR", struct.pack(">IIBBBBB", size[1], size[0], 8, color, 0, 0, 0)))
        if palette is not None:
            fh.write(_png_chunk(b"PLTE", bytes(palette_to_flat(palette))))

    def write(self, chunk: np.ndarray) -> None:
        """Append rows: uint8 ``(r, W)`` for one channel, ``(r, W, 3)`` for RGB."""
        width, bpp = self.size[1], self.channels
        if chunk.dtype != np.uint8 or chunk.size != chunk.shape[0] * width * bpp:
            raise ValueError(f"PNG rows must be uint8 (r, {width}, {bpp}), got {chunk.shape}")
        flat = chunk.reshape(chunk.shape[0], width * bpp)
        filtered = np.empty((flat.shape[0], flat.shape[1] + 1), dtype=np.uint8)
        filtered[:, 0] = 1  # filter type Sub
        filtered[:, 1 : 1 + bpp] = flat[:, :bpp]
        np.subtract(flat[:, bpp:], flat[:, :-bpp], out=filtered[:, 1 + bpp :])
        data = self._packer.compress(filtered.tobytes())
        if data:
            self.fh.write(_png_chunk(b"IDAT", data))
        self.done += flat.shape[0]

    def close(self) -> None:
        """End the file; it must have received every row."""
        if self.done != self.size[0]:
            raise ValueError(f"PNG of {self.size[0]} rows got {self.done}")
        self.fh.write(_png_chunk(b"IDAT", self._packer.flush()))
        self.fh.write(_png_chunk(b"IEND", b""))


def write_png_rows(
    path: Path,
    size: tuple[int, int],
    rows: Iterable[np.ndarray],
    *,
    palette: Sequence[Sequence[int]] | None = None,
    level: int = 6,
    what: str = "image",
) -> None:
    """Write an 8-bit PNG from row chunks (see :class:`PngWriter`); replaced atomically.

    Args:
        path: the ``.png`` file.
        size: the image's ``(height, width)``.
        rows: uint8 chunks ``(r, W)`` (gray, or palette indices with ``palette``) or
            ``(r, W, 3)`` (RGB), top to bottom, together ``height`` rows.
        palette: colours of a palette PNG.
        level: zlib compression level.
        what: what the file is, for messages.

    Raises:
        ValueError: chunks of the wrong width or dtype, or not ``height`` rows in all.
        DataError: the file cannot be written.
    """
    chunks = iter(rows)
    first = next(chunks, None)
    if first is None:
        raise ValueError("no rows to write")
    with atomic_write(path, what) as fh:
        writer = PngWriter(fh, size, 3 if first.ndim == 3 else 1, palette, level)
        writer.write(first)
        for chunk in chunks:
            writer.write(chunk)
        writer.close()


def predict_large_file(
    segmenter: Segmenter,
    path: Path,
    label_path: Path,
    overlay_path: Path,
    *,
    alpha: float = 0.5,
    before_write: Callable[[Path, Path | None], None] | None = None,
) -> None:
    """Segment one large image file into its label map and overlay, in bounded memory.

    A PNG (8-bit gray or RGB) is decoded as the windows need its rows (:func:`png_rows`), and
    each strip's labels and overlay rows are written as soon as the strip is finished, so
    neither the image nor its labels are ever whole in memory; other files are read whole
    (:func:`read_large_image`). The outputs are the files
    :func:`denseseg.engine.predict.predict_semantic` writes (the same labels and overlay, as
    palette and RGB PNGs).

    Args:
        segmenter: a Segmenter that streams (:meth:`Segmenter.streams`) a model of at most 256
            classes.
        path: the image file.
        label_path: the palette label map to write.
        overlay_path: the overlay to write.
        alpha: overlay opacity.
        before_write: called as ``before_write(path, input_file)`` before each file is
            written; it raises to refuse the write.
    """
    check = before_write or (lambda target, source: None)
    source = png_rows(path) or ImageRows(read_large_image(path))
    _, height, width = source.shape
    check(label_path, path)
    check(overlay_path, path)
    step = _rows_per_chunk(width, 3 * 12)  # the blend holds a few float copies of a chunk
    with atomic_write(label_path, "mask") as label_fh, atomic_write(overlay_path, "image") as fh:
        labels = PngWriter(label_fh, (height, width), 1, segmenter.palette)
        blends = _LegendTail(PngWriter(fh, (height, width), 3, level=1), segmenter, height)
        for top, block in segmenter.predict_strips(source):
            labels.write(block.numpy())
            blends.saw(block)
            for r in range(0, block.shape[0], step):
                rows = source.rows(top + r, top + min(r + step, block.shape[0]))
                blend = overlay(rows, block[r : r + step], segmenter.palette, alpha=alpha)
                blends.write(blend)
        labels.close()
        blends.close()


class _LegendTail:
    """The overlay's rows on their way to the PNG writer: the last rows, where the class legend
    goes (:func:`~denseseg.data.palette.draw_legend_band`, bottom-left corner), are held back
    until every class present is known; the others are written at once."""

    def __init__(self, writer: PngWriter, segmenter: Segmenter, height: int) -> None:
        self.writer, self.segmenter, self.height = writer, segmenter, height
        layout = legend_layout(height, writer.size[1])
        self.start = height - min(height, layout.box_height(segmenter.num_classes))
        self.row = 0
        self.held: list[np.ndarray] = []
        self.present: set[int] = set()

    def saw(self, labels: Tensor) -> None:
        """Note the classes of a strip of labels."""
        self.present.update(classes_present(labels.numpy()))

    def write(self, rows: np.ndarray) -> None:
        cut = min(len(rows), max(0, self.start - self.row))
        if cut:
            self.writer.write(rows[:cut])
        if cut < len(rows):
            self.held.append(rows[cut:])
        self.row += len(rows)

    def close(self) -> None:
        if self.held:
            band = draw_legend_band(
                np.concatenate(self.held),
                self.start,
                self.height,
                sorted(self.present),
                self.segmenter.palette,
                self.segmenter.class_names,
            )
            self.writer.write(band)
        self.writer.close()
