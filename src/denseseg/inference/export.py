"""Export a semantic model to a file that is a complete model on its own: ONNX, TorchScript or a
``torch.export`` program (pt2).

The file's contract (the README's "Export and runtimes"):

* One input, ``image``, NCHW. By default float32, already normalised (``(x / 255 - mean) / std``
  per channel, the model's ``in_channels`` channels). With ``with_preprocess`` it is uint8 pixels
  and the normalisation runs inside the graph; a model of 1 or 3 channels then takes 1 or 3
  (grey is repeated for an RGB model; RGB becomes ITU-R 601 luma for a grey one, rounded as
  :meth:`Segmenter.preprocess <denseseg.inference.segmenter.Segmenter.preprocess>` does).
* One output: ``logits`` float32 ``(N, K, H, W)``, or with ``labels`` ``labels`` int64
  ``(N, H, W)`` (arg-max over classes; a binary model with one output channel gives 1 where the
  sigmoid of its logit exceeds the stored ``threshold``, 0.5 by default, else 0).
* Batch, height and width are dynamic. A valid-padding U-Net (``padding == "valid"``) takes
  only sizes ``min + k * step`` (metadata ``valid_sizes``) and returns the centre of its input,
  ``lost`` pixels smaller per side pair; mirror-pad the image (as the Segmenter's overlap-tile
  mode does) to cover every pixel.
* Metadata (ONNX: ``metadata_props``, each value a JSON string; TorchScript and pt2: the extra
  file ``denseseg.json``): class names, palette, normalisation, model name and options, the
  inference defaults (``segmenter``), the contract and the denseseg version.

Only one forward pass is exported: test-time augmentation and tiling are the caller's (the
Segmenter applies them to an ONNX file loaded with :func:`denseseg.api.load_model`).
"""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from denseseg.checkpoint import atomic_write
from denseseg.choices import EXPORT_FORMATS
from denseseg.errors import CheckpointError, ConfigError
from denseseg.inference.build import first_line

__all__ = [
    "FORMATS",
    "FORMAT_TAG",
    "META_FILE",
    "SUFFIXES",
    "ExportWrapper",
    "default_export_path",
    "export_model",
    "onnx_bytes",
    "read_export_meta",
    "read_onnx_meta",
    "segmenter_meta",
]

FORMATS = EXPORT_FORMATS
SUFFIXES = {"onnx": ".onnx", "torchscript": ".ts", "pt2": ".pt2"}
FORMAT_TAG = "denseseg-export/1"
META_FILE = "denseseg.json"
"""Name of the metadata entry in a TorchScript or pt2 file (its extra files)."""

ONNX_EXTRA = "--format onnx needs onnx and onnxscript: pip install 'denseseg[onnx]'"
# ITU-R 601 luma, as PIL's convert("L") and Segmenter._match_channels.
_LUMA = (0.299, 0.587, 0.114)
# Example input side for tracing: small, and height != width so that the exporter does not
# assume them equal (duck sizing), batch 2 so that it does not fix the batch at 1.
_EXAMPLE_HW = (115, 141)


