"""``denseseg env``: what a bug report needs (as detectron2's ``collect_env``): the versions of
Python, denseseg, torch, torchvision and the optional extras, the CPU and its vector features,
torch's threads and CUDA devices."""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata

# (distribution name, the extra that installs it; "" for a requirement)
PACKAGES = (
    ("torch", ""),
    ("torchvision", ""),
    ("numpy", ""),
    ("pillow", ""),
    ("safetensors", ""),
    ("tensorboard", "tb"),
    ("pycocotools", "coco"),
    ("timm", "timm"),
    ("onnx", "onnx"),
    ("onnxscript", "onnx"),
    ("onnxruntime", "onnx"),
    ("openvino", "openvino"),
    ("av", "video"),
    ("fastapi", "serve"),
    ("uvicorn", "serve"),
)

# CPU flags that decide which fast paths exist (/proc/cpuinfo names).
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _cpu() -> tuple[str, list[str]]:
    """The CPU's model name and which of :data:`CPU_FLAGS` it has (Linux; else platform's)."""
    try:
        with open("/proc/cpuinfo") as fh:
            info = fh.read()
    except OSError:
        return platform.processor() or platform.machine(), []
    name = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if "model name" in ln), "")
    flags_line = next((ln for ln in info.splitlines() if ln.startswith("flags")), "")
    flags = set(flags_line.split(":", 1)[-1].split())
    return name or platform.machine(), [f for f in CPU_FLAGS if f in flags]


def _torch_lines() -> list[tuple[str, str]]:
    """torch's build, threads and devices (nothing when torch does not import)."""
    try:
        import torch
    except Exception as exc:  # a broken install is exactly what a bug report must show
        return [("torch import", f"failed: {type(exc).__name__}: {exc}")]
    rows = [
        ("torch threads", f"{torch.get_num_threads()} (interop {torch.get_num_interop_threads()})"),
        ("torch CPU capability", str(torch.backends.cpu.get_cpu_capability())),
        ("oneDNN (mkldnn)", str(torch.backends.mkldnn.is_available())),
        ("torch CUDA build", str(torch.version.cuda)),
    ]
    if not torch.cuda.is_available():
        return [*rows, ("CUDA devices", "none available")]
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        rows.append(
            (f"cuda:{i}", f"{p.name}, {p.total_memory / 2**30:.1f} GiB, sm_{p.major}{p.minor}")
        )
    return rows


def collect() -> list[tuple[str, str]]:
    """``(what, value)`` rows of the environment."""
    from denseseg import __version__

    cpu, flags = _cpu()
    rows = [
        ("denseseg", f"{__version__} ({os.path.dirname(os.path.abspath(__file__))})"),
        ("Python", f"{sys.version.split()[0]} ({sys.executable})"),
        ("platform", platform.platform()),
        ("CPU", f"{cpu}, {os.cpu_count()} logical cores"),
        ("CPU features", ", ".join(flags) or "none of " + ", ".join(CPU_FLAGS)),
    ]
    for dist, extra in PACKAGES:
        version = _version(dist)
        missing = f"not installed (denseseg[{extra}])" if extra else "MISSING (required)"
        rows.append((dist, version or missing))
    return rows + _torch_lines()


def format_env(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)
