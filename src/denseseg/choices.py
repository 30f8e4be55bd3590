"""The names the command line offers as choices, in a module that imports nothing, so that
``denseseg --help`` is built without torch. The modules that implement them take them from here
(or, where the names come from a table, a test checks that the table and this module agree)."""

from __future__ import annotations

MODES = ("whole", "slide", "overlap_tile")
"""Inference modes of the Segmenter."""

TTA = ("none", "hflip", "d4", "ms")
"""Test-time augmentations of the Segmenter."""

BACKENDS = ("torch", "onnxruntime", "openvino")
"""Where a Segmenter's forward pass runs."""

PRECISIONS = ("fp32", "bf16")
"""Inference precisions of the torch paths."""

EXPORT_FORMATS = ("onnx", "torchscript", "pt2")
"""``denseseg export --format``."""

BENCHMARK_PATHS = (
    "eager",
    "eager+bf16",
    "channels_last",
    "channels_last+bf16",
    "trace",
    "trace+bf16",
    "compile",
    "compile+bf16",
    "onnxruntime",
    "openvino",
    "openvino+bf16",
)
"""Every path ``denseseg benchmark`` knows (``engine.benchmark.PATHS``, in order)."""

DEFAULT_BENCHMARK_PATHS = (
    "eager",
    "channels_last",
    "channels_last+bf16",
    "trace",
    "compile",
    "onnxruntime",
    "openvino",
    "openvino+bf16",
)
"""The paths ``denseseg benchmark`` measures unless ``--paths`` says otherwise."""

DATASETS = ("folder", "demo", "voc", "cityscapes", "ade20k", "camvid", "isbi2012", "coco")
"""Every dataset format name ``data.registry.get_dataset`` accepts (its ``DATASETS``)."""
