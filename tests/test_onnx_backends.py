"""ONNX Runtime and OpenVINO backends: every exportable model's exported graph gives eager
PyTorch's logits, a Segmenter runs on either backend (from a torch model or an exported file),
and a missing extra is named in one line.

An ONNX export takes 10-50 s on two busy cores, so each model is exported once per module and
the fast suite exports one model of each code path (FCN on VGG, DeepLab v3+ on ResNet, the valid and
ResNet U-Nets, the per-pixel classifier); the other registered variants (ResNet FCN, DeepLab
v2/v3, the MobileNetV3 models, the same-padding U-Net) and the full-size models are marked
``heavy`` (``make test-all``).
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from denseseg import load_model
from denseseg.errors import CheckpointError, ConfigError
from denseseg.inference import Segmenter, onnx_backends
from denseseg.inference.export import export_model, read_onnx_meta
from denseseg.inference.onnx_backends import OnnxModel, OnnxRuntime
from denseseg.models import create_model, get_model_entry, list_models

CPU = torch.device("cpu")
BACKENDS = ("onnxruntime", "openvino")
EXPORTABLE = [n for n in list_models() if get_model_entry(n).exportable]
FAST = [
    "pixelwise",
    "fcn8s",
    "deeplabv3plus",
    "unet_valid",
    "unet_resnet18",
]
# The other variants (about 5 minutes of exports; the same-padding U-Net's alone takes 50 s, its
# code path is the valid U-Net's and ResNet U-Net's) run with the full-size models, `make
# test-all`, to keep `make test` under 15 minutes on two cores.
TINY = [n if n in FAST else pytest.param(n, marks=pytest.mark.heavy) for n in EXPORTABLE]
CLASSES = ["sky", "road", "car"]
PALETTE = [[10, 20, 30], [128, 64, 128], [0, 0, 142]]


def _meta(name: str, model: nn.Module) -> dict:
    return {
        "model_name": name,
        "model_kwargs": {"num_classes": 3},
        "class_names": CLASSES,
        "palette": PALETTE,
        "mean": [0.4, 0.5, 0.6],
        "std": [0.2, 0.25, 0.3],
        "ignore_index": 255,
        "segmenter": _segmenter_settings(model),
    }


def _segmenter_settings(model: nn.Module) -> dict:
    if getattr(model, "padding", "same") == "valid":
        return {"mode": "overlap_tile", "tile_size": model.valid_input_size(140), "tta": "hflip"}
    return {"mode": "whole", "tile_size": None, "tta": "none"}


def _sizes(model: nn.Module) -> list[tuple[int, ...]]:
    """Two input shapes unlike the export's example (2 x 115 x 141): sides that are and are not
    multiples of the models' strides, batch 2 and 1 (sizes it accepts, for a valid U-Net)."""
    if getattr(model, "padding", "same") == "valid":
        v = model.valid_input_size
        return [(2, 3, v(64), v(80)), (1, 3, v(100), v(150))]
    return [(2, 3, 64, 80), (1, 3, 97, 131)]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, bool], tuple]:
    """``(name, full) -> (model, path)``: each model exported once per module."""
    cache: dict[tuple[str, bool], tuple[nn.Module, Path]] = {}
    folder = tmp_path_factory.mktemp("onnx")

    def get(name: str, full: bool = False) -> tuple[nn.Module, Path]:
        if (name, full) not in cache:
            torch.manual_seed(0)
            cfg = {} if full else get_model_entry(name).test_cfg
            model = create_model(name, num_classes=3, in_channels=3, **cfg).eval()
            if full:
                _calibrate_batch_norm(model)
            path = folder / f"{name}{'_full' if full else ''}.onnx"
            export_model(model, _meta(name, model), path)
            cache[name, full] = model, path
        return cache[name, full]

    return get


