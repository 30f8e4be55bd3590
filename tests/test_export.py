"""``denseseg export``: the file's contract (uint8 in and labels out with ``--with-preprocess
--labels``), TorchScript and pt2 files, metadata, refusals, and the command line.

Per-model agreement of the ONNX graphs with eager PyTorch is in tests/test_onnx_backends.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from conftest import save_em_checkpoint
from denseseg import load_model
from denseseg.cli import main
from denseseg.errors import ConfigError
from denseseg.inference import Segmenter
from denseseg.inference.export import (
    ONNX_EXTRA,
    export_model,
    read_export_meta,
    read_onnx_meta,
    segmenter_meta,
)
from denseseg.models import create_model, get_model_entry


def _tiny(name: str, num_classes: int = 3, in_channels: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = get_model_entry(name).test_cfg
    return create_model(name, num_classes=num_classes, in_channels=in_channels, **cfg).eval()


def _segmenter(model: torch.nn.Module, threshold: float = 0.5) -> Segmenter:
    n = model.in_channels
    meta = {"model_name": "pixelwise", "model_kwargs": {"num_classes": model.num_classes}}
    return Segmenter(
        model,
        mean=[0.3, 0.5, 0.7][:n],
        std=[0.2, 0.3, 0.25][:n],
        class_names=["a", "b", "c"][: max(2, model.num_classes)],
        device="cpu",
        threshold=threshold,
        meta=meta,
    )


def _uint8(channels: int, h: int, w: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (channels, h, w), generator=g, dtype=torch.uint8)


# ---------------------------------------------------------------- --with-preprocess --labels


@pytest.mark.parametrize(
    ("num_classes", "in_channels", "threshold"),
    [(3, 3, 0.5), (1, 1, 0.3)],  # 3 classes (arg-max); binary on grey (sigmoid > threshold)
    ids=["rgb-3-classes", "grey-binary"],
)
def test_uint8_in_labels_out_gives_the_segmenters_labels(
    num_classes: int, in_channels: int, threshold: float, tmp_path: Path
) -> None:
    import onnxruntime as ort
    import openvino as ov

    model = _tiny("pixelwise", num_classes, in_channels)
    seg = _segmenter(model, threshold)
    path = export_model(
        model, segmenter_meta(seg), tmp_path / "m.onnx", with_preprocess=True, labels=True
    )
    contract = read_onnx_meta(path)["contract"]
    assert contract["input_dtype"] == "uint8" and contract["output"] == "labels"
    assert contract["input_channels"] == [1, 3] and contract["output_dtype"] == "int64"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    # Grey and RGB pixels both, as Segmenter.preprocess takes them (repeat, or ITU-R 601 luma).
    for seed, (channels, h, w) in enumerate([(1, 37, 53), (3, 64, 48), (in_channels, 20, 90)]):
        image = _uint8(channels, h, w, seed)
        expected = seg.predict(image).numpy()
        got = session.run(None, {"image": image[None].numpy()})[0]
        assert got.dtype == "int64" and got.shape == (1, h, w)
        assert (got[0] == expected).all(), (channels, h, w)
        assert (compiled(image[None].numpy())[0][0] == expected).all()
    if num_classes == 1:
        assert set(expected.ravel().tolist()) <= {0, 1}


# ---------------------------------------------------------------- TorchScript and pt2


@pytest.mark.parametrize("fmt", ["torchscript", "pt2"])
@pytest.mark.parametrize("name", ["deeplabv3plus", "unet_valid"])
def test_torchscript_and_pt2_files_load_and_match_eager(name: str, fmt: str, tmp_path: Path):
    model = _tiny(name)
    meta = {**segmenter_meta(_segmenter(model)), "model_name": name}
    meta["palette"] = [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    path = export_model(model, meta, tmp_path / f"m.{fmt}", fmt)
    if fmt == "pt2":
        run = torch.export.load(path).module()
    else:
        run = torch.jit.load(str(path))
    valid = getattr(model, "padding", "same") == "valid"
    v = model.valid_input_size if valid else int
    for shape in [(2, 3, v(64), v(80)), (1, 3, v(97), v(131))]:  # not the traced 115 x 141
        x = torch.randn(*shape)
        with torch.no_grad():
            expected, got = model(x)["out"], run(x)
        assert got.shape == expected.shape and torch.allclose(got, expected, 1e-3, 1e-4)
    stored = read_export_meta(path)
    assert stored["class_names"] == ["a", "b", "c"] and stored["palette"] == meta["palette"]
    assert stored["file_format"] == fmt and stored["contract"]["input_dtype"] == "float32"


# ---------------------------------------------------------------- refusals


def test_never_overwrites_without_asking(tmp_path: Path) -> None:
    model = _tiny("pixelwise")
    out = tmp_path / "m.onnx"
    out.write_bytes(b"precious")
    with pytest.raises(ConfigError, match="exists; pass --overwrite"):
        export_model(model, segmenter_meta(_segmenter(model)), out)
    assert out.read_bytes() == b"precious"
    with pytest.raises(ConfigError, match="is a folder"):
        export_model(model, segmenter_meta(_segmenter(model)), tmp_path)


def test_refuses_instance_models_and_bad_options(tmp_path: Path) -> None:
    name = "maskrcnn_resnet18_fpn"
    maskrcnn = create_model(name, num_classes=3, **get_model_entry(name).test_cfg)
    meta = {"model_name": name, "mean": [0.5] * 3, "std": [0.5] * 3}
    with pytest.raises(ConfigError, match="instance model .*cannot export"):
        export_model(maskrcnn, meta, tmp_path / "m.onnx")
    model = _tiny("pixelwise")
    with pytest.raises(ConfigError, match="unknown export format"):
        export_model(model, meta, tmp_path / "m.tflite", "tflite")
    with pytest.raises(ConfigError, match="--opset applies to --format onnx"):
        export_model(model, meta, tmp_path / "m.ts", "torchscript", opset=17)
    assert not list(tmp_path.iterdir())


def test_missing_onnx_extra_is_named(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # import fails as if not installed
    model = _tiny("pixelwise")
    with pytest.raises(ConfigError) as info:
        export_model(model, segmenter_meta(_segmenter(model)), tmp_path / "m.onnx")
    assert str(info.value) == ONNX_EXTRA
    assert "pip install 'denseseg[onnx]'" in ONNX_EXTRA


# ---------------------------------------------------------------- the command line


def test_cli_exports_a_checkpoint(tmp_path: Path, monkeypatch, capsys) -> None:
    ckpt = save_em_checkpoint(tmp_path / "em.pt", "pixelwise", hidden=(4,))
    monkeypatch.chdir(tmp_path)
    assert main(["export", str(ckpt)]) == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith("wrote em.onnx (") and out.endswith("MiB)") and "\n" not in out
    meta = read_onnx_meta(tmp_path / "em.onnx")
    assert meta["class_names"] == ["membrane", "cell"] and meta["model_name"] == "pixelwise"
    assert meta["mean"] == [0.5] and meta["in_channels"] == 1
    # The file alone runs as the checkpoint does.
    images = [_uint8(1, 33, 47, 0), _uint8(1, 60, 24, 1)]
    torch_seg, onnx_seg = load_model(ckpt, device="cpu"), load_model("em.onnx", device="cpu")
    for image in images:
        assert torch.equal(onnx_seg.predict(image), torch_seg.predict(image))
    # An existing file stays unless --overwrite.
    before = (tmp_path / "em.onnx").read_bytes()
    assert main(["export", str(ckpt)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "denseseg: error: em.onnx exists; pass --overwrite to replace it"
    assert (tmp_path / "em.onnx").read_bytes() == before
    assert main(["export", str(ckpt), "--format", "torchscript", "--overwrite"]) == 0
    assert "wrote em.ts" in capsys.readouterr().out
    assert main(["export", str(ckpt), "--format", "pt2", "--opset", "17"]) == 2
    assert "--opset applies to --format onnx" in capsys.readouterr().err
