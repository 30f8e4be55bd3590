"""The package's one image and mask reader and writer.

Every part of denseseg that opens an image or a label map goes through :func:`read_image` and
:func:`read_mask`, so format quirks (palette PNGs, 16-bit grayscale, alpha channels, EXIF
orientation, truncated files) are handled once, and every failure becomes a :class:`DataError`
that names the file and what to do about it.

Conventions:

- Images are ``uint8`` tensors ``(C, H, W)`` with ``C = 3`` (RGB) or ``C = 1`` (grayscale).
- Masks are ``int64`` tensors ``(H, W)`` of class indices, stored on disk as single-channel or
  palette PNGs whose pixel values *are* the indices (as PASCAL VOC stores them).
- EXIF orientation is applied to both (``ImageOps.exif_transpose``), so pixels come out the way
  an image viewer, and therefore an annotator, shows them.
- Decompression bombs: a file whose header claims more than :func:`max_pixels` pixels (default
  :data:`DEFAULT_MAX_PIXELS`, Pillow's own ``Image.MAX_IMAGE_PIXELS``, 89,478,485 pixels) is
  refused from its header, before any pixel is decoded. To read larger images, set the
  environment variable ``DENSESEG_MAX_PIXELS`` to the largest pixel count (width x height) to
  accept, e.g. ``DENSESEG_MAX_PIXELS=400000000``; it also lifts Pillow's own limit to match.
- Writers (:func:`write_image`, :func:`write_mask`, and the plots and metric files elsewhere,
  through :func:`atomic_write`) write a temporary file in the target's folder and
  ``os.replace`` it onto the target: a reader never sees half a file, and a symbolic link
  planted at the target is replaced, never written through.
- File names in messages go through :func:`show_path`, so a name that holds undecodable bytes
  or control characters is printed escaped instead of failing the print.

:func:`atomic_write` and :func:`show_path` live in :mod:`denseseg.checkpoint.files` (the bottom
of the package, which checkpoints are written through too) and are exported here as well.
"""

from __future__ import annotations

import io
import os
import re
import struct
import warnings
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from denseseg.checkpoint.files import atomic_write, show_path
from denseseg.data.palette import palette_to_flat
from denseseg.errors import (
    ConfigError,
    DataError,
    DensesegError,
    ImageTooLargeError,
    NotAnImageError,
)

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "MAX_PIXELS_ENV",
    "ImageInfo",
    "atomic_write",
    "image_info",
    "max_pixels",
    "read_image",
    "read_image_bytes",
    "read_mask",
    "read_text",
    "encode_mask_png",
    "show_path",
    "write_image",
    "write_mask",
]

PathLike = str | os.PathLike

# Modes that carry one intensity channel (alpha, where present, is dropped).
_GRAY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"}
# Modes whose pixel values can be class indices.
_INDEX_MODES = {"1", "L", "LA", "P", "PA", "I", "I;16", "I;16L", "I;16B", "I;16N"}
# Lossy formats: a mask saved in one no longer holds the indices it was given.
_LOSSY_FORMATS = {"JPEG", "MPO"}
# EXIF orientations 5-8 rotate by 90 degrees, so height and width swap.
_TRANSPOSING_ORIENTATIONS = {5, 6, 7, 8}

MAX_PIXELS_ENV = "DENSESEG_MAX_PIXELS"
"""Environment variable that sets the largest image (width x height) the readers accept."""

DEFAULT_MAX_PIXELS = 89_478_485
"""Pillow's own ``Image.MAX_IMAGE_PIXELS`` default (a 1 GiB RGBA buffer / 3), where it warns."""


def max_pixels() -> int:
    """The largest pixel count (width x height) an image or mask may have.

    Returns:
        ``$DENSESEG_MAX_PIXELS`` when set, else :data:`DEFAULT_MAX_PIXELS`.

    Raises:
        ConfigError: The variable is set to something other than a positive whole number.
    """
    raw = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_PIXELS
    value = int(raw) if raw.isdigit() else 0
    if value < 1:
        raise ConfigError(
            f"environment variable {MAX_PIXELS_ENV}={raw!r} must be a positive whole number "
            f"of pixels (width x height, default {DEFAULT_MAX_PIXELS}); fix or unset it"
        )
    return value


