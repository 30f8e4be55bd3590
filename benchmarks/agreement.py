"""Arg-max agreement of the fast paths with eager float32, over a folder of real images.

``denseseg benchmark`` measures agreement on one input; a threshold such as the deployment
issue's (>= 99.5 % of pixels in bfloat16) is better judged over many frames. Each image is
resized to ``--size`` (one shape, so traced and exported runtimes are built once), run through
eager float32 and through every ``--paths`` runtime, and the arg-max maps compared::

    PYTHONPATH=src python benchmarks/agreement.py camvid --images CamVid/val --size 360 480
    PYTHONPATH=src python benchmarks/agreement.py RUNS/dlv3/last.pt --images CamVid/val \\
        --size 512 512 --paths channels_last+bf16 openvino+bf16

Prints a Markdown table: per path the pooled agreement over all pixels, the per-image mean, the
worst image and its agreement. MODEL is anything ``denseseg benchmark`` takes (a built-in name,
a packed NAME.json, a checkpoint). No timing: run it on a busy machine if need be.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from denseseg import load_model
from denseseg.data.datasets.base import IMAGE_SUFFIXES
from denseseg.data.io import read_image
from denseseg.engine.benchmark import agreement, benchmark_input, parse_paths
from denseseg.inference.runtimes import make_runtime


def _images(folder: Path, every: int, limit: int | None) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[::every]
    if not files:
        raise SystemExit(f"--images {folder}: no images")
    return files[:limit] if limit else files


def measure(model: str, files: list[Path], size: tuple[int, int], paths: list[str]) -> list[dict]:
    """One dict per path: pooled and per-image agreement with eager float32 over ``files``."""
    seg = load_model(model, device="cpu")
    specs = [s for s in parse_paths(paths) if s.name != "eager"]
    first = benchmark_input(seg, size, 1, read_image(files[0]))
    runtimes = {}
    for s in specs:
        runtimes[s.name] = make_runtime(
            seg.model, seg.device, backend=s.backend, fast=s.path, precision=s.precision
        )
        runtimes[s.name](first)
    per_image: dict[str, list[tuple[float, str]]] = {name: [] for name in runtimes}
    with torch.no_grad():
        for f in files:
            x = benchmark_input(seg, size, 1, read_image(f))
            ref = seg.model(x)["out"]
            for name, runtime in runtimes.items():
                per_image[name].append((agreement(runtime(x), ref)[0], f.name))
    return [_summary(name, scores) for name, scores in per_image.items()]


def _summary(name: str, scores: list[tuple[float, str]]) -> dict:
    values = [s for s, _ in scores]
    worst = min(scores)
    # Every image has the same size, so the pooled agreement is the mean of the images'.
    return {
        "path": name,
        "images": len(values),
        "pooled_pct": sum(values) / len(values),
        "worst_pct": worst[0],
        "worst_image": worst[1],
        "below_99_5": sum(v < 99.5 for v in values),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--images", type=Path, required=True, help="a folder of images")
    parser.add_argument("--size", type=int, nargs=2, default=(512, 512), metavar=("H", "W"))
    parser.add_argument("--paths", nargs="+", default=["channels_last+bf16", "openvino+bf16"])
    parser.add_argument("--every", type=int, default=1, help="every K-th image (sorted)")
    parser.add_argument("--limit", type=int, default=None, help="the first N images only")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    files = _images(args.images, args.every, args.limit)
    rows = measure(args.model, files, tuple(args.size), args.paths)
    h, w = args.size
    print(f"{args.model}: {len(files)} images of {args.images}, resized to {h}x{w}\n")
    print(
        "| path | images | agreement % (all pixels) | worst image | its agreement % | "
        "images < 99.5 % |"
    )
    print("|---|---:|---:|---|---:|---:|")
    for r in rows:
        print(
            f"| {r['path']} | {r['images']} | {r['pooled_pct']:.3f} | {r['worst_image']} | "
            f"{r['worst_pct']:.3f} | {r['below_99_5']} |"
        )


if __name__ == "__main__":
    main()
