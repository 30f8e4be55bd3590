"""The ONNX Runtime and OpenVINO backends of the Segmenter, and ONNX files as models.

:func:`onnx_runtime` gives the Segmenter's runtime for ``backend="onnxruntime"`` or
``"openvino"``: the torch model is exported to ONNX (float32 normalised input, logits output,
dynamic batch, height and width; :mod:`denseseg.inference.export`) and run by that runtime.
The export (10-60 s on a CPU) is kept per model object and reused while its weights are
unchanged (their tensors' version counters), so a second Segmenter over the same model does not
export again.

:class:`OnnxModel` is a model stand-in for an ONNX file written by ``denseseg export`` (without
``--with-preprocess`` or ``--labels``): it carries the attributes a Segmenter reads
(``num_classes``, ``in_channels``, ``padding``, ``task``) and the file's metadata, so that
:func:`denseseg.api.load_model` on a ``.onnx`` file gives a Segmenter (modes, tiling, TTA) with no
torch model. The runtime then runs the file itself.

Both runtimes use ``torch.get_num_threads()`` threads, so that comparisons with the torch
backend are fair; OpenVINO is told to compute in float32 (on CPUs with bfloat16 it would
otherwise pick bfloat16).
"""

from __future__ import annotations

import inspect
import tempfile
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from denseseg.errors import CheckpointError, ConfigError
from denseseg.inference.build import build_predictor
from denseseg.inference.export import (
    FORMAT_TAG,
    ExportWrapper,
    cpu_float_eval,
    example_input,
    onnx_bytes,
    read_onnx_meta,
)
from denseseg.inference.segmenter import Segmenter

__all__ = [
    "OnnxModel",
    "OnnxRuntime",
    "load_onnx",
    "load_onnx_model",
    "onnx_runtime",
    "require_backend",
]

_EXTRAS = {
    "onnxruntime": ("onnxruntime", "ONNX Runtime", "onnx"),
    "openvino": ("openvino", "OpenVINO", "openvino"),
}
# model -> (weights fingerprint, ONNX bytes): one export per model while its weights stay.
_EXPORTS: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, bytes]] = weakref.WeakKeyDictionary()


def require_backend(backend: str) -> Any:
    """Import the runtime package of ``backend`` or say which extra installs it.

    Raises:
        ConfigError: the package is missing, e.g. "--backend onnxruntime needs ONNX Runtime:
            pip install 'denseseg[onnx]'".
    """
    module, label, extra = _EXTRAS[backend]
    try:
        return __import__(module)
    except ImportError:
        raise ConfigError(
            f"--backend {backend} needs {label}: pip install 'denseseg[{extra}]'"
        ) from None


class OnnxRuntime:
    """Callable ``x (N, C, H, W) float32 -> logits (N, K, H', W')`` running an ONNX model.

    Args:
        source: the ONNX model, serialised bytes or a file.
        device: the torch device inputs come from and outputs go back to.
        backend: ``"onnxruntime"`` (CPU; CUDA when ``device`` is CUDA and ONNX Runtime has its
            CUDA provider) or ``"openvino"`` (CPU).
    """

    def __init__(
        self,
        source: bytes | str | Path,
        device: torch.device,
        backend: str,
        precision: str = "fp32",
    ) -> None:
        require_backend(backend)
        check_backend_precision(backend, precision)
        self.device = torch.device(device)
        self.backend = backend
        self.precision = precision
        self.threads = max(1, torch.get_num_threads())
        if backend == "onnxruntime":
            self._run = self._ort(source)
        else:
            self._run = self._openvino(source)

    def _ort(self, source: bytes | str | Path) -> Callable[[np.ndarray], np.ndarray]:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # warnings about unused initialisers are noise here
        providers = ["CPUExecutionProvider"]
        if self.device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        blob = source if isinstance(source, bytes) else str(source)
        session = ort.InferenceSession(blob, options, providers=providers)
        name = session.get_inputs()[0].name
        return lambda x: session.run(None, {name: x})[0]

    def _openvino(self, source: bytes | str | Path) -> Callable[[np.ndarray], np.ndarray]:
        import openvino as ov

        hint = "bf16" if self.precision == "bf16" else "f32"
        config = {"INFERENCE_NUM_THREADS": self.threads, "INFERENCE_PRECISION_HINT": hint}
        core = ov.Core()
        if isinstance(source, bytes):
            # OpenVINO reads ONNX from a file: write one for the compile, then let it go.
            with tempfile.TemporaryDirectory(prefix="denseseg-onnx-") as tmp:
                file = Path(tmp) / "model.onnx"
                file.write_bytes(source)
                compiled = core.compile_model(str(file), "CPU", config)
        else:
            compiled = core.compile_model(str(source), "CPU", config)
        request = compiled.create_infer_request()
        # The result lives in the request's buffer, overwritten by the next call: copy it.
        return lambda x: np.array(request.infer({0: x})[0], copy=True)

    def __call__(self, x: Tensor) -> Tensor:
        array = x.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(self._run(array)).to(self.device)