def _calibrate_batch_norm(model: nn.Module) -> None:
    """Batch-norm statistics of random images, as a trained model has of its data: a deep
    random ResNet with untouched statistics (mean 0, variance 1) amplifies its input to logits
    of ~1000, where no float32 comparison means anything."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # a plain average over the batches
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(2, 3, *_sizes(model)[0][2:]))  # a size the model takes
    model.eval()


def _check_backends(model: nn.Module, path: Path, noise_floor: bool = False) -> None:
    """Each backend's logits match eager PyTorch's: ``allclose(rtol=1e-3, atol=1e-4)``; with
    ``noise_floor``, ``atol`` also takes twice eager float32's own largest error against float64
    (for the full-size ResNet-101s it is ~4e-4 at logits of ~3, above 1e-4 by itself: the
    backends are then as close to the float64 result as eager float32 is)."""
    torch.manual_seed(1)
    reference = copy.deepcopy(model).double() if noise_floor else None
    runtimes = {backend: OnnxRuntime(path, CPU, backend) for backend in BACKENDS}
    for shape in _sizes(model):
        x = torch.randn(*shape)
        with torch.no_grad():
            expected = model(x)["out"]
            atol = 1e-4
            if reference is not None:
                exact = reference(x.double())["out"]
                atol += 2 * (expected.double() - exact).abs().max().item()
        for backend, runtime in runtimes.items():
            got = runtime(x)
            assert got.dtype == torch.float32 and got.shape == expected.shape, (backend, shape)
            error = (got - expected).abs().max().item()
            assert torch.allclose(got, expected, rtol=1e-3, atol=atol), (backend, shape, error)


@pytest.mark.parametrize("name", TINY)
def test_backends_match_eager_and_metadata_reloads(name: str, exported) -> None:
    model, path = exported(name)
    # noise_floor: ddrnet23 and ddrnet23_slim are their full widths here (fixed by the variant).
    _check_backends(model, path, noise_floor=True)
    meta = read_onnx_meta(path)
    assert meta["class_names"] == CLASSES and meta["palette"] == PALETTE
    assert meta["mean"] == [0.4, 0.5, 0.6] and meta["model_name"] == name
    assert meta["num_classes"] == 3 and meta["in_channels"] == 3
    assert meta["segmenter"] == _segmenter_settings(model)
    assert meta["contract"]["output"] == "logits"


@pytest.mark.heavy  # about 11 minutes on two cores: `make test-all`
@pytest.mark.parametrize("name", EXPORTABLE)
def test_full_size_models_match_eager(name: str, exported) -> None:
    model, path = exported(name, full=True)
    _check_backends(model, path, noise_floor=True)


# ---------------------------------------------------------------- an ONNX file as a Segmenter


def _images(in_channels: int, sizes=((45, 61), (70, 52))) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [
        torch.randint(0, 256, (in_channels, h, w), generator=g, dtype=torch.uint8) for h, w in sizes
    ]


@pytest.mark.parametrize("name", ["unet_valid", "deeplabv3plus"])
def test_load_model_onnx_predicts_as_the_torch_segmenter(name: str, exported) -> None:
    model, path = exported(name)
    meta = _meta(name, model)
    settings = meta.pop("segmenter")
    torch_seg = Segmenter(model, device="cpu", **{k: meta[k] for k in ("mean", "std")}, **settings)
    for backend in BACKENDS:
        seg = load_model(path, device="cpu", backend=backend)
        assert isinstance(seg.model, OnnxModel) and seg.backend == backend
        assert seg.class_names == CLASSES and seg.palette == [tuple(p) for p in PALETTE]
        # The file's inference defaults apply: overlap tiles with flips for the valid U-Net.
        assert (seg.mode, seg.tile_size, seg.tta) == (
            torch_seg.mode,
            torch_seg.tile_size,
            torch_seg.tta,
        )
        for image in _images(3):
            assert torch.equal(seg.predict(image), torch_seg.predict(image)), backend


def test_load_model_onnx_refuses_what_needs_the_torch_model(exported, tmp_path: Path) -> None:
    model, path = exported("pixelwise")
    for options in ({"backend": "torch"}, {"fast": True}, {"precision": "bf16"}):
        with pytest.raises(ConfigError, match="is an ONNX file"):
            load_model(path, device="cpu", **options)
    with pytest.raises(CheckpointError, match="no EMA"):
        load_model(path, device="cpu", ema=True)
    labels = tmp_path / "labels.onnx"
    export_model(model, _meta("pixelwise", model), labels, labels=True)
    with pytest.raises(ConfigError, match="export it again without them"):
        load_model(labels, device="cpu")


# ---------------------------------------------------------------- a torch model on a backend


def test_segmenter_backend_exports_once_per_set_of_weights(monkeypatch) -> None:
    torch.manual_seed(0)
    model = create_model("pixelwise", num_classes=3, in_channels=3, hidden=(8,)).eval()
    stats = {"mean": [0.5] * 3, "std": [0.25] * 3, "device": "cpu"}
    eager = Segmenter(model, tta="hflip", **stats)
    images = _images(3)
    for backend in BACKENDS:
        seg = Segmenter(model, backend=backend, tta="hflip", **stats)
        for image in images:
            assert torch.equal(seg.predict(image), eager.predict(image))
    # The export is kept per model and weights: a new Segmenter reuses it...
    real = onnx_backends.onnx_bytes
    calls = []
    monkeypatch.setattr(
        onnx_backends, "onnx_bytes", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    Segmenter(model, backend="onnxruntime", **stats)
    assert calls == []
    # ...until the weights change in place (an optimiser step, load_state_dict).
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-1.0)
    seg = Segmenter(model, backend="onnxruntime", **stats)
    assert calls == [1]
    x = torch.randn(1, 3, 20, 30)
    with torch.no_grad():
        assert torch.allclose(seg.runtime(x), model(x)["out"], rtol=1e-3, atol=1e-4)
    assert seg.runtime.threads == torch.get_num_threads()


@pytest.mark.parametrize(
    ("backend", "module", "extra"),
    [("onnxruntime", "onnxruntime", "onnx"), ("openvino", "openvino", "openvino")],
)
def test_missing_runtime_names_its_extra(
    backend: str, module: str, extra: str, monkeypatch
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    model = create_model("pixelwise", num_classes=2, in_channels=3, hidden=(4,))
    label = "ONNX Runtime" if backend == "onnxruntime" else "OpenVINO"
    with pytest.raises(ConfigError) as info:
        Segmenter(model, mean=[0.5] * 3, std=[0.5] * 3, device="cpu", backend=backend)
    assert str(info.value) == f"--backend {backend} needs {label}: pip install 'denseseg[{extra}]'"


# ---------------------------------------------------------------- the trained built-in models


def _street(seed: int, h: int = 360, w: int = 480) -> torch.Tensor:
    """A smooth colour field with noise: broad regions, like a street scene's, and near-ties."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, h // 40, w // 40, generator=g)
    field = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bicubic")[0]
    noise = torch.randn(3, h, w, generator=g) * 0.05
    return ((field + noise).clamp(0, 1) * 255).round().to(torch.uint8)


