"""The torch paths of inference (eager, channels_last, trace, compile; fp32 and bf16) give the
eager model's predictions, and batch norm folding computes the same function."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from denseseg import Segmenter, create_model
from denseseg.errors import ConfigError
from denseseg.inference import fast
from denseseg.inference.fast import fold_batch_norm, inference_copy
from denseseg.inference.runtimes import make_runtime
from denseseg.models import get_model_entry

NORM = {"mean": [0.4] * 3, "std": [0.2] * 3, "device": "cpu"}


def _model(name: str, classes: int = 4) -> nn.Module:
    """A reduced-width registered model with non-trivial batch-norm statistics and affine
    parameters (folding the defaults, mean 0 and variance 1, would hide a wrong formula)."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=classes, **get_model_entry(name).test_cfg)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
    return model.eval()


def _count_bn(model: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


@pytest.mark.parametrize(
    "name",
    ["lraspp_mobilenet_v3_large", "deeplabv3_resnet50", "unet_resnet18", "deeplabv3plus"],
)
def test_batch_norm_folding_is_exact_and_complete(name: str) -> None:
    model = _model(name)
    folded = inference_copy(model, channels_last=False)
    # Every batch norm of these models follows a convolution (ConvNormAct, torchvision's
    # Conv2dNormActivation, ResNet blocks and stem, downsample Sequentials): none is left.
    assert _count_bn(model) > 0 and _count_bn(folded) == 0
    x = torch.randn(2, 3, 40, 56)
    with torch.no_grad():
        want, got = model(x)["out"], folded(x)["out"]
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)
    assert _count_bn(model) > 0  # the model itself is untouched


def test_folding_leaves_what_it_cannot_prove() -> None:
    class Custom(nn.Module):  # conv and bn by name, in an unknown module: no proof of order
        def __init__(self, c: int) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(c, c, 1), nn.BatchNorm2d(c)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(self.bn(x))

    # A batch norm after a ReLU, and one before its conv: neither may be folded.
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4), Custom(4)).eval()
    assert fold_batch_norm(model) == 0 and _count_bn(model) == 2
    with pytest.raises(ValueError, match="eval mode"):
        fold_batch_norm(model.train())


@pytest.mark.parametrize("name", ["lraspp_mobilenet_v3_large", "unet", "deeplabv3plus"])
def test_fast_paths_match_eager(name: str) -> None:
    model = _model(name)
    eager = Segmenter(model, **NORM)
    # True: the default fast path, a frozen trace (no measured path stored with this model).
    segs = {p: Segmenter(model, fast=p, **NORM) for p in (True, "channels_last", "eager")}
    g = torch.Generator().manual_seed(1)
    for size in [(45, 61), (64, 48), (45, 61)]:
        x = torch.randn(2, 3, *size, generator=g)
        want = eager.logits(x)
        for path, seg in segs.items():
            got = seg.logits(x)
            assert got.shape == want.shape == (2, 4, *size)
            assert torch.allclose(got, want, rtol=1e-3, atol=1e-4), path
    assert isinstance(segs[True].runtime, fast.FrozenTraces)
    assert len(segs[True].runtime) == 2  # a trace per shape
    assert isinstance(segs["channels_last"].runtime, fast.ChannelsLastRuntime)
    # The Segmenter's own model keeps its batch norms and its memory format.
    assert _count_bn(eager.model) == _count_bn(model)