def read_text(path: PathLike, what: str, error: type[DensesegError] = DataError) -> str:
    """Read a UTF-8 text file (a leading byte-order mark is dropped).

    Args:
        path: The file.
        what: What it is, for messages (``"split list"``, ...).
        error: The exception type to raise (``ConfigError`` for settings files).

    Returns:
        The text.

    Raises:
        DensesegError: ``error``, naming the file, when it cannot be read or is not UTF-8.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise error(
            f"cannot read {what} {show_path(path)} ({exc.strerror or exc}); check the file"
        ) from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise error(
            f"{what} {show_path(path)} is not UTF-8 text (byte 0x{data[exc.start]:02x} on line "
            f"{line}); save it with UTF-8 encoding"
        ) from None


@dataclass(frozen=True)
class ImageInfo:
    """What :func:`image_info` learns from a file's header.

    Attributes:
        channels: 1 for grayscale modes, 3 otherwise (the channel count :func:`read_image` gives).
        height: Height after EXIF orientation.
        width: Width after EXIF orientation.
        mode: The PIL mode stored in the file (``"RGB"``, ``"L"``, ``"P"``, ...).
    """

    channels: int
    height: int
    width: int
    mode: str


def _open(
    path: PathLike, what: str, data: bytes | None = None, limit: int | None = None
) -> Image.Image:
    """Open ``path`` (or the bytes ``data``, named ``path`` in messages) lazily (header only),
    turning every failure into a :class:`DataError`; a header claiming more than ``limit``
    pixels (default :func:`max_pixels`) is refused before decoding."""
    path = Path(path)
    if data is None and not path.is_file():
        raise DataError(
            f"{what} {show_path(path)} does not exist; check the path and the dataset layout"
        )
    from_env, limit = limit is None, max_pixels() if limit is None else limit
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < limit:
        # The user asked for larger images: lift Pillow's own guard to match, the way Pillow's
        # documentation says, so that ours is the one that decides.
        Image.MAX_IMAGE_PIXELS = limit
    try:
        with warnings.catch_warnings():
            # Pillow warns above its own limit; ours refuses such a file with a clearer message.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data) if data is not None else path)
    except Image.DecompressionBombError as exc:
        raise _bomb_error(path, what, _claimed_pixels(exc), limit, "", from_env) from None
    except UnidentifiedImageError as exc:
        raise NotAnImageError(
            f"{what} {show_path(path)} is not an image format Pillow can read; "
            "convert it to PNG (or JPEG for photos)"
        ) from exc
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, struct.error) as exc:
        # Pillow's header parsers raise these for malformed headers (a huge text chunk, a
        # non-numeric PPM size, ...).
        raise DataError(
            f"{what} {show_path(path)} cannot be opened ({exc}); check the file"
        ) from exc
    width, height = img.size
    if width * height > limit:
        img.close()
        raise _bomb_error(path, what, width * height, limit, f"{width}x{height} = ", from_env)
    _check_decoding_cost(img, path, what, data, limit)
    return img


MAX_JPEG_SCANS = 100
"""Most scans a JPEG may have: progressive files have about ten; each scan is a decoding pass
over the whole image, so thousands of repeated scans in a small file take minutes to decode."""


def _check_decoding_cost(
    img: Image.Image, path: Path, what: str, data: bytes | None, limit: int
) -> None:
    """Refuse files that are small but expensive to decode: a JPEG with more than
    :data:`MAX_JPEG_SCANS` scans, a TIFF whose tiles or strips are larger than the pixel limit
    (libtiff allocates one whole tile, whatever the image size)."""
    if img.format in ("JPEG", "MPO"):
        raw = data if data is not None else path.read_bytes()
        scans = raw.count(b"\xff\xda")  # SOS markers; entropy-coded 0xFF bytes are stuffed
        if scans > MAX_JPEG_SCANS:
            img.close()
            raise DataError(
                f"{what} {show_path(path)} has {scans} JPEG scans (at most {MAX_JPEG_SCANS} are "
                "decoded: each is a pass over the whole image); re-encode it"
            )
    elif img.format == "TIFF":
        tags = img.tag_v2
        tile = int(tags.get(322, 0) or 0) * int(tags.get(323, 0) or 0)
        # RowsPerStrip may say 2**32 - 1 for "the whole image": count the rows there are.
        strip = img.size[0] * min(int(tags.get(278, 0) or 0), img.size[1])
        if max(tile, strip) > limit:
            img.close()
            raise ImageTooLargeError(
                f"{what} {show_path(path)} is stored in tiles or strips of "
                f"{max(tile, strip):,} pixels, over the limit of {limit:,} (decoding one would "
                "take that much memory, whatever the image size); re-save it untiled"
            )


def _claimed_pixels(exc: Exception) -> int | None:
    """The pixel count in Pillow's DecompressionBombError message."""
    found = re.search(r"\((\d+) pixels\)", str(exc))
    return int(found.group(1)) if found else None


