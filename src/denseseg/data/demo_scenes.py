"""A seeded procedural dataset of shape scenes, small enough to train on a CPU in minutes.

Each image holds 2-5 overlapping shapes (circle, rectangle, triangle, cross) of varied size and
rotation on a textured, noisy background. The colour and texture of every region - background
included - are drawn from one distribution that does not depend on the class, so a pixel's
colour says nothing about its class: a per-pixel classifier can do no better than "everything is
background", while a model that sees the outline of a shape (a U-Net) can label it.

The dataset is written in the folder format (``images/<stem>.png`` RGB, ``masks/<stem>.png``
palette PNG of class indices, ``classes.yaml``, ``train.txt``, ``val.txt``) and cached: a second
call with the same parameters returns the folder that is already there. Label 255 (the ignore
index) is not used: masks are drawn from the same pixel grid as the image, so every pixel has an
exact label.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from denseseg.data.palette import Color, default_palette
from denseseg.errors import ConfigError, DataError

DEMO_CLASSES: tuple[str, ...] = ("background", "circle", "rectangle", "triangle", "cross")
"""Class names of the demo dataset, index = label value in the masks."""

DEMO_PALETTE: tuple[Color, ...] = tuple(default_palette(len(DEMO_CLASSES)))
"""Mask colours of the demo classes (the first entries of the PASCAL VOC palette)."""

IGNORE_INDEX = 255

# Bump when the drawing changes, so cached datasets from an older generator are not reused.
GENERATOR_VERSION = 3
DONE_MARKER = "demo.json"
_MIN_SHAPES, _MAX_SHAPES = 2, 5
# Shape sizes are given as an area (px^2) relative to a 64x64 image, so every class covers about
# the same number of pixels for the same draw and size alone does not tell the classes apart.
_AREA_RANGE = (150.0, 600.0)
_MIN_COLOUR_DIST = 90.0  # RGB distance between any two region colours of one image
_MAX_OCCLUDED = 0.2  # at most this share of a shape may be hidden by shapes drawn later
_TEXTURES = ("flat", "stripes", "checker", "dots", "grain", "blotch")
_TEXTURE_STRENGTH = (0.05, 0.2)  # how far a texture pulls a region's colour towards black/white
_NOISE_STD = (2.0, 6.0)  # per-image range of the Gaussian pixel noise (0-255 scale)


def default_cache_dir() -> Path:
    """Return the cache folder: ``$DENSESEG_CACHE`` if set, else ``~/.cache/denseseg``."""
    env = os.environ.get("DENSESEG_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "denseseg"


def demo_params(
    *, seed: int = 0, num_train: int = 600, num_val: int = 100, image_size: int = 64
) -> dict[str, int]:
    """Return the parameters that identify one demo dataset (stored in its ``demo.json``)."""
    return {
        "version": GENERATOR_VERSION,
        "seed": int(seed),
        "num_train": int(num_train),
        "num_val": int(num_val),
        "image_size": int(image_size),
    }


def _params_hash(params: dict[str, int]) -> str:
    blob = json.dumps(params, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


# ----------------------------------------------------------------------------------------------
# Drawing


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    i = int(h * 6.0) % 6
    f = h * 6.0 - int(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    rgb = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return np.array(rgb, dtype=np.float32) * 255.0


def _draw_colours(rng: np.random.Generator, n: int) -> np.ndarray:
    """Return ``n`` mutually distinct colours ``(n, 3)`` in random order.

    Colours are drawn one after another, each at least ``_MIN_COLOUR_DIST`` from the earlier
    ones; the final shuffle makes the slots exchangeable, so the background and every shape get
    colours from the same distribution.
    """
    colours: list[np.ndarray] = []
    while len(colours) < n:
        c = _hsv_to_rgb(rng.random(), rng.uniform(0.2, 1.0), rng.uniform(0.25, 1.0))
        if all(np.linalg.norm(c - o) >= _MIN_COLOUR_DIST for o in colours):
            colours.append(c)
    return np.stack(colours)[rng.permutation(n)]


def _texture(rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    """Return a texture field in ``[0, 1]`` of shape ``(H, W)``; 0 means the plain colour."""
    kind = _TEXTURES[rng.integers(len(_TEXTURES))]
    if kind == "flat":
        return np.zeros_like(xx)
    phi = rng.uniform(0, np.pi)
    u = xx * np.cos(phi) + yy * np.sin(phi)
    v = -xx * np.sin(phi) + yy * np.cos(phi)
    period = rng.uniform(3.0, 8.0)
    if kind == "stripes":
        return (np.sin(2 * np.pi * u / period + rng.uniform(0, 2 * np.pi)) > 0).astype(np.float32)
    if kind == "checker":
        return ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float32)
    if kind == "dots":
        du = (u / period) % 1.0 - 0.5
        dv = (v / period) % 1.0 - 0.5
        return (du * du + dv * dv < rng.uniform(0.04, 0.1)).astype(np.float32)
    if kind == "grain":
        return (rng.random(xx.shape) < rng.uniform(0.2, 0.5)).astype(np.float32)
    # blotch: a few random low-frequency waves, rescaled to [0, 1]
    field = np.zeros_like(xx)
    for _ in range(3):
        a = rng.uniform(0, 2 * np.pi)
        f = rng.uniform(0.05, 0.2)
        field += np.sin(f * (xx * np.cos(a) + yy * np.sin(a)) + rng.uniform(0, 2 * np.pi))
    return (field - field.min()) / max(float(np.ptp(field)), 1e-6)


def _fill(
    rng: np.random.Generator, colour: np.ndarray, xx: np.ndarray, yy: np.ndarray
) -> np.ndarray:
    """Return an ``(H, W, 3)`` float image of ``colour`` overlaid with a random texture."""
    t = _texture(rng, xx, yy)[..., None] * rng.uniform(*_TEXTURE_STRENGTH)
    # Texture pulls the colour towards black or white, keeping the region's hue recognisable.
    target = 255.0 if rng.random() < 0.5 else 0.0
    return colour * (1 - t) + target * t


def _shape_mask(
    rng: np.random.Generator, cls: int, xx: np.ndarray, yy: np.ndarray, size: int
) -> np.ndarray:
    """Return a boolean ``(H, W)`` mask of one randomly sized, rotated shape of class ``cls``."""
    scale = size / 64.0
    area = np.exp(rng.uniform(*np.log(_AREA_RANGE))) * scale * scale
    name = DEMO_CLASSES[cls]
    # Half-extent (bounding radius) for each class at the drawn area.
    if name == "circle":
        r = np.sqrt(area / np.pi)
    elif name == "rectangle":
        aspect = rng.uniform(0.45, 0.9)
        a = np.sqrt(area / (4 * aspect))
        b = a * aspect
        r = np.hypot(a, b)
    elif name == "triangle":
        r = np.sqrt(area / (3 * np.sqrt(3) / 4))  # circumradius of an equilateral triangle
    else:
        w = rng.uniform(0.28, 0.4)  # arm half-width relative to arm half-length
        r = np.sqrt(area / (8 * w - 4 * w * w))
    cx, cy = rng.uniform(r, size - r, size=2)
    theta = rng.uniform(0, 2 * np.pi)
    c, s = np.cos(theta), np.sin(theta)
    u = (xx - cx) * c + (yy - cy) * s
    v = -(xx - cx) * s + (yy - cy) * c
    if name == "circle":
        return u * u + v * v <= r * r
    if name == "rectangle":
        return (np.abs(u) <= a) & (np.abs(v) <= b)
    if name == "triangle":
        inside = np.ones_like(u, dtype=bool)
        for k in range(3):
            ang = 2 * np.pi * k / 3
            inside &= u * np.cos(ang) + v * np.sin(ang) <= r / 2
        return inside
    arm = r * np.sqrt(1.0 / (1.0 + w * w))
    half = arm * w
    return ((np.abs(u) <= arm) & (np.abs(v) <= half)) | ((np.abs(v) <= arm) & (np.abs(u) <= half))


def render_scene(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Draw one scene.

    Args:
        rng: the generator all randomness comes from.
        size: image height and width in pixels.

    Returns:
        ``image`` uint8 ``(size, size, 3)`` and ``mask`` uint8 ``(size, size)`` of class indices.
    """
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    n_shapes = int(rng.integers(_MIN_SHAPES, _MAX_SHAPES + 1))
    colours = _draw_colours(rng, n_shapes + 1)
    image = _fill(rng, colours[0], xx, yy)
    mask = np.zeros((size, size), dtype=np.uint8)
    owner = np.full((size, size), -1, dtype=np.int16)  # which shape is visible at each pixel
    areas: list[int] = []
    for k in range(n_shapes):
        cls = int(rng.integers(1, len(DEMO_CLASSES)))
        n = len(areas)
        for _ in range(30):
            m = _shape_mask(rng, cls, xx, yy, size)
            # Keep most of every earlier shape visible, so its outline can still be read.
            hidden = np.bincount(owner[m & (owner >= 0)], minlength=n)
            visible = np.bincount(owner[owner >= 0], minlength=n) - hidden
            if m.any() and all(visible[j] >= (1 - _MAX_OCCLUDED) * areas[j] for j in range(n)):
                break
        else:
            continue
        layer = _fill(rng, colours[k + 1], xx, yy)
        image[m] = layer[m]
        mask[m] = cls
        owner[m] = n
        areas.append(int(m.sum()))
    # Shading and sensor noise act on the whole picture, background and shapes alike.
    gx, gy = rng.uniform(-0.2, 0.2, size=2)
    image *= (1 + (gx * (xx - size / 2) + gy * (yy - size / 2)) / size)[..., None]
    image += rng.normal(0.0, rng.uniform(*_NOISE_STD), size=image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), mask