def _em(seed: int, h: int = 300, w: int = 260) -> torch.Tensor:
    """Grey cells separated by dark membranes (the edges of a Voronoi diagram), with noise."""
    rng = np.random.default_rng(seed)
    seeds = rng.uniform(0, [h, w], size=(40, 2))
    yy, xx = np.mgrid[:h, :w]
    d = np.sort(np.hypot(yy[..., None] - seeds[:, 0], xx[..., None] - seeds[:, 1]), axis=-1)
    image = np.where(d[..., 1] - d[..., 0] < 3.0, 60.0, 180.0) + rng.normal(0, 15, (h, w))
    return torch.from_numpy(np.clip(image, 0, 255).astype(np.uint8))[None]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "image"), [("camvid", _street), ("isbi2012", _em)])
def test_builtin_models_agree_on_every_backend(name: str, image) -> None:
    # One pass per image (tta none): the backends run the network; TTA is the Segmenter's.
    eager = load_model(name, device="cpu", tta="none")
    images = [image(seed) for seed in range(3)]
    expected = [eager.predict(im) for im in images]
    stats = {"mean": eager.mean.flatten().tolist(), "std": eager.std.flatten().tolist()}
    for backend in BACKENDS:
        # Over the same model object: exported once, run by both runtimes.
        seg = Segmenter(
            eager.model,
            **stats,
            device="cpu",
            mode=eager.mode,
            tile_size=eager.tile_size,
            backend=backend,
        )
        same = sum(int((seg.predict(im) == e).sum()) for im, e in zip(images, expected))
        total = sum(e.numel() for e in expected)
        assert same / total >= 0.9999, (backend, same / total)


# OpenVINO's bf16 run happens in a child process: two full `make test` runs on the AMX machine
# crashed (SIGSEGV, at the same later test) after OpenVINO bf16 objects had lived in the pytest
# process; a child keeps the suite's process free of them.
_OPENVINO_BF16 = textwrap.dedent(
    """
    import sys, torch
    from denseseg import load_model
    from denseseg.inference.onnx_backends import OnnxRuntime
    path, data = sys.argv[1], torch.load(sys.argv[2])
    got = OnnxRuntime(path, torch.device("cpu"), "openvino", precision="bf16")(data["x"])
    expected = data["expected"]
    assert got.dtype == torch.float32 and got.shape == expected.shape, (got.dtype, got.shape)
    # bfloat16 keeps 8 bits of mantissa: close, not equal.
    err = float((got - expected).abs().max() / expected.abs().max())
    seg = load_model(path, device="cpu", backend="openvino", precision="bf16")
    print("RESULT", err, tuple(seg.predict(data["image"]).shape))
    """
)


def test_openvino_runs_bf16_and_onnxruntime_refuses_it(exported, tmp_path: Path) -> None:
    from denseseg.inference.runtimes import make_runtime

    model, path = exported("deeplabv3plus")
    x = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        expected = model(x)["out"]
    data = tmp_path / "data.pt"
    torch.save({"x": x, "expected": expected, "image": _images(3)[0]}, data)
    proc = subprocess.run(
        [sys.executable, "-c", _OPENVINO_BF16, str(path), str(data)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    err, shape = proc.stdout.split("RESULT", 1)[1].split(maxsplit=1)
    assert float(err) < 0.1 and shape.strip() == "(45, 61)"
    with pytest.raises(ConfigError, match="ONNX Runtime runs fp32"):
        OnnxRuntime(path, CPU, "onnxruntime", precision="bf16")
    with pytest.raises(ConfigError, match="ONNX Runtime runs fp32"):
        make_runtime(model, CPU, backend="onnxruntime", precision="bf16")
