"""Prediction over a video file: an overlay video and, on request, a label map per frame.

:func:`predict_video` is ``denseseg predict street.mp4``. Frames are decoded with PyAV (the
optional extra ``denseseg[video]``), segmented ``batch_size`` at a time through
:meth:`Segmenter.predict_batch`, blended with the class colours as ``predict`` blends images,
and encoded into ``STEM_overlay.mp4`` (H.264 where PyAV's FFmpeg has libx264, else MPEG-4 part
2) at the input's frame rate and size. With ``frames`` each frame's palette label map is written
as ``STEM_frames/NNNNNN.png`` (frame index from 0, in display order).

The output rules are those of :func:`denseseg.engine.predict.predict_folder`: ``--out`` is not
the input's folder, files already there are replaced only with ``overwrite``, an input is never
written over (:class:`~denseseg.engine.outputs.NoClobber`). The video is written to a temporary
file in ``out`` and the label maps into a temporary folder beside it; both are moved into place
only once the last frame is done, so a video that turns out truncated or damaged half-way leaves
nothing in ``out``.

Frames are shown upright: a display rotation stored in the file (phones record portrait videos
as rotated landscape frames) is applied, as ``read_image`` applies EXIF orientation. H.264 and
MPEG-4 in ``yuv420p`` need even sides, so a frame of odd width or height is padded by repeating
its last column or row in the overlay video (the label maps keep the frame's own size).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from denseseg.data import io as data_io
from denseseg.data.palette import overlay
from denseseg.engine.outputs import NoClobber, check_out_folder, refuse_out_in_input
from denseseg.errors import ConfigError, DataError
from denseseg.inference.segmenter import Segmenter
from denseseg.progress import tqdm

log = logging.getLogger("denseseg")

__all__ = [
    "VIDEO_EXTS",
    "VideoPrediction",
    "is_video",
    "predict_video",
    "require_av",
    "video_codec",
]

VIDEO_EXTS = (
    ".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".wmv", ".flv", ".ts",
    ".mts", ".m2ts", ".3gp", ".ogv",
)  # fmt: skip
"""File name suffixes (any case) that ``denseseg predict`` reads as videos."""

PYAV_MISSING = "reading videos needs PyAV: pip install 'denseseg[video]'"
_FRAME_NAME = re.compile(r"\d{6,}\.png")  # the names of the per-frame label maps
_DEFAULT_RATE = Fraction(25)  # when the file states no frame rate at all


def is_video(path: str | Path) -> bool:
    """Whether ``path`` names a video file by its suffix (a folder never is one)."""
    path = Path(path)
    return path.suffix.lower() in VIDEO_EXTS and not path.is_dir()


@dataclass
class VideoPrediction:
    """What :func:`predict_video` did.

    Attributes:
        input: the video segmented.
        video: the overlay video written.
        frames_dir: the folder of per-frame label maps, or None when not asked for.
        frames: frames segmented.
        seconds: wall time from the first frame decoded to the last file in place.
        size: ``(height, width)`` of the frames (as displayed).
        rate: the frame rate of the overlay video (that of the input).
    """

    input: Path
    video: Path
    frames_dir: Path | None
    frames: int
    seconds: float
    size: tuple[int, int]
    rate: Fraction

    @property
    def frames_per_second(self) -> float:
        """Throughput: frames segmented (decode, model, encode, writes) per second."""
        return self.frames / self.seconds if self.seconds > 0 else float("inf")


def require_av() -> Any:
    """The PyAV module (``import av``); a one-line ConfigError naming the extra when missing."""
    try:
        import av
    except ImportError:
        raise ConfigError(PYAV_MISSING) from None
    return av


def _output_stem(path: Path) -> str:
    # As engine.outputs names images: leading dots would hide the outputs.
    return path.stem.lstrip(".") or "_"


def _plan(path: Path, out: Path, frames: bool, overwrite: bool) -> tuple[Path, Path | None]:
    """The overlay video's and the label-map folder's paths, checked before anything is
    written: ``out`` is no file and not the input's folder, neither output is the input, and
    unless ``overwrite`` neither is in ``out`` already."""
    check_out_folder(out, f"--out {out}")
    refuse_out_in_input(path, out)
    stem = _output_stem(path)
    video = out / f"{stem}_overlay.mp4"
    NoClobber([path]).check(video)
    frames_dir = out / f"{stem}_frames" if frames else None
    if frames_dir is not None:
        check_out_folder(frames_dir, f"--out {out}")
        if frames_dir.resolve() == path.resolve().parent:
            raise ConfigError(
                f"--out {out}: the label maps would go to {frames_dir}, the folder of the input "
                f"{path}; choose another --out"
            )
    if not overwrite:
        existing = [video] if video.exists() or video.is_symlink() else []
        if frames_dir is not None and frames_dir.is_dir():
            existing += sorted(p for p in frames_dir.iterdir() if _FRAME_NAME.fullmatch(p.name))
        if existing:
            raise ConfigError(
                f"--out {out} already holds {len(existing)} of the files predict would write "
                f"(e.g. {existing[0].relative_to(out)}); pass --overwrite to replace them, or "
                "choose another --out"
            )
    return video, frames_dir


def _open_input(av: Any, path: Path) -> tuple[Any, Any]:
    """The open container and its first video stream, checked against the pixel limit."""
    if not path.is_file():
        raise DataError(f"input {data_io.show_path(path)} does not exist or is not a file")
    try:
        container = av.open(os.fspath(path), "r")
    except (av.error.FFmpegError, OSError, UnicodeDecodeError) as exc:
        raise DataError(
            f"cannot read video {data_io.show_path(path)}: not a video, or damaged ({_reason(exc)})"
        ) from None
    if not container.streams.video:
        container.close()
        raise DataError(f"{data_io.show_path(path)} holds no video stream (audio only?)")
    stream = container.streams.video[0]
    # No frame threading (thread_type "AUTO" / "FRAME"): it drops the error of a truncated
    # file's last packets, and the video would end early without a word.
    try:
        _check_pixels(path, stream.codec_context.width, stream.codec_context.height)
    except DataError:
        container.close()
        raise
    return container, stream


def _reason(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or str(exc)


def _check_pixels(path: Path, width: int, height: int) -> None:
    limit = data_io.max_pixels()
    if width * height > limit:
        raise DataError(
            f"video {data_io.show_path(path)} has frames of {width}x{height} = "
            f"{width * height:,} pixels, over the limit of {limit:,} (a guard against "
            "decompression bombs); if the file is genuine, raise the limit with the environment "
            f"variable {data_io.MAX_PIXELS_ENV}={width * height}"
        )


def _decoded_frames(av: Any, container: Any, stream: Any, path: Path) -> Iterator[np.ndarray]:
    """The frames as upright ``uint8`` RGB arrays ``(H, W, 3)``, in display order.

    Raises:
        DataError: the file is damaged or truncated, or a frame is over the pixel limit.
    """
    index, size = 0, None
    try:
        for frame in container.decode(stream):
            _check_pixels(path, frame.width, frame.height)
            size = size or (frame.width, frame.height)  # a stream may change size: scale back
            rgb = frame.to_ndarray(format="rgb24", width=size[0], height=size[1])
            turns = round((frame.rotation or 0) / 90) % 4  # counter-clockwise, as np.rot90
            yield np.ascontiguousarray(np.rot90(rgb, turns)) if turns else rgb
            index += 1
    except (av.error.FFmpegError, OSError) as exc:
        raise DataError(
            f"cannot read video {data_io.show_path(path)} after {index} frame(s): damaged or "
            f"truncated ({_reason(exc)})"
        ) from None
    if index == 0:
        raise DataError(
            f"video {data_io.show_path(path)} has no frame that decodes: damaged or truncated"
        )


def _frame_rate(stream: Any) -> Fraction:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return Fraction(rate) if rate and rate > 0 else _DEFAULT_RATE


class _OverlayWriter:
    """Encodes RGB frames into an MP4 written to ``fh``: H.264 (libx264, CRF 18) when PyAV's
    FFmpeg has it, else MPEG-4 part 2; ``yuv420p``, so odd sides are padded to even ones.

    Args:
        av: the PyAV module.
        fh: a seekable binary file (the MP4 muxer writes its index at the end).
        rate: frames per second.
    """

    def __init__(self, av: Any, fh: BinaryIO, rate: Fraction) -> None:
        self.av = av
        self.container = av.open(fh, "w", format="mp4")
        self.rate = rate
        self.stream: Any = None
        self.count = 0

    def _start(self, height: int, width: int) -> None:
        codec = video_codec(self.av)
        self.stream = self.container.add_stream(codec, rate=self.rate)
        self.stream.height, self.stream.width = height + height % 2, width + width % 2
        self.stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            self.stream.options = {"crf": "18", "preset": "veryfast"}
        else:  # MPEG-4 part 2 has no constant-quality mode here: a generous bit rate instead
            bits = int(height * width * float(self.rate) * 0.5)
            self.stream.bit_rate = max(bits, 1_000_000)
        if (height % 2, width % 2) != (0, 0):
            log.info(
                "frames are %dx%d: the overlay video is %dx%d (yuv420p needs even sides; the "
                "last row/column is repeated)",
                width,
                height,
                self.stream.width,
                self.stream.height,
            )

    def write(self, rgb: np.ndarray) -> None:
        """Encode one ``uint8`` frame ``(H, W, 3)``."""
        if self.stream is None:
            self._start(*rgb.shape[:2])
        pad_h, pad_w = self.stream.height - rgb.shape[0], self.stream.width - rgb.shape[1]
        if pad_h or pad_w:
            rgb = np.pad(rgb, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")
        frame = self.av.VideoFrame.from_ndarray(rgb, format="rgb24")
        frame.pts = self.count
        frame.time_base = 1 / self.rate
        self.container.mux(self.stream.encode(frame))
        self.count += 1

    def close(self) -> None:
        """Flush the encoder and write the file's index."""
        if self.stream is not None:
            self.container.mux(self.stream.encode(None))
        self.container.close()

    def abort(self) -> None:
        """Release the encoder after a failure (the caller discards the file)."""
        with contextlib.suppress(Exception):
            self.container.close()


