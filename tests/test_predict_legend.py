"""``denseseg predict``: overlays carry a legend of the classes present; the label PNG is the labels
alone; the progress bar moves per image (and shows the passes of test-time augmentation)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from denseseg.data.palette import draw_legend, draw_legend_band, overlay
from denseseg.engine import predict as predict_module
from denseseg.engine.predict import predict_folder
from denseseg.inference.segmenter import Segmenter

# Saturated colours: the darkened legend box (at most 30% of 255) and its grey text cannot make
# them, so where they appear in the box they are swatches.
PALETTE = [(0, 0, 255), (255, 0, 0), (0, 255, 0)]
NAMES = ["background", "left", "right"]


class Halves(nn.Module):
    """Class 1 on the left half of any input, class 2 on the right; class 0 never."""

    num_classes = 3
    in_channels = 3

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        n, _, h, w = x.shape
        out = torch.zeros(n, 3, h, w)
        out[:, 1, :, : w // 2] = 5.0
        out[:, 2, :, w // 2 :] = 5.0
        return {"out": out}


def _segmenter(**kwargs: Any) -> Segmenter:
    return Segmenter(
        Halves(),
        mean=[0.5] * 3,
        std=[0.25] * 3,
        class_names=NAMES,
        palette=PALETTE,
        device="cpu",
        **kwargs,
    )


def _images(folder: Path, n: int, size: tuple[int, int] = (60, 80)) -> list[Path]:
    folder.mkdir()
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = folder / f"im{i}.png"
        Image.fromarray(rng.integers(40, 200, (*size, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


class Bar:
    """Stands in for tqdm: records what predict tells it."""

    made: list[Bar] = []

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.updates: list[int] = []
        self.notes: list[str] = []
        Bar.made.append(self)

    def __enter__(self) -> Bar:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def update(self, n: int = 1) -> None:
        self.updates.append(n)

    def set_postfix_str(self, text: str = "", refresh: bool = True) -> None:
        self.notes.append(text)


@pytest.fixture
def bar(monkeypatch: pytest.MonkeyPatch) -> type[Bar]:
    Bar.made = []
    monkeypatch.setattr(predict_module, "tqdm", Bar)
    return Bar


def _swatch_pixels(picture: np.ndarray, color: tuple[int, int, int]) -> int:
    return int((picture == np.array(color, np.uint8)).all(-1).sum())


def test_overlay_has_a_legend_and_the_label_png_is_the_labels(tmp_path: Path, bar: Any) -> None:
    seg = _segmenter()
    (path,) = _images(tmp_path / "in", 1)
    predict_folder(seg, path, tmp_path / "out")
    image = np.array(Image.open(path))
    labels = seg.predict(torch.from_numpy(image).permute(2, 0, 1).contiguous())

    with Image.open(tmp_path / "out" / "im0.png") as png:  # the label map: labels alone
        assert png.mode == "P" and np.array_equal(np.asarray(png), labels.numpy())
    with Image.open(tmp_path / "out" / "im0_overlay.png") as over:
        picture = np.asarray(over.convert("RGB"))
    assert picture.shape == image.shape  # the legend lies inside the picture
    h, w = image.shape[:2]
    corner = picture[h // 2 :, : w // 2]  # the legend's: bottom left
    assert _swatch_pixels(corner, PALETTE[1]) >= 16 and _swatch_pixels(corner, PALETTE[2]) >= 16
    assert _swatch_pixels(picture, PALETTE[0]) == 0  # background is not present: no swatch
    plain = overlay(image, labels, PALETTE, alpha=0.5)
    assert np.array_equal(picture[: h // 2], plain[: h // 2])
    assert np.array_equal(picture[:, 3 * w // 4 :], plain[:, 3 * w // 4 :])
    assert not np.array_equal(picture[-8:, :8], plain[-8:, :8])


def test_progress_moves_per_image_and_shows_passes(tmp_path: Path, bar: Any) -> None:
    _images(tmp_path / "in", 3)
    predict_folder(_segmenter(), tmp_path / "in", tmp_path / "a", batch_size=3)
    (plain,) = bar.made
    assert plain.updates == [1, 1, 1]  # one batch, three steps
    assert not [n for n in plain.notes if n]  # one pass: nothing to show

    bar.made = []
    predict_folder(_segmenter(tta="d4"), tmp_path / "in", tmp_path / "b", batch_size=2)
    (tta,) = bar.made
    assert tta.updates == [1, 1, 1]
    passes = [n for n in tta.notes if n]
    assert passes == [f"pass {k}/8" for k in range(1, 9)] * 2  # two batches of 8 passes


def test_predict_batch_reports_every_pass() -> None:
    seen: list[tuple[int, int]] = []
    images = [torch.zeros(3, 20, 24, dtype=torch.uint8)] * 2
    _segmenter(tta="hflip").predict_batch(images, on_pass=lambda d, t: seen.append((d, t)))
    assert seen == [(1, 2), (2, 2)]
    seen.clear()
    slide = _segmenter(mode="slide", crop_size=16, stride=12)
    slide.predict_batch(images, on_pass=lambda d, t: seen.append((d, t)))
    assert seen == [(1, 2), (2, 2)]  # slide: one pass per image
    assert _segmenter(tta="d4").passes == 8 and _segmenter().passes == 1


def test_legend_sums_up_what_does_not_fit_and_skips_tiny_pictures() -> None:
    labels = np.arange(40 * 60).reshape(40, 60) % 12
    colors = [(10 * i + 5, 255 - 10 * i, 255) for i in range(12)]
    picture = np.full((40, 60, 3), 128, np.uint8)
    names = [f"class\nname {i} \u00e9\u4e2d" for i in range(12)]  # odd names draw on one line
    out = draw_legend(picture, labels, colors, names)
    assert out.shape == picture.shape and out.dtype == np.uint8
    shown = [c for c in colors if _swatch_pixels(out, c)]
    assert 0 < len(shown) < len(colors) and shown == colors[: len(shown)]
    tiny = np.full((6, 6, 3), 128, np.uint8)
    assert np.array_equal(draw_legend(tiny, np.zeros((6, 6), int), colors), tiny)
    ignored = draw_legend(picture, np.full((40, 60), 255), colors)  # only ignored pixels
    assert np.array_equal(ignored, picture)


def test_legend_band_matches_the_whole_picture() -> None:
    # Pictures written strip by strip (engine/large_image.py) get the same legend pixels.
    rng = np.random.default_rng(1)
    picture = rng.integers(0, 256, (300, 200, 3), dtype=np.uint8)
    labels = rng.integers(0, 5, (300, 200))
    colors = [(255, 0, 255), (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    whole = draw_legend(picture, labels, colors, ["a", "b", "c", "d", "e"])
    for start in (0, 150, 217):
        band = draw_legend_band(picture[start:], start, 300, [0, 1, 2, 3, 4], colors, "abcde")
        assert np.array_equal(band, whole[start:]), start