def check_backend_precision(backend: str, precision: str) -> None:
    """OpenVINO runs float32 or bfloat16 (its ``INFERENCE_PRECISION_HINT``; on CPUs with AMX or
    AVX512-BF16); ONNX Runtime float32 only.

    Raises:
        ConfigError: another precision, or bf16 on ONNX Runtime.
    """
    if precision == "fp32" or (precision == "bf16" and backend == "openvino"):
        return
    raise ConfigError(
        f"precision {precision!r} on backend {backend}: ONNX Runtime runs fp32, OpenVINO fp32 "
        "or bf16, the torch backend fp32 or bf16"
    )


def onnx_runtime(
    model: nn.Module, device: torch.device, backend: str, precision: str = "fp32"
) -> OnnxRuntime:
    """The Segmenter's runtime for ``backend`` ``"onnxruntime"`` or ``"openvino"``.

    An :class:`OnnxModel` runs its own file; a torch model is exported to ONNX first (once per
    model and set of weights).

    Args:
        model: a semantic model returning ``{"out": logits}``, or an :class:`OnnxModel`.
        device: where inputs come from and logits go back to.
        backend: ``"onnxruntime"`` or ``"openvino"``.

    Raises:
        ConfigError: the backend's package (or onnx/onnxscript for the export) is missing, or
            the model cannot be exported.
    """
    require_backend(backend)
    if isinstance(model, OnnxModel):
        return OnnxRuntime(model.onnx_path, device, backend, precision)
    return OnnxRuntime(_exported(model), device, backend, precision)


def _exported(model: nn.Module) -> bytes:
    """The ONNX bytes of ``model`` (float input, logits), exported once per set of weights."""
    key = _fingerprint(model)
    cached = _EXPORTS.get(model)
    if cached is not None and cached[0] == key:
        return cached[1]
    # The exporter traces on the CPU in float32; the model goes back where it was afterwards.
    with cpu_float_eval(model):
        n = int(getattr(model, "in_channels", 3))
        wrapper = ExportWrapper(model, [0.0] * n, [1.0] * n).eval()
        blob = onnx_bytes(wrapper, example_input(wrapper))
    _EXPORTS[model] = (_fingerprint(model), blob)
    return blob


def _fingerprint(model: nn.Module) -> tuple:
    # In-place updates (optimiser steps, load_state_dict) bump a tensor's version counter.
    return tuple((t.data_ptr(), t._version) for t in model.state_dict().values())


