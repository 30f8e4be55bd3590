"""``denseseg benchmark``: the speed of every inference path of a model, and their agreement.

For one model, input size and batch, each available path (:data:`PATHS`: the torch paths of
:mod:`denseseg.inference.fast` in float32 and bfloat16, ONNX Runtime, OpenVINO) is set up once
(its first call: copy, trace, compile or export, timed as ``setup_s``), warmed up, then timed
call by call, the paths taking turns (round robin, the order rotated every round) so that the
drift of a shared machine falls on all of them alike. Per path:

* latency p50/p90 (ms per batch) and images/s (batch / p50);
* peak memory: on a CPU the growth of the process's resident memory during one call, over the
  resident memory just before it, freed memory first handed back to the system
  (``malloc_trim``), sampled every ~0.5 ms (``/proc/self/statm``; None elsewhere); on CUDA the
  allocator's peak during one call over what was allocated before it;
* achieved GFLOP/s: the floating-point operations of one eager forward pass (convolutions and
  matrix products, counted once by :class:`torch.utils.flop_counter.FlopCounterMode`) over p50;
* agreement with eager float32 on the same input: the percentage of pixels with the same
  arg-max class, and the largest absolute logit difference.

The reference: torchvision's own eager model of the same architecture
(``torchvision.models.segmentation.<name>``, auxiliary head off, no pretrained weights) loaded
with the model's weights (:func:`torchvision_reference`), timed in the same rounds; every path's
speed is also given as a multiple of it.

:func:`fastest_config` picks the fastest torch path whose agreement meets the thresholds
(:data:`AGREEMENT`), which ``denseseg benchmark --save`` stores in a packed model's JSON.
"""

from __future__ import annotations

import ctypes
import datetime as _dt
import json
import logging
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
import torchvision.models.segmentation as tvseg
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from denseseg.checkpoint import atomic_write
from denseseg.choices import DEFAULT_BENCHMARK_PATHS
from denseseg.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from denseseg.errors import ConfigError, DensesegError
from denseseg.inference.fast import PATHS as TORCH_PATHS
from denseseg.inference.runtimes import make_runtime
from denseseg.inference.segmenter import Segmenter
from denseseg.models import create_model
from denseseg.models.tv_layouts import TorchvisionLayoutModel

log = logging.getLogger("denseseg")

__all__ = [
    "AGREEMENT",
    "DEFAULT_PATHS",
    "PATHS",
    "PathSpec",
    "benchmark",
    "fastest_config",
    "markdown_table",
    "parse_paths",
    "save_json",
    "torchvision_reference",
]

AGREEMENT = {"fp32": 99.99, "bf16": 99.5}
"""Least arg-max agreement with eager float32 (% of pixels) a path needs to be chosen."""
REFERENCE = "torchvision"


@dataclass(frozen=True)
class PathSpec:
    """One row of the benchmark: a backend, and for torch its path and precision."""

    name: str
    backend: str = "torch"
    path: str = "eager"
    precision: str = "fp32"


def _torch_specs() -> list[PathSpec]:
    specs = []
    for path in TORCH_PATHS:
        specs.append(PathSpec(path, "torch", path, "fp32"))
        specs.append(PathSpec(f"{path}+bf16", "torch", path, "bf16"))
    return specs


PATHS: dict[str, PathSpec] = {
    s.name: s
    for s in [
        *_torch_specs(),
        PathSpec("onnxruntime", "onnxruntime"),
        PathSpec("openvino", "openvino"),
        PathSpec("openvino+bf16", "openvino", precision="bf16"),
    ]
}
"""Every path the benchmark knows, by name (``channels_last+bf16``: that path in bfloat16)."""
DEFAULT_PATHS = DEFAULT_BENCHMARK_PATHS


def parse_paths(names: Sequence[str] | None) -> list[PathSpec]:
    """The specs of ``names`` (default :data:`DEFAULT_PATHS`), eager float32 always first: it
    is what agreement is measured against.

    Raises:
        ConfigError: an unknown name.
    """
    names = list(DEFAULT_PATHS if not names else names)
    unknown = [n for n in names if n not in PATHS]
    if unknown:
        raise ConfigError(f"unknown benchmark path {unknown[0]!r}; choose {', '.join(PATHS)}")
    ordered = ["eager"] + [n for n in dict.fromkeys(names) if n != "eager"]
    return [PATHS[n] for n in ordered]


