"""Sliding-window inference (mode="slide"), multi-scale + flip TTA (tta="ms"), the inputs
``Segmenter.predict`` takes, ``predict_large`` (strip by strip, the same labels as ``predict``),
and slide settings packed with a model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import save_em_checkpoint
from denseseg.cli import main
from denseseg.errors import ConfigError, DataError
from denseseg.inference.segmenter import MS_SCALES, Segmenter
from denseseg.inference.slide import gaussian_weights, window_starts
from denseseg.models import create_model
from denseseg.pretrained import load_builtin

MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]


class ConvNet(torch.nn.Module):
    """One 5x5 zero-padded convolution: its output near a window's border depends on where the
    window was cut, so overlapping windows disagree and their averaging is visible."""

    num_classes = 3
    in_channels = 3

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = torch.nn.Conv2d(3, 3, 5, padding=2)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": self.conv(x)}


def _seg(model: torch.nn.Module, **kw) -> Segmenter:
    return Segmenter(model, mean=MEAN, std=STD, device="cpu", **kw)


def _unet(num_classes: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(
        "unet", num_classes=num_classes, in_channels=3, base_channels=4, depth=2
    ).eval()


def _image(h: int = 45, w: int = 61, seed: int = 0, c: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (c, h, w), generator=g, dtype=torch.uint8)


def _reference_slide(seg: Segmenter, image: torch.Tensor, crop, stride, gaussian: bool):
    """mmsegmentation's slide_inference written out (full-size sums, one window at a time), with
    nnU-Net's Gaussian map computed here from its definition."""
    x = seg.preprocess(image)[None]
    h, w = x.shape[-2:]
    (ch, cw), (sh, sw) = crop, stride
    preds = torch.zeros(1, seg.num_classes, h, w, dtype=torch.float64)
    weight_sum = torch.zeros(h, w, dtype=torch.float64)
    rows = max(h - ch + sh - 1, 0) // sh + 1
    cols = max(w - cw + sw - 1, 0) // sw + 1
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * sh + ch, h), min(c * sw + cw, w)
            y1, x1 = max(y2 - ch, 0), max(x2 - cw, 0)
            out = seg.model(x[..., y1:y2, x1:x2])["out"].double()
            wt = torch.ones(y2 - y1, x2 - x1, dtype=torch.float64)
            if gaussian:
                gy = [
                    math.exp(-((i - (y2 - y1 - 1) / 2) ** 2) / (2 * ((y2 - y1) / 8) ** 2))
                    for i in range(y2 - y1)
                ]
                gx = [
                    math.exp(-((i - (x2 - x1 - 1) / 2) ** 2) / (2 * ((x2 - x1) / 8) ** 2))
                    for i in range(x2 - x1)
                ]
                wt = torch.tensor(gy, dtype=torch.float64)[:, None] * torch.tensor(gx)[None]
            preds[..., y1:y2, x1:x2] += out * wt
            weight_sum[y1:y2, x1:x2] += wt
    return (preds / weight_sum).float()


# ------------------------------------------------------------------------- windows


def test_window_starts_as_mmsegmentation() -> None:
    assert window_starts(10, 4, 3) == [0, 3, 6]  # 6 + 4 = 10: the grid ends on the border
    assert window_starts(11, 4, 3) == [0, 3, 6, 7]  # the last window moved back to the end
    assert window_starts(4, 4, 3) == [0]
    assert window_starts(1024, 512, 341) == [0, 341, 512]


def test_gaussian_weights_follow_nnunet() -> None:
    g = gaussian_weights(33, 20)
    assert g.shape == (33, 20) and g.dtype == torch.float32
    assert torch.equal(g, g.flip(0)) and torch.equal(g, g.flip(1))  # exactly: mirrored windows
    sigma = 33 / 8  # nnU-Net: sigma = window / 8, peak 1 at the centre
    expected = math.exp(-(4**2) / (2 * sigma**2))
    assert g[16].max().item() == pytest.approx(g[16 + 4].max().item() / expected, rel=1e-5)
    assert 1e-4 < g[16, 0] < 1e-3 and 1e-8 < g.min() < 1e-6  # ~exp(-8) per axis, never zero


@pytest.mark.parametrize("weighting", ["uniform", "gaussian"])
@pytest.mark.parametrize(("crop", "size"), [((45, 61), (45, 61)), (64, (40, 50))])
def test_one_window_gives_the_whole_image_result(weighting: str, crop, size) -> None:
    model = _unet()
    image = _image(*size)
    whole = _seg(model)
    slide = _seg(model, mode="slide", crop_size=crop, stride=8, weighting=weighting)
    x = whole.preprocess(image)[None]
    assert torch.equal(slide.logits(x), whole.logits(x))
    assert torch.equal(slide.predict(image), whole.predict(image))
    assert torch.equal(slide.predict_proba(image), whole.predict_proba(image))


