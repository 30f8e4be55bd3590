"""torchrun with 2 processes (gloo on the CPU) on what the plain U-Net test leaves out: Mask R-CNN,
whose heads go unused in some steps and whose COCO evaluation gathers detections to rank 0, and
gradient accumulation, whose backward passes all-reduce only with a step's last batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from coco_fixtures import write_shapes_dataset
from conftest import tiny_recipe, write_folder_dataset
from denseseg.checkpoint import load_checkpoint
from denseseg.config import load_config
from denseseg.engine.trainer import train

PLAIN = [
    "model.kwargs={base_channels: 4, depth: 2, batch_norm: false}",
    "data.scale_range=null",
    "data.crop_size=[24, 24]",
    "train.deterministic=true",
    "train.keep_last=0",
    "train.eval_every=0",
]
TINY_MASKRCNN = [
    "model.name=maskrcnn_resnet18_fpn",
    "model.kwargs={norm: gn, backbone_width: 0.25, fpn_channels: 16, representation_size: 32, "
    "mask_head_channels: 8, min_size: 64, max_size: 96, rpn_post_nms_top_n_train: 100, "
    "box_batch_size_per_image: 32}",
    "data.dataset=coco",
    "data.options={target: instance, category_map: file}",
    "data.crop_size=null",
    "data.scale_range=null",
    "data.batch_size=1",
    "data.eval_batch_size=1",
    "optim.lr=0.01",
    "train.max_steps=2",
    "train.eval_every=2",
    "train.ckpt_every=2",
    "train.tensorboard=false",
    "train.progress=false",
]


def _torchrun(recipe: str, overrides: list[str]) -> subprocess.CompletedProcess:
    src = str(Path(__file__).resolve().parents[1] / "src")
    path = os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    cmd = [sys.executable, "-m", "denseseg", "train", "--nproc", "2", recipe, *overrides]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.heavy  # minutes: make test-all
def test_maskrcnn_trains_and_evaluates_on_two_processes(tmp_path: Path) -> None:
    """Unused heads do not stop DDP; the sharded COCO evaluation scores the whole split once."""
    root = write_shapes_dataset(tmp_path / "data")
    out = tmp_path / "run"
    run = _torchrun("maskrcnn_resnet18_fpn_coco", [*TINY_MASKRCNN, f"data.root={root}",
                                                   f"train.out_dir={out}"])  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["step"] == 2 and ckpt["world_size"] == 2 and ckpt["global_batch"] == 2
    assert not any(k.startswith("module.") for k in ckpt["model"])
    assert 0.0 <= ckpt["metrics"]["segm_AP"] <= 1.0


@pytest.mark.heavy  # make test-all: keeps make test under 15 minutes
def test_two_processes_accumulating_equal_one_with_the_whole_batch(tmp_path: Path) -> None:
    """2 processes x batch 1 x 2 accumulated == 1 process with batch 4: same weights."""
    data = write_folder_dataset(tmp_path / "data", n_train=8)
    one, two = tmp_path / "one", tmp_path / "two"
    train(load_config("unet_demo", tiny_recipe(data, one) + PLAIN + ["data.batch_size=4"]))
    torch.use_deterministic_algorithms(False)
    opts = ["data.batch_size=1", "train.accumulate=2"]
    run = _torchrun("unet_demo", tiny_recipe(data, two) + PLAIN + opts)
    assert run.returncode == 0, run.stderr[-3000:]
    a, b = (load_checkpoint(r / "last.pt")["model"] for r in (one, two))
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