def video_codec(av: Any) -> str:
    """The encoder for overlay videos: libx264 when PyAV's FFmpeg has it, else mpeg4."""
    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


@contextlib.contextmanager
def _staged_frames(frames_dir: Path | None, out: Path) -> Iterator[Path | None]:
    """A hidden temporary folder in ``out`` for the label maps, removed if the block raises;
    None when no label maps are asked for."""
    if frames_dir is None:
        yield None
        return
    staging = Path(tempfile.mkdtemp(prefix=f".{frames_dir.name}.", suffix=".tmp", dir=out))
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # emptied already when all went well


def _publish_frames(staging: Path, frames_dir: Path, guard: NoClobber, source: Path) -> None:
    """Move the staged label maps into ``frames_dir`` (replacing same-named files), then
    remove the label maps of an earlier, longer video there (only ``--overwrite`` gets here
    with any): the folder then holds this video's frames only; other files stay."""
    try:
        frames_dir.mkdir(exist_ok=True)
        written = set()
        for tmp in sorted(staging.iterdir()):
            guard(frames_dir / tmp.name, source)
            os.replace(tmp, frames_dir / tmp.name)
            written.add(tmp.name)
        for old in frames_dir.iterdir():
            if _FRAME_NAME.fullmatch(old.name) and old.name not in written and old.is_file():
                old.unlink()
    except OSError as exc:
        raise DataError(f"cannot write label maps into {frames_dir} ({_reason(exc)})") from None