# ----------------------------------------------------------------------------------------------
# Writing


def _sample_rng(seed: int, split: int, index: int) -> np.random.Generator:
    # One independent stream per sample: sample i is the same whatever num_train or num_val is.
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(split, index)))


def _palette_bytes() -> list[int]:
    flat = [v for colour in DEMO_PALETTE for v in colour]
    flat += [0] * (3 * 256 - len(flat))
    flat[3 * IGNORE_INDEX : 3 * IGNORE_INDEX + 3] = [255, 255, 255]
    return flat


def _write_sample(folder: Path, stem: str, image: np.ndarray, mask: np.ndarray) -> None:
    Image.fromarray(image).save(folder / "images" / f"{stem}.png")
    png = Image.fromarray(mask)
    png.putpalette(_palette_bytes())  # turns the mode-L index image into a palette ("P") image
    png.save(folder / "masks" / f"{stem}.png")


def _generate(folder: Path, params: dict[str, int]) -> None:
    """Write the whole dataset into ``folder``; the marker file comes last."""
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    size = params["image_size"]
    for split_id, split in enumerate(("train", "val")):
        stems = [f"{split}_{i:04d}" for i in range(params[f"num_{split}"])]
        for i, stem in enumerate(stems):
            image, mask = render_scene(_sample_rng(params["seed"], split_id, i), size)
            _write_sample(folder, stem, image, mask)
        (folder / f"{split}.txt").write_text("".join(f"{s}\n" for s in stems))
    classes = {
        "classes": list(DEMO_CLASSES),
        "palette": [list(c) for c in DEMO_PALETTE],
        "ignore_index": IGNORE_INDEX,
    }
    (folder / "classes.yaml").write_text(yaml.safe_dump(classes, sort_keys=False))
    (folder / DONE_MARKER).write_text(json.dumps(params, sort_keys=True, indent=2) + "\n")


