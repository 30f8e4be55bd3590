"""Huge images in bounded memory: the streaming PNG writer and lean reader, ``denseseg predict``'s
large-image path (the same files as the batched path), the pixel limit, and peak resident memory
measured in a fresh process for ``Segmenter.predict_large`` and for ``predict_folder``."""

from __future__ import annotations

import json
import logging
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from denseseg.data import io as data_io
from denseseg.engine import large_image
from denseseg.engine.large_image import read_large_image, write_png_rows
from denseseg.engine.predict import predict_folder
from denseseg.errors import DataError
from denseseg.inference.segmenter import Segmenter
from denseseg.inference.slide import StreamedRows
from denseseg.models import create_model

MiB = 2**20


def _unet() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("unet", num_classes=3, in_channels=3, base_channels=4, depth=2).eval()


def _rows(arr: np.ndarray, step: int):
    return (arr[r : r + step] for r in range(0, arr.shape[0], step))


@pytest.mark.parametrize("shape", [(37, 53, 3), (37, 53), (1, 5, 3)])
def test_png_rows_read_back(tmp_path: Path, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, shape, dtype=np.uint8)
    write_png_rows(tmp_path / "a.png", shape[:2], _rows(arr, 10))
    with Image.open(tmp_path / "a.png") as img:
        assert img.mode == ("RGB" if len(shape) == 3 else "L")
        assert np.array_equal(np.asarray(img), arr)


def test_palette_png_rows_are_a_label_map(tmp_path: Path) -> None:
    labels = np.random.default_rng(1).integers(0, 5, (40, 31), dtype=np.uint8)
    palette = [(10, 20, 30), (40, 50, 60), (70, 80, 90), (1, 2, 3), (4, 5, 6)]
    write_png_rows(tmp_path / "m.png", (40, 31), _rows(labels, 7), palette=palette, what="mask")
    assert torch.equal(data_io.read_mask(tmp_path / "m.png"), torch.from_numpy(labels).long())
    data_io.write_mask(tmp_path / "ref.png", labels, palette=palette)  # what predict writes
    with Image.open(tmp_path / "m.png") as a, Image.open(tmp_path / "ref.png") as b:
        assert a.mode == b.mode == "P" and a.getpalette() == b.getpalette()
    with pytest.raises(ValueError, match="40 rows got 39"):
        write_png_rows(tmp_path / "x.png", (40, 31), _rows(labels[:39], 7))
    assert not (tmp_path / "x.png").exists()  # atomic: nothing left behind


def _encode_png(path: Path, arr: np.ndarray, color: int, pieces: int = 7) -> None:
    """A PNG whose rows use the five filters in turn (encoding is vectorised: each filter
    predicts from the unfiltered samples), its deflate stream cut into several IDAT chunks, with
    other chunks before and after them."""
    h, w, c = arr.shape
    raw = arr.reshape(h, w * c).astype(np.int32)
    left = np.pad(raw, ((0, 0), (c, 0)))[:, :-c]
    up = np.pad(raw, ((1, 0), (0, 0)))[:-1]
    up_left = np.pad(up, ((0, 0), (c, 0)))[:, :-c]
    p = left + up - up_left
    pa, pb, pc = abs(p - left), abs(p - up), abs(p - up_left)
    paeth = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, up_left))
    predictions = [0 * raw, left, up, (left + up) // 2, paeth]
    lines = b"".join(
        bytes([r % 5]) + ((raw[r] - predictions[r % 5][r]) % 256).astype(np.uint8).tobytes()
        for r in range(h)
    )
    data = zlib.compress(lines, 9)
    cuts = np.linspace(0, len(data), pieces + 1).astype(int)
    body = [_chunk(b"IDAT", data[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]
    body.insert(0, _chunk(b"tEXt", b"Comment\x00before the IDAT chunks"))  # skipped
    body.append(_chunk(b"tIME", bytes(7)))  # after them (PNG keeps IDAT chunks together)
    header = _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, color, 0, 0, 0))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + header + b"".join(body) + _chunk(b"IEND", b""))


def _chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(data, zlib.crc32(kind)) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


@pytest.mark.parametrize(("color", "samples"), [(0, 1), (2, 3), (4, 2), (6, 4)])
def test_png_rows_decode_every_filter_chunk_by_chunk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, color: int, samples: int
) -> None:
    monkeypatch.setattr(large_image, "_CHUNK_BYTES", 700)  # a few rows per chunk
    rng = np.random.default_rng(color)
    arr = rng.integers(0, 256, (53, 41, samples), dtype=np.uint8)
    arr[10:30] = arr[10:11]  # runs of equal rows and smooth parts besides the noise
    _encode_png(tmp_path / "f.png", arr, color)
    source = large_image.png_rows(tmp_path / "f.png")
    assert source is not None and source.shape == (1 if color in (0, 4) else 3, 53, 41)
    got = torch.cat([source.rows(top, min(top + 6, 53)) for top in range(0, 53, 6)], 1)
    want = torch.from_numpy(arr[..., : source.shape[0]]).permute(2, 0, 1)
    assert torch.equal(got, want)
    assert torch.equal(got, data_io.read_image(tmp_path / "f.png"))  # as Pillow reads it


