"""Pictures people look at: overlays side by side, per-class IoU, confusion matrix, curves.

Uses matplotlib's non-interactive Agg backend, so it works on machines without a screen. Text
that comes from users (class names, titles, file names) goes through :func:`plain_text`, so a
class called ``$\\alpha$`` is drawn as typed instead of failing matplotlib's mathtext parser.
Figures are written through :func:`denseseg.data.io.atomic_write` (a temporary file replaced
onto the target, never through a symbolic link planted there).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from denseseg.checkpoint import atomic_write, show_path  # noqa: E402
from denseseg.errors import DataError  # noqa: E402

MAX_LABELLED = 60
"""Most classes a plot names one by one; beyond, plots summarise (a figure stays readable)."""


def plain_text(text: object) -> str:
    """``text`` as matplotlib draws it literally: dollar signs escaped, so that mathtext (text
    between two ``$``) never parses a user's string; undecodable bytes shown as ``\\xNN``."""
    return show_path(str(text)).replace("$", r"\$")


def _plain_all(texts: Sequence[object]) -> list[str]:
    return [plain_text(t) for t in texts]


def _legend(palette: Sequence[Sequence[int]], class_names: Sequence[str]) -> list[Patch]:
    return [
        Patch(color=np.array(c) / 255.0, label=plain_text(n)) for c, n in zip(palette, class_names)
    ]


def save_image_grid(
    rows: Sequence[Sequence[np.ndarray]],
    path: str | Path,
    *,
    titles: Sequence[str] | None = None,
    palette: Sequence[Sequence[int]] | None = None,
    class_names: Sequence[str] | None = None,
    cell: float = 2.2,
) -> Path:
    """Save a grid of uint8 ``(H, W, 3)`` pictures, one row per sample, with column titles and
    an optional class legend."""
    nr, nc = len(rows), max(len(r) for r in rows)
    fig, axes = plt.subplots(nr, nc, figsize=(cell * nc, cell * nr + 0.6), squeeze=False)
    for i, row in enumerate(rows):
        for j in range(nc):
            ax = axes[i][j]
            ax.axis("off")
            if j < len(row):
                ax.imshow(row[j], interpolation="nearest")
            if i == 0 and titles and j < len(titles):
                ax.set_title(plain_text(titles[j]), fontsize=9)
    if palette is not None and class_names is not None:
        fig.legend(
            handles=_legend(palette, class_names),
            loc="lower center",
            ncol=min(len(class_names), 6),
            fontsize=8,
            frameon=False,
        )
    fig.tight_layout(rect=(0, 0.05 if class_names else 0, 1, 1))
    return _save(fig, path)


