"""Faster torch paths for inference, chosen by measurement (``denseseg benchmark``).

A path is how the torch model runs; each of them runs in float32 or under bfloat16 autocast
(``precision="bf16"``):

* ``"eager"``: the model as it is.
* ``"channels_last"``: a copy of the model with batch norm folded into the convolution before
  it (:func:`fold_batch_norm`), the auxiliary head dropped (its output is never used at
  inference), weights and input in the channels-last (NHWC) memory format, which oneDNN's
  convolutions prefer on CPUs.
* ``"trace"``: a frozen TorchScript trace per input shape (:class:`FrozenTraces`):
  ``torch.jit.optimize_for_inference`` freezes the weights, folds batch norm itself and lets
  oneDNN pick the layouts. TorchScript is deprecated by PyTorch; the path stays while it is the
  fastest somewhere.
* ``"compile"``: ``torch.compile`` (Inductor) of the channels-last copy, one graph per input
  shape (``dynamic=False``). Compiling takes from tens of seconds to minutes at the first call
  of each new shape, so it happens only when asked for. Measured on the CamVid LR-ASPP at
  360x480, one thread of a busy AVX2 EPYC (fastest of 15 calls): static shapes compiled in
  17 s (28 s for a second shape) and ran at 101 ms; with Inductor's freezing (weights made
  constants, prepacked for oneDNN) compiling took 72 s per shape for 104 ms, and
  ``dynamic=True`` 153 s once for 117 ms. Freezing is used for bfloat16 alone, where it turns
  autocast's per-call weight casts into constants.

Under bfloat16 on a CPU the channels-last and compile paths also compute every convolution with
a large dilation (>= :data:`TAPS_MIN_DILATION`, DeepLab's ASPP) as one 1x1 convolution to the
``k*k`` taps' outputs followed by shifted sums (:class:`DilatedAsTaps`): oneDNN's bfloat16 kernel
for such convolutions is several times slower than its plain 1x1 (GEMM) kernel, measured on an
AMX Xeon (2 threads, 2048 -> 256 channels at 64x64, rates 12/24/36: 360/620/770 ms against
about 75 ms each as taps), while in float32 the direct kernel stays the faster one.

Under bfloat16 these two paths keep the first convolution the input meets and the last one
before the logits in float32 (:func:`keep_ends_float32`, as mixed-precision practice keeps the
first and last layers): the normalised image and the logits lose most to bfloat16's 8-bit
significand, and both convolutions are cheap. On a DeepLabV3-ResNet50 trained on CamVid (512x512,
5 val frames) arg-max agreement with float32 rose from 99.32 % to 99.69 % for a few % of time.

Every path captures the weights at its first call (a copy or a trace): build it from a trained
model in eval mode, never while training.
"""

from __future__ import annotations

import copy
import warnings
from collections import OrderedDict

import torch
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.models.resnet import ResNet as TorchvisionResNet

from denseseg.backbones.resnet import ResNetBackbone
from denseseg.choices import PRECISIONS
from denseseg.errors import ConfigError
from denseseg.layers import ConvNormAct

__all__ = [
    "PATHS",
    "TAPS_MIN_DILATION",
    "DilatedAsTaps",
    "PRECISIONS",
    "ChannelsLastRuntime",
    "CompiledRuntime",
    "EagerRuntime",
    "FrozenTraces",
    "autocast_dtype",
    "dilated_as_taps",
    "fold_batch_norm",
    "inference_copy",
    "keep_ends_float32",
    "torch_runtime",
]

PATHS = ("eager", "channels_last", "trace", "compile")
# Inductor options of the compile path per precision (see the module docstring); "freezing"
# makes the weights constants (the runtime runs in no_grad), so bfloat16 casts of them fold.
COMPILE_OPTIONS: dict[str, dict[str, bool]] = {"fp32": {}, "bf16": {"freezing": True}}

