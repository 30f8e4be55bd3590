"""What test-time augmentation buys the built-in CamVid model: val mIoU and seconds per image for
``tta`` none, hflip and ms (multi-scale 0.5-1.75 + flip, as DeepLab and mmsegmentation).

    PYTHONPATH=src python benchmarks/tta_effect.py --root /path/to/camvid
    PYTHONPATH=src python benchmarks/tta_effect.py --root /path/to/camvid --limit 3 --tta none ms

``--root`` is a CamVid folder in the SegNet layout (``val/``, ``valannot/``); the 101 val images
are segmented whole-image (the model's own mode) under each TTA and scored with the repository's
metrics (void ignored). Prints a Markdown table; seconds are wall time per image, batch 1, on the
CPU threads given, and noisy on a shared machine.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
from torch.utils.data import Subset

from denseseg import load_model
from denseseg.data.registry import get_dataset
from denseseg.engine.evaluate import evaluate
from denseseg.inference.segmenter import MS_SCALES, TTA


def run(model: str, root: str, split: str, tta: str, limit: int | None, **kw) -> dict:
    """mIoU (%) and seconds per image of ``model`` under ``tta`` on ``limit`` images."""
    seg = load_model(model, device="cpu", tta=tta, **kw)
    dataset = get_dataset("camvid", root, split)
    if limit:
        dataset = Subset(dataset, range(min(limit, len(dataset))))
    seg.predict(dataset[0][0])  # warm-up, not timed
    start = time.perf_counter()
    metrics = evaluate(seg, dataset, batch_size=1, progress=False).compute()
    seconds = (time.perf_counter() - start) / len(dataset)
    return {"tta": tta, "images": len(dataset), "mIoU": 100 * metrics["mIoU"], "s/img": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", required=True, help="CamVid folder (val/, valannot/)")
    parser.add_argument("--split", default="val")
    parser.add_argument("--model", default="camvid", help="built-in name or checkpoint")
    parser.add_argument("--tta", nargs="+", default=["none", "hflip", "ms"], choices=TTA)
    parser.add_argument("--scales", type=float, nargs="+", default=None, help="for ms")
    parser.add_argument("--limit", type=int, default=None, help="only the first N images")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    scales = tuple(args.scales) if args.scales else MS_SCALES
    print(
        f"{args.model} on CamVid {args.split}, {platform.processor() or platform.machine()}, "
        f"{args.threads} threads; ms scales {', '.join(f'{s:g}' for s in scales)} x flip\n"
    )
    print("| tta | passes | images | mIoU (%) | s / image |")
    print("|---|---:|---:|---:|---:|")
    for tta in args.tta:
        kw = {"scales": scales} if tta == "ms" else {}
        row = run(args.model, args.root, args.split, tta, args.limit, **kw)
        passes = {"none": 1, "hflip": 2, "d4": 8, "ms": 2 * len(scales)}[tta]
        print(
            f"| {tta} | {passes} | {row['images']} | {row['mIoU']:.2f} | {row['s/img']:.3f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