@dataclass
class _Job:
    """One video's segmentation: the model, the writers and the running count."""

    segmenter: Segmenter
    writer: _OverlayWriter
    staging: Path | None
    alpha: float
    frames: int = 0
    size: tuple[int, int] = (0, 0)

    @property
    def rate(self) -> Fraction:
        """The overlay video's frame rate."""
        return self.writer.rate

    def run(self, batch: list[np.ndarray]) -> None:
        """Segment a batch of frames ``(H, W, 3)``; encode overlays, stage label maps."""
        images = [torch.from_numpy(rgb).permute(2, 0, 1) for rgb in batch]  # (3, H, W) views
        labels, _ = self.segmenter.predict_batch(images)
        height, width = batch[0].shape[:2]
        self.size = (height, width)
        for rgb, label in zip(batch, labels):
            self.writer.write(overlay(rgb, label, self.segmenter.palette, alpha=self.alpha))
            if self.staging is not None:
                name = self.staging / f"{self.frames:06d}.png"
                data_io.write_mask(name, label, palette=self.segmenter.palette)
            self.frames += 1


def predict_video(
    segmenter: Segmenter,
    path: str | Path,
    out_dir: str | Path,
    *,
    batch_size: int = 4,
    alpha: float = 0.5,
    frames: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> VideoPrediction:
    """Segment every frame of a video into ``out_dir``: ``STEM_overlay.mp4`` and, with
    ``frames``, ``STEM_frames/NNNNNN.png`` (see the module docstring).

    Args:
        segmenter: a semantic predictor (e.g. from :func:`denseseg.load_model`).
        path: the video file (anything FFmpeg reads: MP4, MOV, MKV, WebM, AVI, ...).
        out_dir: the output folder, not the video's own folder; created if missing.
        batch_size: frames per forward pass.
        alpha: overlay opacity, 0 to 1.
        frames: also write each frame's palette label map ``(H, W)``.
        overwrite: replace outputs of the same names already in ``out_dir``.
        progress: show a progress bar (frames, frames/s).

    Returns:
        The files written, the frame count and the time taken.

    Raises:
        ConfigError: PyAV is missing, the model is an instance model, ``out_dir`` is a file or
            the video's folder, or an output exists already and ``overwrite`` is False.
        DataError: the file is no video, has no video stream, is damaged or truncated, or its
            frames are over the pixel limit (``DENSESEG_MAX_PIXELS``); nothing is left in
            ``out_dir`` then.
    """
    av = require_av()
    path, out = Path(path), Path(out_dir)
    if getattr(segmenter, "task", "semantic") == "instance":
        raise ConfigError(
            "video prediction takes a semantic model, not an instance model; extract the frames "
            "(e.g. ffmpeg -i VIDEO frames/%06d.png) and predict the folder"
        )
    container, stream = _open_input(av, path)
    with container:
        video, frames_dir = _plan(path, out, frames, overwrite)
        created = not out.exists()
        out.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        try:
            job = _segment(
                av,
                segmenter,
                container,
                stream,
                path,
                video,
                frames_dir,
                batch_size,
                alpha,
                progress,
            )
        except BaseException:
            if created:  # leave no empty --out behind either
                with contextlib.suppress(OSError):
                    out.rmdir()
            raise
    seconds = time.perf_counter() - start
    return VideoPrediction(path, video, frames_dir, job.frames, seconds, job.size, job.rate)


def _segment(
    av: Any,
    segmenter: Segmenter,
    container: Any,
    stream: Any,
    path: Path,
    video: Path,
    frames_dir: Path | None,
    batch_size: int,
    alpha: float,
    progress: bool,
) -> _Job:
    """Decode, segment in batches, encode; the outputs appear only once all frames are done."""
    guard = NoClobber([path])
    bar = tqdm(total=stream.frames or None, desc="predict", unit="frame", disable=not progress)
    guard(video, path)
    with (
        bar,
        data_io.atomic_write(video, "video") as fh,
        _staged_frames(frames_dir, video.parent) as staging,
    ):
        job = _Job(segmenter, _OverlayWriter(av, fh, _frame_rate(stream)), staging, alpha)
        try:
            batch: list[np.ndarray] = []
            for rgb in _decoded_frames(av, container, stream, path):
                batch.append(rgb)
                if len(batch) == batch_size:
                    job.run(batch)
                    bar.update(len(batch))
                    batch = []
            if batch:
                job.run(batch)
                bar.update(len(batch))
        except BaseException:
            job.writer.abort()
            raise
        job.writer.close()
        if staging is not None and frames_dir is not None:
            _publish_frames(staging, frames_dir, guard, path)
    return job
