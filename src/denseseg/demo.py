"""``denseseg demo``: per-pixel colour against context, end to end on the built-in demo data.

It trains a naive per-pixel colour classifier (``pixelwise``: 1x1 convolutions, each pixel
classified on its own colour) and a U-Net, which sees each pixel's neighbourhood, with the
built-in recipes ``pixelwise_demo`` and ``unet_demo``; evaluates both on the validation split
(:func:`denseseg.engine.evaluate.evaluate` and :func:`~denseseg.engine.evaluate.semantic_report`);
and writes ``report.md`` with pictures into the output folder.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import torch

from denseseg.config import load_config
from denseseg.errors import DensesegError

MODELS = ("pixelwise", "unet")


def run_demo(
    out_dir: str | Path = "runs/demo", *, quick: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Run the demo and write ``report.md`` with pictures into ``out_dir``.

    Args:
        out_dir: output folder; the demo's earlier outputs there are replaced.
        quick: a few training steps only (for smoke tests; the accuracy claims need the full run).
        progress: show progress bars.

    Returns:
        ``{"pixelwise": metrics, "unet": metrics, "wall_s": seconds, "report": path}``.
    """
    from denseseg.api import load_model
    from denseseg.data.registry import get_dataset
    from denseseg.engine.evaluate import evaluate, semantic_report
    from denseseg.engine.trainer import train
    from denseseg.metrics import format_table
    from denseseg.viz import plot_training_curves

    t0 = time.time()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    print(f"denseseg demo: pixelwise colour classifier vs U-Net; outputs in {out}/")
    results: dict[str, Any] = {}
    times: dict[str, float] = {}
    for name in MODELS:
        run = out / name
        if run.exists():
            shutil.rmtree(run)  # the demo is regenerated from scratch every time
        # Evaluate once, at the end, and skip TensorBoard: the demo has a 3-minute budget.
        overrides = [
            f"train.out_dir={run}",
            f"train.progress={str(progress).lower()}",
            "train.eval_every=0",
            "train.tensorboard=false",
        ]
        if quick:
            overrides += ["train.max_steps=6", "train.eval_every=6", "train.log_every=2"]
        cfg = load_config(f"{name}_demo", overrides)
        t = time.time()
        train(cfg)
        times[name] = time.time() - t
        seg = load_model(run / "best.pt", device="cpu")
        val = get_dataset(cfg.data.dataset, cfg.data.root, cfg.data.val_split, **cfg.data.demo)
        metrics = evaluate(seg, val, batch_size=cfg.data.eval_batch_size, progress=progress)
        res = metrics.compute()
        results[name] = {"metrics": res, "segmenter": seg}
        semantic_report(
            res,
            metrics.confusion,
            seg,
            run,
            title=name,
            confusion_png=out / f"confusion_{name}.png",
            confusion_title=f"{name}: confusion matrix",
            iou_png=out / f"iou_{name}.png",
        )
        print(f"\n{name} on the demo val split:\n{format_table(res, seg.class_names)}\n")

    plot_training_curves({n: out / n / "log.csv" for n in MODELS}, out / "curves.png")
    _overlays(out / "overlays.png", val, results, n=6)
    wall = time.time() - t0
    report = _write_report(out, results, times, wall, quick)
    miou = {n: results[n]["metrics"]["mIoU"] for n in MODELS}
    print(
        f"pixelwise val mIoU {100 * miou['pixelwise']:.1f}% | U-Net val mIoU "
        f"{100 * miou['unet']:.1f}% | {wall:.0f} s\nreport: {report}  (pictures beside it)"
    )
    if not quick and miou["unet"] < 0.8:
        raise DensesegError(f"the demo U-Net reached only {100 * miou['unet']:.1f}% mIoU (< 80%)")
    return {**{n: results[n]["metrics"] for n in MODELS}, "wall_s": wall, "report": str(report)}


def _overlays(path: Path, dataset: Any, results: dict[str, Any], n: int) -> None:
    from denseseg.data.palette import colorize, overlay
    from denseseg.viz import save_image_grid

    seg0 = results[MODELS[0]]["segmenter"]
    rows = []
    for i in range(min(n, len(dataset))):
        image, target = dataset[i]
        row = [image.permute(1, 2, 0).numpy(), colorize(target, seg0.palette)]
        for name in MODELS:
            pred = results[name]["segmenter"].predict(image)
            row.append(overlay(image, pred, seg0.palette, alpha=0.6))
        rows.append(row)
    save_image_grid(
        rows,
        path,
        titles=["image", "ground truth", *MODELS],
        palette=seg0.palette,
        class_names=seg0.class_names,
    )


def _write_report(
    out: Path, results: dict[str, Any], times: dict[str, float], wall: float, quick: bool
) -> Path:
    names = results[MODELS[0]]["segmenter"].class_names
    lines = [
        "# denseseg demo: per-pixel colour vs context",
        "",
        "The demo scenes put shapes of several classes on textured backgrounds; every class "
        "draws its colours from the same distribution, so a pixel's colour says little about "
        "its class. The `pixelwise` model (1x1 convolutions: each pixel classified on its own "
        "colour, the naive method) cannot separate them; the U-Net, which sees each pixel's "
        "neighbourhood, can.",
        "",
        f"Run: `denseseg demo{' --quick' if quick else ''}` - {wall:.0f} s wall time on "
        f"{torch.get_num_threads()} CPU threads.",
        "",
        "| model | val mIoU | mAcc | aAcc | training time |",
        "|---|---|---|---|---|",
    ]
    for n in MODELS:
        m = results[n]["metrics"]
        lines.append(
            f"| {n} | {100 * m['mIoU']:.1f}% | {100 * m['mAcc']:.1f}% | "
            f"{100 * m['aAcc']:.1f}% | {times[n]:.0f} s |"
        )
    lines += [
        "",
        "Per-class IoU (%):",
        "",
        "| class | " + " | ".join(MODELS) + " |",
        "|---|" + "---|" * len(MODELS),
    ]
    for k, c in enumerate(names):
        vals = [results[n]["metrics"]["IoU"][k] for n in MODELS]
        lines.append(
            f"| {c} | " + " | ".join(f"{100 * v:.1f}" if v == v else "n/a" for v in vals) + " |"
        )
    lines += [
        "",
        "## Validation images",
        "",
        "![overlays](overlays.png)",
        "",
        "## Training",
        "",
        "![curves](curves.png)",
        "",
        "## Per-class IoU",
        "",
        *[f"![{n}](iou_{n}.png)" for n in MODELS],
        "",
        "## Confusion matrices",
        "",
        *[f"![{n}](confusion_{n}.png)" for n in MODELS],
        "",
        "Checkpoints, logs, metrics JSON/CSV and the resolved recipes are in "
        + ", ".join(f"`{n}/`" for n in MODELS)
        + ".",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