def test_png_rows_leave_other_files_to_the_whole_reader(tmp_path: Path) -> None:
    rgb = np.random.default_rng(2).integers(0, 256, (30, 20, 3), dtype=np.uint8)
    Image.fromarray(rgb).convert("P").save(tmp_path / "palette.png")
    Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).save(tmp_path / "deep.png")
    Image.fromarray(rgb).save(tmp_path / "photo.jpg")
    rotated = Image.fromarray(rgb)
    exif = rotated.getexif()
    exif[0x0112] = 6  # EXIF: rotate by 90 degrees
    rotated.save(tmp_path / "rotated.png", exif=exif)
    rotated.save(tmp_path / "rotated.jpg", exif=exif)
    _encode_png(tmp_path / "laced.png", rgb, 2)
    laced = (tmp_path / "laced.png").read_bytes()
    ihdr = _chunk(b"IHDR", laced[16:28] + b"\x01")  # interlace: Adam7
    (tmp_path / "laced.png").write_bytes(laced[:8] + ihdr + laced[33:])
    for name in ("palette.png", "deep.png", "photo.jpg", "rotated.png", "laced.png"):
        assert large_image.png_rows(tmp_path / name) is None, name
    # The EXIF orientation is found without decoding the PNG; the size is the rotated one.
    assert large_image._png_header(tmp_path / "rotated.png").orientation == 6
    assert large_image.is_large(tmp_path / "rotated.png", 599) is True
    assert large_image.is_large(tmp_path / "rotated.png", 600) is False
    for name in ("palette.png", "deep.png", "photo.jpg", "rotated.png", "rotated.jpg"):
        got = read_large_image(tmp_path / name)
        assert torch.equal(got, data_io.read_image(tmp_path / name)), name
    assert read_large_image(tmp_path / "rotated.jpg").shape == (3, 20, 30)


def test_truncated_files_are_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(large_image, "_CHUNK_BYTES", 700)
    arr = np.random.default_rng(3).integers(0, 256, (40, 30, 3), dtype=np.uint8)
    _encode_png(tmp_path / "whole.png", arr, 2)
    data = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    source = large_image.png_rows(tmp_path / "cut.png")
    assert source is not None
    with pytest.raises(DataError, match="cut.png is truncated"):
        source.rows(0, 40)
    with pytest.raises(DataError, match="cut.png"):
        read_large_image(tmp_path / "cut.png")


def test_streamed_rows_keep_only_what_is_not_released() -> None:
    image = torch.randint(0, 256, (3, 1000, 7), dtype=torch.uint8)
    chunks = (image[:, t : t + 3].permute(1, 2, 0).numpy() for t in range(0, 1000, 3))
    source = StreamedRows(chunks, (3, 1000, 7))
    for top in range(0, 981, 9):  # windows of 20 rows every 9 rows, as a slide would ask
        source.release(top)
        assert torch.equal(source.rows(top, top + 20), image[:, top : top + 20])
        assert len(source._buffer) <= 2 * (20 + 3)
    with pytest.raises(ValueError, match="released"):
        source.rows(970, 980)


def _write_inputs(folder: Path) -> None:
    folder.mkdir()
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 256, (130, 171, 3), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(rng.integers(0, 256, (99, 140), dtype=np.uint8)).save(folder / "g.png")
    Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(folder / "s.png")


@pytest.mark.parametrize("tta", ["none", "hflip", "d4"])
def test_predict_folder_streams_large_images_to_the_same_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tta: str
) -> None:
    seg = Segmenter(
        _unet(),
        mean=[0.5] * 3,
        std=[0.25] * 3,
        device="cpu",
        mode="slide",
        crop_size=48,
        stride=32,
        tta=tta,
    )
    _write_inputs(tmp_path / "in")
    predict_folder(seg, tmp_path / "in", tmp_path / "batched", batch_size=2)
    monkeypatch.setattr(large_image, "LARGE_IMAGE_PIXELS", 1000)  # a.png and g.png are "large"
    streamed = []
    real = large_image.predict_large_file
    monkeypatch.setattr(
        "denseseg.engine.predict.predict_large_file",
        lambda s, path, *a, **k: streamed.append(path.name) or real(s, path, *a, **k),
    )
    with caplog.at_level(logging.WARNING, logger="denseseg"):
        done = predict_folder(seg, tmp_path / "in", tmp_path / "streamed", batch_size=2)
    assert len(done.written) == 6
    assert streamed == ([] if tta == "d4" else ["a.png", "g.png"])
    if tta == "d4":  # rotations do not stream: batched as before, and said so
        assert "2 image(s) above 1000 pixels" in caplog.text and "tta=d4" in caplog.text
    for name in ("a.png", "a_overlay.png", "g.png", "g_overlay.png", "s.png", "s_overlay.png"):
        with (
            Image.open(tmp_path / "batched" / name) as a,
            Image.open(tmp_path / "streamed" / name) as b,
        ):
            assert a.mode == b.mode and np.array_equal(np.asarray(a), np.asarray(b)), name
            assert a.getpalette() == b.getpalette()