class OnnxModel(nn.Module):
    """A model stand-in for an ONNX file of ``denseseg export`` (float input, logits output).

    A Segmenter reads ``num_classes``, ``in_channels``, ``padding`` and ``task`` from it; for a
    valid-padding U-Net also ``valid_input_size`` and ``output_size`` (from the file's
    ``valid_sizes``). Its runtime (:func:`onnx_runtime`) runs the file; calling the module runs
    it with ONNX Runtime.

    Args:
        path: the ``.onnx`` file.
        meta: its metadata (:func:`~denseseg.inference.export.read_onnx_meta`).
    """

    task = "semantic"

    def __init__(self, path: str | Path, meta: Mapping[str, Any]) -> None:
        super().__init__()
        self.onnx_path = Path(path)
        self.onnx_meta = dict(meta)
        self.num_classes = int(meta["num_classes"])
        self.in_channels = int(meta["in_channels"])
        self.padding = str(meta.get("padding", "same"))
        self._sizes = meta.get("valid_sizes") or {}
        self._runtime: OnnxRuntime | None = None

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        if self._runtime is None or self._runtime.device != x.device:
            self._runtime = OnnxRuntime(self.onnx_path, x.device, "onnxruntime")
        return {"out": self._runtime(x)}

    def valid_input_size(self, min_size: int) -> int:
        """Smallest accepted input side ``>= min_size``."""
        if self.padding != "valid":
            return max(int(min_size), 1)
        low, step = self._sizes["min"], self._sizes["step"]
        return low + step * max(0, -(-(int(min_size) - low) // step))

    def output_size(self, input_size: int) -> int:
        """Output side for an accepted input side."""
        if self.padding != "valid":
            return int(input_size)
        if self.valid_input_size(input_size) != input_size:
            raise ConfigError(
                f"input size {input_size} does not fit {self.onnx_path.name}; the nearest it "
                f"takes is {self.valid_input_size(input_size)}"
            )
        return int(input_size) - self._sizes["lost"]

    def extra_repr(self) -> str:
        return f"{self.onnx_path}, classes={self.num_classes}"


# Metadata entries a Segmenter cannot run an exported file without.
_NEEDED = ("num_classes", "in_channels", "mean", "std", "contract")


def load_onnx_model(path: str | Path) -> tuple[OnnxModel, dict[str, Any]]:
    """Read an ONNX file of ``denseseg export`` as a model and its predictor metadata.

    Returns:
        The :class:`OnnxModel` and the metadata :func:`~denseseg.inference.build.build_predictor`
        takes (class names, palette, mean, std, ignore index, model name and options; the
        stored inference defaults under ``segmenter``).

    Raises:
        CheckpointError: not an ONNX file of ``denseseg export``.
        ConfigError: exported with ``--with-preprocess`` or ``--labels``.
    """
    meta = read_onnx_meta(path)
    if meta.get("format") != FORMAT_TAG:
        raise CheckpointError(
            f"{path} was not written by denseseg export (no {FORMAT_TAG!r} metadata); export "
            "the model with denseseg export"
        )
    missing = [k for k in _NEEDED if k not in meta]
    if missing:
        raise CheckpointError(
            f"{path} lacks the metadata {', '.join(missing)} that denseseg export writes; the "
            "file was edited by another tool: export the model again"
        )
    contract = meta.get("contract") or {}
    if contract.get("input_dtype") != "float32" or contract.get("output") != "logits":
        raise ConfigError(
            f"{path} was exported with --with-preprocess or --labels: it cannot be run as a "
            "Segmenter's model; export it again without them"
        )
    model = OnnxModel(path, meta)
    described = {
        "model_name": meta.get("model_name"),
        "model_kwargs": meta.get("model_kwargs") or {},
        "class_names": meta.get("class_names"),
        "palette": meta.get("palette"),
        "mean": meta["mean"],
        "std": meta["std"],
        "ignore_index": meta.get("ignore_index", 255),
        "checkpoint": str(path),
        "segmenter": meta.get("segmenter") or {},
    }
    return model, described


def load_onnx(path: str | Path, device: str | torch.device = "auto", **options: Any) -> Segmenter:
    """A :class:`Segmenter` running an ONNX file of ``denseseg export``.

    The file's stored inference defaults (mode, tile size, TTA, threshold) apply unless
    ``options`` override them.

    Args:
        path: the ``.onnx`` file (exported without ``--with-preprocess`` and ``--labels``).
        device: where the Segmenter's tensors live (ONNX Runtime uses CUDA there when it can).
        **options: :class:`Segmenter` options; ``backend`` is ``"onnxruntime"`` (default) or
            ``"openvino"``.

    Raises:
        CheckpointError: not an ONNX file of ``denseseg export``.
        ConfigError: an option that needs the torch model (``backend="torch"``, ``fast``),
            ``precision="bf16"`` on ONNX Runtime, or the runtime's package is missing.
    """
    backend = options.pop("backend", None) or "onnxruntime"
    bf16_elsewhere = options.get("precision", "fp32") != "fp32" and backend != "openvino"
    if backend == "torch" or options.get("fast") or bf16_elsewhere:
        raise ConfigError(
            f"{path} is an ONNX file: it runs on --backend onnxruntime (float32) or openvino "
            "(float32, or --precision bf16); --fast applies to the torch backend"
        )
    require_backend(backend)
    model, described = load_onnx_model(path)
    accepted = inspect.signature(Segmenter).parameters
    stored = {k: v for k, v in described.pop("segmenter").items() if k in accepted}
    if isinstance(stored.get("tile_size"), list):
        stored["tile_size"] = tuple(stored["tile_size"])
    return build_predictor(model, described, device, backend=backend, **{**stored, **options})
