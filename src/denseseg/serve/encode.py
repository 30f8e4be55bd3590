"""What ``POST /v1/segment`` returns: a palette label PNG, a colour overlay PNG, or JSON with
each class's pixel count, area fraction and COCO run-length encoded mask."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from denseseg.data.io import encode_mask_png
from denseseg.data.palette import overlay

FORMATS = ("label", "overlay", "json")


def label_png(labels: torch.Tensor | np.ndarray, palette: Sequence[Sequence[int]]) -> bytes:
    """A palette PNG (mode ``P``) of the label map: pixel values are the class indices, the
    palette the model's colours (what ``denseseg predict`` writes)."""
    return encode_mask_png(labels, palette)


def overlay_png(
    image: torch.Tensor, labels: torch.Tensor, palette: Sequence[Sequence[int]], alpha: float
) -> bytes:
    """The label colours blended over the image (``alpha`` the weight of the colours), RGB PNG."""
    buf = io.BytesIO()
    Image.fromarray(overlay(image, labels, palette, alpha=alpha)).save(buf, format="PNG")
    return buf.getvalue()


def _runs(mask: np.ndarray) -> list[int]:
    """COCO's uncompressed RLE counts of a binary ``(H, W)`` mask: run lengths in column-major
    order, starting with a run of zeros (0 when the first pixel is set)."""
    flat = np.asfortranarray(mask).ravel(order="F")
    if flat.size == 0:
        return []
    edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    counts = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
    return [0, *counts] if flat[0] else counts


def _compress(counts: Sequence[int]) -> str:
    """COCO's compressed RLE string: each count (after the second, as the difference to the
    count two before) in 5-bit groups, least significant first, ``0x20`` marking more groups,
    each group offset by 48 into printable ASCII."""
    out = []
    for i, count in enumerate(counts):
        x = count - counts[i - 2] if i > 2 else count
        more = True
        while more:
            c = x & 0x1F
            x >>= 5  # arithmetic shift: negative differences end at -1
            more = x != -1 if c & 0x10 else x != 0
            out.append(chr((c | 0x20 if more else c) + 48))
    return "".join(out)


def rle_encode(mask: np.ndarray) -> dict[str, Any]:
    """A binary ``(H, W)`` mask as COCO's compressed RLE, ``{"size": [h, w], "counts": str}``,
    the form ``pycocotools.mask.encode`` gives (``counts`` decoded to ``str``)."""
    h, w = mask.shape
    return {"size": [int(h), int(w)], "counts": _compress(_runs(mask.astype(bool)))}


def summary(
    labels: torch.Tensor, class_names: Sequence[str], palette: Sequence[Sequence[int]], rle: bool
) -> dict[str, Any]:
    """Per class: index, name, colour, pixel count, area fraction and (``rle``) the COCO RLE of
    its mask (None for a class absent from the image)."""
    arr = labels.numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    h, w = arr.shape
    counts = np.bincount(arr.ravel(), minlength=len(class_names))
    classes = []
    for k, name in enumerate(class_names):
        n = int(counts[k])
        item = {"index": k, "name": name, "color": list(palette[k]), "pixels": n}
        item["fraction"] = n / max(1, h * w)
        if rle:
            item["rle"] = rle_encode(arr == k) if n else None
        classes.append(item)
    return {"width": int(w), "height": int(h), "classes": classes}