def _bomb_error(
    path: Path, what: str, pixels: int | None, limit: int, size: str = "", from_env: bool = True
) -> ImageTooLargeError:
    claim = f"{size}{pixels:,}" if pixels else "too many"
    head = f"{what} {show_path(path)} claims {claim} pixels, over the limit of {limit:,}"
    if not from_env:  # a caller's own limit (the server's): the environment does not change it
        return ImageTooLargeError(f"{head}; send a smaller image")
    return ImageTooLargeError(
        f"{head} (a guard against decompression bombs); if the file is genuine, raise the limit "
        f"with the environment variable {MAX_PIXELS_ENV}={pixels or 2 * limit}"
    )


def _decode(
    path: PathLike, what: str, data: bytes | None = None, limit: int | None = None
) -> Image.Image:
    """Open and fully decode ``path`` (or ``data``, see :func:`_open`) with EXIF orientation
    applied; masks must be stored in a lossless format (JPEG smears the class indices at every
    edge)."""
    img = _open(path, what, data, limit)
    if what == "mask" and img.format in _LOSSY_FORMATS:
        img.close()
        raise DataError(
            f"mask {show_path(path)} is stored as {img.format}, a lossy format that changes class "
            "indices near every edge; export the masks as PNG"
        )
    try:
        with img:
            # Image.open only parses the header; load() decodes every pixel, which is where a
            # truncated or corrupt file fails.
            img.load()
            out = ImageOps.exif_transpose(img)
    except Image.DecompressionBombError as exc:  # a frame or tile larger than the header said
        pixels, from_env = _claimed_pixels(exc), limit is None
        raise _bomb_error(Path(path), what, pixels, limit or max_pixels(), "", from_env) from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error) as exc:
        raise DataError(
            f"{what} {show_path(path)} is truncated or corrupt ({exc}); re-export or re-download it"
        ) from exc
    return out


def image_info(path: PathLike) -> ImageInfo:
    """Read an image's channel count and size from its header, without decoding the pixels.

    Args:
        path: Image file.

    Returns:
        :class:`ImageInfo` with the values :func:`read_image` would give.

    Raises:
        DataError: The file is missing or not a readable image.
    """
    with _open(path, "image") as img:
        width, height = img.size
        try:
            orientation = img.getexif().get(0x0112, 1)
        except Exception:  # a broken EXIF block must not stop a header read
            orientation = 1
        if orientation in _TRANSPOSING_ORIENTATIONS:
            width, height = height, width
        channels = 1 if img.mode in _GRAY_MODES else 3
        return ImageInfo(channels=channels, height=height, width=width, mode=img.mode)


def _to_uint8_gray(img: Image.Image, path: PathLike) -> np.ndarray:
    """Grayscale PIL image of any depth -> ``(H, W)`` uint8 array."""
    if img.mode in ("LA", "La"):
        img = img.getchannel(0)
    if img.mode == "1":
        return np.asarray(img, dtype=np.uint8) * 255
    if img.mode == "L":
        return np.asarray(img, dtype=np.uint8)
    if img.mode.startswith("I"):
        # 16-bit data (I;16 or a 16-bit PNG opened as I) spans 0-65535; map it linearly to 0-255.
        arr = np.asarray(img).astype(np.float64)
        return np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8)
    raise DataError(
        f"image {show_path(path)} has mode {img.mode} (e.g. floating point), which has no "
        "standard 8-bit scale; convert it to 8-bit grayscale or RGB"
    )


