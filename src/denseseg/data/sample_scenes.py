"""The sample images of the web page, drawn by the package itself (no bundled photos).

Two kinds, each drawn from a fixed seed so the bytes are the same on every call and machine:

- ``shapes-1``, ``shapes-2``: demo shape scenes (:func:`denseseg.data.demo_scenes.render_scene`),
  64x64 like the training images of the ``unet_demo`` recipe, which segments them.
- ``street-1``, ``street-2``: 480x360 synthetic street views (sky, buildings with windows, a
  road with lane marks, pavements, a tree, a pole, cars) for the built-in ``camvid`` model.

PNG bytes are cached: the first call draws the image (well under 0.3 s), later calls are free.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from functools import cache

import numpy as np
from PIL import Image, ImageDraw

from denseseg.data.demo_scenes import render_scene

__all__ = ["sample_names", "sample_png"]

SHAPES_SIZE = 64
STREET_SIZE = (480, 360)  # (width, height), CamVid's frames halved


def _shapes(seed: int) -> Callable[[], np.ndarray]:
    def draw() -> np.ndarray:
        image, _ = render_scene(np.random.default_rng(seed), SHAPES_SIZE)
        return image

    return draw


def _sky(draw: ImageDraw.ImageDraw, width: int, horizon: int, rng: np.random.Generator) -> None:
    """A vertical gradient from a pale blue-grey at the top to near white at the horizon."""
    top = np.array([190, 200, 212]) + rng.integers(-8, 9, 3)  # CamVid's overcast skies
    bottom = np.array([225, 230, 235])
    for y in range(horizon):
        c = top + (bottom - top) * (y / max(horizon - 1, 1))
        draw.line([(0, y), (width, y)], fill=tuple(int(v) for v in c))


def _building(
    draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], rng: np.random.Generator
) -> None:
    """A facade with a grid of dark windows."""
    x0, y0, x1, y1 = box
    wall = tuple(int(v) for v in rng.integers(90, 190, 3))
    draw.rectangle(box, fill=wall)
    glass = tuple(int(v) for v in rng.integers(30, 70, 3))
    step_x, step_y = int(rng.integers(18, 28)), int(rng.integers(22, 32))
    for wy in range(y0 + 10, y1 - 20, step_y):
        for wx in range(x0 + 6, x1 - 12, step_x):
            draw.rectangle((wx, wy, wx + step_x // 2, wy + step_y // 2), fill=glass)


def _car(draw: ImageDraw.ImageDraw, x: int, y: int, w: int, rng: np.random.Generator) -> None:
    """A side view of a car whose wheels touch the ground at row ``y``."""
    h = w * 0.42
    paint = tuple(int(v) for v in rng.integers(20, 150, 3))
    body = (x, y - h * 0.75, x + w, y - h * 0.2)
    draw.rounded_rectangle(body, radius=int(w * 0.06), fill=paint)
    cabin = [(x + w * 0.2, y - h * 0.75), (x + w * 0.32, y - h), (x + w * 0.7, y - h)]
    cabin += [(x + w * 0.82, y - h * 0.75)]
    draw.polygon(cabin, fill=paint)
    draw.polygon(
        [(x + w * 0.26, y - h * 0.76), (x + w * 0.35, y - h * 0.94)]
        + [(x + w * 0.67, y - h * 0.94), (x + w * 0.76, y - h * 0.76)],
        fill=(60, 75, 90),
    )
    r = h * 0.2
    for cx in (x + w * 0.22, x + w * 0.78):
        draw.ellipse((cx - r, y - 2 * r, cx + r, y), fill=(25, 25, 25))


def _tree(draw: ImageDraw.ImageDraw, x: int, y: int, rng: np.random.Generator) -> None:
    """A leafy canopy centred at (x, y): many small blobs of varied greens."""
    for _ in range(120):
        r = rng.uniform(0, 42)
        a = rng.uniform(0, 2 * np.pi)
        bx, by, s = x + r * np.cos(a), y + 0.9 * r * np.sin(a), rng.uniform(5, 11)
        green = (int(rng.integers(30, 90)), int(rng.integers(80, 150)), int(rng.integers(20, 60)))
        draw.ellipse((bx - s, by - s, bx + s, by + s), fill=green)


def _street(seed: int) -> Callable[[], np.ndarray]:
    def draw_street() -> np.ndarray:
        rng = np.random.default_rng(seed)
        width, height = STREET_SIZE
        horizon = int(height * rng.uniform(0.42, 0.5))
        img = Image.new("RGB", STREET_SIZE)
        draw = ImageDraw.Draw(img)
        _sky(draw, width, horizon, rng)
        _scenery(draw, width, height, horizon, rng)
        pixels = np.asarray(img, dtype=np.float32)
        pixels += rng.normal(0.0, 3.0, pixels.shape)  # a little sensor noise
        return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)

    return draw_street


def _scenery(
    draw: ImageDraw.ImageDraw, width: int, height: int, horizon: int, rng: np.random.Generator
) -> None:
    """Buildings, road, pavements, a tree, a pole and cars below the sky."""
    x = 0
    while x < width:  # a row of buildings of varied width and height
        w = int(rng.integers(70, 140))
        _building(draw, (x, int(rng.integers(30, horizon - 40)), x + w, horizon + 20), rng)
        x += w
    mid = width * rng.uniform(0.4, 0.6)
    draw.polygon(
        [(0, horizon + 20), (width, horizon + 20), (width, height), (0, height)],
        fill=(170, 165, 160),
    )  # pavement on both sides
    draw.polygon(
        [(mid - 30, horizon + 20), (mid + 30, horizon + 20)]
        + [(width + 60, height), (-60, height)],
        fill=(85, 85, 90),
    )
    for t0 in np.arange(0.05, 1.0, 0.18):  # dashed centre line, in perspective
        t1 = t0 + 0.08
        pts = [(mid, horizon + 20 + t * (height - horizon - 20)) for t in (t0, t1)]
        draw.line(pts, fill=(235, 235, 225), width=max(1, int(6 * t1)))
    tx = int(width * rng.uniform(0.05, 0.2))
    draw.rectangle((tx - 5, horizon - 30, tx + 5, horizon + 60), fill=(90, 65, 40))
    _tree(draw, tx, horizon - 60, rng)
    px = int(width * rng.uniform(0.8, 0.92))
    draw.rectangle((px - 3, horizon - 120, px + 3, horizon + 70), fill=(70, 70, 75))
    n_cars = int(rng.integers(1, 3))
    ground = np.sort(rng.uniform(0.7, 1.0, n_cars))  # far cars first: nearer ones cover them
    for k, g in enumerate(ground):
        y = int(horizon + 20 + g * (height - horizon - 20))
        w = int(190 * g)  # smaller towards the horizon
        lo, hi = k * width // n_cars, (k + 1) * width // n_cars - w
        _car(draw, int(rng.integers(lo, max(hi, lo + 1))), y, w, rng)


_SAMPLES: dict[str, Callable[[], np.ndarray]] = {
    "shapes-1": _shapes(3),
    "shapes-2": _shapes(11),
    "street-1": _street(1),
    "street-2": _street(2),
}


def sample_names() -> list[str]:
    """Return the names of the sample images, in the order the web page shows them."""
    return list(_SAMPLES)


@cache
def sample_png(name: str) -> bytes:
    """Return the PNG bytes of the sample ``name`` (RGB, the same bytes on every call).

    Raises:
        KeyError: ``name`` is not one of :func:`sample_names`.
    """
    if name not in _SAMPLES:
        raise KeyError(f"no sample image named {name!r}; known: {', '.join(_SAMPLES)}")
    buf = io.BytesIO()
    Image.fromarray(_SAMPLES[name](), "RGB").save(buf, format="PNG", optimize=False)
    return buf.getvalue()