@pytest.mark.parametrize("weighting", ["uniform", "gaussian"])
@pytest.mark.parametrize(("crop", "stride"), [((16, 20), (10, 12)), ((20, 20), (20, 20))])
def test_slide_matches_the_written_out_definition(weighting: str, crop, stride) -> None:
    model = ConvNet().eval()
    image = _image(45, 61)  # neither side a multiple of the stride: last windows moved back
    seg = _seg(model, mode="slide", crop_size=crop, stride=stride, weighting=weighting)
    got = seg.logits(seg.preprocess(image)[None])
    want = _reference_slide(seg, image, crop, stride, weighting == "gaussian")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # Not the whole-image result: windows cut the 5x5 convolution's context at their borders.
    whole = _seg(model).logits(seg.preprocess(image)[None])
    assert (got - whole).abs().max() > 1e-2


def test_gaussian_weighting_differs_from_uniform_but_keeps_a_pixelwise_model() -> None:
    image = _image(45, 61)
    conv = ConvNet().eval()
    kw = {"mode": "slide", "crop_size": (16, 20), "stride": (8, 10)}
    uni = _seg(conv, **kw).predict_proba(image)
    gau = _seg(conv, weighting="gaussian", **kw).predict_proba(image)
    assert (uni - gau).abs().max() > 1e-3
    # Every window gives a 1x1-convolution model the same logits at a pixel: any weighted mean
    # of them is the whole-image result.
    torch.manual_seed(0)
    pixelwise = create_model("pixelwise", num_classes=4, in_channels=3, hidden=(8,)).eval()
    whole = _seg(pixelwise).predict_proba(image)
    for weighting in ("uniform", "gaussian"):
        got = _seg(pixelwise, weighting=weighting, **kw).predict_proba(image)
        torch.testing.assert_close(got, whole, rtol=1e-5, atol=1e-6)


def test_window_batch_and_mixed_sizes_do_not_change_the_result() -> None:
    model = _unet()
    kw = {"mode": "slide", "crop_size": (24, 32), "stride": 16}
    images = [_image(45, 61, seed=1), _image(30, 90, seed=2), _image(20, 20, seed=3)]
    one = _seg(model, window_batch=1, **kw)
    many = _seg(model, window_batch=7, **kw)
    labels, probs = many.predict_batch(images, return_probs=True)
    for image, label, prob in zip(images, labels, probs):
        # Each image slides on its own, not over its batch-mates' padding.
        torch.testing.assert_close(prob, one.predict_proba(image), rtol=1e-4, atol=1e-5)
        assert prob.shape == (3, *image.shape[-2:]) and label.shape == image.shape[-2:]


def test_slide_settings_are_checked() -> None:
    model = _unet()
    seg = _seg(model, mode="slide", crop_size=[32, 40], stride=(20, 24))
    assert seg.crop_size == (32, 40) and seg.stride == (20, 24)
    assert _seg(model, mode="slide", crop_size=769).stride == (513, 513)  # two thirds, rounded
    assert _seg(model, mode="slide", crop_size=[512]).crop_size == (512, 512)
    assert "slide (32, 40) stride (20, 24) uniform" in repr(seg)
    bad = [
        ({"crop_size": None}, "needs crop_size"),
        ({"crop_size": 0}, "crop_size=0 must be"),
        ({"crop_size": (8, 8, 8)}, "crop_size=.*must be"),
        ({"crop_size": "64"}, "crop_size='64' must be"),
        ({"crop_size": 2.5}, "crop_size=2.5 must be"),
        ({"crop_size": True}, "crop_size=True must be"),
        ({"crop_size": 16, "stride": 0}, "stride=0 must be"),
        ({"crop_size": 16, "stride": 17}, "stride=17 is larger than crop_size=16"),
        ({"crop_size": (16, 32), "stride": (8, 40)}, r"stride=\(8, 40\) is larger"),
        ({"crop_size": 16, "weighting": "cosine"}, "weighting 'cosine'"),
        ({"crop_size": 16, "window_batch": 0}, "window_batch=0"),
    ]
    for options, message in bad:
        with pytest.raises(ConfigError, match=message):
            _seg(model, mode="slide", **options)
    with pytest.raises(ConfigError, match="whole, slide, overlap_tile"):
        _seg(model, mode="sliding")
    valid = create_model("unet_valid", num_classes=2, in_channels=3, base_channels=4, depth=2)
    with pytest.raises(ConfigError, match="valid-padding.*overlap_tile"):
        _seg(valid, mode="slide", crop_size=64)
    # --crop-size serves overlap_tile too (the command line's one option for both).
    tiled = _seg(valid, mode="overlap_tile", crop_size=64, tile_size=572)
    assert tiled.tile_size == (64, 64)


