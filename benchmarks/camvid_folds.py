"""The held-out-drive protocol for CamVid (benchmarks/camvid.md): each run trained on train+val
without one drive, scored on that drive's frames.

The val split (drive 0016E5) shares its drive with 204 of the 367 training frames and flatters;
the test split is mostly a drive that no training frame comes from. Each run folder (written by
``denseseg train ... data.train_split=trainval:-D data.val_split=trainval:D``) is evaluated
with its ``last.pt`` on its own held-out split (read from the run's recipe), at the frames' full
360x480 resolution, one pass (no test-time augmentation). Runs are grouped by ``--label`` (one
label per run, default the model name): each group's mean mIoU over its runs and the spread
(min-max), per-class IoU, and the curves of every run's validation mIoU::

    PYTHONPATH=src python benchmarks/camvid_folds.py RUNS/dd_0001TP RUNS/dd_0006R0 \\
        RUNS/bs_0001TP RUNS/bs_0006R0 --root /path/to/camvid --curves docs/camvid_folds.png

Prints Markdown tables; ``--json`` keeps every number.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from pathlib import Path

import torch

from denseseg.api import load_model
from denseseg.checkpoint import load_checkpoint
from denseseg.data.registry import get_dataset
from denseseg.engine.evaluate import evaluate


def _log(run: Path) -> list[dict[str, str]]:
    with open(run / "log.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def score(run: Path, root: str) -> dict:
    """The run's ``last.pt`` on its held-out drive: mIoU, mAcc, aAcc, per-class IoU."""
    ckpt = load_checkpoint(run / "last.pt")
    split = ckpt["config"]["data"]["val_split"]
    seg = load_model(run / "last.pt", device="cpu")
    metrics = evaluate(seg, get_dataset("camvid", root, split), batch_size=4, progress=False)
    m = metrics.compute()
    rows = _log(run)
    return {
        "run": str(run),
        "model": ckpt["model_name"],
        "held_out": split,
        "steps": ckpt["step"],
        "minutes": max(float(r["elapsed_s"]) for r in rows if r["elapsed_s"]) / 60,
        "mIoU": 100 * m["mIoU"],
        "mAcc": 100 * m["mAcc"],
        "aAcc": 100 * m["aAcc"],
        "per_class": dict(zip(seg.class_names, (100 * v for v in m["IoU"]), strict=True)),
        "curve": [(int(r["step"]), 100 * float(r["val_mIoU"])) for r in rows if r["val_mIoU"]],
    }


def tables(results: list[dict], labels: list[str]) -> str:
    """Markdown: one row per run, then one per label (mean and min-max over its runs)."""
    out = [
        "| label | model | held-out drive | steps | training (min) | mIoU | mAcc | aAcc |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for label, r in zip(labels, results, strict=True):
        drive = r["held_out"].split(":")[-1]
        out.append(
            f"| {label} | `{r['model']}` | {drive} | {r['steps']} | {r['minutes']:.0f} | "
            f"{r['mIoU']:.1f} | {r['mAcc']:.1f} | {r['aAcc']:.1f} |"
        )
    out += ["", "| label | runs | mean mIoU | min - max |", "|---|---:|---:|---|"]
    groups: dict[str, list[dict]] = {}
    for label, r in zip(labels, results, strict=True):
        groups.setdefault(label, []).append(r)
    for label, runs in groups.items():
        ious = [r["mIoU"] for r in runs]
        out.append(
            f"| {label} | {len(runs)} | **{statistics.mean(ious):.1f}** | "
            f"{min(ious):.1f} - {max(ious):.1f} |"
        )
    classes = list(results[0]["per_class"])
    out += [
        "",
        "| class | "
        + " | ".join(
            f"{lb} ({r['held_out'].split(':')[-1]})" for lb, r in zip(labels, results, strict=True)
        )
        + " |",
    ]
    out.append("|---|" + "---:|" * len(results))
    for c in classes:
        out.append(f"| {c} | " + " | ".join(f"{r['per_class'][c]:.1f}" for r in results) + " |")
    return "\n".join(out)


def plot_curves(results: list[dict], labels: list[str], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for label, r in zip(labels, results, strict=True):
        if r["curve"]:
            steps, ious = zip(*r["curve"], strict=True)
            ax.plot(
                steps, ious, marker="o", label=f"{label}, held out {r['held_out'].split(':')[-1]}"
            )
    ax.set_xlabel("step")
    ax.set_ylabel("held-out drive mIoU %")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="run folders (last.pt, log.csv)")
    p.add_argument("--root", required=True, help="CamVid folder (SegNet layout)")
    p.add_argument("--label", nargs="+", help="one label per run (default: the model name)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--curves", help="write the validation curves here (PNG)")
    p.add_argument("--json", help="write every number here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    results = [score(run, args.root) for run in args.runs]
    labels = args.label or [r["model"] for r in results]
    if len(labels) != len(results):
        p.error(f"--label: {len(labels)} labels for {len(results)} runs")
    print(tables(results, labels))
    if args.curves:
        plot_curves(results, labels, args.curves)
    if args.json:
        Path(args.json).write_text(json.dumps({"labels": labels, "runs": results}, indent=1))


if __name__ == "__main__":
    main()