# ----------------------------------------------------------------------------- the reference
def torchvision_reference(model: nn.Module) -> tuple[nn.Module | None, str]:
    """torchvision's eager model of ``model``'s architecture with ``model``'s weights.

    torchvision's state_dict keys are renamed to denseseg's by the model's own conversion
    (:meth:`~denseseg.models.tv_layouts.TorchvisionLayoutModel.convert_torchvision_state_dict`),
    which pairs every torchvision key with the denseseg key holding its tensor.

    Returns:
        ``(model, "")`` on ``model``'s device in eval mode, or ``(None, why not)`` when there is
        no counterpart (another architecture, another width, input channels, ...).
    """
    if not isinstance(model, TorchvisionLayoutModel) or not hasattr(tvseg, model.tv_name):
        return None, f"{type(model).__name__} has no torchvision counterpart"
    kwargs: dict[str, Any] = {"weights": None, "weights_backbone": None}
    if not model.tv_name.startswith("lraspp"):
        kwargs["aux_loss"] = False
    ref = getattr(tvseg, model.tv_name)(num_classes=model.num_classes, **kwargs)
    theirs = ref.state_dict()
    renamed = list(model.convert_torchvision_state_dict(theirs))
    ours = model.state_dict()
    state = {}
    for tv_key, key in zip(theirs, renamed):
        if key not in ours or ours[key].shape != theirs[tv_key].shape:
            return None, (
                f"the weights do not fit torchvision's {model.tv_name} ({key}): another width, "
                "input channels or head size"
            )
        state[tv_key] = ours[key]
    if len(set(renamed)) != len(renamed):
        return None, f"torchvision's {model.tv_name} keys do not map one to one"
    ref.load_state_dict(state)
    device = next(model.parameters()).device
    return ref.to(device).eval(), ""


class _TorchvisionRuntime:
    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            return self.model(x)["out"]


# ----------------------------------------------------------------------------- measuring
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm", "rb") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_memory_mib(call: Callable[[], Any], device: torch.device) -> float | None:
    """Peak extra memory of one ``call()`` in MiB (see the module docstring for how), or None
    where it cannot be measured."""
    if device.type == "cuda":
        _sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        call()
        _sync(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    _malloc_trim()
    before = _rss_bytes()
    if before is None:
        return None
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes() or 0)
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        call()
    finally:
        done.set()
        sampler.join()
    peak[0] = max(peak[0], _rss_bytes() or 0)
    return (peak[0] - before) / 2**20