def _read_marker(root: Path) -> dict | None:
    try:
        return json.loads((root / DONE_MARKER).read_text())
    except (OSError, ValueError):
        return None


def make_demo_dataset(
    root: str | os.PathLike | None = None,
    *,
    seed: int = 0,
    num_train: int = 600,
    num_val: int = 100,
    image_size: int = 64,
) -> Path:
    """Generate the demo dataset, or return it if a complete copy is already there.

    The dataset is written into a temporary sibling folder and renamed into place only when
    complete, so an interrupted run never leaves a half dataset at ``root``. The same arguments
    always give byte-identical files.

    Args:
        root: where to put the dataset; default ``<cache>/demo/<hash of the parameters>`` with
            ``<cache>`` from :func:`default_cache_dir` (``$DENSESEG_CACHE`` or
            ``~/.cache/denseseg``).
        seed: seed of the numpy generators that draw every scene.
        num_train: number of training images (stems ``train_0000``...).
        num_val: number of validation images (stems ``val_0000``...).
        image_size: height and width of the square images, at least 32.

    Returns:
        The dataset folder, holding ``images/``, ``masks/``, ``classes.yaml``, ``train.txt``,
        ``val.txt`` and the ``demo.json`` marker with the parameters.

    Raises:
        ConfigError: a size or count out of range.
        DataError: ``root`` holds something other than this demo dataset.
    """
    if image_size < 32 or num_train < 0 or num_val < 0:
        raise ConfigError(
            f"demo dataset: need image_size >= 32 and non-negative counts, got "
            f"image_size={image_size}, num_train={num_train}, num_val={num_val}"
        )
    params = demo_params(seed=seed, num_train=num_train, num_val=num_val, image_size=image_size)
    root = Path(root) if root is not None else default_cache_dir() / "demo" / _params_hash(params)
    if root.exists():
        found = _read_marker(root)
        if found == params:
            return root
        if found is not None or any(root.iterdir()):
            raise DataError(
                f"{root} already holds other files or a demo dataset with other parameters; "
                "delete it or choose another root"
            )
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        _generate(tmp, params)
        if root.exists():
            root.rmdir()  # empty (checked above); rename cannot replace a folder everywhere
        try:
            os.rename(tmp, root)
        except OSError:
            # Another process may have finished the same dataset first: use theirs.
            if _read_marker(root) != params:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