def read_image(path: PathLike) -> torch.Tensor:
    """Read an image file as a ``uint8`` tensor.

    Grayscale files (modes ``1``, ``L``, ``I``, ``I;16``) stay one channel, with 16-bit values
    scaled to 8 bits (``round(v / 257)``) and 1-bit values to 0/255; alpha channels are dropped
    (not composited); palette images are expanded to RGB; CMYK, YCbCr and other colour modes are
    converted to RGB. EXIF orientation is applied.

    Args:
        path: Image file (PNG, JPEG, BMP, TIFF, ... anything Pillow reads).

    Returns:
        ``uint8`` tensor ``(C, H, W)``, ``C`` is 1 or 3.

    Raises:
        DataError: The file is missing, truncated, corrupt or in an unknown format.
    """
    return _image_tensor(_decode(path, "image"), path)


def read_image_bytes(
    data: bytes,
    name: str = "upload",
    limit: int | None = None,
    formats: Collection[str] | None = None,
) -> torch.Tensor:
    """:func:`read_image` for an encoded image held in memory (an upload, say).

    Args:
        data: The file's bytes; the format is decided by the content, never by ``name``.
        name: What messages call the image.
        limit: The largest pixel count accepted (default :func:`max_pixels`), checked from the
            header before any pixel is decoded.
        formats: Pillow format names accepted (e.g. ``{"PNG", "JPEG"}``); default any.

    Returns:
        ``uint8`` tensor ``(C, H, W)`` as :func:`read_image` gives it.

    Raises:
        DataError: Empty, not an image, a format not in ``formats``, too many pixels,
            truncated or corrupt.
    """
    if not data:
        raise DataError(f"image {show_path(name)} is empty (0 bytes); send an image file")
    if formats is not None:
        with _open(name, "image", data, limit) as img:
            if img.format not in formats:
                raise NotAnImageError(
                    f"image {show_path(name)} is {img.format}, not one of the accepted formats "
                    f"({', '.join(sorted(formats))}); convert it to PNG or JPEG"
                )
    return _image_tensor(_decode(name, "image", data, limit), name)


def _image_tensor(img: Image.Image, path: PathLike) -> torch.Tensor:
    """A decoded PIL image -> ``uint8`` tensor ``(C, H, W)`` as :func:`read_image` describes."""
    if img.mode in _GRAY_MODES:
        arr = _to_uint8_gray(img, path)[None]
    else:
        if img.mode in ("P", "PA"):
            # Through RGBA so a palette with transparency converts without a Pillow warning;
            # the alpha is then dropped like any other.
            img = img.convert("RGBA")
        if img.mode != "RGB":
            img = img.convert("RGB")  # RGBA drops alpha; CMYK, YCbCr, ... become RGB
        arr = np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)
    # A copy: arrays viewing PIL buffers are read-only, which torch warns about.
    return torch.from_numpy(np.array(arr, dtype=np.uint8, order="C", copy=True))


def read_mask(path: PathLike) -> torch.Tensor:
    """Read a label map of class indices.

    Single-channel files (modes ``L``, ``I``, ``I;16``, ``1``) and palette PNGs (mode ``P``) are
    read as the stored indices: a palette PNG is *not* converted to colours, as in PASCAL VOC.
    A ``LA``/``PA`` file's alpha channel is ignored. EXIF orientation is applied, as for images.

    Args:
        path: Mask file, normally a PNG.

    Returns:
        ``int64`` tensor ``(H, W)``.

    Raises:
        DataError: The file is missing, unreadable, or an RGB/RGBA colour image.
    """
    img = _decode(path, "mask")
    if img.mode not in _INDEX_MODES:
        raise DataError(
            f"mask {show_path(path)} is {img.mode}; save class indices as a single-channel or "
            "palette PNG (pixel value = class index)"
        )
    if img.mode in ("LA", "PA"):
        img = img.getchannel(0)
    arr = np.asarray(img).astype(np.int64)
    return torch.from_numpy(arr)