def count_flops(model: nn.Module, x: Tensor) -> int:
    """Floating-point operations of one eager forward pass of ``model`` on ``x``."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return int(counter.get_total_flops())


def agreement(out: Tensor, ref: Tensor) -> tuple[float, float]:
    """``(% of pixels with the same arg-max class, largest absolute logit difference)`` of
    logits ``out`` and ``ref`` ``(N, K, H, W)``; one channel (binary): the same sign."""
    out, ref = out.float().cpu(), ref.float().cpu()
    if out.shape != ref.shape:
        raise ValueError(f"logits of shape {tuple(out.shape)}, expected {tuple(ref.shape)}")
    if out.shape[1] == 1:
        same = (out > 0) == (ref > 0)
    else:
        same = out.argmax(1) == ref.argmax(1)
    return 100.0 * same.float().mean().item(), (out - ref).abs().max().item()


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


# ----------------------------------------------------------------------------- the input
def benchmark_input(
    seg: Segmenter, size: tuple[int, int], batch: int, image: Tensor | None = None
) -> Tensor:
    """A normalised batch ``(batch, C, H, W)`` on the Segmenter's device.

    Args:
        seg: the Segmenter (its normalisation and input channels).
        size: ``(H, W)``.
        batch: N.
        image: a uint8 image ``(C, H', W')`` resized to ``size`` for every batch element; by
            default random smooth images (regions of random colour plus a little noise, seed 0):
            image-like, so arg-max agreement is not measured on noise alone.
    """
    h, w = size
    if image is None:
        g = torch.Generator().manual_seed(0)
        coarse = torch.rand(batch, seg.in_channels, max(h // 16, 2), max(w // 16, 2), generator=g)
        smooth = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
        noisy = smooth + 0.05 * torch.randn(smooth.shape, generator=g)
        images = (noisy.clamp(0, 1) * 255).round().to(torch.uint8)
    else:
        resized = F.interpolate(image[None].float(), size=(h, w), mode="bilinear")
        images = resized.round().clamp(0, 255).to(torch.uint8).expand(batch, -1, -1, -1)
    return torch.stack([seg.preprocess(im) for im in images]).to(seg.device)


def random_weights_segmenter(name: str, classes: int, device: str | None = "cpu") -> Segmenter:
    """Registered architecture ``name`` with random weights drawn from seed 0 (the same weights
    every run, so that agreement figures repeat; the caller's random state is left as it was),
    ``classes`` classes and ImageNet normalisation.

    Raises:
        ConfigError: an instance model (the benchmark measures semantic ones).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = create_model(name, num_classes=classes)
    if getattr(model, "task", "semantic") != "semantic":
        raise ConfigError(f"{name} is an instance model; benchmark measures semantic models")
    meta = {"model_name": name, "weights": "random (seed 0)"}
    mean, std = IMAGENET_MEAN[: model.in_channels], IMAGENET_STD[: model.in_channels]
    return Segmenter(model, mean=mean, std=std, device=device, meta=meta)


# ----------------------------------------------------------------------------- the run
def _setup(seg: Segmenter, spec: PathSpec, x: Tensor) -> tuple[Callable | None, float, Any, str]:
    """``(runtime, seconds of its first call, its logits, "")`` or ``(None, 0, None, why)``."""
    start = time.perf_counter()
    try:
        runtime = make_runtime(
            seg.model, seg.device, backend=spec.backend, fast=spec.path, precision=spec.precision
        )
        out = runtime(x)
        _sync(seg.device)
    except (ImportError, DensesegError) as exc:  # a missing extra or backend module
        return None, 0.0, None, _one_line(exc)
    except Exception as exc:  # noqa: BLE001 - one path failing (a compiler missing) is a row's note
        if spec.name == "eager":
            raise
        return None, 0.0, None, f"failed: {type(exc).__name__}: {_one_line(exc)}"
    return runtime, time.perf_counter() - start, out.float(), ""


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _round_robin(
    runtimes: Mapping[str, Callable], x: Tensor, runs: int, device: torch.device
) -> dict[str, list[float]]:
    """Seconds of each call, ``runs`` calls per runtime taken in turns; the order rotates every
    round so that no runtime always follows the same one."""
    names = list(runtimes)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(runs):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            _sync(device)
            start = time.perf_counter()
            runtimes[name](x)
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def _setup_all(
    seg: Segmenter, specs: Sequence[PathSpec], x: Tensor, reference: bool | None
) -> tuple[dict[str, Callable], dict[str, dict[str, Any]], list[dict[str, str]], dict[str, Any]]:
    """Runtimes by name, each one's first facts (setup time, agreement), the paths skipped with
    their reasons, and what is known of the reference."""
    runtimes: dict[str, Callable] = {}
    facts: dict[str, dict[str, Any]] = {}
    skipped: list[dict[str, str]] = []
    eager_out: Tensor | None = None
    for spec in specs:
        log.info("benchmark: setting up %s", spec.name)
        runtime, setup_s, out, why = _setup(seg, spec, x)
        if runtime is None:
            log.info("benchmark: %s skipped: %s", spec.name, why)
            skipped.append({"path": spec.name, "reason": why})
            continue
        eager_out = out if eager_out is None else eager_out
        agree, diff = agreement(out, eager_out)
        runtimes[spec.name] = runtime
        facts[spec.name] = {"spec": spec, "setup_s": setup_s, "agree": agree, "diff": diff}
    ref_info: dict[str, Any] = {"name": None, "note": "not asked for (--no-reference)"}
    if reference is not False:
        ref, note = torchvision_reference(seg.model)
        ref_info = {"name": None, "note": note}
        if ref is not None:
            runtime = _TorchvisionRuntime(ref)
            out = runtime(x).float()
            agree, diff = agreement(out, eager_out)
            runtimes[REFERENCE] = runtime
            facts[REFERENCE] = {"spec": PathSpec(REFERENCE), "setup_s": 0.0}
            facts[REFERENCE].update(agree=agree, diff=diff)
            ref_info = {
                "name": f"torchvision.models.segmentation.{seg.model.tv_name}",
                "note": "torchvision's eager model with the same weights, auxiliary head off",
                "agreement_pct": agree,
                "max_abs_diff": diff,
            }
        elif reference:
            log.warning("benchmark: no torchvision reference: %s", note)
    return runtimes, facts, skipped, ref_info


def benchmark(
    seg: Segmenter,
    *,
    size: tuple[int, int],
    batch: int = 1,
    runs: int = 20,
    warmup: int = 3,
    paths: Sequence[str] | None = None,
    reference: bool | None = None,
    threads: int | None = None,
    image: Tensor | None = None,
    name: str | None = None,
) -> dict[str, Any]:
    """Measure every path of ``seg``'s model (see the module docstring).

    Args:
        seg: a Segmenter of the model (its model, device and normalisation are used; its own
            runtime is not).
        size: input ``(H, W)``.
        batch: images per call N.
        runs: timed calls per path.
        warmup: untimed calls per path after its first (setup) call.
        paths: names from :data:`PATHS` (default :data:`DEFAULT_PATHS`); eager float32 is
            always measured, as the baseline of agreement.
        reference: time torchvision's model of the same architecture too: None when it has
            one, True to warn when it has none, False never.
        threads: torch's intra-op threads (``torch.set_num_threads``, restored afterwards;
            ONNX Runtime and OpenVINO take torch's count too); None leaves it.
        image: a uint8 image ``(C, H', W')`` to measure on (resized to ``size``); default
            random smooth images (:func:`benchmark_input`).
        name: the model's name for the report.

    Returns:
        A JSON-ready dict: the settings, the machine, ``rows`` (one per path measured, the
        reference last), ``skipped`` (paths not available, with the reason), ``reference``,
        and ``fastest`` (:func:`fastest_config`).

    Raises:
        ConfigError: an unknown path name, or ``runs`` or ``batch`` below 1.
    """
    if runs < 1 or batch < 1 or warmup < 0:
        raise ConfigError("benchmark needs runs >= 1, batch >= 1 and warmup >= 0")
    specs = parse_paths(paths)
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        result = _measure(seg, specs, size, batch, runs, warmup, reference, image)
    finally:
        torch.set_num_threads(previous_threads)
    result["model"] = name or seg.meta.get("builtin") or result["architecture"]
    result["weights"] = seg.meta.get("weights", "the model's own")
    result["fastest"] = fastest_config(result)
    return result


def _measure(
    seg: Segmenter,
    specs: Sequence[PathSpec],
    size: tuple[int, int],
    batch: int,
    runs: int,
    warmup: int,
    reference: bool | None,
    image: Tensor | None,
) -> dict[str, Any]:
    x = benchmark_input(seg, size, batch, image)
    seg.model.eval()
    flops = count_flops(seg.model, x)
    with torch.no_grad():
        runtimes, facts, skipped, ref_info = _setup_all(seg, specs, x, reference)
        for runtime in runtimes.values():
            for _ in range(warmup):
                runtime(x)
        times = _round_robin(runtimes, x, runs, seg.device)
        memory = {n: peak_memory_mib(lambda r=r: r(x), seg.device) for n, r in runtimes.items()}
    rows = _rows(facts, times, memory, flops, batch)
    return {
        "model": None,
        "architecture": seg.meta.get("model_name") or type(seg.model).__name__,
        "size": list(size),
        "batch": batch,
        "threads": torch.get_num_threads(),
        "runs": runs,
        "warmup": warmup,
        "device": str(seg.device),
        "input": "image file" if image is not None else "random smooth images (seed 0)",
        "flops_per_batch": flops,
        "memory_method": _memory_method(seg.device),
        "machine": machine_info(),
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "reference": ref_info,
        "agreement_thresholds_pct": dict(AGREEMENT),
        "rows": rows,
        "skipped": skipped,
    }


def _memory_method(device: torch.device) -> str:
    if device.type == "cuda":
        return "CUDA allocator peak during one call, over the memory allocated before it"
    return (
        "peak resident-set growth during one call over the resident set before it, freed "
        "memory handed back first (malloc_trim), sampled every ~0.5 ms from /proc/self/statm"
    )


def _rows(
    facts: Mapping[str, dict[str, Any]],
    times: Mapping[str, list[float]],
    memory: Mapping[str, float | None],
    flops: int,
    batch: int,
) -> list[dict[str, Any]]:
    p50 = {n: _percentile(t, 0.5) for n, t in times.items()}
    rows = []
    for name, fact in facts.items():
        spec, t = fact["spec"], times[name]
        rows.append(
            {
                "path": name,
                "backend": "torchvision" if name == REFERENCE else spec.backend,
                "torch_path": spec.path if spec.backend == "torch" else None,
                "precision": spec.precision,
                "setup_s": round(fact["setup_s"], 3),
                "latency_ms": {
                    "p50": 1000 * p50[name],
                    "p90": 1000 * _percentile(t, 0.9),
                    "mean": 1000 * statistics.fmean(t),
                    "min": 1000 * min(t),
                },
                "images_per_s": batch / p50[name],
                "peak_memory_mib": memory[name],
                "gflops_per_s": flops / p50[name] / 1e9,
                "agreement_pct": fact["agree"],
                "max_abs_diff": fact["diff"],
                "meets_agreement": fact["agree"] >= AGREEMENT[spec.precision],
                "speedup_vs_eager": p50["eager"] / p50[name],
                "speedup_vs_reference": p50[REFERENCE] / p50[name] if REFERENCE in p50 else None,
            }
        )
    return rows


def fastest_config(result: Mapping[str, Any]) -> dict[str, Any] | None:
    """The fastest torch path of a :func:`benchmark` result whose agreement meets
    :data:`AGREEMENT`, as a packed model stores it: ``{"path", "precision", "measured"}``
    (``measured``: the conditions and the images/s of every torch path). None when no torch
    path was measured."""
    rows = [r for r in result["rows"] if r["backend"] == "torch" and r["meets_agreement"]]
    if not rows:
        return None
    best = min(rows, key=lambda r: r["latency_ms"]["p50"])
    machine = result["machine"]
    return {
        "path": best["torch_path"],
        "precision": best["precision"],
        "measured": {
            "images_per_s": best["images_per_s"],
            "speedup_vs_eager": best["speedup_vs_eager"],
            "size": result["size"],
            "batch": result["batch"],
            "threads": result["threads"],
            "device": result["device"],
            "cpu": machine["cpu"],
            "cpu_capability": machine["cpu_capability"],
            "torch": machine["torch"],
            "date": result["date"],
            "paths_images_per_s": {
                r["path"]: r["images_per_s"] for r in result["rows"] if r["backend"] == "torch"
            },
        },
    }


def machine_info() -> dict[str, Any]:
    """The CPU, its vector capability and bfloat16 support, the CUDA device, and the versions
    of torch, torchvision, ONNX Runtime and OpenVINO (None when not installed)."""
    from denseseg.engine.precision import cpu_has_bf16

    info: dict[str, Any] = {
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_bf16_native": cpu_has_bf16(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
    }
    for module in ("onnxruntime", "openvino"):
        try:
            info[module] = __import__(module).__version__
        except (ImportError, AttributeError):
            info[module] = None
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ----------------------------------------------------------------------------- the table
def _num(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def markdown_table(result: Mapping[str, Any]) -> str:
    """The result as a Markdown table with a title line and notes (skipped paths, methods)."""
    m = result["machine"]
    size = "x".join(str(s) for s in result["size"])
    lines = [
        f"{result['model']} ({result['architecture']}), {size}, batch {result['batch']}, "
        f"{result['threads']} threads, {result['device']}, {m['cpu']} ({m['cpu_capability']}"
        f"{', bf16' if m['cpu_bf16_native'] else ', no native bf16'}), torch {m['torch']}, "
        f"{result['runs']} runs round robin",
        "",
        "| path | precision | p50 ms | p90 ms | images/s | x torchvision | x eager | peak MiB "
        "| GFLOP/s | agree % | max abs diff | setup s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lat = r["latency_ms"]
        lines.append(
            f"| {r['path']} | {r['precision']} | {lat['p50']:.1f} | {lat['p90']:.1f} "
            f"| {r['images_per_s']:.2f} | {_num(r['speedup_vs_reference'], 2)} "
            f"| {r['speedup_vs_eager']:.2f} | {_num(r['peak_memory_mib'])} "
            f"| {r['gflops_per_s']:.1f} | {r['agreement_pct']:.3f} | {r['max_abs_diff']:.2e} "
            f"| {r['setup_s']:.1f} |"
        )
    lines.append("")
    ref = result["reference"]
    lines.append(f"reference: {ref['name'] or 'none'} ({ref['note']})")
    for s in result["skipped"]:
        lines.append(f"skipped {s['path']}: {s['reason']}")
    fastest = result["fastest"]
    if fastest:
        lines.append(
            f"fastest meeting the agreement thresholds: {fastest['path']} {fastest['precision']}"
        )
    lines.append(
        f"GFLOP per batch: {result['flops_per_batch'] / 1e9:.2f}; memory: {result['memory_method']}"
    )
    return "\n".join(lines)


def save_json(result: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Write a :func:`benchmark` result as JSON, atomically (:func:`atomic_write`)."""
    with atomic_write(path, "benchmark results") as fh:
        fh.write((json.dumps(result, indent=2, default=str) + "\n").encode())
