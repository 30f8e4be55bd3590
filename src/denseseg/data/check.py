"""``check-data``: read every item of a dataset once, count class pixels, list what is wrong.

One pass per split does both jobs: the per-item checks are the dataset's own
(``dataset.load``, the loader ``check()`` runs: unreadable files, image/mask size and channel
mismatches, label values outside the classes, each named with its file), and the class pixel
histogram is :func:`denseseg.data.stats.class_frequency_counts`, fed through a view whose
targets come from those same loads, so no file is read twice and the progress bar covers the
whole scan.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from denseseg.data.datasets.base import SplitNotFound
from denseseg.data.io import show_path
from denseseg.data.palette import Color
from denseseg.data.registry import get_dataset
from denseseg.data.stats import class_frequency_counts
from denseseg.errors import DataError
from denseseg.progress import tqdm
from denseseg.viz import MAX_LABELLED, _plain_all, _save, plain_text, plt  # Agg: set up in viz

__all__ = [
    "DataReport",
    "SplitReport",
    "check_dataset",
    "check_split",
    "format_report",
    "plot_class_histogram",
]

DEFAULT_SPLITS = ("train", "val")


@dataclass
class SplitReport:
    """What one split holds.

    Attributes:
        split: Split name.
        images: Number of items.
        pixel_counts: ``int64 (num_classes,)`` pixels per class over the readable items.
        image_pixel_counts: ``int64 (num_classes,)`` pixels of the images holding each class.
        ignored_pixels: Pixels labelled ``ignore_index`` over the readable items.
        problems: One message per faulty item, each naming its file.
    """

    split: str
    images: int
    pixel_counts: np.ndarray
    image_pixel_counts: np.ndarray
    ignored_pixels: int = 0
    problems: list[str] = field(default_factory=list)


@dataclass
class DataReport:
    """The result of :func:`check_dataset`.

    Attributes:
        dataset: Format name.
        root: Dataset folder.
        classes: Class names.
        palette: One colour per class.
        ignore_index: The ignored label.
        splits: One :class:`SplitReport` per split that could be opened.
        errors: Splits that could not be opened at all, as ``"<split>: <message>"``.
        notes: Default splits that do not exist (not problems).
    """

    dataset: str
    root: str | None
    classes: list[str]
    palette: list[Color]
    ignore_index: int
    splits: list[SplitReport] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def problems(self) -> list[str]:
        """Every problem, one line each, prefixed with its split."""
        lines = [show_path(" ".join(e.split())) for e in self.errors]
        for s in self.splits:
            lines += [show_path(f"{s.split}: {' '.join(p.split())}") for p in s.problems]
        return lines

    @property
    def ok(self) -> bool:
        """True when no split has a problem."""
        return not self.problems


class _LoadingView:
    """A dataset seen by ``class_frequency_counts``: each target is loaded together with its
    image through ``dataset.load`` (which raises :class:`DataError` on any fault); a faulty
    item is recorded and contributes an empty target."""

    def __init__(self, dataset: Any, bar: Any) -> None:
        self.dataset, self.bar = dataset, bar
        self.num_classes = dataset.num_classes
        self.ignore_index = dataset.ignore_index
        self.problems: list[str] = []
        self.ignored = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def load_target(self, index: int) -> torch.Tensor:
        try:
            _, target = self.dataset.load(index)
        except DataError as exc:
            self.problems.append(str(exc))
            target = torch.zeros(0, dtype=torch.int64)
        finally:
            self.bar.update(1)
        if not isinstance(target, torch.Tensor):  # instance targets carry no label map
            return torch.zeros(0, dtype=torch.int64)
        self.ignored += int((target == self.ignore_index).sum())
        return target


def check_split(dataset: Any, split: str, *, progress: bool = True) -> SplitReport:
    """Scan one opened split.

    Args:
        dataset: A dataset from :func:`~denseseg.data.registry.get_dataset` (no transforms).
        split: Its name, for the report.
        progress: Show a progress bar.

    Returns:
        The split's :class:`SplitReport`.
    """
    with tqdm(
        total=len(dataset), desc=f"check {split}", unit="img", disable=not progress, leave=False
    ) as bar:
        view = _LoadingView(dataset, bar)
        pixels, image_pixels = class_frequency_counts(view)
    return SplitReport(split, len(dataset), pixels, image_pixels, view.ignored, view.problems)


def check_dataset(
    dataset: str,
    root: str | Path | None,
    splits: Sequence[str] | None = None,
    *,
    options: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> DataReport:
    """Check a dataset split by split.

    Args:
        dataset: Format name (``folder``, ``camvid``, ...).
        root: Dataset folder.
        splits: Splits to scan; ``None`` scans ``train`` and ``val`` where they exist (a
            missing default split is a note, not a problem, unless none exists). A split that
            is asked for and does not exist, or that exists but fails to open (the first image
            unreadable, a mask missing: what ``train`` would stop on), is a problem.
        options: Format options passed to ``get_dataset`` (e.g. the demo data's).
        progress: Show a progress bar per split.

    Returns:
        The :class:`DataReport`. Raises :class:`DataError` only when none of the splits exists.
    """
    if root is not None and not Path(root).is_dir():  # not a problem of a split: one error
        raise DataError(f"dataset folder {show_path(root)} does not exist; check --root")
    explicit = splits is not None
    names = list(splits) if explicit else list(DEFAULT_SPLITS)
    report: DataReport | None = None
    errors: list[str] = []
    notes: list[str] = []
    opened: list[tuple[str, Any]] = []
    broken = False  # a split exists but fails to open: a problem even when no split opens
    for name in names:
        try:
            opened.append((name, get_dataset(dataset, root, name, **dict(options or {}))))
        except DataError as exc:
            missing = isinstance(exc, SplitNotFound)
            broken |= not missing
            (notes if missing and not explicit else errors).append(f"{name}: {exc}")
    if not opened and not broken:
        detail = "; ".join(errors or notes)
        raise DataError(f"no split of {show_path(root or dataset)} could be opened ({detail})")
    first = opened[0][1] if opened else None
    report = DataReport(
        dataset,
        None if root is None else str(root),
        list(first.classes) if first else [],
        [tuple(c) for c in first.palette] if first else [],
        int(first.ignore_index) if first else 255,
        errors=errors,
        notes=notes,
    )
    for name, ds in opened:
        report.splits.append(check_split(ds, name, progress=progress))
    return report


def format_report(report: DataReport) -> str:
    """A plain-text summary: images per split and a class pixel table (count and share).

    Args:
        report: From :func:`check_dataset`.

    Returns:
        Lines of text (without the problem list; see :attr:`DataReport.problems`).
    """
    lines = [f"dataset {report.dataset} at {show_path(report.root or '')}"]
    for s in report.splits:
        lines.append(f"  {s.split}: {s.images} images, {len(s.problems)} with problems")
    lines += [f"  note: {n.splitlines()[0]}" for n in report.notes]
    width = max([len(c) for c in report.classes] + [len("ignored"), len("class")])
    header = f"{'id':>4}  {'class':<{width}}"
    for s in report.splits:
        header += f"  {s.split + ' pixels':>16} {'share':>7}"
    lines += ["", header]
    totals = [max(int(s.pixel_counts.sum()), 1) for s in report.splits]
    for i, name in enumerate(report.classes):
        row = f"{i:>4}  {name:<{width}}"
        for s, total in zip(report.splits, totals):
            row += f"  {int(s.pixel_counts[i]):>16,} {100 * s.pixel_counts[i] / total:>6.2f}%"
        lines.append(row)
    row = f"{report.ignore_index:>4}  {'ignored':<{width}}"
    for s in report.splits:
        row += f"  {s.ignored_pixels:>16,} {'':>7}"
    lines.append(row)
    absent = [
        f"{s.split}: {', '.join(c for c, n in zip(report.classes, s.pixel_counts) if n == 0)}"
        for s in report.splits
        if (s.pixel_counts == 0).any()
    ]
    if absent:
        lines += ["", "classes without pixels: " + "; ".join(absent)]
    return "\n".join(lines)


def plot_class_histogram(report: DataReport, path: str | Path) -> Path:
    """Bar chart of pixels per class (log scale), one bar group per class, one bar per split.

    Args:
        report: From :func:`check_dataset`.
        path: PNG file to write (folders are created).

    Returns:
        ``path``.
    """
    n, k = len(report.classes), max(len(report.splits), 1)
    width_in = min(max(6.0, 0.45 * n * k + 2), 0.45 * MAX_LABELLED + 2)  # not a poster
    fig, ax = plt.subplots(figsize=(width_in, 4.2))
    width = 0.8 / k
    colors = [np.array(c) / 255.0 for c in report.palette]
    for j, s in enumerate(report.splits):
        x = np.arange(n) + (j - (k - 1) / 2) * width
        # Classes without pixels would vanish on a log axis; they are listed in the table.
        ax.bar(
            x,
            np.maximum(s.pixel_counts, 0),
            width,
            color=colors,
            edgecolor="black",
            linewidth=0.5,
            hatch=["", "//", "..", "xx"][j % 4],
            label=plain_text(f"{s.split} ({s.images} images)"),
        )
    ax.set_yscale("log")
    if n <= MAX_LABELLED:
        ax.set_xticks(range(n), _plain_all(report.classes), rotation=45 if n > 6 else 0, ha="right")
    else:
        ax.set_xlabel(f"class index (0 to {n - 1})")
    ax.set_ylabel("pixels (log scale)")
    title = plain_text(f"class pixels: {report.dataset} {report.root or ''}".strip())
    ax.set_title(title, fontsize=10)
    if len(report.splits) > 1:
        ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)