def _as_numpy(x: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def write_mask(
    path: PathLike,
    mask: torch.Tensor | np.ndarray,
    palette: Sequence[Sequence[int]] | Sequence[int] | None = None,
) -> None:
    """Write a label map as a PNG that :func:`read_mask` reads back unchanged.

    Args:
        path: Output file; must end in ``.png`` (a lossy format would change the labels).
            Missing parent folders are created; the file is replaced atomically (see
            :func:`atomic_write`).
        mask: Integer ``(H, W)`` tensor or array of class indices.
        palette: Colours ``[(r, g, b), ...]`` (or a flat ``[r, g, b, r, g, b, ...]`` list).
            When given, a palette PNG (mode ``P``) is written, viewable in colour yet storing
            indices; values must then be below 256. Without it, values below 256 give an 8-bit
            grayscale PNG and larger ones a 16-bit PNG.

    Raises:
        DataError: Bad suffix, negative values, or values too large for the chosen format.
        ValueError: ``mask`` is not a 2-D integer array.
    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise DataError(
            f"mask file {show_path(path)} must be a .png (lossless); change the file name"
        )
    img = _mask_pil(mask, palette, path)
    with atomic_write(path, "mask") as fh:
        img.save(fh, format="PNG")


def encode_mask_png(
    mask: torch.Tensor | np.ndarray, palette: Sequence[Sequence[int]] | Sequence[int] | None = None
) -> bytes:
    """The PNG file :func:`write_mask` would write, as bytes (for a response, say)."""
    buf = io.BytesIO()
    _mask_pil(mask, palette, Path("mask.png")).save(buf, format="PNG")
    return buf.getvalue()


def _mask_pil(
    mask: torch.Tensor | np.ndarray,
    palette: Sequence[Sequence[int]] | Sequence[int] | None,
    path: Path,
) -> Image.Image:
    """A label map as the PIL image :func:`write_mask` stores (``path`` names it in errors)."""
    arr = _as_numpy(mask)
    if arr.ndim != 2 or not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_):
        raise ValueError(f"mask must be a 2-D integer array, got shape {arr.shape} {arr.dtype}")
    lo = int(arr.min()) if arr.size else 0
    hi = int(arr.max()) if arr.size else 0
    if lo < 0:
        raise DataError(
            f"mask for {show_path(path)} holds negative value {lo}; class indices must be >= 0"
        )
    if palette is not None:
        if hi > 255:
            raise DataError(
                f"mask for {show_path(path)} holds value {hi}; a palette PNG stores indices "
                "below 256, write it without a palette (16-bit PNG) instead"
            )
        img = Image.fromarray(arr.astype(np.uint8))
        # putpalette turns the L image into P with the same bytes; convert("P") would quantise.
        img.putpalette(palette_to_flat(palette))
    elif hi <= 255:
        img = Image.fromarray(arr.astype(np.uint8))
    elif hi <= 65535:
        img = Image.fromarray(arr.astype(np.uint16))
    else:
        raise DataError(
            f"mask for {show_path(path)} holds value {hi}; PNG masks store values up to 65535"
        )
    return img


def write_image(path: PathLike, image: torch.Tensor | np.ndarray) -> None:
    """Write a ``uint8`` image; the format follows the file suffix.

    Args:
        path: Output file (``.png``, ``.jpg``, ...). Missing parent folders are created; the
            file is replaced atomically (see :func:`atomic_write`).
        image: A tensor ``(C, H, W)`` or an array ``(H, W, C)``, or either as ``(H, W)``;
            ``C`` is 1, 3 or 4 (RGBA), ``uint8``.

    Raises:
        ValueError: Wrong dtype or shape.
        DataError: Pillow cannot write that format, or the folder cannot be written.
    """
    path = Path(path)
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise DataError(f"cannot write image {show_path(path)}: unknown suffix; use .png or .jpg")
    arr = _as_numpy(image)
    if arr.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got {arr.dtype}")
    if isinstance(image, torch.Tensor) and arr.ndim == 3:
        arr = arr.transpose(1, 2, 0)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise ValueError(f"image must have 1, 3 or 4 channels, got shape {tuple(image.shape)}")
    picture = Image.fromarray(np.ascontiguousarray(arr))
    try:
        with atomic_write(path, "image") as fh:
            picture.save(fh, format=fmt)
    except (KeyError, ValueError, OSError) as exc:  # e.g. RGBA as JPEG
        raise DataError(
            f"cannot write image {show_path(path)} ({exc}); use a .png or .jpg suffix"
        ) from exc
