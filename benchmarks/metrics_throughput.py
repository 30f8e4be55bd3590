"""Throughput of the confusion-matrix update: denseseg against the usual ways of counting.

Prints one row per method with the best and median Mpixel/s over ``--repeat`` timed updates of
a ``(batch, H, W)`` map (default: one 1024x2048 Cityscapes-sized map, 19 classes, 10 % ignored
pixels)::

    PYTHONPATH=src python benchmarks/metrics_throughput.py --repeat 5

Baselines: FCN's ``fast_hist`` (numpy mask + bincount), torchvision's reference
``ConfusionMatrix`` (torch mask + ``torch.bincount``) and torchmetrics'
``MulticlassJaccardIndex`` / ``MulticlassConfusionMatrix`` (skipped if torchmetrics is missing).
Timings on a shared machine are noisy: compare rows of one run, not runs of different days.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from denseseg.metrics import SegmentationMetrics


def fcn_fast_hist(pred: np.ndarray, target: np.ndarray, n: int) -> np.ndarray:
    """The FCN reference evaluation (score.py): mask valid labels, one bincount."""
    k = (target >= 0) & (target < n)
    return np.bincount(n * target[k].astype(int) + pred[k], minlength=n * n).reshape(n, n)


def torchvision_confmat(pred: torch.Tensor, target: torch.Tensor, n: int) -> torch.Tensor:
    """torchvision's references/segmentation ConfusionMatrix.update: the same on tensors."""
    k = (target >= 0) & (target < n)
    inds = n * target[k].to(torch.int64) + pred[k]
    return torch.bincount(inds, minlength=n * n).reshape(n, n)


def time_it(fn: Callable[[], object], repeat: int, sync: bool = False) -> list[float]:
    fn()  # warm-up: allocations, lazy imports, CUDA kernels
    times = []
    for _ in range(repeat):
        if sync:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if sync:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="timed updates per method")
    parser.add_argument("--classes", type=int, default=19)
    parser.add_argument("--size", type=int, nargs=2, default=(1024, 2048), metavar=("H", "W"))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    c, shape = args.classes, (args.batch, *args.size)
    rng = np.random.default_rng(0)
    target = rng.integers(0, c, shape, dtype=np.int64)
    pred = np.where(rng.random(shape) < 0.7, target, rng.integers(0, c, shape))
    target[rng.random(shape) < 0.1] = 255
    t8, p8 = target.astype(np.uint8), pred.astype(np.uint8)
    tt, pt = torch.from_numpy(target), torch.from_numpy(pred)
    pixels = target.size

    ours = SegmentationMetrics(c)
    rows: list[tuple[str, str, Callable[[], object]]] = [
        ("denseseg SegmentationMetrics", "numpy uint8", lambda: ours.update(p8, t8)),
        ("denseseg SegmentationMetrics", "torch int64", lambda: ours.update(pt, tt)),
        ("numpy bincount (FCN fast_hist)", "numpy int64", lambda: fcn_fast_hist(pred, target, c)),
        ("torch.bincount (torchvision ref)", "torch int64", lambda: torchvision_confmat(pt, tt, c)),
    ]
    try:
        from torchmetrics.classification import MulticlassConfusionMatrix, MulticlassJaccardIndex

        jaccard = MulticlassJaccardIndex(c, average="macro", ignore_index=255)
        confmat = MulticlassConfusionMatrix(c, ignore_index=255, validate_args=False)
        rows += [
            ("torchmetrics MulticlassJaccardIndex", "torch int64", lambda: jaccard.update(pt, tt)),
            (
                "torchmetrics ConfusionMatrix, no checks",
                "torch int64",
                lambda: confmat.update(pt, tt),
            ),
        ]
    except ImportError:
        print("torchmetrics not installed: its rows are skipped")
    cuda = torch.cuda.is_available()
    if cuda:
        pg, tg = pt.cuda(), tt.cuda()
        rows.append(("denseseg SegmentationMetrics", "cuda int64", lambda: ours.update(pg, tg)))
        rows.append(
            (
                "torch.bincount (torchvision ref)",
                "cuda int64",
                lambda: torchvision_confmat(pg, tg, c),
            )
        )

    print(f"{c} classes, maps {shape}, {args.repeat} timed updates, {args.threads} thread(s)")
    print(f"| {'method':42s} | {'input':11s} | best Mpx/s | median Mpx/s |")
    print(f"|{'-' * 44}|{'-' * 13}|-----------:|-------------:|")
    for name, kind, fn in rows:
        times = time_it(fn, args.repeat, sync=cuda and kind.startswith("cuda"))
        best, median = pixels / min(times) / 1e6, pixels / statistics.median(times) / 1e6
        print(f"| {name:42s} | {kind:11s} | {best:10.1f} | {median:12.1f} |")


if __name__ == "__main__":
    main()