class ExportWrapper(nn.Module):
    """The model with the file's contract: ``image -> logits`` or ``labels``.

    Args:
        model: a semantic model returning ``{"out": logits (N, K, H', W')}``.
        mean: per-channel normalisation mean (0-1 units), used with ``with_preprocess``.
        std: per-channel normalisation std.
        with_preprocess: the input is uint8 pixels ``(N, C, H, W)``, normalised in the graph;
            1 or 3 channels for a model of 1 or 3 channels.
        labels: return int64 labels ``(N, H', W')`` instead of the logits.
        threshold: probability above which a one-channel (binary) model predicts 1.
    """

    def __init__(
        self,
        model: nn.Module,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        with_preprocess: bool = False,
        labels: bool = False,
        threshold: float = 0.5,
    ) -> None:
        super().__init__()
        self.model = model
        self.with_preprocess = with_preprocess
        self.labels = labels
        self.threshold = float(threshold)
        self.in_channels = int(getattr(model, "in_channels", len(mean)))
        self.register_buffer(
            "mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1)
        )
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("luma", torch.tensor(_LUMA).view(1, 3, 1, 1))

    @property
    def converts_channels(self) -> bool:
        """Whether the uint8 input may have 1 or 3 channels (converted in the graph)."""
        return self.with_preprocess and self.in_channels in (1, 3)

    def forward(self, image: Tensor) -> Tensor:
        """``image (N, C, H, W)`` -> logits ``(N, K, H', W')`` or int64 labels ``(N, H', W')``
        (``H' = H`` except for a valid-padding U-Net, whose output is the input's centre)."""
        x = self._normalise(image) if self.with_preprocess else image
        logits = self.model(x)["out"]
        if not self.labels:
            return logits
        if logits.shape[1] == 1:
            return (torch.sigmoid(logits[:, 0]) > self.threshold).long()
        return logits.argmax(1)

    def _normalise(self, image: Tensor) -> Tensor:
        x = image
        if self.converts_channels:
            # Without branching on the channel count (a static graph cannot): gather channels
            # (0, 0, 0) from grey and grey + alpha, (0, 1, 2) from RGB and RGBA (alpha dropped,
            # as denseseg's image reader does).
            colour = (torch.scalar_tensor(image.shape[1], device=image.device) >= 3).long()
            index = torch.arange(3, device=image.device) * colour
            x = image.index_select(1, index)
            if self.in_channels == 1:
                x = (x.float() * self.luma).sum(1, keepdim=True).round()
        return (x.float() / 255.0 - self.mean) / self.std


def segmenter_meta(seg: Any) -> dict[str, Any]:
    """The export metadata of a :class:`~denseseg.inference.segmenter.Segmenter`: what
    :func:`export_model` takes as ``meta``."""
    settings: dict[str, Any] = {"mode": seg.mode, "tile_size": seg.tile_size, "tta": seg.tta}
    # Sliding-window and multi-scale settings, where this Segmenter has them in use.
    for name in ("crop_size", "stride"):
        if getattr(seg, name, None) is not None:
            settings[name] = getattr(seg, name)
    if seg.mode == "slide" and hasattr(seg, "weighting"):
        settings["weighting"] = seg.weighting
    if seg.tta == "ms" and hasattr(seg, "scales"):
        settings["scales"] = list(seg.scales)
    settings["threshold"] = seg.threshold
    return {
        "model_name": seg.meta.get("model_name", type(seg.model).__name__),
        "model_kwargs": seg.meta.get("model_kwargs", {}),
        "class_names": list(seg.class_names),
        "palette": [list(p) for p in seg.palette],
        "mean": seg.mean.flatten().tolist(),
        "std": seg.std.flatten().tolist(),
        "ignore_index": seg.ignore_index,
        "segmenter": settings,
    }


def default_export_path(model: str, fmt: str) -> Path:
    """``MODEL_STEM.onnx`` (``.ts``, ``.pt2``) in the current folder."""
    stem = Path(str(model).rstrip("/\\")).stem or "model"
    return Path(stem + SUFFIXES[fmt])


