"""Model table: parameters, GFLOPs and CPU latency of every registered model at 512x512.

Prints a Markdown table with one row per registered model, built with its default (paper) options
and ``--classes`` classes, run on one ``3 x 512 x 512`` image (batch 1) on the CPU::

    PYTHONPATH=src python benchmarks/model_table.py            # 3 timed runs per model
    PYTHONPATH=src python benchmarks/model_table.py --quick    # 1 timed run, big models untimed

* Parameters count every parameter, frozen ones too (FCN's fixed bilinear up-samplers).
* GFLOPs are measured with ``torch.utils.flop_counter.FlopCounterMode`` on one forward pass: it
  counts convolutions and matrix products as 2 FLOPs per multiply-add and ignores element-wise
  operations (ReLU, batch norm, pooling, interpolation).
* Latency is the median wall-clock time of the timed forward passes after one untimed pass (the
  FLOP-counting one), in inference mode with ``--threads`` threads. On a shared machine it is
  noisy: compare rows of one run, not runs of different days.
* A valid-padding U-Net cannot take 512; it gets the smallest input it accepts above 512 (the
  ``input`` column) and outputs the centre it sees.
"""

from __future__ import annotations

import argparse
import gc
import platform
import statistics
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from denseseg.models import create_model, list_models


def input_side(model: torch.nn.Module, size: int) -> int:
    """The side fed to ``model``: ``size``, or the smallest valid side above it."""
    if getattr(model, "padding", "same") == "valid":
        return int(model.valid_input_size(size))  # type: ignore[operator]
    return size


def count_flops(model: torch.nn.Module, x: torch.Tensor) -> int:
    """FLOPs of one forward pass of ``model`` on ``x`` (convolutions and matrix products)."""
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(x)
    return int(counter.get_total_flops())


def time_forward(model: torch.nn.Module, x: torch.Tensor, runs: int) -> float:
    """Median seconds of ``runs`` forward passes."""
    times = []
    with torch.inference_mode():
        for _ in range(runs):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(name: str, size: int, classes: int, runs: int, max_gflops: float | None) -> dict:
    """One table row for model ``name``."""
    model = create_model(name, num_classes=classes).eval()
    side = input_side(model, size)
    x = torch.randn(1, int(getattr(model, "in_channels", 3)), side, side)
    row: dict = {
        "model": name,
        "input": side,
        "params": sum(p.numel() for p in model.parameters()),
        "flops": count_flops(model, x),  # also the warm-up pass
    }
    too_big = max_gflops is not None and row["flops"] / 1e9 > max_gflops
    row["latency"] = None if runs == 0 or too_big else time_forward(model, x, runs)
    return row


def markdown(rows: list[dict]) -> str:
    """The rows as a Markdown table."""
    lines = [
        "| model | input | parameters | GFLOPs | CPU latency (ms) |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        latency = "-" if r["latency"] is None else f"{1000 * r['latency']:,.0f}"
        lines.append(
            f"| `{r['model']}` | {r['input']} | {r['params']:,} | {r['flops'] / 1e9:,.1f} "
            f"| {latency} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="input side (default 512)")
    parser.add_argument("--classes", type=int, default=21, help="classes (default 21, VOC)")
    parser.add_argument("--runs", type=int, default=3, help="timed forward passes per model")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--models", nargs="*", help="only these models (default: all)")
    parser.add_argument(
        "--max-gflops", type=float, default=None, help="leave models above this untimed"
    )
    parser.add_argument(
        "--quick", action="store_true", help="1 timed run; models above 150 GFLOPs untimed"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.runs = 1
        args.max_gflops = 150.0 if args.max_gflops is None else args.max_gflops
    torch.set_num_threads(args.threads)
    names = args.models or list_models()
    unknown = sorted(set(names) - set(list_models()))
    if unknown:
        parser.error(f"unknown models: {', '.join(unknown)}; see `denseseg models`")

    rows = []
    for name in names:
        start = time.perf_counter()
        rows.append(measure(name, args.size, args.classes, args.runs, args.max_gflops))
        gc.collect()  # the big models hold hundreds of MB each
        print(f"{name}: {time.perf_counter() - start:.1f} s", file=sys.stderr)
    print(
        f"{args.size}x{args.size}, batch 1, {args.classes} classes, CPU "
        f"({platform.processor() or platform.machine()}, {args.threads} threads), "
        f"torch {torch.__version__}, median of {args.runs} run(s)\n"
    )
    print(markdown(rows))


if __name__ == "__main__":
    main()
