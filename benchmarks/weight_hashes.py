"""Hashes of the final weights of two short deterministic trainings, for refactors that must not
change what training computes: run it before and after, on the same machine, and compare.

    PYTHONPATH=src python benchmarks/weight_hashes.py

Runs ``unet_demo`` (demo data) and ``maskrcnn_resnet18_fpn_coco`` (the test suite's shapes
dataset) for 50 steps each with ``train.deterministic=true`` on one CPU thread, and prints a table
of recipe, steps and the first 16 hex digits of the sha256 over the state_dict (about 2 minutes).
"""

from __future__ import annotations

import hashlib
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from coco_fixtures import write_shapes_dataset  # noqa: E402
from denseseg.checkpoint import load_checkpoint  # noqa: E402
from denseseg.config import load_config  # noqa: E402
from denseseg.engine.trainer import train  # noqa: E402

COMMON = [
    "train.deterministic=true",
    "train.max_steps=50",
    "train.eval_every=25",
    "train.ckpt_every=25",
    "train.progress=false",
    "train.tensorboard=false",
]


def digest(run: Path) -> tuple[str, int]:
    """(sha256 prefix of the state_dict, step) of ``run/last.pt``."""
    ckpt = load_checkpoint(run / "last.pt")
    h = hashlib.sha256()
    for key in sorted(ckpt["model"]):
        h.update(key.encode())
        h.update(ckpt["model"][key].contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16], ckpt["step"]


def main() -> None:
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp())
    shapes = write_shapes_dataset(tmp / "shapes")
    runs = {
        "unet_demo": [],
        "maskrcnn_resnet18_fpn_coco": [f"data.root={shapes}", "schedule.warmup_steps=10"],
    }
    print("| recipe | steps | weights sha256 |\n|---|---|---|")
    for recipe, extra in runs.items():
        out = tmp / recipe
        train(load_config(recipe, [*COMMON, *extra, f"train.out_dir={out}"]))
        sha, step = digest(out)
        print(f"| {recipe} | {step} | {sha} |")


if __name__ == "__main__":
    main()
