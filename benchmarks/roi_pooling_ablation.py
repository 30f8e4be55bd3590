"""Mask R-CNN's RoI pooling ablation (He et al., ICCV 2017, Table 2c) on a small real dataset.

Trains the same Mask R-CNN once per RoI pooler (``roipool``, ``roiwarp``, ``roialign_max``,
``roialign``) and seed, with the same data, steps and schedule, through denseseg's own trainer,
and prints the held-out COCO mask AP, AP50, AP75 as mean ± std over the seeds in the paper's
layout. By default the data are tiles of the fluorescence nuclei image bundled with stardist
(``pip install --no-deps stardist``): the left three quarters of the 512x512 image give
overlapping training tiles, the right quarter non-overlapping held-out tiles. ``--coco ROOT``
takes any COCO-format folder instead (splits ``--train-split`` / ``--val-split``).

Each finished run writes ``<out>/results/<pooler>_seed<k>.json`` at once; a rerun skips the
finished runs and resumes an interrupted one from its ``last.pt``, so the script can be stopped
and started again at will::

    nohup python benchmarks/roi_pooling_ablation.py --threads 1 > ablation.log 2>&1 &
    python benchmarks/roi_pooling_ablation.py --table-only     # the table of what has finished
    python benchmarks/roi_pooling_ablation.py --export data/nuclei_tiles   # just the tiles

The model is small so that the whole ablation runs on one CPU thread in well under an hour: a
ResNet-18-FPN at half width with GroupNorm, trained from scratch (see ``MODEL``). It is not the
paper's setting (ResNet-50-C4 pretrained on ImageNet, COCO, 800-pixel images).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from denseseg.config import config_from_dict
from denseseg.data.coco_export import label_image_instances, write_coco_split
from denseseg.data.samples import nuclei_sample, stretch_to_uint8
from denseseg.engine.trainer import train

KINDS = ("roipool", "roiwarp", "roialign_max", "roialign")  # the paper's row order
PAPER = {  # Table 2c, ResNet-50-C4 on COCO minival: mask AP, AP50, AP75
    "roipool": (26.9, 48.8, 26.4),
    "roiwarp": (27.2, 49.2, 27.1),
    "roialign_max": (30.2, 51.0, 31.8),
    "roialign": (30.3, 51.2, 31.5),
}
LAYOUT = {  # quantised RoI, bilinear sampling, aggregation
    "roipool": ("yes", "", "max"),
    "roiwarp": ("yes", "yes", "max"),
    "roialign_max": ("", "yes", "max"),
    "roialign": ("", "yes", "avg"),
}
MODEL = {
    "norm": "gn",
    "backbone_width": 0.5,
    "fpn_channels": 64,
    "representation_size": 256,
    "mask_head_channels": 32,
    "min_size": 128,
    "max_size": 128,
    "anchor_sizes": [8, 16, 32, 64, 128],
    "rpn_post_nms_top_n_train": 500,
    "box_batch_size_per_image": 64,
}


def export_tiles(root: Path, tile: int = 128, stride: int = 64, min_area: int = 15) -> Path:
    """Cut stardist's nuclei image into a COCO-format tiles dataset (splits train and val).

    Training tiles (``stride`` apart, overlapping) cover the left three quarters of the image,
    held-out tiles (side by side) the right quarter; nuclei cut by a tile keep their visible
    part when it has at least ``min_area`` pixels. A nucleus on the split line shows its two
    parts on both sides: a few pixels of leakage, stated in the results file.
    """
    image, labels = nuclei_sample()
    image8 = stretch_to_uint8(image)
    h, w = labels.shape
    split_x = w * 3 // 4
    regions = {"train": (0, split_x, stride), "val": (split_x, w, tile)}
    for split, (x0, x1, step) in regions.items():
        images, instances = [], []
        for y in range(0, h - tile + 1, step):
            for x in range(x0, x1 - tile + 1, step):
                crop = labels[y : y + tile, x : x + tile]
                inst = [(m, c) for m, c in label_image_instances(crop) if m.sum() >= min_area]
                images.append(image8[y : y + tile, x : x + tile])
                instances.append(inst)
        write_coco_split(root, split, images, instances, {1: "nucleus"})
    return root


def recipe(data_root: Path, out: Path, kind: str, seed: int, args: argparse.Namespace) -> dict:
    """The denseseg recipe of one run (saved with it as config.yaml)."""
    return {
        "model": {"name": "maskrcnn_resnet18_fpn", "kwargs": {**MODEL, "pooler": kind}},
        "data": {
            "dataset": "coco",
            "root": str(data_root),
            "train_split": args.train_split,
            "val_split": args.val_split,
            "options": {"target": "instance", "category_map": "file"},
            "crop_size": None,
            "scale_range": None,
            "hflip": True,
            "batch_size": args.batch_size,
            "eval_batch_size": 4,
        },
        "optim": {"name": "sgd", "lr": args.lr, "momentum": 0.9, "weight_decay": 1e-4},
        "schedule": {"name": "poly", "power": 0.9, "warmup_steps": args.steps // 10},
        "train": {
            "max_steps": args.steps,
            "eval_every": 0,  # once, at the end
            "ckpt_every": max(1, args.steps // 4),
            "keep_last": 0,
            "log_every": 10,
            "seed": seed,
            "device": args.device,
            "tensorboard": False,
            "progress": False,
            "out_dir": str(out),
        },
    }


def run_one(data_root: Path, out: Path, kind: str, seed: int, args: argparse.Namespace) -> dict:
    """Train (or resume) one run; returns its result record."""
    run_dir = out / "runs" / f"{kind}_seed{seed}"
    cfg = config_from_dict(recipe(data_root, run_dir, kind, seed, args))
    start = time.time()
    result = train(cfg, resume=(run_dir / "last.pt").is_file())
    m = result["metrics"]
    return {
        "pooler": kind,
        "seed": seed,
        "steps": result["step"],
        "wall_s_this_session": round(time.time() - start, 1),
        "threads": torch.get_num_threads(),
        "data": str(data_root),
        "model": {**MODEL, "pooler": kind},
        "metrics": m,
    }


def _fmt(values: list[float]) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * mean:.1f} ± {100 * std:.1f}"


def table(results: list[dict]) -> str:
    """Markdown table in the layout of the paper's Table 2c (mask AP in percent)."""
    lines = [
        "| pooler | quantised RoI | bilinear | agg. | AP | AP50 | AP75 | box AP | runs "
        "| paper AP / AP50 / AP75 |",
        "|---|:-:|:-:|:-:|---:|---:|---:|---:|---:|---|",
    ]
    for kind in KINDS:
        rows = [r["metrics"] for r in results if r["pooler"] == kind]
        cols = [
            _fmt([m[k] for m in rows if not math.isnan(m[k])])
            for k in ("segm_AP", "segm_AP50", "segm_AP75", "bbox_AP")
        ]
        paper = " / ".join(f"{v:.1f}" for v in PAPER[kind])
        cells = [f"`{kind}`", *LAYOUT[kind], *cols, str(len(rows)), paper]
        lines.append(f"| {' | '.join(cells)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/roi_pooling_ablation", help="output folder")
    p.add_argument("--coco", default=None, help="a COCO-format folder instead of the nuclei tiles")
    p.add_argument("--train-split", default="train")
    p.add_argument("--val-split", default="val")
    p.add_argument("--kinds", nargs="*", default=list(KINDS), choices=KINDS)
    p.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--steps", type=int, default=200, help="training steps per run")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--device", default="auto")
    p.add_argument("--export", default=None, help="write the nuclei tiles there and stop")
    p.add_argument("--table-only", action="store_true", help="print the table of finished runs")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    if args.export:
        print(f"wrote {export_tiles(Path(args.export))}")
        return 0
    data_root = Path(args.coco) if args.coco else out / "tiles"
    if not args.coco and not (data_root / "annotations" / "instances_val.json").is_file():
        export_tiles(data_root)
    (out / "results").mkdir(parents=True, exist_ok=True)
    if not args.table_only:
        for seed in args.seeds:  # seeds outermost: an early stop still covers every pooler
            for kind in args.kinds:
                path = out / "results" / f"{kind}_seed{seed}.json"
                if path.is_file():
                    continue
                t0 = time.time()
                record = run_one(data_root, out, kind, seed, args)
                path.write_text(json.dumps(record, indent=1))
                m = record["metrics"]
                print(
                    f"{kind} seed {seed}: mask AP {100 * m['segm_AP']:.1f} AP50 "
                    f"{100 * m['segm_AP50']:.1f} ({time.time() - t0:.0f} s)",
                    flush=True,
                )
    results = [json.loads(f.read_text()) for f in sorted((out / "results").glob("*.json"))]
    print(table(results))
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
