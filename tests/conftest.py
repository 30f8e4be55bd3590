"""Shared fixtures: tiny datasets written in the exact on-disk folder format."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

# One thread: on a shared or oversubscribed 2-core machine, 2 threads run many times slower.
torch.set_num_threads(1)

PALETTE = [(0, 0, 0), (200, 30, 30), (30, 200, 30)]


@pytest.fixture(autouse=True)
def _cache_outside_home(tmp_path_factory, monkeypatch) -> None:
    """denseseg's cache (demo data, the models table) in one folder of this test session, not
    in the user's ~/.cache; a test that needs its own sets DENSESEG_CACHE itself."""
    monkeypatch.setenv("DENSESEG_CACHE", str(tmp_path_factory.getbasetemp() / "denseseg-cache"))


def write_folder_dataset(
    root: Path,
    *,
    n_train: int = 6,
    n_val: int = 3,
    size: tuple[int, int] = (32, 40),
    seed: int = 0,
    val_sizes: list[tuple[int, int]] | None = None,
) -> Path:
    """A 3-class folder dataset: RGB images, palette PNG masks, classes.yaml, list-file splits.

    Class 1 is a bright square, class 2 a dark square, on a mid-grey noisy background.
    Validation images may have their own sizes (to exercise mixed-size batches).
    """
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    flat = [c for p in PALETTE for c in p]
    splits: dict[str, list[str]] = {"train": [], "val": []}
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(n):
            h, w = val_sizes[i % len(val_sizes)] if (split == "val" and val_sizes) else size
            img = rng.normal(128, 20, (h, w, 3))
            mask = np.zeros((h, w), np.uint8)
            for cls, value in ((1, 230), (2, 25)):
                s = int(rng.integers(6, max(7, min(h, w) // 2)))
                y, x = int(rng.integers(0, h - s)), int(rng.integers(0, w - s))
                img[y : y + s, x : x + s] = value + rng.normal(0, 5, (s, s, 3))
                mask[y : y + s, x : x + s] = cls
            stem = f"{split}_{i:03d}"
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB").save(
                root / "images" / f"{stem}.png"
            )
            m = Image.fromarray(mask, "P")
            m.putpalette(flat)
            m.save(root / "masks" / f"{stem}.png")
            splits[split].append(stem)
    for split, stems in splits.items():
        (root / f"{split}.txt").write_text("\n".join(stems) + "\n")
    (root / "classes.yaml").write_text(
        "classes: [background, bright, dark]\n"
        f"palette: {[list(p) for p in PALETTE]}\n"
        "ignore_index: 255\n"
    )
    return root


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> Path:
    return write_folder_dataset(tmp_path / "data", val_sizes=[(32, 40), (28, 36), (36, 30)])


def tiny_recipe(data_root: Path, out_dir: Path, **extra: object) -> list[str]:
    """Overrides that make a small, fast U-Net recipe on ``data_root``."""
    overrides = [
        "model.name=unet",
        "model.kwargs={base_channels: 4, depth: 2, batch_norm: true}",
        "data.dataset=folder",
        f"data.root={data_root}",
        "data.crop_size=[24, 24]",
        "data.batch_size=2",
        "data.eval_batch_size=2",
        "optim.name=adamw",
        "optim.lr=0.01",
        "train.max_steps=8",
        "train.eval_every=4",
        "train.ckpt_every=4",
        "train.log_every=2",
        "train.tensorboard=false",
        "train.progress=false",
        f"train.out_dir={out_dir}",
    ]
    overrides += [f"{k}={v}" for k, v in extra.items()]
    return overrides


def save_em_checkpoint(path: Path, model_name: str, **kwargs: object) -> Path:
    """A checkpoint as ``denseseg train`` writes one, of an untrained two-class, one-channel
    model (membrane/cell): enough for pack, load and inference tests."""
    from denseseg.checkpoint import atomic_save
    from denseseg.models import create_model

    kwargs = {"num_classes": 2, "in_channels": 1, **kwargs}
    ckpt = {
        "model": create_model(model_name, **kwargs).state_dict(),
        "model_name": model_name,
        "model_kwargs": kwargs,
        "mean": [0.5],
        "std": [0.5],
        "class_names": ["membrane", "cell"],
        "palette": [[0, 0, 0], [255, 255, 255]],
        "step": 7,
    }
    atomic_save(ckpt, path)
    return path


@pytest.fixture
def nondeterministic_afterwards():
    """Tests that train with ``train.deterministic=true`` leave torch's global switch off."""
    yield
    torch.use_deterministic_algorithms(False)