def test_bf16_paths_agree_where_the_margin_exceeds_bfloat16s_error(caplog, monkeypatch) -> None:
    from denseseg.engine.precision import cpu_has_bf16
    from denseseg.inference import runtimes

    monkeypatch.setattr(runtimes, "_warned", [])  # the warning is given once per process
    model = _model("lraspp_mobilenet_v3_large", classes=6)
    x = torch.randn(2, 3, 48, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model(x)["out"]
    top2 = want.topk(2, dim=1).values
    # bfloat16 keeps 8 bits of mantissa (relative error 2^-9 per rounding; a few roundings
    # per layer): 3% of the logits' range is far above its error, so those pixels must agree.
    scale = want.abs().amax()
    sure = (top2[:, 0] - top2[:, 1]) > 0.03 * scale
    assert sure.float().mean() > 0.3  # enough pixels to make the check mean something
    with caplog.at_level(logging.WARNING, logger="denseseg"):
        for path in ("eager", "channels_last", "trace"):
            got = make_runtime(model, torch.device("cpu"), fast=path, precision="bf16")(x)
            assert got.dtype == torch.float32 and got.shape == want.shape
            assert (got - want).abs().max() < 0.03 * scale, path
            assert torch.equal(got.argmax(1)[sure], want.argmax(1)[sure]), path
    emulated = [r for r in caplog.records if "bfloat16 runs emulated" in r.getMessage()]
    assert len(emulated) == (0 if cpu_has_bf16() else 1)


def test_unknown_path_or_precision_is_one_clear_error() -> None:
    model = _model("lraspp_mobilenet_v3_large")
    with pytest.raises(ConfigError, match="unknown fast path 'fastest'.*channels_last"):
        Segmenter(model, fast="fastest", **NORM)
    with pytest.raises(ConfigError, match="unknown precision 'fp16'"):
        Segmenter(model, fast="channels_last", precision="fp16", **NORM)


@pytest.mark.slow
@pytest.mark.heavy  # minutes: make test-all
def test_compiled_path_matches_eager() -> None:
    # torch.compile (Inductor, C++ code generation) takes about a minute on two busy cores.
    model = _model("lraspp_mobilenet_v3_large")
    seg = Segmenter(model, fast="compile", **NORM)
    x = torch.randn(1, 3, 48, 64, generator=torch.Generator().manual_seed(3))
    want = Segmenter(model, **NORM).logits(x)
    assert torch.allclose(seg.logits(x), want, rtol=1e-3, atol=1e-4)
    assert torch.allclose(seg.logits(x), want, rtol=1e-3, atol=1e-4)  # the compiled graph


# ---------------------------------------------------------------- dilated convolutions as taps


@pytest.mark.parametrize(
    ("kernel", "dilation", "size", "bias"),
    [
        (3, 6, (20, 30), True),
        (3, 12, (9, 40), False),
        (3, 36, (64, 64), False),
        (5, 7, (11, 13), True),
    ],
)
def test_dilated_as_taps_is_the_convolution(kernel, dilation, size, bias) -> None:
    from denseseg.inference.fast import DilatedAsTaps

    torch.manual_seed(0)
    pad = dilation * (kernel - 1) // 2
    conv = nn.Conv2d(6, 5, kernel, padding=pad, dilation=dilation, bias=bias).eval()
    x = torch.randn(2, 6, *size)
    with torch.no_grad():
        expected = conv(x)
        got = DilatedAsTaps(conv)(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        low = DilatedAsTaps(conv)(x)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), expected, rtol=0.05, atol=0.05)


def test_dilated_as_taps_rewrites_only_what_it_computes() -> None:
    from denseseg.inference.fast import DilatedAsTaps, dilated_as_taps

    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=12, dilation=12),  # rewritten
        nn.Conv2d(4, 4, 3, padding=2, dilation=2),  # dilation below the threshold
        nn.Conv2d(4, 4, 3, padding=12, dilation=12, stride=2),  # strided
        nn.Conv2d(4, 4, 3, padding=12, dilation=12, groups=2),  # grouped
        nn.Conv2d(4, 4, 3, padding=0, dilation=12),  # not "same"
    ).eval()
    x = torch.randn(1, 3, 50, 60)
    with torch.no_grad():
        expected = model(x)
        assert dilated_as_taps(model) == 1
        got = model(x)
    assert isinstance(model[0], DilatedAsTaps)
    assert all(type(m) is nn.Conv2d for m in model[1:])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_bf16_channels_last_path_of_deeplab_uses_taps() -> None:
    from denseseg.inference.fast import ChannelsLastRuntime, DilatedAsTaps

    model = create_model(
        "deeplabv3_resnet50", num_classes=3, **get_model_entry("deeplabv3_resnet50").test_cfg
    ).eval()
    x = torch.randn(1, 3, 64, 64)
    for precision, expected in (("fp32", 0), ("bf16", 3)):
        runtime = ChannelsLastRuntime(model, torch.device("cpu"), precision)
        out = runtime(x)
        taps = [m for m in runtime._module.modules() if isinstance(m, DilatedAsTaps)]
        assert len(taps) == expected and out.shape == (1, 3, 64, 64)


@pytest.mark.parametrize("name", ["deeplabv3_resnet50", "lraspp_mobilenet_v3_large", "ddrnet23"])
def test_bf16_fast_paths_keep_the_first_and_last_convolution_in_float32(name: str) -> None:
    """The stem convolution sees the normalised image and the classifier makes the logits in
    float32 (found by running the model once: the aux head is gone, so the last convolution
    run is the classifier's), everything between in bfloat16; float32 paths are untouched."""
    from denseseg.inference.fast import ChannelsLastRuntime, Float32

    model = _model(name, classes=5)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    seen: dict[int, torch.dtype] = {}
    for precision in ("fp32", "bf16"):
        runtime = ChannelsLastRuntime(model, torch.device("cpu"), precision)
        runtime(x)
        inner = runtime._module.model
        wrapped = [n for n, m in inner.named_modules() if isinstance(m, Float32)]
        if precision == "fp32":
            assert wrapped == []
            continue
        assert len(wrapped) == 2, wrapped
        first, last = (inner.get_submodule(n).module for n in wrapped)
        assert last.out_channels == 5 and first.in_channels == 3
        convs = [m for m in inner.modules() if type(m) is nn.Conv2d]

        def note(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            seen[id(module)] = out.dtype

        hooks = [m.register_forward_hook(note) for m in convs]  # first and last among them
        runtime(x)
        for h in hooks:
            h.remove()
    assert seen[id(first)] == seen[id(last)] == torch.float32
    assert {seen[id(m)] for m in convs if m not in (first, last)} == {torch.bfloat16}
