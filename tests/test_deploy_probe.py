"""Regressions from a hostile-user probe of deployment (export, backends, benchmark, video).

Self-contained: tiny random pixelwise models, images and a 5-frame clip made here. Each test
documents one bug found by hand (each test names the bug it pins).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from denseseg import load_model
from denseseg.checkpoint import atomic_save
from denseseg.cli import main
from denseseg.errors import CheckpointError, ConfigError
from denseseg.inference.export import export_model
from denseseg.models import create_model

MEAN, STD = [0.3, 0.5, 0.7], [0.2, 0.3, 0.25]


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("pixelwise", num_classes=3, in_channels=3).eval()


def _meta() -> dict:
    return {
        "model_name": "pixelwise",
        "model_kwargs": {"num_classes": 3, "in_channels": 3},
        "class_names": ["a", "b", "c"],
        "palette": [[255, 0, 0], [0, 255, 0], [0, 0, 255]],
        "mean": MEAN,
        "std": STD,
    }


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A checkpoint, its plain ONNX export and its --with-preprocess --labels export."""
    d = tmp_path_factory.mktemp("probe14")
    ckpt = d / "pix.pt"
    atomic_save({"model": _model().state_dict(), **_meta(), "step": 1}, ckpt)
    return {
        "ckpt": ckpt,
        "onnx": export_model(_model(), _meta(), d / "pix.onnx"),
        "labels": export_model(
            _model(), _meta(), d / "pix_labels.onnx", with_preprocess=True, labels=True
        ),
    }


def _image(path: Path, mode: str = "RGB", size=(53, 37)) -> Path:
    rng = np.random.default_rng(0)
    channels = len(mode)
    arr = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    Image.fromarray(arr[..., 0] if channels == 1 else arr, mode).save(path)
    return path


def _error_lines(capsys: pytest.CaptureFixture) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


# 1. --opset N that the exporter cannot produce: the file is written with opset 18, exit 0.
@pytest.mark.parametrize("opset", [7, 99])
def test_opset_is_honoured_or_refused(opset: int, tmp_path: Path) -> None:
    import onnx

    try:
        path = export_model(_model(), _meta(), tmp_path / "m.onnx", opset=opset)
    except ConfigError as exc:
        assert "opset" in str(exc)
        return
    versions = {o.version for o in onnx.load(str(path)).opset_import if o.domain in ("", "ai.onnx")}
    assert versions == {opset}, f"asked for opset {opset}, file has {versions}"


# 2. benchmark of a registered instance architecture: a TypeError traceback, exit 1.
def test_benchmark_instance_architecture_is_one_line(capsys) -> None:
    code = main(
        [
            "benchmark",
            "maskrcnn_resnet18_fpn",
            "--size",
            "32",
            "32",
            "--runs",
            "1",
            "--warmup",
            "0",
            "--paths",
            "eager",
            "--no-reference",
        ]
    )
    assert code == 2
    lines = _error_lines(capsys)
    assert lines[-1].startswith("denseseg: error:") and "instance" in lines[-1]


# 3. benchmark of an exported .onnx: torch paths (trace, channels_last, +bf16) "measured" on
#    ONNX Runtime; the trace records ORT's output as a constant; "fastest: trace fp32".
def test_benchmark_onnx_file_measures_no_torch_paths(files, capsys) -> None:
    code = main(
        [
            "benchmark",
            str(files["onnx"]),
            "--size",
            "8",
            "8",
            "--runs",
            "1",
            "--warmup",
            "0",
            "--paths",
            "eager",
            "trace",
            "channels_last+bf16",
            "--no-reference",
        ]
    )
    out = capsys.readouterr()
    if code == 2:  # refused: fine, in one line
        assert out.err.strip().startswith("denseseg: error:")
        return
    assert code == 0
    assert "| trace |" not in out.out and "| channels_last+bf16 |" not in out.out


