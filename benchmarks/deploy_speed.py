"""Deployment speed: every inference path against torchvision's eager model, for the targets of
the deployment issue (the fastest path >= 2.5x torchvision's images/s, camvid >= 30 frames/s,
with arg-max agreement >= 99.99 % in fp32 and >= 99.5 % in bf16).

Two runs, batch 1, through :func:`denseseg.engine.benchmark.benchmark` (the library behind
``denseseg benchmark``: paths timed round robin, torchvision's model with the same weights in
the same rounds):

* DeepLabV3-ResNet50 (torchvision layout) at 512x512: a trained checkpoint with ``--deeplab``
  (agreement is only meaningful on trained weights: random ones leave many near-tied logits),
  else 21 classes with random weights, seed 0 (speed does not depend on the weights);
* the LR-ASPP MobileNetV3-Large the issue names, ``camvid_lraspp`` (the built-in ``camvid``
  until 2026-12-03; the DDRNet now shipped as ``camvid`` has no torchvision counterpart), at
  360x480.

Prints one Markdown table per run and a line per target; writes each run's JSON into ``--out``::

    PYTHONPATH=src python benchmarks/deploy_speed.py --threads 2 --runs 30 --out /tmp/deploy
    PYTHONPATH=src python benchmarks/deploy_speed.py --runs 2 --scale 0.25 --paths eager trace

``--image`` measures agreement on a real frame (e.g. one of CamVid's val images) instead of
random smooth images; ``benchmarks/agreement.py`` measures it over a folder. Timings on a
shared machine are noisy: compare rows of one run, and run the long version on an otherwise
idle machine.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from denseseg import Segmenter, load_model
from denseseg.data.io import read_image
from denseseg.engine.benchmark import (
    DEFAULT_PATHS,
    PATHS,
    benchmark,
    markdown_table,
    random_weights_segmenter,
    save_json,
)

TARGET_SPEEDUP = 2.5
TARGET_CAMVID_FPS = 30.0


def _deeplab(checkpoint: Path | None) -> Segmenter:
    if checkpoint is not None:
        return load_model(checkpoint, device="cpu")
    return random_weights_segmenter("deeplabv3_resnet50", 21)


def _runs(scale: float, deeplab: Path | None) -> list[tuple[str, Segmenter, tuple[int, int]]]:
    def scaled(h: int, w: int) -> tuple[int, int]:
        return max(32, round(h * scale)), max(32, round(w * scale))

    return [
        ("deeplabv3_resnet50", _deeplab(deeplab), scaled(512, 512)),
        ("camvid_lraspp", load_model("camvid_lraspp", device="cpu"), scaled(360, 480)),
    ]


def _targets(name: str, result: dict) -> list[str]:
    """One line per target of the issue: met or not, with the numbers."""
    rows = [r for r in result["rows"] if r["backend"] != "torchvision" and r["meets_agreement"]]
    best = max(rows, key=lambda r: r["images_per_s"])
    lines = [f"{name}: fastest path meeting the agreement thresholds: {best['path']}"]
    ratio = best["speedup_vs_reference"]
    if ratio is not None:
        verdict = "met" if ratio >= TARGET_SPEEDUP else "NOT met"
        lines.append(
            f"  {ratio:.2f}x torchvision's eager images/s (target {TARGET_SPEEDUP}x): {verdict}"
        )
    if name == "camvid_lraspp":
        fps = best["images_per_s"]
        verdict = "met" if fps >= TARGET_CAMVID_FPS else "NOT met"
        lines.append(f"  {fps:.1f} frames/s (target {TARGET_CAMVID_FPS:.0f}): {verdict}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--scale", type=float, default=1.0, help="input sizes times this")
    parser.add_argument("--paths", nargs="+", choices=list(PATHS), default=list(DEFAULT_PATHS))
    parser.add_argument("--image", type=Path, default=None, help="a real frame to measure on")
    parser.add_argument("--deeplab", type=Path, default=None, help="a trained DeepLabV3 .pt")
    parser.add_argument("--out", type=Path, default=Path("/tmp/deploy_speed"))
    args = parser.parse_args()
    summary = []
    image = read_image(args.image) if args.image is not None else None
    for name, seg, size in _runs(args.scale, args.deeplab):
        result = benchmark(
            seg,
            size=size,
            batch=1,
            runs=args.runs,
            warmup=args.warmup,
            paths=args.paths,
            threads=args.threads,
            image=image,
            name=name,
        )
        print(markdown_table(result), end="\n\n", flush=True)
        save_json(result, args.out / f"{name}.json")
        summary += _targets(name, result)
    print("\n".join(summary))
    print(f"\nJSON: {args.out}")


if __name__ == "__main__":
    main()
