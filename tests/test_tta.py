"""Test-time augmentation in the Segmenter: flips and the 8 symmetries of the square (the U-Net
paper's rotation averaging), probabilities averaged, on top of whole-image and overlap-tile
inference, for multi-class and binary models; the setting travels with a packed model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import save_em_checkpoint
from denseseg.cli import main
from denseseg.errors import ConfigError
from denseseg.inference.segmenter import Segmenter
from denseseg.models import create_model
from denseseg.pretrained import load_builtin, pack

MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]


def _seg(model: torch.nn.Module, **kw) -> Segmenter:
    return Segmenter(model, mean=MEAN[: model.in_channels], std=STD[: model.in_channels], **kw)


def _unet(num_classes: int = 3, in_channels: int = 3, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model(
        "unet", num_classes=num_classes, in_channels=in_channels, base_channels=4, depth=2, **kw
    )
    # Non-trivial batch-norm statistics, so the model is far from symmetric.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _image(c: int = 3, h: int = 30, w: int = 37, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (c, h, w), generator=g, dtype=torch.uint8)


def _transformed_average(plain: Segmenter, image: torch.Tensor, d4: bool) -> torch.Tensor:
    """The definition, written out: segment each rotated/mirrored image, map back, average."""
    total = torch.zeros(plain.num_classes, *image.shape[-2:])
    turns = range(4) if d4 else range(1)
    for mirror in (False, True):
        for k in turns:
            x = image.flip(-1) if mirror else image
            p = plain.predict_proba(torch.rot90(x, k, (-2, -1)).contiguous())
            p = torch.rot90(p, -k, (-2, -1))
            total += p.flip(-1) if mirror else p
    return total / (8 if d4 else 2)


@pytest.mark.parametrize("tta", ["hflip", "d4"])
def test_tta_is_the_average_over_the_transforms(tta: str) -> None:
    model = _unet()
    plain, aug = _seg(model, device="cpu"), _seg(model, device="cpu", tta=tta)
    image = _image()  # not square: rotations swap height and width
    expected = _transformed_average(plain, image, d4=tta == "d4")
    got = aug.predict_proba(image)
    assert got.shape == (3, 30, 37)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.sum(0), torch.ones(30, 37))
    assert torch.equal(aug.predict(image), expected.argmax(0))
    # The model is not symmetric, so the average differs from one pass.
    assert (got - plain.predict_proba(image)).abs().max() > 1e-3


def test_tta_leaves_a_symmetric_model_unchanged() -> None:
    # A per-pixel classifier (1x1 convolutions) commutes with every flip and rotation.
    torch.manual_seed(0)
    model = create_model("pixelwise", num_classes=4, in_channels=3).eval()
    image = _image(h=21, w=26)
    one = _seg(model, device="cpu").predict_proba(image)
    torch.testing.assert_close(_seg(model, device="cpu", tta="d4").predict_proba(image), one)


def test_tta_for_a_binary_model_averages_sigmoids() -> None:
    model = _unet(num_classes=1, in_channels=1)
    plain = _seg(model, device="cpu")
    aug = _seg(model, device="cpu", tta="d4", threshold=0.4)
    image = _image(c=1, h=24, w=33, seed=1)
    expected = _transformed_average(plain, image, d4=True)
    got = aug.predict_proba(image)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert torch.equal(aug.predict(image), (expected[1] > 0.4).long())


def test_tta_with_overlap_tiles_and_mixed_sizes() -> None:
    torch.manual_seed(0)
    kw = {"num_classes": 2, "in_channels": 1, "base_channels": 4, "depth": 2}
    model = create_model("unet_valid", **kw).eval()
    whole = _seg(model, device="cpu", tta="d4")
    tiled = _seg(model, device="cpu", tta="d4", mode="overlap_tile", tile_size=64)
    images = [_image(c=1, h=70, w=45, seed=2), _image(c=1, h=41, w=83, seed=3)]
    _, probs_w = whole.predict_batch(images, return_probs=True)
    _, probs_t = tiled.predict_batch(images, return_probs=True)
    for image, pw, pt in zip(images, probs_w, probs_t):
        assert pw.shape == pt.shape == (2, *image.shape[-2:])
        torch.testing.assert_close(pt, pw, rtol=1e-4, atol=1e-5)
    assert "tta=d4" in repr(tiled)


def test_tta_fast_path_matches_eager() -> None:
    model = _unet()
    image = _image()
    eager = _seg(model, device="cpu", tta="hflip").predict_proba(image)
    fast = _seg(model, device="cpu", tta="hflip", fast=True).predict_proba(image)
    torch.testing.assert_close(fast, eager, rtol=1e-3, atol=1e-4)


def test_unknown_tta_is_refused() -> None:
    with pytest.raises(ConfigError, match="tta='rot'.*none, hflip, d4"):
        _seg(_unet(), device="cpu", tta="rot")


def test_tta_travels_with_a_packed_model(tmp_path: Path, capsys) -> None:
    save_em_checkpoint(tmp_path / "m.pt", "unet", base_channels=4, depth=2)
    args = ["pack", str(tmp_path / "m.pt"), "em", "--out", str(tmp_path), "--tta", "d4"]
    assert main(args) == 0
    seg = load_builtin("em", device="cpu", directory=tmp_path)
    assert seg.tta == "d4"
    assert load_builtin("em", device="cpu", directory=tmp_path, tta="none").tta == "none"
    with pytest.raises(ConfigError, match="tta"):
        pack(tmp_path / "m.pt", "bad", out_dir=tmp_path, extra_meta={"segmenter": {"tta": "x"}})

    # predict --tta on the command line.
    Image.fromarray(np.full((20, 24), 120, np.uint8)).save(tmp_path / "in.png")
    out = tmp_path / "pred"
    cmd = ["predict", str(tmp_path / "in.png"), "--model", str(tmp_path / "m.pt")]
    assert main([*cmd, "--out", str(out), "--device", "cpu", "--tta", "hflip"]) == 0
    assert (out / "in.png").is_file()
    capsys.readouterr()
    assert main([*cmd, "--tta", "rot"]) == 2
    assert "--tta" in capsys.readouterr().err