# 4. an ONNX file with our tag but a missing key (edited by another tool): KeyError traceback.
@pytest.mark.parametrize("drop", ["num_classes", "mean", "in_channels"])
def test_onnx_file_missing_metadata_key_is_checkpoint_error(files, drop, tmp_path) -> None:
    import onnx

    proto = onnx.load(str(files["onnx"]))
    keep = [(p.key, p.value) for p in proto.metadata_props if p.key != drop]
    del proto.metadata_props[:]
    for key, value in keep:
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    path = tmp_path / "edited.onnx"
    onnx.save(proto, str(path))
    with pytest.raises(CheckpointError, match=drop):
        load_model(path, device="cpu")


# 5. --with-preprocess file fed RGBA (4 channels): silently takes channels (R, G, A) as RGB.
#    denseseg predict on the same PNG drops the alpha channel.
def test_with_preprocess_rgba_matches_predict_or_is_refused(files, tmp_path) -> None:
    import onnxruntime as ort

    png = _image(tmp_path / "rgba.png", "RGBA")
    expected = load_model(files["ckpt"], device="cpu").predict(png).numpy()
    x = np.asarray(Image.open(png)).transpose(2, 0, 1)[None]
    session = ort.InferenceSession(str(files["labels"]), providers=["CPUExecutionProvider"])
    try:
        got = session.run(None, {"image": x})[0][0]
    except Exception:  # refused by the graph: acceptable
        return
    assert (got == expected).all(), f"agreement {(got == expected).mean():.3f}"


# 6. A TorchScript / pt2 file given as --model: warning lines and a misleading message
#    ("holds Python objects other than tensors", "PytorchStreamReader ... data.pkl").
@pytest.mark.parametrize("fmt", ["torchscript", "pt2"])
def test_exported_ts_or_pt2_as_model_is_one_clear_line(fmt, tmp_path, capsys, recwarn) -> None:
    path = export_model(
        _model(), _meta(), tmp_path / f"m.{'ts' if fmt == 'torchscript' else fmt}", fmt
    )
    png = _image(tmp_path / "a.png")
    code = main(
        ["predict", str(png), "--model", str(path), "--out", str(tmp_path / "o"), "--device", "cpu"]
    )
    assert code == 2
    lines = _error_lines(capsys)
    assert len(lines) == 1 and lines[0].startswith("denseseg: error:"), lines
    message = lines[0].replace(str(path), "FILE")  # the tmp path itself holds "export"
    # Says it is an exported file (denseseg export), not a damaged or unsafe checkpoint.
    assert "export" in message, message
    assert not [w for w in recwarn if "TorchScript" in str(w.message)]  # no torch.load warning


# 7. predict VIDEO --frames --overwrite keeps stale label maps of an earlier, longer run.
def test_video_overwrite_leaves_only_this_videos_frames(files, tmp_path) -> None:
    av = pytest.importorskip("av")
    clip = tmp_path / "in" / "clip.mp4"
    clip.parent.mkdir()
    container = av.open(str(clip), "w")
    stream = container.add_stream("mpeg4", rate=10)
    stream.width, stream.height, stream.pix_fmt = 48, 34, "yuv420p"
    rng = np.random.default_rng(0)
    for _ in range(3):
        frame = av.VideoFrame.from_ndarray(rng.integers(0, 256, (34, 48, 3), np.uint8), "rgb24")
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    out = tmp_path / "out"
    args = [
        "predict",
        str(clip),
        "--model",
        str(files["ckpt"]),
        "--out",
        str(out),
        "--device",
        "cpu",
        "--frames",
    ]
    assert main(args) == 0
    (out / "clip_frames" / "000099.png").write_bytes(
        (out / "clip_frames" / "000000.png").read_bytes()
    )
    assert main([*args, "--overwrite"]) == 0
    assert sorted(p.name for p in (out / "clip_frames").iterdir()) == [
        "000000.png",
        "000001.png",
        "000002.png",
    ]