# Modules whose forward applies ``bn`` directly (and only) to ``conv``'s output, by attribute
# name: torchvision's ResNet blocks and stem, and denseseg's ResNet backbone.
_NAMED_PAIRS: dict[type, tuple[tuple[str, str], ...]] = {
    BasicBlock: (("conv1", "bn1"), ("conv2", "bn2")),
    Bottleneck: (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")),
    ResNetBackbone: (("conv1", "bn1"),),
    TorchvisionResNet: (("conv1", "bn1"),),
}


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast type of ``precision`` (None: plain float32).

    Raises:
        ConfigError: an unknown precision, or bfloat16 on a device that lacks it.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; choose {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return None
    if device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise ConfigError("precision bf16: this GPU has no bfloat16 support; use fp32")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"precision bf16 is not supported on {device.type}; use fp32")
    return torch.bfloat16


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    return (
        type(conv) is nn.Conv2d
        and type(bn) is nn.BatchNorm2d
        and bn.track_running_stats
        and bn.running_mean is not None
        and conv.out_channels == bn.num_features
    )


def _fold_named(module: nn.Module, pairs: tuple[tuple[str, str], ...]) -> int:
    done = 0
    for conv_name, bn_name in pairs:
        conv, bn = getattr(module, conv_name, None), getattr(module, bn_name, None)
        if conv is not None and bn is not None and _foldable(conv, bn):
            setattr(module, conv_name, fuse_conv_bn_eval(conv, bn))
            setattr(module, bn_name, nn.Identity())
            done += 1
    return done


def _fold_sequence(seq: nn.Sequential) -> int:
    done = 0
    names = list(seq._modules)
    for a, b in zip(names, names[1:]):
        conv, bn = seq._modules[a], seq._modules[b]
        if conv is not None and bn is not None and _foldable(conv, bn):
            seq._modules[a] = fuse_conv_bn_eval(conv, bn)
            seq._modules[b] = nn.Identity()
            done += 1
    return done


def fold_batch_norm(model: nn.Module) -> int:
    """Fold every batch norm that directly follows a convolution into it, in place.

    ``BN(conv(x)) = conv'(x)`` with ``w' = w * g / sqrt(v + eps)`` and
    ``b' = (b - m) * g / sqrt(v + eps) + beta`` (running statistics, eval mode;
    :func:`torch.nn.utils.fusion.fuse_conv_bn_eval`); the batch norm becomes an ``Identity``.
    Pairs are found where the structure guarantees the batch norm sees the convolution's output
    and nothing else: consecutive children of an ``nn.Sequential`` run in order (its own forward,
    or :class:`~denseseg.layers.ConvNormAct` and its subclasses, which call it), and the named
    pairs of the ResNet blocks and stems (``conv1``/``bn1``, ...). Any other batch norm is left
    as it is, so the result always computes the same function.

    Args:
        model: a model in eval mode (folding uses the running statistics).

    Returns:
        The number of batch norms folded.

    Raises:
        ValueError: ``model`` is in training mode.
    """
    if model.training:
        raise ValueError("fold_batch_norm needs a model in eval mode (running statistics)")
    done = 0
    for module in list(model.modules()):
        pairs = _NAMED_PAIRS.get(type(module))
        if pairs is not None:
            done += _fold_named(module, pairs)
        sequential = type(module).forward is nn.Sequential.forward
        if isinstance(module, nn.Sequential) and (sequential or isinstance(module, ConvNormAct)):
            done += _fold_sequence(module)
    return done


def inference_copy(model: nn.Module, channels_last: bool = True) -> nn.Module:
    """A copy of ``model`` for inference: eval mode, no gradients, no auxiliary head, batch
    norm folded (:func:`fold_batch_norm`), weights channels-last when ``channels_last``.

    The model itself is left untouched (the Segmenter keeps it, e.g. for the trainer).
    """
    out = copy.deepcopy(model).eval()
    if getattr(out, "aux_head", None) is not None:
        out.aux_head = None  # SegmentationModel computes it only when present
    for p in out.parameters():
        p.requires_grad_(False)
    fold_batch_norm(out)
    if channels_last:
        out = out.to(memory_format=torch.channels_last)
    return out


TAPS_MIN_DILATION = 6
"""Least dilation of the convolutions :func:`dilated_as_taps` rewrites."""


class DilatedAsTaps(nn.Module):
    """A stride-1, "same"-padded, dilated ``k x k`` convolution (one group) computed as one 1x1
    convolution to the ``k*k`` taps' outputs, then each tap's output shifted by its offset and
    summed where it lands inside the image (zero padding contributes nothing). Exactly the
    convolution's result up to the order of the sums.

    Args:
        conv: the ``nn.Conv2d`` to replace (its weights are copied).
    """

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        out_ch, in_ch, kh, kw = conv.weight.shape
        self.out_channels = out_ch
        taps = conv.weight.detach().permute(2, 3, 0, 1).reshape(kh * kw * out_ch, in_ch, 1, 1)
        self.weight = nn.Parameter(taps.contiguous(), requires_grad=False)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone())
        dy, dx = conv.dilation
        py, px = conv.padding  # type: ignore[misc]
        self.offsets = [(i * dy - py, j * dx - px) for i in range(kh) for j in range(kw)]

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        taps = nn.functional.conv2d(x, self.weight)  # bfloat16 under autocast
        n, o = x.shape[0], self.out_channels
        # The taps' partial sums are added in float32, as the convolution accumulates them.
        out = torch.zeros(n, o, h, w, device=x.device).contiguous(memory_format=torch.channels_last)
        for k, (oy, ox) in enumerate(self.offsets):
            y0, y1, x0, x1 = max(0, -oy), min(h, h - oy), max(0, -ox), min(w, w - ox)
            if y0 < y1 and x0 < x1:
                tap = taps[:, k * o : (k + 1) * o, y0 + oy : y1 + oy, x0 + ox : x1 + ox]
                out[:, :, y0:y1, x0:x1] += tap
        if self.bias is not None:
            out += self.bias.view(1, -1, 1, 1)
        return out.to(taps.dtype)


