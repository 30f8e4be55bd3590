"""Architecture comparison on CamVid at an equal CPU budget (benchmarks/camvid.md).

For each training run (a folder written by ``denseseg train``), evaluates its ``last.pt`` on the
val split twice: with the batch-norm running averages it was saved with, and with statistics
recomputed over ``--batches`` batches of the recipe's own training crops (PreciseBN,
:mod:`denseseg.engine.precise_bn`). The runs' own log gives the steps and training time. Prints
a Markdown table::

    PYTHONPATH=src python benchmarks/camvid_compare.py runs/cmp_lraspp runs/cmp_deeplab \\
        --root /path/to/camvid --batches 20
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import torch

from denseseg.api import load_model
from denseseg.checkpoint import load_checkpoint
from denseseg.config import config_from_dict
from denseseg.data.registry import get_dataset
from denseseg.engine.evaluate import evaluate
from denseseg.engine.precise_bn import recipe_batches, recompute_bn_stats


def _train_seconds(run: Path) -> float:
    with open(run / "log.csv", newline="") as fh:
        return max(float(r["elapsed_s"]) for r in csv.DictReader(fh) if r["elapsed_s"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="run folders (with last.pt and log.csv)")
    p.add_argument("--root", required=True, help="CamVid folder")
    p.add_argument("--split", default="val")
    p.add_argument("--batches", type=int, default=20, help="PreciseBN batches")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    val = get_dataset("camvid", args.root, args.split)
    rows = []
    for run in args.runs:
        ckpt = load_checkpoint(run / "last.pt")
        cfg = config_from_dict(ckpt["config"], str(run / "last.pt"))
        seg = load_model(run / "last.pt", device="cpu")
        params = sum(t.numel() for t in seg.model.parameters())
        stale = evaluate(seg, val, batch_size=4, progress=False).compute()
        start = time.time()
        batches = recipe_batches(
            cfg.data, args.batches, mean=ckpt["mean"], std=ckpt["std"], root=args.root
        )
        recompute_bn_stats(seg.model, batches)
        calib = time.time() - start
        fresh = evaluate(seg, val, batch_size=4, progress=False).compute()
        rows.append(
            (
                cfg.model.name,
                params,
                ckpt["step"],
                _train_seconds(run) / 60,
                100 * stale["mIoU"],
                100 * fresh["mIoU"],
                100 * fresh["mAcc"],
                calib,
            )
        )
    print(
        f"CamVid {args.split}; PreciseBN over {args.batches} training batches; "
        f"{args.threads} thread(s)\n"
    )
    print(
        "| model | parameters | steps | training (min) | mIoU, running averages | "
        "mIoU, PreciseBN | mAcc, PreciseBN | PreciseBN (s) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, params, steps, minutes, a, b, c, s in rows:
        print(
            f"| `{name}` | {params / 1e6:.1f} M | {steps} | {minutes:.1f} | {a:.1f} | "
            f"**{b:.1f}** | {c:.1f} | {s:.0f} |"
        )


if __name__ == "__main__":
    main()
