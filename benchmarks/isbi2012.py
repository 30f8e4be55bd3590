"""ISBI 2012 membranes: pixel error, Rand error and membrane IoU of a model on held-out slices.

Prints a Markdown table next to the U-Net paper's challenge results, and optionally writes the
metrics as JSON, a picture of one slice (input, ground truth, prediction, errors) and the
training curve::

    PYTHONPATH=src python benchmarks/isbi2012.py --model runs/unet_isbi2012/best.pt \\
        --root /work/shared/data/isbi2012 --json runs/isbi2012_eval.json \\
        --overlay docs/isbi2012_overlay.png --log runs/unet_isbi2012/log.csv \\
        --curve docs/isbi2012_curve.png

``--model`` takes a checkpoint or a built-in name (default ``isbi2012``). The held-out slices
default to the recipe's ``data.options.val_slices``. Inference follows the model's stored mode
and test-time augmentation (overlap-tile and ``d4`` for the built-in) unless ``--mode``,
``--tile-size`` or ``--tta`` say otherwise. The metric
definitions are in :mod:`denseseg.metrics.isbi`.

``--sweep RUN_DIR`` evaluates every ``step_*.pt`` checkpoint of a run instead (overlap-tile,
572-pixel tiles, no test-time augmentation) and plots the errors against the step
(``--sweep-plot``): how the Rand error moves during training, which the run's own
validation mIoU does not show.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from denseseg.api import load_model
from denseseg.config import load_config
from denseseg.data.registry import get_dataset
from denseseg.inference.segmenter import TTA
from denseseg.metrics.isbi import evaluate_isbi

# Ronneberger et al. 2015, Table 1 (ISBI 2012 hidden test set, 7-rotation averaging).
PAPER = {"pixel_error": 0.0611, "rand_error": 0.0382}


def _panel(image: np.ndarray, target: np.ndarray, pred: np.ndarray, size: int) -> Image.Image:
    """Input | ground truth | prediction | errors (red: false membrane, blue: missed membrane)."""
    gray = np.repeat(image[..., None], 3, axis=2)
    gt = np.repeat(np.where(target == 1, 255, 0).astype(np.uint8)[..., None], 3, axis=2)
    pr = np.repeat(np.where(pred == 1, 255, 0).astype(np.uint8)[..., None], 3, axis=2)
    err = (0.6 * gray).astype(np.uint8)
    err[(pred == 0) & (target == 1)] = (230, 40, 40)
    err[(pred == 1) & (target == 0)] = (40, 90, 240)
    tiles = [Image.fromarray(a).resize((size, size), Image.NEAREST) for a in (gray, gt, pr, err)]
    out = Image.new("RGB", (4 * size + 6, size), (255, 255, 255))
    for i, tile in enumerate(tiles):
        out.paste(tile, (i * (size + 2), 0))
    return out


def _sweep(run: Path, root: str, slices: list[int], plot: str | None) -> None:
    ds = get_dataset("isbi2012", root, "val", val_slices=slices)
    rows = []
    for ckpt in sorted(run.glob("step_*.pt")):
        seg = load_model(ckpt, device="cpu", mode="overlap_tile", tile_size=572)
        m = evaluate_isbi(seg, ds)
        step = int(ckpt.stem.split("_")[1])
        keys = ("pixel_error", "pixel_error_min", "rand_error", "membrane_IoU")
        rows.append((step, *(m[k] for k in keys)))
    print(f"{run}: held-out slices {slices}, overlap-tile 572, no TTA\n")
    print("| step | pixel error | pixel error, best threshold | Rand error | membrane IoU |")
    print("|---:|---:|---:|---:|---:|")
    for step, pe, pe_min, rand, iou in rows:
        print(f"| {step} | {pe:.4f} | {pe_min:.4f} | {rand:.4f} | {iou:.4f} |")
    if plot and rows:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps = [r[0] for r in rows]
        fig, ax = plt.subplots(figsize=(6, 3.4))
        ax.plot(steps, [r[1] for r in rows], marker="o", ms=3, label="pixel error (at 0.5)")
        ax.plot(steps, [r[2] for r in rows], marker="o", ms=3, label="pixel error, best threshold")
        ax.plot(steps, [r[3] for r in rows], marker="o", ms=3, label="Rand error")
        for key, value in PAPER.items():
            ax.axhline(value, ls=":", lw=1, color="gray")
            ax.annotate(f"paper {key.split('_')[0]}", (steps[0], value), fontsize=7)
        ax.set(xlabel="step", ylabel="error on held-out slices", ylim=(0, None))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        Path(plot).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(plot, dpi=110)
        plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="isbi2012", help="checkpoint or built-in model name")
    p.add_argument("--root", default="/work/shared/data/isbi2012")
    p.add_argument("--val-slices", type=int, nargs="+", default=None)
    p.add_argument("--mode", default=None, choices=["whole", "overlap_tile"])
    p.add_argument("--tile-size", type=int, default=None)
    p.add_argument("--tta", default=None, choices=TTA, help="test-time augmentation")
    p.add_argument("--json", default=None, help="write the metrics here")
    p.add_argument("--overlay", default=None, help="PNG of the first held-out slice")
    p.add_argument("--overlay-size", type=int, default=256)
    p.add_argument("--log", default=None, help="a run's log.csv, for --curve")
    p.add_argument("--curve", default=None, help="PNG of the training curve")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--sweep", type=Path, default=None, help="evaluate RUN_DIR/step_*.pt")
    p.add_argument("--sweep-plot", default=None, help="PNG of the sweep's errors")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    slices = args.val_slices or load_config("unet_isbi2012").data.options["val_slices"]
    if args.sweep:
        _sweep(args.sweep, args.root, list(slices), args.sweep_plot)
        return
    options = (("mode", args.mode), ("tile_size", args.tile_size), ("tta", args.tta))
    kwargs = {k: v for k, v in options if v}
    seg = load_model(args.model, device="cpu", **kwargs)
    ds = get_dataset("isbi2012", args.root, "val", val_slices=slices)
    start = time.time()
    metrics = evaluate_isbi(seg, ds)
    seconds = time.time() - start
    metrics.update(model=str(args.model), val_slices=list(slices), segmenter=repr(seg))
    metrics["seconds_per_slice"] = seconds / len(ds)

    rows = [
        ("pixel error", "pixel_error", "{:.4f}"),
        ("pixel error, best threshold", "pixel_error_min", "{:.4f}"),
        ("Rand error (best threshold)", "rand_error", "{:.4f}"),
        ("Rand error at 0.5", "rand_error_at_0.5", "{:.4f}"),
        ("membrane IoU", "membrane_IoU", "{:.4f}"),
    ]
    print(f"{seg}; held-out slices {list(slices)}; {seconds / len(ds):.2f} s/slice\n")
    print("| metric | denseseg (held-out slices) | U-Net paper (challenge test set) |")
    print("|---|---|---|")
    for label, key, fmt in rows:
        paper = PAPER.get(key)
        print(f"| {label} | {fmt.format(metrics[key])} | {'' if paper is None else paper} |")
    print(
        f"\nthresholds on P(cell): Rand {metrics['rand_threshold']:.1f}, "
        f"pixel {metrics['pixel_threshold']:.1f}"
    )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(metrics, indent=2) + "\n")
    if args.overlay:
        image, target = ds[0]
        pred = seg.predict(image)
        panel = _panel(image[0].numpy(), target.numpy(), pred.numpy(), args.overlay_size)
        Path(args.overlay).parent.mkdir(parents=True, exist_ok=True)
        panel.save(args.overlay, optimize=True)
    if args.curve and args.log:
        from denseseg.viz import plot_training_curves

        plot_training_curves({"unet_isbi2012": args.log}, args.curve)


if __name__ == "__main__":
    main()
