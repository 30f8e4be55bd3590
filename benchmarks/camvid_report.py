"""Pictures and tables for benchmarks/camvid.md: a CamVid model's curve, per-class IoU, overlays.

Evaluates ``--model`` (a checkpoint or built-in name, default ``camvid``) on a CamVid split at the
frames' full 360x480 resolution, prints the per-class IoU table next to the published test mean
IoUs, and writes small pictures for the docs: the training curve from the run's ``log.csv``
and overlays of a few frames::

    PYTHONPATH=src python benchmarks/camvid_report.py --root /path/to/camvid --split val \\
        --log runs/lraspp_mobilenet_v3_large_camvid/log.csv --docs docs

The pictures hold a handful of downscaled frames and predictions, never dataset files.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from PIL import Image

from denseseg import load_model
from denseseg.data.palette import colorize, overlay
from denseseg.data.registry import get_dataset
from denseseg.engine.evaluate import evaluate
from denseseg.viz import plot_training_curves, save_image_grid

# CamVid test mean IoU (11 classes, void ignored) as published: SegNet-Basic and SegNet
# (Badrinarayanan et al., TPAMI 2017), ENet (Paszke et al. 2016).
PUBLISHED = {"SegNet-Basic": 46.4, "ENet": 51.3, "SegNet": 55.6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="camvid")
    parser.add_argument("--root", required=True, help="CamVid folder (SegNet layout)")
    parser.add_argument("--split", default="val")
    parser.add_argument(
        "--log",
        nargs="+",
        default=None,
        metavar="[LABEL=]LOG",
        help="training runs' log.csv for the curve, one line each (label: 'train' if not given)",
    )
    parser.add_argument("--docs", default="docs", help="folder for the pictures")
    parser.add_argument("--frames", type=int, nargs="+", default=[0, 25, 50, 75])
    parser.add_argument("--json", default=None, help="write the metrics JSON here")
    parser.add_argument(
        "--prefix", default="camvid", help="picture names: PREFIX_overlays.png, PREFIX_curve.png"
    )
    args = parser.parse_args()
    torch.set_num_threads(2)
    docs = Path(args.docs)
    docs.mkdir(parents=True, exist_ok=True)

    seg = load_model(args.model, device="cpu")
    data = get_dataset("camvid", args.root, args.split)
    res = evaluate(seg, data, batch_size=4, progress=True).compute()
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    print(f"\nmodel {args.model} on CamVid {args.split} ({len(data)} frames, 360x480)\n")
    print("| class | IoU % | accuracy (recall) % |\n|---|---|---|")
    for name, iou, acc in zip(seg.class_names, res["IoU"], res["Acc"]):
        print(f"| {name} | {100 * iou:.1f} | {100 * acc:.1f} |")
    print(f"| **mean** | **{100 * res['mIoU']:.1f}** | **{100 * res['mAcc']:.1f}** |")
    print(f"\nmAcc {100 * res['mAcc']:.1f} %, aAcc {100 * res['aAcc']:.1f} %")
    print("published CamVid test mean IoU: " + ", ".join(f"{k} {v}" for k, v in PUBLISHED.items()))

    rows = []
    for i in args.frames:
        image, target = data[i]
        pred = seg.predict(image)
        rows.append(
            [
                image.permute(1, 2, 0).numpy(),
                colorize(target, seg.palette),
                overlay(image, pred, seg.palette, alpha=0.6),
            ]
        )
    grid = save_image_grid(
        rows,
        docs / f"{args.prefix}_overlays.png",
        titles=["frame", "ground truth", "prediction"],
        palette=seg.palette,
        class_names=seg.class_names,
        cell=2.6,
    )
    # Keep the repository light: a palette-quantised copy of the figure.
    Image.open(grid).convert("RGB").quantize(colors=128).save(grid, optimize=True)
    print(f"overlays: {grid} ({grid.stat().st_size // 1024} KiB)")
    if args.log:
        runs = dict(item.split("=", 1) if "=" in item else ("train", item) for item in args.log)
        curve = plot_training_curves(runs, docs / f"{args.prefix}_curve.png")
        print(f"curve: {curve}")


if __name__ == "__main__":
    main()