def _rewritable(conv: nn.Module) -> bool:
    if type(conv) is not nn.Conv2d or conv.groups != 1 or conv.stride != (1, 1):
        return False
    if conv.padding_mode != "zeros" or min(conv.dilation) < TAPS_MIN_DILATION:
        return False
    kh, kw = conv.kernel_size
    same = ((kh - 1) * conv.dilation[0] // 2, (kw - 1) * conv.dilation[1] // 2)
    return kh % 2 == 1 and kw % 2 == 1 and tuple(conv.padding) == same  # type: ignore[arg-type]


def dilated_as_taps(model: nn.Module) -> int:
    """Replace, in place, every convolution :class:`DilatedAsTaps` computes (stride 1, one
    group, "same" zero padding, odd kernel, dilation >= :data:`TAPS_MIN_DILATION`).

    Returns:
        The number of convolutions replaced.
    """
    done = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if _rewritable(child):
                setattr(module, name, DilatedAsTaps(child))
                done += 1
    return done


class Float32(nn.Module):
    """``module`` run in float32 inside an autocast region: floating inputs cast up, autocast
    off, so its output is float32 too."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args: Tensor) -> Tensor:
        device_type = args[0].device.type
        with torch.autocast(device_type, enabled=False):
            return self.module(*(a.float() if a.is_floating_point() else a for a in args))


def keep_ends_float32(model: nn.Module, x: Tensor) -> list[str]:
    """Wrap, in place, the first and the last ``nn.Conv2d`` that a call on ``x`` runs in
    :class:`Float32` (the model is run once on ``x`` to find them).

    Returns:
        The wrapped modules' names (none for a model without convolutions).
    """
    order: list[str] = []
    convs = [(n, m) for n, m in model.named_modules() if type(m) is nn.Conv2d]
    hooks = [m.register_forward_hook(lambda *_, n=n: order.append(n)) for n, m in convs]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    ends = list(dict.fromkeys(order[:1] + order[-1:]))
    for name in ends:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent)
        setattr(owner, child, Float32(getattr(owner, child)))
    return ends


class _Logits(nn.Module):
    # The "out" entry alone (TorchScript traces and Inductor graphs take tensors, not dicts),
    # in float32, computed under autocast when ``dtype`` is set.
    def __init__(self, model: nn.Module, device_type: str, dtype: torch.dtype | None) -> None:
        super().__init__()
        self.model = model
        self.device_type = device_type
        self.dtype = dtype

    def forward(self, x: Tensor) -> Tensor:
        if self.dtype is None:
            return self.model(x)["out"]
        with torch.autocast(self.device_type, dtype=self.dtype):
            out = self.model(x)["out"]
        return out.float()


class EagerRuntime:
    """Callable ``x (N, C, H, W) -> logits (N, K, H', W')``: the model called as it is.

    Args:
        model: the model, returning ``{"out": logits}``.
        device: its device.
        amp: float16 autocast (CUDA), the Segmenter's ``amp``; wins over ``precision``.
        precision: ``"fp32"`` or ``"bf16"`` (bfloat16 autocast).
    """

    def __init__(
        self, model: nn.Module, device: torch.device, amp: bool = False, precision: str = "fp32"
    ) -> None:
        self.model = model
        self.device = device
        self.dtype = torch.float16 if amp else autocast_dtype(precision, device)

    def __call__(self, x: Tensor) -> Tensor:
        if self.dtype is None:
            return self.model(x)["out"]
        with torch.autocast(self.device.type, dtype=self.dtype):
            out = self.model(x)["out"]
        return out.float()


class ChannelsLastRuntime:
    """Callable ``x (N, C, H, W) -> logits (N, K, H', W')`` running :func:`inference_copy` of
    the model (made at the first call) on a channels-last input.

    Args:
        model: the model, returning ``{"out": logits}``.
        device: its device.
        precision: ``"fp32"`` or ``"bf16"`` (autocast).
    """

    def __init__(self, model: nn.Module, device: torch.device, precision: str = "fp32") -> None:
        self.model = model
        self.device = device
        self.dtype = autocast_dtype(precision, device)
        self._module: nn.Module | None = None

    def _build(self, x: Tensor) -> nn.Module:
        module = inference_copy(self.model)
        if self.dtype is torch.bfloat16:
            with torch.autocast(self.device.type, dtype=self.dtype):
                keep_ends_float32(module, x)
            if self.device.type == "cpu":
                dilated_as_taps(module)
        return _Logits(module, self.device.type, self.dtype)

    def __call__(self, x: Tensor) -> Tensor:
        x = x.contiguous(memory_format=torch.channels_last)
        if self._module is None:
            self._module = self._build(x)
        with torch.no_grad():
            return self._module(x).contiguous()


class CompiledRuntime(ChannelsLastRuntime):
    """:class:`ChannelsLastRuntime` of ``torch.compile`` of the channels-last copy (see the
    module docstring); compiled at the first call of each input shape."""

    def _build(self, x: Tensor) -> nn.Module:
        module = super()._build(x)
        precision = "fp32" if self.dtype is None else "bf16"
        return torch.compile(module, dynamic=False, options=dict(COMPILE_OPTIONS[precision]))


class FrozenTraces:
    """Callable ``x (N, C, H, W) -> logits`` running a frozen trace of ``model`` for x's shape.

    A trace records the input's shape (the models resize to it), so one trace is kept per
    shape: the ``max_shapes`` most recently used. With ``precision="bf16"`` the trace records
    autocast's casts, and freezing folds batch norm into the bfloat16 weights.
    """

    def __init__(
        self,
        model: nn.Module,
        max_shapes: int = 8,
        precision: str = "fp32",
        device: torch.device | None = None,
    ) -> None:
        device = device if device is not None else _device_of(model)
        self.model = _Logits(model, device.type, autocast_dtype(precision, device)).eval()
        self.max_shapes = max_shapes
        self._traces: OrderedDict[tuple, torch.jit.ScriptModule] = OrderedDict()

    def __len__(self) -> int:
        return len(self._traces)

    def __call__(self, x: Tensor) -> Tensor:
        key = (tuple(x.shape), x.dtype, x.device)
        trace = self._traces.get(key)
        if trace is None:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")  # TorchScript's deprecation and tracer notes
                trace = torch.jit.optimize_for_inference(
                    torch.jit.trace(self.model, x, check_trace=False)
                )
            self._traces[key] = trace
            if len(self._traces) > self.max_shapes:
                self._traces.popitem(last=False)
        else:
            self._traces.move_to_end(key)
        with torch.no_grad():
            return trace(x)


def _device_of(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


TorchRuntime = EagerRuntime | ChannelsLastRuntime | FrozenTraces


def torch_runtime(
    model: nn.Module, device: torch.device, path: str, precision: str = "fp32"
) -> TorchRuntime:
    """The runtime of torch path ``path`` (one of :data:`PATHS`) at ``precision``.

    Raises:
        ConfigError: an unknown path or precision.
    """
    if path == "eager":
        return EagerRuntime(model, device, precision=precision)
    if path == "channels_last":
        return ChannelsLastRuntime(model, device, precision)
    if path == "trace":
        return FrozenTraces(model, precision=precision, device=device)
    if path == "compile":
        return CompiledRuntime(model, device, precision)
    raise ConfigError(f"unknown fast path {path!r}; choose {', '.join(PATHS)}")