def plot_per_class_iou(
    iou: Sequence[float],
    class_names: Sequence[str],
    path: str | Path,
    *,
    title: str = "",
    palette: Sequence[Sequence[int]] | None = None,
) -> Path:
    """Horizontal bar chart of per-class IoU in percent (NaN classes shown as 'n/a')."""
    finite = [v for v in iou if v == v]
    miou = 100 * sum(finite) / len(finite) if finite else float("nan")
    shown = list(range(len(iou)))
    if len(shown) > MAX_LABELLED:  # thousands of bars would make a picture no one can read
        shown = sorted(shown, key=lambda i: iou[i] if iou[i] == iou[i] else 2.0)[:MAX_LABELLED]
        title = f"{title} ({MAX_LABELLED} lowest of {len(iou)} classes)".strip()
    iou = [iou[i] for i in shown]
    class_names = [class_names[i] for i in shown]
    palette = [palette[i] for i in shown] if palette else None
    vals = [100 * v if v == v else 0.0 for v in iou]
    fig, ax = plt.subplots(figsize=(6, 0.35 * len(vals) + 1.2))
    colors = [np.array(c) / 255.0 for c in palette] if palette else None
    ax.barh(range(len(vals)), vals, color=colors, edgecolor="black", linewidth=0.5)
    ax.set_yticks(range(len(vals)), _plain_all(class_names))
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("IoU (%)")
    for k, v in enumerate(iou):
        ax.text(
            min(100 * v, 88) + 1 if v == v else 1,
            k,
            f"{100 * v:.1f}" if v == v else "n/a",
            va="center",
            fontsize=8,
        )
    ax.set_title(f"{plain_text(title)}  mIoU {miou:.1f}%".strip(), fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_confusion_matrix(
    confusion: np.ndarray, class_names: Sequence[str], path: str | Path, *, title: str = ""
) -> Path:
    """Row-normalised confusion matrix (rows: ground truth, columns: prediction), in percent."""
    cm = np.asarray(confusion, dtype=np.float64)
    rows = cm.sum(1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0) * 100
    n = len(class_names)
    size = min(max(4.0, 0.55 * n + 2), 0.55 * MAX_LABELLED + 2)  # an image, not a poster
    fig, ax = plt.subplots(figsize=(size, size))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=100, interpolation="nearest")
    if n <= MAX_LABELLED:
        ax.set_xticks(range(n), _plain_all(class_names), rotation=45, ha="right")
        ax.set_yticks(range(n), _plain_all(class_names))
    ax.set_xlabel("predicted")
    ax.set_ylabel("ground truth")
    if n <= 25:
        for i in range(n):
            for j in range(n):
                if norm[i, j] >= 0.05:
                    ax.text(
                        j,
                        i,
                        f"{norm[i, j]:.0f}",
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if norm[i, j] > 50 else "black",
                    )
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="% of ground-truth pixels")
    ax.set_title(plain_text(title) or "confusion matrix (row-normalised)", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def read_log(path: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Read a training ``log.csv`` into ``{"loss": [(step, v)], "val_mIoU": [...], ...}``."""
    series: dict[str, list[tuple[int, float]]] = {}
    with Path(path).open() as fh:
        for row in csv.DictReader(fh):
            for key, val in row.items():
                if key != "step" and val not in ("", None):
                    series.setdefault(key, []).append((int(row["step"]), float(val)))
    return series


def plot_training_curves(logs: dict[str, str | Path], path: str | Path) -> Path:
    """Training loss and validation mIoU against steps, one line per run ``{label: log.csv}``."""
    fig, (ax_l, ax_m) = plt.subplots(1, 2, figsize=(10, 3.6))
    for label, log_path in logs.items():
        s = read_log(log_path)
        if "loss" in s:
            ax_l.plot(*zip(*s["loss"]), label=plain_text(label))
        if "val_mIoU" in s:
            steps, vals = zip(*s["val_mIoU"])
            ax_m.plot(steps, [100 * v for v in vals], marker="o", ms=3, label=plain_text(label))
    ax_l.set(xlabel="step", ylabel="training loss", title="loss")
    ax_l.set_yscale("log")
    ax_m.set(xlabel="step", ylabel="val mIoU (%)", title="validation mIoU", ylim=(0, 100))
    if not ax_m.lines:  # a run without validation (data.val_split null)
        ax_m.text(0.5, 0.5, "no validation split", ha="center", va="center", color="0.4")
    for ax in (ax_l, ax_m):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig: plt.Figure, path: str | Path) -> Path:
    """Write ``fig`` to ``path`` in the format its suffix names (atomically), then close it.

    Raises:
        DataError: Unknown picture format, or the folder cannot be written.
    """
    path = Path(path)
    try:
        fmt = path.suffix[1:].lower()
        if fmt not in fig.canvas.get_supported_filetypes():
            known = ", ".join(f".{k}" for k in ("png", "pdf", "svg", "jpg"))
            raise DataError(f"cannot write picture {show_path(path)}: use a suffix such as {known}")
        with atomic_write(path, "picture") as fh:
            fig.savefig(fh, dpi=110, format=fmt)
    finally:
        plt.close(fig)
    return path


def grid_shape(n: int) -> tuple[int, int]:
    """Rows and columns of a near-square grid for ``n`` pictures."""
    cols = math.ceil(math.sqrt(n))
    return math.ceil(n / cols), cols


def instance_colors(n: int, seed: int = 0) -> list[tuple[int, int, int]]:
    """``n`` distinct, saturated colours (hues spaced by the golden ratio)."""
    import colorsys

    out = []
    for i in range(n):
        hue = (seed * 0.131 + i * 0.618033988749895) % 1.0
        r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 0.95)
        out.append((round(255 * r), round(255 * g), round(255 * b)))
    return out


def draw_instances(
    image: np.ndarray | object,
    boxes: object,
    labels: object,
    masks: object,
    *,
    scores: object | None = None,
    class_names: Sequence[str] | None = None,
    alpha: float = 0.5,
) -> np.ndarray:
    """Draw instances over an image: each mask in a colour of its own, its box, class and score.

    Args:
        image: ``uint8`` tensor ``(C, H, W)`` or array ``(H, W, 3)`` / ``(H, W)``.
        boxes: ``(N, 4)`` XYXY pixels.
        labels: ``(N,)`` class indices (names from ``class_names``).
        masks: ``(N, H, W)`` binary masks.
        scores: ``(N,)`` scores shown next to the names, or None.
        class_names: names by class index; default ``class_<i>``.
        alpha: mask opacity.

    Returns:
        ``uint8 (H, W, 3)``.
    """
    from PIL import Image, ImageDraw

    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = arr.transpose(1, 2, 0)  # (C, H, W) tensor -> (H, W, C)
    if arr.ndim == 2:
        arr = arr[..., None]
    rgb = np.repeat(arr, 3, axis=2) if arr.shape[2] == 1 else arr[..., :3]
    out = rgb.astype(np.float32)
    m = np.asarray(masks).astype(bool)
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    lab = np.asarray(labels).reshape(-1).astype(int)
    colors = instance_colors(len(lab))
    for mask, color in zip(m, colors):
        out[mask] = (1 - alpha) * out[mask] + alpha * np.array(color, dtype=np.float32)
    picture = Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    sc = None if scores is None else np.asarray(scores).reshape(-1)
    for i, (box, label, color) in enumerate(zip(b, lab, colors)):
        draw.rectangle([float(v) for v in box], outline=color, width=2)
        known = class_names is not None and 0 <= label < len(class_names)
        name = show_path(class_names[label]) if known else f"class_{label}"
        text = f"{name} {sc[i]:.2f}" if sc is not None else name
        x, y = float(box[0]), max(0.0, float(box[1]) - 11)
        left, top, right, bottom = draw.textbbox((x, y), text)
        draw.rectangle([left - 1, top - 1, right + 1, bottom + 1], fill=color)
        draw.text((x, y), text, fill=(0, 0, 0))
    return np.asarray(picture)
