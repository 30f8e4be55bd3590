"""``denseseg predict VIDEO``: an overlay video and per-frame label maps, on short clips the tests
write themselves with PyAV; the label maps are checked against ``Segmenter.predict`` on the
frames as PyAV decodes them from the (lossy) input, the overlay video against ``overlay`` of
them; and the refusals: no video, truncated, no video stream, over the pixel limit, outputs in
the way, PyAV missing, an instance model."""

from __future__ import annotations

import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import save_em_checkpoint
from denseseg import load_model
from denseseg.cli import main
from denseseg.data.io import MAX_PIXELS_ENV, read_mask
from denseseg.data.palette import overlay
from denseseg.engine import video as video_mod
from denseseg.engine.video import PYAV_MISSING, predict_video
from denseseg.errors import ConfigError, DataError
from denseseg.inference.segmenter import Segmenter
from denseseg.models import create_model
from test_bad_input import run_cli, snapshot

av = pytest.importorskip("av")

NTSC = Fraction(30000, 1001)


def write_clip(
    path: Path,
    frames: int = 12,
    size: tuple[int, int] = (64, 80),
    rate: Fraction = NTSC,
    rotation: int | None = None,
    faststart: bool = False,
    codec: str = "libx264",
) -> Path:
    """A clip of ``frames`` frames ``(height, width)``: a yellow box moving right over a green
    block on dark blue; H.264, or any ``codec`` (``ffv1``: lossless, any size); ``rotation``
    stores a display rotation (counter-clockwise)."""
    h, w = size
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", options=options) as container:
        stream = container.add_stream(codec, rate=rate)
        stream.height, stream.width = h, w
        stream.pix_fmt = "yuv420p" if codec == "libx264" else "bgr0"
        stream.options = {"g": "4"}  # key frames often: a truncated file fails part-way
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for i in range(frames):
            rgb = np.zeros((h, w, 3), np.uint8)
            rgb[..., 2] = 70
            rgb[h // 2 :, : w // 3] = (0, 180, 60)
            x = (5 * i) % w
            rgb[4 : h // 3, x : x + w // 5] = (250, 210, 0)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        container.mux(stream.encode(None))
    return path


def decode(path: Path) -> tuple[list[np.ndarray], Fraction, str]:
    """Every frame of a video as RGB ``(H, W, 3)``, its frame rate and codec name."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        return frames, Fraction(stream.average_rate), stream.codec_context.name


@pytest.fixture(scope="module")
def seg() -> Segmenter:
    """A tiny untrained three-class U-Net with non-trivial batch-norm statistics."""
    torch.manual_seed(0)
    model = create_model("unet", num_classes=3, in_channels=3, base_channels=4, depth=2)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    palette = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]
    return Segmenter(model.eval(), mean=[0.5] * 3, std=[0.25] * 3, palette=palette, device="cpu")


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_clip(tmp_path_factory.mktemp("clip") / "street.mp4")


def _expected(seg: Segmenter, frames: list[np.ndarray]) -> list[torch.Tensor]:
    return [seg.predict(torch.from_numpy(f).permute(2, 0, 1).contiguous()) for f in frames]


def _blocks(rgb: np.ndarray) -> np.ndarray:
    """Means of the 2x2 blocks of an ``(H, W, 3)`` picture (an odd last row/column dropped)."""
    h, w = rgb.shape[0] // 2 * 2, rgb.shape[1] // 2 * 2
    return rgb[:h, :w].astype(float).reshape(h // 2, 2, w // 2, 2, 3).mean((1, 3))


def _check_outputs(seg: Segmenter, done, source: list[np.ndarray], alpha: float) -> None:
    """The label maps are the predictions on the decoded input frames; the overlay video has
    as many frames, at the input's rate, each close to ``overlay`` of frame and labels."""
    expected = _expected(seg, source)
    maps = sorted(done.frames_dir.iterdir())
    assert [p.name for p in maps] == [f"{k:06d}.png" for k in range(len(source))]
    for path, labels in zip(maps, expected):
        assert torch.equal(read_mask(path), labels)
    assert Image.open(maps[0]).getpalette()[:9] == [c for rgb in seg.palette for c in rgb]
    shown, rate, _ = decode(done.video)
    assert len(shown) == len(source) == done.frames
    h, w = source[0].shape[:2]
    assert shown[0].shape == (h + h % 2, w + w % 2, 3)
    for picture, rgb, labels in zip(shown, source, expected):
        want = overlay(rgb, labels, seg.palette, alpha=alpha)
        # yuv420p keeps one colour per 2x2 block, and the untrained model's labels are speckled:
        # compare 2x2 block means (measured: at most ~4 grey levels off; ~50 with the palette
        # reversed).
        assert np.abs(_blocks(picture[:h, :w]) - _blocks(want)).mean() < 8
    assert abs(float(rate) - float(NTSC)) < 0.01


def test_overlay_video_and_label_maps(seg: Segmenter, clip: Path, tmp_path: Path) -> None:
    done = predict_video(seg, clip, tmp_path / "out", batch_size=5, alpha=0.6, frames=True)
    assert done.video == tmp_path / "out" / "street_overlay.mp4"
    assert done.frames_dir == tmp_path / "out" / "street_frames"
    assert (done.size, done.rate, done.frames) == ((64, 80), NTSC, 12)
    _check_outputs(seg, done, decode(clip)[0], alpha=0.6)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "street_frames",
        "street_overlay.mp4",
    ]  # no temporary file left


def test_odd_sizes_and_mpeg4(seg: Segmenter, tmp_path: Path, monkeypatch) -> None:
    # Odd sides: the label maps keep them, the yuv420p video is padded by one row and column;
    # also the MPEG-4 encoder used where PyAV's FFmpeg lacks libx264.
    monkeypatch.setattr(video_mod, "video_codec", lambda av: "mpeg4")
    odd = write_clip(tmp_path / "odd.mkv", frames=5, size=(63, 81), codec="ffv1")
    done = predict_video(seg, odd, tmp_path / "out", frames=True, progress=False)
    assert done.size == (63, 81)
    assert decode(done.video)[2] == "mpeg4"
    _check_outputs(seg, done, decode(odd)[0], alpha=0.5)


def test_display_rotation_is_applied(seg: Segmenter, tmp_path: Path) -> None:
    # A phone's portrait video: landscape frames with a display rotation, shown upright.
    clip = write_clip(tmp_path / "phone.mp4", frames=3, size=(32, 48), rotation=90)
    upright = [np.ascontiguousarray(np.rot90(f)) for f in decode(clip)[0]]
    done = predict_video(seg, clip, tmp_path / "out", frames=True, progress=False)
    assert done.size == (48, 32)
    _check_outputs(seg, done, upright, alpha=0.5)


def test_cli_video(clip: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    ckpt = save_em_checkpoint(tmp_path / "em.pt", "unet", base_channels=4, depth=2)
    monkeypatch.chdir(tmp_path)
    args = ["predict", str(clip), "--model", str(ckpt), "--out", "pred", "--batch-size", "3"]
    assert main([*args, "--frames"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("wrote pred/street_overlay.mp4 and 12 label maps in pred/street_frames")
    assert "12 frames in" in line and "frames/s)" in line
    assert len(decode(tmp_path / "pred" / "street_overlay.mp4")[0]) == 12
    # The checkpoint's one-channel model segments the frames' luma, as it does an RGB image.
    first = _expected(load_model(str(ckpt), device="cpu"), decode(clip)[0][:1])[0]
    assert torch.equal(read_mask(tmp_path / "pred/street_frames/000000.png"), first)
    before = snapshot(tmp_path / "pred")
    assert "pass --overwrite" in run_cli([*args, "--frames"], capsys)
    assert "pass --overwrite" in run_cli(args, capsys)
    assert snapshot(tmp_path / "pred") == before
    assert main([*args, "--overwrite"]) == 0
    capsys.readouterr()
    assert "--probs is for images" in run_cli([*args, "--probs", "--out", "p2"], capsys)
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    assert "--frames is for a video" in run_cli(["predict", "a.png", "--frames"], capsys)
    assert "one process" in run_cli([*args, "--nproc", "2", "--out", "p2"], capsys)
    assert "is the folder of the input" in run_cli([*args, "--out", str(clip.parent)], capsys)
    assert not (tmp_path / "p2").exists()


def _truncated(tmp_path: Path) -> Path:
    data = write_clip(tmp_path / "full.mp4", frames=24, faststart=True).read_bytes()
    path = tmp_path / "cut.mp4"
    path.write_bytes(data[: int(len(data) * 0.8)])  # the index is whole, frames 12+ are gone
    return path


def _audio_only(tmp_path: Path) -> Path:
    path = tmp_path / "talk.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), "fltp", "mono")
        frame.sample_rate = 8000
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


BAD = {
    "not a video": (lambda d: _write(d / "notes.mp4", b"hello, not a video\n" * 40), "notes.mp4"),
    "empty": (lambda d: _write(d / "empty.mkv", b""), "empty.mkv"),
    "truncated": (_truncated, "cut.mp4"),
    "no video stream": (_audio_only, "no video stream"),
    "missing": (lambda d: d / "absent.mp4", "absent.mp4 does not exist"),
}


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("case", list(BAD))
def test_bad_videos_leave_nothing(case: str, seg: Segmenter, tmp_path: Path, monkeypatch) -> None:
    make, named = BAD[case]
    source = make(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(DataError, match=named) as err:
        predict_video(seg, source, out, batch_size=2, frames=True, progress=False)
    assert "\n" not in str(err.value)
    assert not out.exists()  # not even the folder, let alone half a video or some label maps
    out.mkdir()  # an --out that exists keeps existing, empty
    with pytest.raises(DataError, match=named):
        predict_video(seg, source, out, batch_size=2, frames=True, progress=False)
    assert list(out.iterdir()) == []


def test_pixel_limit_and_instance_models(seg: Segmenter, clip: Path, tmp_path, monkeypatch):
    monkeypatch.setenv(MAX_PIXELS_ENV, "5000")  # the clip's frames are 64 x 80 = 5120 pixels
    with pytest.raises(DataError, match=f"street.mp4 has frames of 80x64 .*{MAX_PIXELS_ENV}"):
        predict_video(seg, clip, tmp_path / "out")
    monkeypatch.setenv(MAX_PIXELS_ENV, "5120")
    assert predict_video(seg, clip, tmp_path / "out", progress=False).frames == 12

    class Instances:
        task = "instance"

    with pytest.raises(ConfigError, match="not an instance model"):
        predict_video(Instances(), clip, tmp_path / "out2")  # type: ignore[arg-type]


def test_missing_pyav(clip: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "av", None)  # `import av` raises ImportError
    assert run_cli(["predict", str(clip), "--out", str(tmp_path / "o")], capsys).endswith(
        PYAV_MISSING
    )
    assert not (tmp_path / "o").exists()