def test_pixel_limit_applies_to_the_large_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seg = Segmenter(
        _unet(), mean=[0.5] * 3, std=[0.25] * 3, device="cpu", mode="slide", crop_size=48
    )
    _write_inputs(tmp_path / "in")
    monkeypatch.setattr(large_image, "LARGE_IMAGE_PIXELS", 1000)
    monkeypatch.setenv(data_io.MAX_PIXELS_ENV, "20000")
    with pytest.raises(
        DataError, match="a.png claims 171x130 = 22,230 pixels.*DENSESEG_MAX_PIXELS"
    ):
        predict_folder(seg, tmp_path / "in", tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []  # refused before the first write


# ----------------------------------------------------------------- peak memory, fresh process

_PROBE = r"""
import json, sys, time
import numpy as np, torch
from PIL import Image
from denseseg.inference.segmenter import Segmenter
from denseseg.inference.slide import StreamedRows
from denseseg.engine.predict import predict_folder

class Toy(torch.nn.Module):
    num_classes, in_channels = 3, 3
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
    def forward(self, x):
        return {"out": self.conv(x)}

def status(key):  # bytes
    with open("/proc/self/status") as fh:
        return next(int(l.split()[1]) * 1024 for l in fh if l.startswith(key + ":"))

def start_peak():
    # The imports' own peak (above what they keep) would hide ours: reset the high-water mark.
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    return status("VmRSS")

def peak():
    return status("VmHWM")

kind, n, folder = sys.argv[1], int(sys.argv[2]), sys.argv[3]
seg = Segmenter(Toy(), mean=[0.5] * 3, std=[0.25] * 3, device="cpu", mode="slide",
                crop_size=256, weighting="gaussian")
seg.predict_large(torch.zeros(3, 300, 700, dtype=torch.uint8))  # first-call costs, warm pools
if kind == "memory":
    image = torch.randint(0, 256, (3, n, n), dtype=torch.uint8, generator=torch.Generator())
    base, start = start_peak(), time.time()
    labels = seg.predict_large(image)
    assert labels.shape == (n, n) and labels.dtype == torch.uint8
else:
    base, start = start_peak(), time.time()
    predict_folder(seg, folder + "/in", folder + "/out")
print(json.dumps({"base": base, "peak": peak(), "seconds": time.time() - start}))
"""


def _probe(tmp_path: Path, kind: str, n: int) -> dict:
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("measures peak memory through Linux's /proc/self/clear_refs")
    script = tmp_path / "probe.py"
    script.write_text(_PROBE)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(script), kind, str(n), str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _strip_bytes(n: int, classes: int = 3, crop: int = 256) -> int:
    """The accumulator of one strip: logits (K, crop, W), float32."""
    return classes * crop * n * 4


def test_predict_large_memory_is_bounded(tmp_path: Path) -> None:
    # A 6000 x 6000 RGB image (103 MiB) held in memory: a float copy of it alone would take
    # 412 MiB, its logits 412 MiB more. Streaming needs the uint8 labels (34 MiB) and one strip
    # of logits (18 MiB), a few times over for temporaries, and some slack for the allocator.
    n = 6000
    got = _probe(tmp_path, "memory", n)
    bound = n * n + 3 * _strip_bytes(n) + 48 * MiB
    grown = got["peak"] - got["base"]
    print(
        f"predict_large {n}x{n}: +{grown / MiB:.0f} of {bound / MiB:.0f} MiB, {got['seconds']:.0f}s"
    )
    assert grown < bound


@pytest.mark.heavy  # 50 s on two cores (make test-all); the in-memory bound above is in make test
def test_predict_folder_memory_is_bounded(tmp_path: Path) -> None:
    # File in, files out: the PNG is decoded as the windows need its rows and the label map and
    # overlay are written as the strips finish, so neither the image (103 MiB; Pillow would
    # decode it into 137 MiB) nor its labels (34 MiB) are ever whole in memory: only a strip.
    n = 6000
    (tmp_path / "in").mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (n, n, 3), dtype=np.uint8)).save(
        tmp_path / "in" / "big.png", compress_level=1
    )
    got = _probe(tmp_path, "folder", n)
    bound = 3 * _strip_bytes(n) + 48 * MiB
    grown = got["peak"] - got["base"]
    print(f"predict {n}x{n}: +{grown / MiB:.0f} of {bound / MiB:.0f} MiB, {got['seconds']:.0f}s")
    assert grown < bound
    with Image.open(tmp_path / "out" / "big.png") as labels:
        assert labels.mode == "P" and labels.size == (n, n)
    with Image.open(tmp_path / "out" / "big_overlay.png") as over:
        assert over.mode == "RGB" and over.size == (n, n)