def export_model(
    model: nn.Module,
    meta: Mapping[str, Any],
    path: str | Path,
    format: str = "onnx",
    *,
    opset: int | None = None,
    with_preprocess: bool = False,
    labels: bool = False,
    example_size: tuple[int, int] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` to ``path`` as a file that is a complete model (see the module docstring).

    Args:
        model: a semantic model in any mode (exported in eval mode, on the CPU, float32).
        meta: class names, palette, mean, std, model name and options, ignore index and the
            inference defaults (``segmenter``); :func:`segmenter_meta` gives them for a Segmenter.
        path: the file to write (written atomically).
        format: ``"onnx"``, ``"torchscript"`` or ``"pt2"``.
        opset: the ONNX opset (default: the exporter's).
        with_preprocess: uint8 input, normalised in the graph.
        labels: int64 labels as output instead of the logits.
        example_size: ``(H, W)`` of the example input traced (default 115x141; for a
            valid-padding U-Net the nearest sizes it accepts).
        overwrite: replace an existing ``path``.

    Returns:
        ``path``.

    Raises:
        ConfigError: an unknown format, an instance model, a model the exporter cannot handle,
            an existing file without ``overwrite``, or a missing extra (``denseseg[onnx]``).
    """
    path = Path(path)
    if format not in FORMATS:
        raise ConfigError(f"unknown export format {format!r}; choose {', '.join(FORMATS)}")
    if opset is not None and format != "onnx":
        raise ConfigError("--opset applies to --format onnx only")
    if opset is not None:
        _check_opset(opset)
    check_export_target(path, overwrite)
    _check_exportable(model, meta)
    with cpu_float_eval(model):
        wrapper = ExportWrapper(
            model,
            meta["mean"],
            meta["std"],
            with_preprocess=with_preprocess,
            labels=labels,
            threshold=float((meta.get("segmenter") or {}).get("threshold", 0.5)),
        ).eval()
        example = example_input(wrapper, example_size)
        info = export_info(wrapper, meta, format)
        if format == "onnx":
            blob = onnx_bytes(wrapper, example, opset=opset, metadata=info)
        elif format == "torchscript":
            blob = _torchscript_bytes(wrapper, example, info)
        else:
            blob = _pt2_bytes(wrapper, example, info)
    with atomic_write(path, f"{format} file") as fh:
        fh.write(blob)
    return path


@contextmanager
def cpu_float_eval(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` on the CPU, in float32 and eval mode (what the exporters trace), put back on
    its device, dtype and mode afterwards."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    was_training = model.training
    try:
        yield model.cpu().float().eval()
    finally:
        model.to(device=device, dtype=dtype).train(was_training)


def check_export_target(path: Path, overwrite: bool) -> None:
    """Refuse to replace an existing file unless asked, before any slow work.

    Raises:
        ConfigError: ``path`` exists (and ``overwrite`` is off) or is a folder.
    """
    if path.is_dir():
        raise ConfigError(f"--out {path} is a folder; give a file name")
    if path.exists() and not overwrite:
        raise ConfigError(f"{path} exists; pass --overwrite to replace it")


def _check_exportable(model: nn.Module, meta: Mapping[str, Any]) -> None:
    name = meta.get("model_name", type(model).__name__)
    if getattr(model, "task", "semantic") == "instance":
        # Tried with torch 2.14 and torchvision's Mask R-CNN: torch.export stops in ~20 s at
        # batched_nms, whose branch depends on the number of boxes (GuardOnDataDependentSymNode).
        raise ConfigError(
            f"model {name!r} is an instance model (Mask R-CNN): torch.export cannot export it "
            "(its number of detections, and torchvision's NMS branching on it, depend on the "
            "image); export a semantic model"
        )
    if getattr(model, "onnx_path", None) is not None:
        raise ConfigError(f"{model.onnx_path} is already an exported ONNX file")
    for key in ("mean", "std"):
        if key not in meta:
            raise ConfigError(f"export metadata lacks {key!r} (the normalisation)")


def example_input(wrapper: ExportWrapper, size: tuple[int, int] | None = None) -> Tensor:
    """A batch of two example images ``(2, C, H, W)`` of the wrapper's input type."""
    model = wrapper.model
    h, w = size or _EXAMPLE_HW
    if getattr(model, "padding", "same") == "valid":
        h = model.valid_input_size(h)
        w = model.valid_input_size(w + 1 if model.valid_input_size(w) == h else w)
    c = wrapper.in_channels
    if wrapper.with_preprocess:
        return torch.randint(0, 256, (2, c, h, w), dtype=torch.uint8)
    return torch.randn(2, c, h, w)


def dynamic_shapes(wrapper: ExportWrapper) -> dict[str, dict[int, Any]]:
    """Batch, height and width dynamic (and the channels when the graph converts them)."""
    auto = torch.export.Dim.AUTO
    axes = {0: auto, 2: auto, 3: auto}
    if wrapper.converts_channels:
        axes[1] = auto
    return {"image": axes}


def export_info(wrapper: ExportWrapper, meta: Mapping[str, Any], fmt: str) -> dict[str, Any]:
    """The metadata stored in the file (each value JSON-serialisable)."""
    model = wrapper.model
    info: dict[str, Any] = {
        "format": FORMAT_TAG,
        "file_format": fmt,
        "denseseg_version": _version(),
        "model_name": meta.get("model_name", type(model).__name__),
        "model_kwargs": _plain(meta.get("model_kwargs") or {}),
        "class_names": list(meta.get("class_names") or []),
        "palette": [list(map(int, p)) for p in (meta.get("palette") or [])],
        "mean": [float(v) for v in meta["mean"]],
        "std": [float(v) for v in meta["std"]],
        "in_channels": wrapper.in_channels,
        "num_classes": int(getattr(model, "num_classes", 0) or 0),
        "ignore_index": int(meta.get("ignore_index", 255)),
        "segmenter": _plain(meta.get("segmenter") or {}),
        "padding": getattr(model, "padding", "same"),
        "contract": {
            "input": "image",
            "layout": "NCHW",
            "input_dtype": "uint8" if wrapper.with_preprocess else "float32",
            "input_channels": [1, 3] if wrapper.converts_channels else [wrapper.in_channels],
            "normalised_inside": wrapper.with_preprocess,
            "output": "labels" if wrapper.labels else "logits",
            "output_dtype": "int64" if wrapper.labels else "float32",
            "binary_threshold": wrapper.threshold if wrapper.labels else None,
        },
    }
    if info["padding"] == "valid":
        info["valid_sizes"] = valid_sizes(model)
    return info


def valid_sizes(model: nn.Module) -> dict[str, int]:
    """The input sides a valid-padding network accepts, ``min + k * step``, and the pixels it
    loses, ``lost = input - output`` (the same for every accepted side)."""
    smallest = model.valid_input_size(1)
    step = model.valid_input_size(smallest + 1) - smallest
    return {"min": smallest, "step": step, "lost": smallest - model.output_size(smallest)}


def _check_opset(opset: int) -> None:
    """Refuse, before the slow export, an opset that no ONNX runtime of this onnx knows."""
    try:
        import onnx
    except ImportError:
        raise ConfigError(ONNX_EXTRA) from None
    newest = onnx.defs.onnx_opset_version()
    if not 18 <= opset <= newest:
        raise ConfigError(
            f"--opset {opset} is not one PyTorch's exporter writes: choose 18 to {newest}"
        )


def onnx_bytes(
    wrapper: nn.Module,
    example: Tensor,
    *,
    opset: int | None = None,
    metadata: Mapping[str, Any] | None = None,
    output_name: str | None = None,
) -> bytes:
    """The serialised ONNX model of ``wrapper`` (torch.export-based exporter), with dynamic
    batch, height and width, and ``metadata`` in its ``metadata_props`` as JSON strings.

    Raises:
        ConfigError: onnx/onnxscript missing, or the exporter cannot handle the model.
    """
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise ConfigError(ONNX_EXTRA) from None
    labels = getattr(wrapper, "labels", False)
    shapes = dynamic_shapes(wrapper) if isinstance(wrapper, ExportWrapper) else None
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                wrapper,
                (example,),
                None,
                dynamo=True,
                input_names=["image"],
                output_names=[output_name or ("labels" if labels else "logits")],
                opset_version=opset,
                dynamic_shapes=shapes,
                verbose=False,
            )
    except Exception as exc:  # the exporter raises many kinds; say which model, in one line
        raise ConfigError(
            f"the ONNX exporter cannot export this model ({first_line(exc)})"
        ) from None
    proto = program.model_proto
    written = {o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")}
    if opset is not None and written != {opset}:  # the exporter logs a failed conversion only
        raise ConfigError(
            f"--opset {opset}: the ONNX exporter could not convert this model to opset {opset} "
            f"(it wrote {', '.join(map(str, sorted(written)))}); use --opset 18 or later"
        )
    if metadata:
        del proto.metadata_props[:]
        for key, value in metadata.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, json.dumps(value)
    return proto.SerializeToString()


def _torchscript_bytes(wrapper: ExportWrapper, example: Tensor, info: Mapping[str, Any]) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TorchScript's deprecation and tracer notes
        traced = torch.jit.trace(wrapper, example, check_trace=False)
        torch.jit.save(traced, buffer, _extra_files={META_FILE: json.dumps(info)})
    return buffer.getvalue()


def _pt2_bytes(wrapper: ExportWrapper, example: Tensor, info: Mapping[str, Any]) -> bytes:
    program = None
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            # Non-strict capture first (fast); where it fixed a dynamic side (a valid-padding
            # U-Net's size checks), strict TorchDynamo capture, the ONNX exporter's first try.
            for strict in (False, True):
                program = torch.export.export(
                    wrapper, (example,), dynamic_shapes=dynamic_shapes(wrapper), strict=strict
                )
                if _kept_dynamic(program, dynamic_shapes(wrapper)["image"]):
                    break
    except Exception as exc:
        raise ConfigError(f"torch.export cannot export this model ({first_line(exc)})") from None
    buffer = io.BytesIO()
    torch.export.save(program, buffer, extra_files={META_FILE: json.dumps(info)})
    return buffer.getvalue()


def _kept_dynamic(program: torch.export.ExportedProgram, axes: Mapping[int, Any]) -> bool:
    """Whether the program's input kept every axis of ``axes`` symbolic."""
    node = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == "image")
    shape = node.meta["val"].shape
    return not any(is_concrete_int(shape[axis]) for axis in axes)


