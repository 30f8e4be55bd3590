"""The whole instance training path on a real picture: Mask R-CNN, trained from scratch by
``denseseg.train`` on stardist's nuclei image (125 nuclei) cut into 16 tiles, reaches mask AP50
>= 0.5 on that image within 300 steps.

Slow (a few minutes on two CPU cores); needs stardist's data files
(``pip install --no-deps stardist``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from denseseg.config import config_from_dict
from denseseg.data.coco_export import label_image_instances, write_coco_split
from denseseg.data.samples import nuclei_sample, stretch_to_uint8
from denseseg.engine.trainer import train
from denseseg.errors import ConfigError

STEPS = 200
TILE = 128
MIN_AREA = 15  # slivers of nuclei cut by a tile border carry no shape to learn


def _nuclei_dataset(root: Path) -> Path:
    """The 512x512 image as 16 tiles of 128 pixels, the same in the train and val splits."""
    try:
        image, labels = nuclei_sample()
    except ConfigError:
        pytest.skip("stardist's data files are not installed (pip install --no-deps stardist)")
    assert labels.shape == (512, 512) and len(label_image_instances(labels)) == 125
    image8 = stretch_to_uint8(image)
    images, instances = [], []
    for y in range(0, 512, TILE):
        for x in range(0, 512, TILE):
            images.append(image8[y : y + TILE, x : x + TILE])
            inst = label_image_instances(labels[y : y + TILE, x : x + TILE])
            instances.append([(m, c) for m, c in inst if m.sum() >= MIN_AREA])
    for split in ("train", "val"):
        write_coco_split(root, split, images, instances, {1: "nucleus"})
    return root


@pytest.mark.slow
@pytest.mark.heavy  # minutes: make test-all
def test_mask_rcnn_learns_the_nuclei_image(tmp_path: Path) -> None:
    # conftest's one thread: on a shared two-core machine two threads run several times slower.
    root = _nuclei_dataset(tmp_path / "nuclei")
    cfg = config_from_dict(
        {
            "model": {
                "name": "maskrcnn_resnet18_fpn",
                "kwargs": {
                    "norm": "gn",
                    "backbone_width": 0.5,
                    "fpn_channels": 64,
                    "representation_size": 256,
                    "mask_head_channels": 32,
                    "min_size": TILE,
                    "max_size": TILE,
                    "anchor_sizes": [8, 16, 32, 64, 128],
                    "rpn_post_nms_top_n_train": 500,
                    "box_batch_size_per_image": 64,
                },
            },
            "data": {
                "dataset": "coco",
                "root": str(root),
                "options": {"target": "instance", "category_map": "file"},
                "crop_size": None,
                "scale_range": None,
                "hflip": True,
                "batch_size": 2,
                "eval_batch_size": 4,
            },
            "optim": {"name": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4},
            "schedule": {"name": "poly", "warmup_steps": STEPS // 10},
            "train": {
                "max_steps": STEPS,
                "eval_every": 0,
                "ckpt_every": 0,
                "log_every": 20,
                "tensorboard": False,
                "progress": False,
                "out_dir": str(tmp_path / "run"),
            },
        }
    )
    result = train(cfg)
    metrics = result["metrics"]
    print("nuclei overfit:", {k: round(v, 3) for k, v in metrics.items()})
    assert result["step"] == STEPS <= 300
    assert metrics["num_images"] == 16
    assert metrics["segm_AP50"] >= 0.5, metrics
    assert result["best_segm_AP"] == metrics["segm_AP"]