# ------------------------------------------------------------------------- multi-scale TTA


def test_ms_at_one_scale_is_flip_testing() -> None:
    model = _unet()
    image = _image()
    flip = _seg(model, tta="hflip").predict_proba(image)
    torch.testing.assert_close(_seg(model, tta="ms", scales=(1.0,)).predict_proba(image), flip)
    kw = {"mode": "slide", "crop_size": 24, "stride": 16}
    torch.testing.assert_close(
        _seg(model, tta="ms", scales=[1], **kw).predict_proba(image),
        _seg(model, tta="hflip", **kw).predict_proba(image),
    )


@pytest.mark.parametrize("slide", [False, True])
def test_ms_averages_scaled_and_mirrored_passes(slide: bool) -> None:
    model = _unet()
    image = _image(30, 41)
    kw = {"mode": "slide", "crop_size": (24, 32), "stride": 16} if slide else {}
    plain = _seg(model, **kw)  # one pass in the same mode: each scaled image slides the same
    x = plain.preprocess(image)[None]
    scales = (0.5, 1.0, 1.5)
    total = torch.zeros(1, 3, 30, 41)
    for s in scales:
        size = (int(30 * s + 0.5), int(41 * s + 0.5))
        y = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        for mirror in (False, True):
            out = plain.logits(y.flip(-1) if mirror else y)
            out = out.flip(-1) if mirror else out
            out = F.interpolate(out, size=(30, 41), mode="bilinear", align_corners=False)
            total += out.softmax(1)
    got = _seg(model, tta="ms", scales=scales, **kw).predict_proba(image)
    torch.testing.assert_close(got, (total / 6)[0], rtol=1e-4, atol=1e-5)
    assert _seg(model, tta="ms").scales == MS_SCALES == (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


def test_ms_for_a_binary_model_and_bad_scales() -> None:
    model = _unet(num_classes=1)
    image = _image(24, 30)
    probs = _seg(model, tta="ms", scales=(0.75, 1.25)).predict_proba(image)
    assert probs.shape == (2, 24, 30)
    torch.testing.assert_close(probs.sum(0), torch.ones(24, 30))
    for scales, message in [((), "non-empty"), ((1.0, -0.5), "positive"), ("1", "positive")]:
        with pytest.raises(ConfigError, match=message):
            _seg(model, tta="ms", scales=scales)
    with pytest.raises(ConfigError, match="scales apply to tta='ms' only"):
        _seg(model, tta="hflip", scales=(1.0,))


# ------------------------------------------------------------------------- inputs


def test_predict_takes_what_users_hold(tmp_path: Path) -> None:
    seg = _seg(_unet())
    image = _image(21, 26)
    want = seg.predict(image)
    hwc = image.permute(1, 2, 0).numpy().copy()
    Image.fromarray(hwc).save(tmp_path / "im.png")
    rgba = np.concatenate([hwc, np.full((21, 26, 1), 7, np.uint8)], 2)
    for held in (
        hwc,
        rgba,  # alpha dropped, as read_image does
        Image.fromarray(hwc),
        Image.fromarray(rgba),
        str(tmp_path / "im.png"),
        tmp_path / "im.png",
        image.float() / 255,  # floats in 0-1
        hwc.astype(np.float32) / 255,
    ):
        assert torch.equal(seg.predict(held), want), type(held)
    gray = image[:1]
    want_gray = seg.predict(gray)  # one channel, expanded to the model's three
    for held in (
        gray[0],
        gray[0].numpy(),
        Image.fromarray(gray[0].numpy()),
        gray[0].numpy()[..., None],
    ):
        assert torch.equal(seg.predict(held), want_gray), type(held)
    labels, _ = seg.predict_batch([hwc, image, Image.fromarray(hwc)])
    assert all(torch.equal(lab, want) for lab in labels)


@pytest.mark.parametrize(
    ("held", "message"),
    [
        (torch.zeros(3, 8, 8, dtype=torch.int64), "dtype int64.*uint8"),
        (np.zeros((8, 8, 3), np.uint16), "dtype uint16.*scale 16-bit"),
        (np.full((8, 8, 3), 200.0, np.float32), "values 200 to 200.*0-1"),
        (torch.full((3, 8, 8), float("nan")), "0-1"),
        (np.zeros((1, 8, 8, 3), np.uint8), r"shape \(1, 8, 8, 3\)"),
        (np.zeros((3, 8, 8), np.uint8), "torch.from_numpy"),
        (torch.zeros(8, 8, 3, dtype=torch.uint8), "image has 8 channels.*numpy array"),
        (torch.zeros(1, 3, 8, 8, dtype=torch.uint8), "predict_batch"),
        ([[1, 2], [3, 4]], "cannot segment a list"),
        (None, "cannot segment a NoneType"),
        (Image.new("I;16", (8, 8)), "mode I;16"),
    ],
)
def test_predict_refuses_what_is_no_image(held, message: str) -> None:
    with pytest.raises(DataError, match=message):
        _seg(_unet()).predict(held)


def test_predict_of_a_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nope.png does not exist"):
        _seg(_unet()).predict(tmp_path / "nope.png")


# ------------------------------------------------------------------------- predict_large


@pytest.mark.parametrize("tta", ["none", "hflip"])
@pytest.mark.parametrize("weighting", ["uniform", "gaussian"])
def test_predict_large_gives_the_labels_of_predict(tta: str, weighting: str) -> None:
    model = _unet()
    seg = _seg(
        model, mode="slide", crop_size=(24, 32), stride=(16, 20), weighting=weighting, tta=tta
    )
    image = _image(150, 133, seed=4)  # several strips, blocks and a last window moved back
    got = seg.predict_large(image)
    assert got.dtype == torch.uint8 and got.shape == (150, 133)
    assert torch.equal(got.long(), seg.predict(image))
    hwc = image.permute(1, 2, 0).numpy().copy()  # used in place, as a view
    assert torch.equal(seg.predict_large(hwc), got)


@pytest.mark.parametrize("tta", ["none", "hflip"])
def test_predict_large_with_overlap_tiles(tta: str) -> None:
    torch.manual_seed(0)
    valid = create_model("unet_valid", num_classes=2, in_channels=1, base_channels=4, depth=2)
    seg = Segmenter(
        valid.eval(),
        mean=[0.5],
        std=[0.25],
        device="cpu",
        mode="overlap_tile",
        tile_size=64,
        tta=tta,
    )
    image = _image(150, 131, seed=5, c=1)
    assert torch.equal(seg.predict_large(image).long(), seg.predict(image))


def test_predict_large_refuses_what_does_not_stream() -> None:
    model = _unet()
    for kw in (
        {},
        {"mode": "slide", "crop_size": 16, "tta": "d4"},
        {"mode": "slide", "crop_size": 16, "tta": "ms"},
    ):
        seg = _seg(model, **kw)
        assert not seg.streams()
        with pytest.raises(ConfigError, match="predict_large streams mode slide"):
            seg.predict_large(_image())


# ------------------------------------------------------------------------- packed settings


def test_pack_stores_a_sliding_window(tmp_path: Path) -> None:
    ckpt = save_em_checkpoint(tmp_path / "m.pt", "unet", base_channels=4, depth=2)
    out = tmp_path / "models"
    args = ["pack", str(ckpt), "slidy", "--out", str(out), "--mode", "slide"]
    assert main([*args, "--crop-size", "32", "48", "--stride", "16"]) == 0
    meta = json.loads((out / "slidy.json").read_text())
    assert meta["segmenter"] == {
        "mode": "slide",
        "tile_size": None,
        "tta": "none",
        "crop_size": [32, 48],
        "stride": 16,
    }
    seg = load_builtin("slidy", device="cpu", directory=out)
    assert (seg.mode, seg.crop_size, seg.stride) == ("slide", (32, 48), (16, 16))
    # Options given at load time win over the packed ones.
    assert load_builtin("slidy", device="cpu", directory=out, mode="whole").mode == "whole"
    image = _image(40, 60, c=1)
    ref = Segmenter(
        seg.model, mean=[0.5], std=[0.5], device="cpu", mode="slide", crop_size=(32, 48), stride=16
    )
    assert torch.equal(seg.predict(image), ref.predict(image))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--mode", "slide"], "needs crop_size"),
        (["--mode", "slide", "--crop-size", "16", "--stride", "32"], "stride=32 is larger"),
        (["--mode", "whole", "--stride", "8"], "--stride applies to --mode slide"),
        (["--mode", "whole", "--crop-size", "8"], "--crop-size applies to"),
        (["--mode", "slide", "--crop-size", "8", "8", "8"], "one or two sides"),
    ],
)
def test_pack_refuses_bad_windows(
    tmp_path: Path, capsys: pytest.CaptureFixture, extra: list[str], message: str
) -> None:
    ckpt = save_em_checkpoint(tmp_path / "m.pt", "unet", base_channels=4, depth=2)
    assert main(["pack", str(ckpt), "bad", "--out", str(tmp_path / "o"), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "o" / "bad.json").exists()