def read_onnx_meta(path: str | Path) -> dict[str, Any]:
    """The metadata :func:`export_model` stored in an ONNX file (each value decoded from JSON).

    Raises:
        CheckpointError: the file cannot be read as ONNX.
        ConfigError: onnx is not installed.
    """
    try:
        import onnx
    except ImportError:
        raise ConfigError("reading an ONNX file needs onnx: pip install 'denseseg[onnx]'") from None
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError, OSError, ...
        raise CheckpointError(
            f"{path} cannot be read as an ONNX file ({first_line(exc)})"
        ) from None
    meta: dict[str, Any] = {}
    for entry in proto.metadata_props:
        try:
            meta[entry.key] = json.loads(entry.value)
        except ValueError:
            meta[entry.key] = entry.value  # written by another tool: kept as text
    return meta


def read_export_meta(path: str | Path) -> dict[str, Any]:
    """The metadata of an exported file of any format (ONNX, TorchScript or pt2)."""
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        return read_onnx_meta(path)
    try:
        if path.suffix.lower() == ".pt2":
            extra = {META_FILE: ""}
            torch.export.load(path, extra_files=extra)
            return json.loads(extra[META_FILE])
        extra = {META_FILE: ""}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
        return json.loads(extra[META_FILE])
    except (RuntimeError, ValueError, OSError) as exc:
        raise CheckpointError(
            f"{path} holds no denseseg export metadata ({first_line(exc)})"
        ) from None


def _version() -> str:
    try:
        return importlib_metadata.version("denseseg")
    except importlib_metadata.PackageNotFoundError:
        return "unknown"


def _plain(obj: Any) -> Any:
    """Tuples to lists, tensors and numpy scalars to Python numbers: JSON-ready."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):
        return obj.item()
    return obj
