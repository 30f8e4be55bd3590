"""The one image/mask reader and writer, and the one palette."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from denseseg.data.io import image_info, read_image, read_mask, write_image, write_mask
from denseseg.data.palette import (
    IGNORE_COLOR,
    colorize,
    default_palette,
    overlay,
    palette_to_flat,
)
from denseseg.errors import DataError

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
GRAY = RNG.integers(0, 256, size=(5, 7), dtype=np.uint8)
# Palette whose colours differ from their indices, so reading colours instead of indices shows.
PAL = [(200, 10, 10), (10, 200, 10), (10, 10, 200), (90, 90, 90)]


def _palette_png(path, indices: np.ndarray, palette=PAL) -> None:
    img = Image.fromarray(indices.astype(np.uint8))
    img.putpalette([v for c in palette for v in c])
    assert img.mode == "P"
    img.save(path)


# ---------------------------------------------------------------- read_image


def test_read_rgb_png_exact(tmp_path):
    Image.fromarray(RGB).save(tmp_path / "a.png")
    img = read_image(tmp_path / "a.png")
    assert img.dtype == torch.uint8 and img.shape == (3, 5, 7)
    assert np.array_equal(img.permute(1, 2, 0).numpy(), RGB)


def test_read_gray_stays_one_channel(tmp_path):
    Image.fromarray(GRAY).save(tmp_path / "g.png")
    img = read_image(tmp_path / "g.png")
    assert img.shape == (1, 5, 7) and np.array_equal(img[0].numpy(), GRAY)


def test_read_16bit_gray_scaled_to_8bit(tmp_path):
    values = np.array([[0, 257, 65535], [32896, 1000, 514]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    img = read_image(tmp_path / "g16.png")
    assert img.shape == (1, 2, 3) and img.dtype == torch.uint8
    assert img[0].tolist() == [[0, 1, 255], [128, 4, 2]]


def test_read_one_bit_image(tmp_path):
    bits = np.array([[True, False], [False, True]])
    Image.fromarray(bits).save(tmp_path / "b.png")
    assert Image.open(tmp_path / "b.png").mode == "1"
    assert read_image(tmp_path / "b.png")[0].tolist() == [[255, 0], [0, 255]]


def test_rgba_and_la_drop_alpha_without_compositing(tmp_path):
    alpha = np.zeros((5, 7, 1), dtype=np.uint8)  # fully transparent: compositing would blank it
    Image.fromarray(np.concatenate([RGB, alpha], axis=2)).save(tmp_path / "rgba.png")
    Image.fromarray(np.stack([GRAY, GRAY // 2], axis=2), mode="LA").save(tmp_path / "la.png")
    rgba = read_image(tmp_path / "rgba.png")
    la = read_image(tmp_path / "la.png")
    assert rgba.shape == (3, 5, 7) and np.array_equal(rgba.permute(1, 2, 0).numpy(), RGB)
    assert la.shape == (1, 5, 7) and np.array_equal(la[0].numpy(), GRAY)


def test_palette_image_becomes_rgb(tmp_path):
    idx = np.array([[0, 1, 2], [3, 2, 1]])
    _palette_png(tmp_path / "p.png", idx)
    img = read_image(tmp_path / "p.png")
    assert img.shape == (3, 2, 3)
    expected = np.array(PAL, dtype=np.uint8)[idx]
    assert np.array_equal(img.permute(1, 2, 0).numpy(), expected)


def test_jpeg_rgb_and_gray(tmp_path):
    flat = np.full((16, 16, 3), (40, 120, 200), dtype=np.uint8)
    Image.fromarray(flat).save(tmp_path / "c.jpg", quality=95)
    Image.fromarray(np.full((16, 16), 77, np.uint8)).save(tmp_path / "g.jpeg", quality=95)
    img = read_image(tmp_path / "c.jpg")
    assert img.shape == (3, 16, 16)
    assert (img.permute(1, 2, 0).int() - torch.tensor([40, 120, 200])).abs().max() <= 3
    gray = read_image(tmp_path / "g.jpeg")
    assert gray.shape == (1, 16, 16) and (gray.int() - 77).abs().max() <= 2


def test_exif_orientation_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(RGB).save(tmp_path / "r.png", exif=exif)
    img = read_image(tmp_path / "r.png")
    expected = np.rot90(RGB, k=-1)
    assert img.shape == (3, 7, 5)
    assert np.array_equal(img.permute(1, 2, 0).numpy(), expected)
    info = image_info(tmp_path / "r.png")
    assert (info.channels, info.height, info.width) == (3, 7, 5)


def test_image_info_matches_reader(tmp_path):
    Image.fromarray(GRAY).save(tmp_path / "g.png")
    _palette_png(tmp_path / "p.png", np.zeros((4, 6)))
    for name in ("g.png", "p.png"):
        info = image_info(tmp_path / name)
        assert (info.channels, info.height, info.width) == tuple(read_image(tmp_path / name).shape)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="nope.png does not exist"):
        read_image(tmp_path / "nope.png")
    with pytest.raises(DataError, match="nope.png does not exist"):
        read_mask(tmp_path / "nope.png")


def test_truncated_png(tmp_path):
    noise = RNG.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "half.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"half\.png is truncated or corrupt"):
        read_image(tmp_path / "half.png")
    with pytest.raises(DataError, match=r"half\.png is truncated or corrupt"):
        read_mask(tmp_path / "half.png")


def test_unknown_format(tmp_path):
    (tmp_path / "notes.png").write_text("not an image at all")
    with pytest.raises(DataError, match=r"notes\.png is not an image format"):
        read_image(tmp_path / "notes.png")


# ---------------------------------------------------------------- read_mask


def test_read_mask_gray(tmp_path):
    labels = np.array([[0, 1, 2], [255, 3, 0]], dtype=np.uint8)
    Image.fromarray(labels).save(tmp_path / "m.png")
    mask = read_mask(tmp_path / "m.png")
    assert mask.dtype == torch.int64 and mask.tolist() == labels.tolist()


def test_read_mask_palette_as_indices(tmp_path):
    idx = np.array([[0, 1, 2], [3, 2, 1]])
    _palette_png(tmp_path / "m.png", idx)
    mask = read_mask(tmp_path / "m.png")
    assert mask.shape == (2, 3) and mask.tolist() == idx.tolist()


def test_read_mask_16bit_keeps_large_labels(tmp_path):
    labels = np.array([[0, 300], [1000, 65535]], dtype=np.uint16)
    Image.fromarray(labels).save(tmp_path / "m16.png")
    assert read_mask(tmp_path / "m16.png").tolist() == labels.tolist()


@pytest.mark.parametrize("channels", [3, 4])
def test_read_mask_rejects_colour(tmp_path, channels):
    Image.fromarray(np.zeros((3, 3, channels), np.uint8)).save(tmp_path / "m.png")
    with pytest.raises(DataError, match=r"m\.png is RGBA?; save class indices as a single-channel"):
        read_mask(tmp_path / "m.png")


# ---------------------------------------------------------------- writers


def test_write_mask_palette_roundtrip(tmp_path):
    labels = torch.tensor([[0, 1, 2], [255, 1, 0]])
    write_mask(tmp_path / "sub" / "m.png", labels, palette=PAL)
    img = Image.open(tmp_path / "sub" / "m.png")
    assert img.mode == "P"
    flat = img.getpalette()
    assert flat[:12] == [v for c in PAL for v in c]
    assert flat[3 * 255 : 3 * 256] == list(IGNORE_COLOR)
    assert torch.equal(read_mask(tmp_path / "sub" / "m.png"), labels)


def test_write_mask_gray_and_16bit(tmp_path):
    small = np.array([[0, 7], [255, 3]])
    write_mask(tmp_path / "a.png", small)
    assert Image.open(tmp_path / "a.png").mode == "L"
    assert read_mask(tmp_path / "a.png").tolist() == small.tolist()
    big = np.array([[0, 256], [4000, 3]])
    write_mask(tmp_path / "b.png", big)
    assert read_mask(tmp_path / "b.png").tolist() == big.tolist()


def test_write_mask_errors(tmp_path):
    with pytest.raises(DataError, match="below 256"):
        write_mask(tmp_path / "a.png", np.array([[0, 300]]), palette=PAL)
    with pytest.raises(DataError, match=r"\.png"):
        write_mask(tmp_path / "a.jpg", np.zeros((2, 2), np.int64))
    with pytest.raises(DataError, match="negative"):
        write_mask(tmp_path / "a.png", np.array([[-1, 0]]))


def test_write_image_roundtrip(tmp_path):
    chw = torch.from_numpy(RGB).permute(2, 0, 1).contiguous()
    write_image(tmp_path / "t.png", chw)
    write_image(tmp_path / "a.png", RGB)
    write_image(tmp_path / "g.png", torch.from_numpy(GRAY)[None])
    assert np.array_equal(read_image(tmp_path / "t.png").numpy(), chw.numpy())
    assert np.array_equal(read_image(tmp_path / "a.png").numpy(), chw.numpy())
    assert np.array_equal(read_image(tmp_path / "g.png")[0].numpy(), GRAY)
    with pytest.raises(ValueError, match="uint8"):
        write_image(tmp_path / "f.png", chw.float())


# ---------------------------------------------------------------- palette


def test_default_palette_is_voc():
    pal = default_palette(256)
    assert pal[:6] == [
        (0, 0, 0),
        (128, 0, 0),
        (0, 128, 0),
        (128, 128, 0),
        (0, 0, 128),
        (128, 0, 128),
    ]
    assert pal[15] == (192, 128, 128)  # VOC "person"
    assert pal[255] == IGNORE_COLOR == (224, 224, 192)
    assert len(set(pal)) == 256
    assert default_palette(3) == pal[:3]


def test_palette_to_flat_pads_with_defaults():
    flat = palette_to_flat(PAL)
    assert len(flat) == 768
    assert flat[:12] == [v for c in PAL for v in c]
    assert flat[12:15] == list(default_palette(5)[4])
    assert flat[-3:] == [224, 224, 192]
    with pytest.raises(ValueError):
        palette_to_flat([(0, 0, 300)])


def test_colorize_pixels():
    mask = torch.tensor([[0, 1], [255, 2]])
    out = colorize(mask, PAL)
    assert out.dtype == np.uint8 and out.shape == (2, 2, 3)
    assert out[0, 0].tolist() == list(PAL[0]) and out[0, 1].tolist() == list(PAL[1])
    assert out[1, 0].tolist() == list(IGNORE_COLOR) and out[1, 1].tolist() == list(PAL[2])
    assert colorize(mask)[0, 1].tolist() == [128, 0, 0]
    with pytest.raises(ValueError, match=r"labels \[4\]"):
        colorize(np.array([[4]]), PAL)


def test_overlay_blends_and_keeps_ignored():
    image = torch.tensor([[[100, 0]], [[50, 10]], [[0, 20]]], dtype=torch.uint8)  # (3, 1, 2)
    mask = np.array([[1, 255]])
    out = overlay(image, mask, PAL, alpha=0.25)
    # 0.75 * (100, 50, 0) + 0.25 * (10, 200, 10) = (77.5, 87.5, 2.5) -> rint (78, 88, 2)
    assert out.shape == (1, 2, 3)
    assert out[0, 0].tolist() == [78, 88, 2]
    assert out[0, 1].tolist() == [0, 10, 20]
    gray = overlay(np.full((1, 2), 40, np.uint8), np.array([[0, 0]]), PAL, alpha=0.5)
    assert gray[0, 0].tolist() == [120, 25, 25]
