"""Does data loading starve training? CamVid pipeline images/s against the training step's.

Prints a Markdown table: images per second delivered by the CamVid training pipeline (PNG
decoding, the recipe's augmentation, collation) through a ``DataLoader`` with 0, 1 and 2 worker
processes, sampled as the trainer samples (``EpochSampler`` + per-sample seeds), next to the
images per second of the recipe model's training step (forward, loss, backward, optimiser step)
on one batch of the same size::

    PYTHONPATH=src python benchmarks/data_throughput.py
    PYTHONPATH=src python benchmarks/data_throughput.py --recipe unet_camvid \\
        --model-kwargs "{base_channels: 16, depth: 4, padding: same, batch_norm: true}"

The data come from ``--root`` (default ``/work/shared/data/camvid``, SegNet layout); when that
folder is missing a synthetic CamVid of random 360x480 frames is written to a temporary folder.
The model is built without pretrained weights (they change nothing about speed). Timings on a
shared machine are noisy: compare rows of one run, not runs of different days.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image
from torch.utils.data import DataLoader

from denseseg.config import load_config
from denseseg.data.registry import get_dataset
from denseseg.data.transforms import build_transforms, default_mean_std
from denseseg.engine.optim import backward_and_step, build_optimizer
from denseseg.engine.precision import resolve_precision
from denseseg.engine.sampler import EpochSampler, SeededTransformDataset
from denseseg.engine.tasks import SemanticTask
from denseseg.inference.segmenter import resolve_device
from denseseg.losses import build_loss
from denseseg.models import create_model

DEFAULT_ROOT = "/work/shared/data/camvid"


def synthetic_camvid(folder: Path, n: int = 40, size: tuple[int, int] = (360, 480)) -> Path:
    """Write ``n`` random frames in the SegNet CamVid layout (train/ + trainannot/)."""
    rng = np.random.default_rng(0)
    (folder / "train").mkdir(parents=True)
    (folder / "trainannot").mkdir()
    h, w = size
    for i in range(n):
        # Smooth-ish content so PNG decoding costs about what a photo's does.
        base = rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)
        image = np.kron(base, np.ones((8, 8, 1), dtype=np.uint8))
        image = (image + rng.integers(0, 24, image.shape)).clip(0, 255).astype(np.uint8)
        labels = np.kron(rng.integers(0, 12, (h // 24, w // 24)), np.ones((24, 24), int))
        Image.fromarray(image, "RGB").save(folder / "train" / f"syn_{i:03d}.png")
        Image.fromarray(labels.astype(np.uint8), "L").save(
            folder / "trainannot" / f"syn_{i:03d}.png"
        )
    return folder


def loader_rate(dataset, transform, batch_size: int, workers: int, batches: int) -> float:
    """Images/s of a DataLoader as the trainer builds it, after its first batch."""
    loader = DataLoader(
        SeededTransformDataset(dataset, transform),
        batch_size=batch_size,
        sampler=EpochSampler(len(dataset), seed=0),
        num_workers=workers,
        drop_last=True,
    )
    it = iter(loader)
    next(it)  # worker start-up and first-batch latency are not throughput
    start = time.perf_counter()
    done = 0
    for _ in range(batches):
        images, _ = next(it)
        done += images.shape[0]
    return done / (time.perf_counter() - start)


def train_step_rate(cfg, num_classes: int, batch, device: torch.device, steps: int) -> float:
    """Images/s of the trainer's own step (the semantic task's loss, backward and update, as
    ``Trainer.run_step`` does them) on one fixed batch."""
    kwargs = {k: v for k, v in cfg.model.kwargs.items() if k not in ("weights", "backbone_weights")}
    kwargs.setdefault("num_classes", num_classes)
    model = create_model(cfg.model.name, **kwargs).to(device).train()
    oc = cfg.optim
    optimizer = build_optimizer(
        model, oc.name, lr=oc.lr, weight_decay=oc.weight_decay, momentum=oc.momentum,
        nesterov=oc.nesterov, betas=tuple(oc.betas),
    )  # fmt: skip
    criterion = build_loss("ce", num_classes=num_classes, ignore_index=255).to(device)
    precision = resolve_precision(cfg.train.precision, device, cfg.train.amp)
    scaler = torch.amp.GradScaler(device.type, enabled=precision.scaled)
    images, targets = batch
    task = SemanticTask()
    task.criterion = criterion

    def step() -> None:
        with precision.autocast():
            loss = task.loss(model, (images, targets), device)
        backward_and_step(loss, model, optimizer, scaler, None)
        if device.type == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up (allocations, cudnn autotune)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * images.shape[0] / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=DEFAULT_ROOT, help="CamVid folder (SegNet layout)")
    parser.add_argument("--recipe", default="lraspp_mobilenet_v3_large_camvid")
    parser.add_argument("--model", default=None, help="override the recipe's model name")
    parser.add_argument("--model-kwargs", default=None, help="YAML mapping replacing its kwargs")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the recipe's")
    parser.add_argument("--batches", type=int, default=6, help="timed batches per loader")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=3, help="timed training steps")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the main process")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    overrides = [f"model.name={args.model}"] if args.model else []
    if args.model_kwargs:
        overrides.append(f"model.kwargs={args.model_kwargs}")
    cfg = load_config(args.recipe, overrides)
    dc = cfg.data
    batch_size = args.batch_size or dc.batch_size
    root, source = Path(args.root), "real"
    tmp = None
    if not root.is_dir():
        tmp = tempfile.TemporaryDirectory()
        n = max(2 * batch_size * (args.batches + 2), 40)
        root, source = synthetic_camvid(Path(tmp.name) / "camvid", n=n), "synthetic"
    dataset = get_dataset("camvid", root, dc.train_split)
    mean, std = default_mean_std(dataset.in_channels)
    transform = build_transforms(
        True, mean=list(dc.mean or mean), std=list(dc.std or std), ignore_index=255,
        **dc.transform_kwargs(),
    )  # fmt: skip

    rows = []
    for workers in args.workers:
        rate = loader_rate(dataset, transform, batch_size, workers, args.batches)
        rows.append((f"data pipeline ({args.recipe})", str(workers), rate))
    device = resolve_device(args.device)
    loader = DataLoader(SeededTransformDataset(dataset, transform), batch_size=batch_size,
                        sampler=EpochSampler(len(dataset), seed=0), drop_last=True)  # fmt: skip
    batch = next(iter(loader))
    rate = train_step_rate(cfg, dataset.num_classes, batch, device, args.steps)
    size = "x".join(str(s) for s in batch[0].shape[-2:])
    rows.append((f"training step ({cfg.model.name}, {device.type}, {size})", "-", rate))

    print(f"CamVid {source} data at {root} ({len(dataset)} train images), batch {batch_size}, "
          f"{os.cpu_count()} CPUs, {args.threads} torch threads in the main process\n")  # fmt: skip
    print(f"| {'what':<58} | workers | images/s |")
    print(f"|{'-' * 60}|---------|----------|")
    for what, workers, rate in rows:
        print(f"| {what:<58} | {workers:>7} | {rate:8.1f} |")
    used = {k: v for k, v in cfg.model.kwargs.items() if k not in ("weights", "backbone_weights")}
    print(f"\nmodel kwargs (no weights loaded): {yaml.safe_dump(used, default_flow_style=True)}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
