"""Frames per second of a Segmenter on one image size, eager against the fast (traced) path.

Times ``Segmenter.predict`` end to end (normalisation, forward pass, arg-max) on random uint8
frames, batch 1, after warm-up runs, and prints a Markdown table::

    PYTHONPATH=src python benchmarks/inference_speed.py --model camvid --size 360 480
    PYTHONPATH=src python benchmarks/inference_speed.py --model lraspp_mobilenet_v3_large \\
        --classes 11 --size 360 480 --threads 2

``--model`` is a checkpoint, a built-in model name, or a registered architecture (built with
random weights: speed does not depend on them). Timings on a shared machine are noisy: compare
rows of one run.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

from denseseg import Segmenter, create_model, load_model
from denseseg.models import list_models


def _segmenter(name: str, classes: int, fast: bool) -> Segmenter:
    if name in list_models() and not Path(name).exists():
        model = create_model(name, num_classes=classes)
        return Segmenter(model, mean=[0.5] * 3, std=[0.25] * 3, device="cpu", fast=fast)
    return load_model(name, device="cpu", fast=fast)


def measure(seg: Segmenter, size: tuple[int, int], runs: int, warmup: int) -> list[float]:
    """Seconds per ``predict`` call for ``runs`` timed calls."""
    image = torch.randint(0, 256, (seg.in_channels, *size), dtype=torch.uint8)
    for _ in range(warmup):
        seg.predict(image)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        seg.predict(image)
        times.append(time.perf_counter() - t)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="camvid")
    parser.add_argument("--classes", type=int, default=11)
    parser.add_argument("--size", type=int, nargs=2, default=(360, 480), metavar=("H", "W"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    size = tuple(args.size)
    print(
        f"{args.model}, {size[0]}x{size[1]}, batch 1, {args.threads} threads, "
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}\n"
    )
    print("| path | median ms/frame | frames/s (median) | best ms |")
    print("|---|---|---|---|")
    for label, fast in (("eager", False), ("fast (frozen trace)", True)):
        t = measure(_segmenter(args.model, args.classes, fast), size, args.runs, args.warmup)
        med = statistics.median(t)
        print(f"| {label} | {1000 * med:.1f} | {1 / med:.1f} | {1000 * min(t):.1f} |")


if __name__ == "__main__":
    main()
