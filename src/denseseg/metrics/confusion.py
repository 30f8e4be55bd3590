"""Streaming confusion matrix and every semantic-segmentation metric derived from it.

One ``(C, C)`` int64 matrix (rows = ground truth, columns = prediction) is accumulated over the
whole dataset; all metrics are computed from it at the end, so per-image averaging never enters
and a distributed evaluation only has to sum one small matrix across processes.

Definitions follow the FCN paper (Long et al., CVPR 2015, section 5) with ``n_ij`` the pixels of
class ``i`` predicted as ``j``, ``t_i = sum_j n_ij`` and ``p_j = sum_i n_ij``::

    aAcc   = sum_i n_ii / sum_i t_i              Acc_i  = Recall_i = n_ii / t_i
    IoU_i  = n_ii / (t_i + p_i - n_ii)           Dice_i = 2 n_ii / (t_i + p_i)
    fwIoU  = sum_i t_i IoU_i / sum_i t_i         Precision_i = n_ii / p_i
    Fscore_i = (1 + beta^2) P_i R_i / (beta^2 P_i + R_i)      (mmsegmentation's definition)

How a ratio 0/0 (a class with nothing to measure) is treated is the ``absent`` policy:

* ``"nan"`` (default; mmsegmentation's ``IoUMetric`` and the original FCN evaluation): 0/0 is NaN
  and NaNs are left out of the means. A class absent from both ground truth and prediction is
  NaN everywhere; a class predicted but absent from the ground truth has IoU = Dice = Precision =
  0 and Acc = Recall = NaN; a class never predicted has Precision NaN. As in mmsegmentation the
  F-score is built from P and R, so it is NaN whenever P or R is NaN or both are 0 (such classes
  then drop out of mFscore, while Dice, which equals F1, counts them as 0).
* ``"zero"``: every 0/0 counts as 0 and every mean runs over all classes (this is
  segmentation_models_pytorch with ``zero_division=0`` or ``"warn"``; note that its own default,
  ``zero_division=1.0``, would count a class absent from both sides as a perfect 1).
* ``"gt_only"`` (detectron2's ``SemSegEvaluator``): only classes present in the ground truth
  (``t_i > 0``) get values and enter the means; the rest are NaN. Within those, the two ratios
  that can still be 0/0 (Precision of a class never predicted, F-score when P = R = 0) count as 0.

Predictions outside ``[0, C)`` on a valid pixel are counted as a miss for the ground-truth class:
they raise ``t_i`` (hurting Acc, IoU, Dice, Recall of that class) but are a false positive for no
class. They are kept in a hidden extra column, so :attr:`SegmentationMetrics.confusion` stays
``(C, C)`` and :attr:`SegmentationMetrics.out_of_range_predictions` reports them.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from denseseg.checkpoint.files import atomic_write, show_path
from denseseg.errors import ConfigError, DataError

ABSENT_POLICIES = ("nan", "zero", "gt_only")
PER_CLASS_KEYS = ("IoU", "Acc", "Dice", "Precision", "Recall", "Fscore")
SUMMARY_KEYS = ("aAcc", "mAcc", "mIoU", "fwIoU", "mDice", "mFscore")

# Pixels per slice on the CPU path: the uint16 pair index of a slice (512 KiB) and bincount's
# intp copy of it stay in the L2 cache: 1.3-1.8x faster than one whole-image pass (measured).
_CHUNK = 1 << 18
_SAT = 255  # wide integer labels are clipped to this byte value before pairing

Array = np.ndarray | torch.Tensor


# ----------------------------------------------------------------------------------- counting


def _to_numpy_labels(x: Any, name: str) -> np.ndarray:
    """Return ``x`` as an integer numpy array (a view where possible); bool becomes uint8."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if not x.dtype.isnative:  # the byte tricks below reinterpret memory in native order
        x = x.astype(x.dtype.newbyteorder("="))
    if x.dtype == np.bool_:
        return x.view(np.uint8)
    if not np.issubdtype(x.dtype, np.integer):
        raise TypeError(
            f"{name} must hold integer class indices, got dtype {x.dtype}; "
            "pass e.g. logits.argmax(dim=1) rather than scores"
        )
    return x


def _to_u8(x: np.ndarray, buf: np.ndarray) -> tuple[np.ndarray, bool]:
    """Class indices as bytes, and whether values outside [0, 255] were saturated to 255."""
    if x.dtype == np.uint8:
        return x, False
    if x.dtype.itemsize == 1:  # int8: negatives would wrap into [128, 255] and look valid
        x = x.astype(np.int16)
    # Viewed as unsigned, negative values become huge, so one max() checks both ends.
    unsigned = x.view(np.dtype(f"u{x.dtype.itemsize}"))
    out = buf[: x.size]
    if x.size == 0 or unsigned.max() <= _SAT:
        np.copyto(out, unsigned, casting="unsafe")
        return out, False
    np.minimum(unsigned, _SAT, out=out, casting="unsafe")
    return out, True


def _pair_histogram(target: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, bool]:
    """Joint histogram ``(256, 256)`` of byte-clipped (target, pred) pairs of two flat arrays.

    Returns:
        The histogram, and whether some target value outside [0, 255] was clipped into row 255.
    """
    n = target.size
    counts = np.zeros(1 << 16, dtype=np.int64)
    size = min(n, _CHUNK)
    pair = np.empty(size, dtype=np.uint16)
    tbuf = np.empty(size, dtype=np.uint8)
    pbuf = np.empty(size, dtype=np.uint8)
    clipped = False
    for start in range(0, n, _CHUNK):
        t, t_clipped = _to_u8(target[start : start + _CHUNK], tbuf)
        p, _ = _to_u8(pred[start : start + _CHUNK], pbuf)
        clipped |= t_clipped
        k = t.size
        # (target << 8) | pred: one small-dtype index per pixel, no mask and no copy of the
        # valid pixels; ignored or invalid targets land in rows that are folded away later.
        np.left_shift(t, 8, out=pair[:k], dtype=np.uint16)
        np.bitwise_or(pair[:k], p, out=pair[:k])
        counts += np.bincount(pair[:k], minlength=1 << 16)
    return counts.reshape(256, 256), clipped


def _bad_target_error(
    target: np.ndarray | torch.Tensor, num_classes: int, ignore: int
) -> DataError:
    """Build the DataError naming the offending target values and their pixel counts."""
    if isinstance(target, torch.Tensor):
        t = target.reshape(-1).to(torch.int64)
        bad = t[((t < 0) | (t >= num_classes)) & (t != ignore)]
        values, counts = (v.cpu().numpy() for v in torch.unique(bad, return_counts=True))
    else:
        t = target.reshape(-1).astype(np.int64)
        bad = t[((t < 0) | (t >= num_classes)) & (t != ignore)]
        values, counts = np.unique(bad, return_counts=True)
    shown = ", ".join(f"{v} ({c} px)" for v, c in zip(values[:10].tolist(), counts[:10].tolist()))
    more = f" and {len(values) - 10} more values" if len(values) > 10 else ""
    return DataError(
        f"target holds label value(s) {shown}{more} outside [0, {num_classes}) that are not "
        f"ignore_index={ignore}; fix the label maps, or set num_classes / ignore_index to match "
        "the dataset"
    )


def _count_bytes(pred: np.ndarray, target: np.ndarray, num_classes: int, ignore: int) -> np.ndarray:
    """Counts ``(C, C + 1)`` for ``C <= 255`` through the byte-pair histogram (the fast path)."""
    c = num_classes
    h, clipped = _pair_histogram(target, pred)
    exact = not clipped  # otherwise row 255 also holds clipped out-of-range values
    rows = h.sum(axis=1)
    ignored = np.zeros(256, dtype=bool)
    mixed = False  # row 255 holds both the ignore label and invalid values
    if 0 <= ignore < _SAT or (exact and ignore == _SAT):
        ignored[ignore] = True
    elif not exact:
        mixed = True
    invalid = int(rows[c:][~ignored[c:]].sum())
    if mixed and rows[_SAT] > 0:
        invalid -= int(np.count_nonzero(target == ignore))
    if invalid > 0:
        raise _bad_target_error(target, c, ignore)
    out = np.empty((c, c + 1), dtype=np.int64)
    out[:, :c] = h[:c, :c]
    out[:, c] = h[:c, c:].sum(axis=1)
    if ignored[:c].any():  # an ignore label inside the class range silences that class's row
        out[ignored[:c]] = 0
    return out


def _count_wide(pred: np.ndarray, target: np.ndarray, num_classes: int, ignore: int) -> np.ndarray:
    """Counts ``(C, C + 1)`` for any class count (used when ``C > 255``)."""
    c = num_classes
    t = target.astype(np.int64, copy=False)
    p = pred.astype(np.int64, copy=False)
    valid = (t >= 0) & (t < c)
    keep = valid & (t != ignore)
    if np.count_nonzero(keep | (t == ignore)) != t.size:
        raise _bad_target_error(target, c, ignore)
    col = np.where((p >= 0) & (p < c), p, c)
    idx = t[keep] * (c + 1) + col[keep]
    return np.bincount(idx, minlength=c * (c + 1)).reshape(c, c + 1)


def _count_torch(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore: int
) -> np.ndarray:
    """Counts ``(C, C + 1)`` on the tensors' device (CUDA): one bincount, one small copy back."""
    c = num_classes
    t = target.reshape(-1).to(torch.int64)
    p = pred.reshape(-1).to(torch.int64)
    # Ignored pixels go to row C and invalid targets to row C + 1 instead of being masked out,
    # so shapes stay fixed and the only host sync is the final copy of the small histogram.
    row = torch.where((t >= 0) & (t < c), t, c + 1)
    row = torch.where(t == ignore, c, row)
    col = torch.where((p >= 0) & (p < c), p, c)
    h = torch.bincount(row * (c + 1) + col, minlength=(c + 2) * (c + 1))
    h = h.view(c + 2, c + 1).cpu().numpy()
    if h[c + 1].sum() > 0:
        raise _bad_target_error(target, c, ignore)
    return h[:c].astype(np.int64)


def count_pairs(pred: Any, target: Any, num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """Confusion counts of one batch, with out-of-range predictions in an extra last column.

    Args:
        pred: predicted class indices, numpy array or tensor (CPU or CUDA), any integer dtype,
            shape ``(H, W)`` or ``(N, H, W)`` (any shape equal to ``target``'s).
        target: ground-truth class indices of the same shape; ``ignore_index`` marks pixels that
            count nowhere.
        num_classes: number of classes ``C``.
        ignore_index: label of pixels to skip (may lie inside or outside ``[0, C)``).

    Returns:
        int64 array ``(C, C + 1)``: entry ``[i, j]`` counts pixels of true class ``i`` predicted
        as ``j``; column ``C`` counts predictions outside ``[0, C)``.

    Raises:
        DataError: shapes differ, or ``target`` holds values outside ``[0, C)`` other than
            ``ignore_index`` (the message lists the values and their pixel counts).
    """
    if not isinstance(pred, torch.Tensor):
        pred = _to_numpy_labels(pred, "pred")
    if not isinstance(target, torch.Tensor):
        target = _to_numpy_labels(target, "target")
    if tuple(pred.shape) != tuple(target.shape):
        raise DataError(
            f"prediction shape {tuple(pred.shape)} differs from target shape "
            f"{tuple(target.shape)}; resize or crop the prediction to the label map"
        )
    on_gpu = [x.device for x in (pred, target) if isinstance(x, torch.Tensor) and not x.is_cpu]
    if on_gpu:
        device = on_gpu[0]
        pred, target = (
            torch.as_tensor(x if isinstance(x, torch.Tensor) else x.astype(np.int64), device=device)
            for x in (pred, target)
        )
        for x, name in ((pred, "pred"), (target, "target")):
            if x.is_floating_point() or x.is_complex():
                raise TypeError(f"{name} must hold integer class indices, got dtype {x.dtype}")
        return _count_torch(pred, target, num_classes, ignore_index)
    p = _to_numpy_labels(pred, "pred").reshape(-1)
    t = _to_numpy_labels(target, "target").reshape(-1)
    if num_classes <= _SAT:
        return _count_bytes(p, t, num_classes, ignore_index)
    return _count_wide(p, t, num_classes, ignore_index)


# ----------------------------------------------------------------------------------- metrics


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``num / den`` elementwise with NaN wherever ``den`` is 0 (or NaN): the 0/0 cases."""
    num, den = np.broadcast_arrays(np.asarray(num, float), np.asarray(den, float))
    out = np.full(num.shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _plain_mean(x: np.ndarray) -> float:
    return float(x.mean())


def _nanmean(x: np.ndarray) -> float:
    finite = x[~np.isnan(x)]
    return float(finite.mean()) if finite.size else math.nan


def metrics_from_confusion(
    counts: np.ndarray, absent: str = "nan", beta: float = 1.0
) -> dict[str, Any]:
    """Every semantic metric from accumulated confusion counts.

    Args:
        counts: int array ``(C, C)`` (rows = ground truth, columns = prediction) or ``(C, C + 1)``
            whose last column counts predictions outside ``[0, C)`` (misses of the row's class).
        absent: 0/0 policy, ``"nan"``, ``"zero"`` or ``"gt_only"`` (see the module docstring).
        beta: weight of recall in the F-score.

    Returns:
        ``aAcc, mAcc, mIoU, fwIoU, mDice, mFscore`` as floats, ``IoU, Acc, Dice, Precision,
        Recall, Fscore`` as lists of ``C`` floats (NaN allowed), all fractions in ``[0, 1]``, and
        ``num_pixels`` (int), the pixels counted (ignored ones excluded).
    """
    if absent not in ABSENT_POLICIES:
        raise ConfigError(f"absent={absent!r} is not a policy; use one of {ABSENT_POLICIES}")
    counts = np.asarray(counts)
    c = counts.shape[0]
    if counts.ndim != 2 or counts.shape[1] not in (c, c + 1):
        raise ValueError(f"counts must have shape (C, C) or (C, C + 1), got {counts.shape}")
    tp = np.diagonal(counts[:, :c]).astype(float)
    t = counts.sum(axis=1).astype(float)  # includes out-of-range predictions: they are misses
    p = counts[:, :c].sum(axis=0).astype(float)
    b2 = float(beta) ** 2

    iou = _ratio(tp, t + p - tp)
    acc = _ratio(tp, t)
    dice = _ratio(2 * tp, t + p)
    precision = _ratio(tp, p)
    if absent == "zero":
        iou, acc, dice, precision = (np.nan_to_num(v, nan=0.0) for v in (iou, acc, dice, precision))
    elif absent == "gt_only":
        present = t > 0
        precision[present & (p == 0)] = 0.0
    # mmsegmentation's F-score from P and R: NaN in, NaN out, and P = R = 0 gives 0/0.
    fscore = _ratio((1 + b2) * precision * acc, b2 * precision + acc)
    if absent == "zero":
        fscore = np.nan_to_num(fscore, nan=0.0)
    elif absent == "gt_only":
        fscore[present & np.isnan(fscore)] = 0.0
        for v in (iou, acc, dice, precision, fscore):
            v[~present] = np.nan

    total = t.sum()
    a_acc = _ratio(tp.sum(), total)
    # Classes whose IoU is NaN have t_i = 0, so dropping them leaves the weights' sum unchanged.
    fw_iou = _ratio(np.nansum(t * iou), total)
    mean = _nanmean
    if absent == "zero":
        mean = _plain_mean
        a_acc, fw_iou = np.nan_to_num(a_acc), np.nan_to_num(fw_iou)
    return {
        "aAcc": float(a_acc),
        "mAcc": mean(acc),
        "mIoU": mean(iou),
        "fwIoU": float(fw_iou),
        "mDice": mean(dice),
        "mFscore": mean(fscore),
        "IoU": iou.tolist(),
        "Acc": acc.tolist(),
        "Dice": dice.tolist(),
        "Precision": precision.tolist(),
        "Recall": acc.tolist(),
        "Fscore": fscore.tolist(),
        "num_pixels": int(counts.sum()),
    }


class SegmentationMetrics:
    """Streaming semantic-segmentation metrics over one confusion matrix.

    Example::

        metrics = SegmentationMetrics(num_classes=19, ignore_index=255)
        for images, targets in loader:
            metrics.update(model(images)["out"].max(1).indices, targets)
        metrics.all_reduce()          # sums over processes; a no-op without torch.distributed
        results = metrics.compute()   # {"mIoU": 0.71, "IoU": [...], ...}

    Args:
        num_classes: number of classes ``C``; valid labels are ``0 .. C - 1``.
        ignore_index: target label of pixels that count nowhere (default 255, as in VOC and
            Cityscapes train ids).
        absent: how 0/0 ratios of absent classes are treated: ``"nan"`` (mmsegmentation),
            ``"zero"`` (0/0 = 0, means over all classes) or ``"gt_only"`` (detectron2: only
            classes present in the ground truth); see the module docstring.
        beta: weight of recall in the F-score (1 gives F1).
    """

    def __init__(
        self, num_classes: int, ignore_index: int = 255, absent: str = "nan", beta: float = 1.0
    ) -> None:
        if int(num_classes) != num_classes or num_classes < 1:
            raise ConfigError(f"num_classes must be a positive integer, got {num_classes!r}")
        if absent not in ABSENT_POLICIES:
            raise ConfigError(f"absent={absent!r} is not a policy; use one of {ABSENT_POLICIES}")
        if not beta > 0:
            raise ConfigError(f"beta must be positive, got {beta!r}")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.absent = absent
        self.beta = float(beta)
        self._counts = np.zeros((self.num_classes, self.num_classes + 1), dtype=np.int64)

    def update(self, pred: Array, target: Array) -> None:
        """Add one image or batch.

        Args:
            pred: predicted class indices ``(H, W)`` or ``(N, H, W)``, numpy array or tensor on
                any device, any integer dtype (uint8 included). Values outside ``[0, C)`` count
                as misses of the pixel's true class.
            target: ground truth of the same shape; ``ignore_index`` pixels are skipped.

        Raises:
            DataError: shapes differ, or ``target`` holds a value outside ``[0, C)`` that is not
                ``ignore_index``; nothing is added in that case.
        """
        self._counts += count_pairs(pred, target, self.num_classes, self.ignore_index)

    def reset(self) -> None:
        """Forget everything accumulated so far."""
        self._counts[...] = 0

    @property
    def confusion(self) -> np.ndarray:
        """int64 ``(C, C)`` copy of the matrix: rows = ground truth, columns = prediction."""
        return self._counts[:, : self.num_classes].copy()

    @property
    def out_of_range_predictions(self) -> np.ndarray:
        """int64 ``(C,)``: pixels of each true class whose prediction was outside ``[0, C)``."""
        return self._counts[:, self.num_classes].copy()

    @property
    def num_pixels(self) -> int:
        """Number of pixels counted so far (ignored pixels excluded)."""
        return int(self._counts.sum())

    def compute(self) -> dict[str, Any]:
        """Metrics of everything accumulated (see :func:`metrics_from_confusion`)."""
        return metrics_from_confusion(self._counts, self.absent, self.beta)

    def merge(self, other: SegmentationMetrics) -> SegmentationMetrics:
        """Add the counts of ``other`` (e.g. from another worker) into this one; returns self."""
        if not isinstance(other, SegmentationMetrics):
            return NotImplemented
        if (other.num_classes, other.ignore_index) != (self.num_classes, self.ignore_index):
            raise ValueError(
                "cannot merge metrics with (num_classes, ignore_index) "
                f"{(other.num_classes, other.ignore_index)} into "
                f"{(self.num_classes, self.ignore_index)}"
            )
        self._counts += other._counts
        return self

    def __iadd__(self, other: SegmentationMetrics) -> SegmentationMetrics:
        return self.merge(other)

    def all_reduce(self, group: Any = None) -> SegmentationMetrics:
        """Sum the matrix over all processes of ``group``; a no-op unless torch.distributed runs.

        Call it once per evaluation on every rank, after the last :meth:`update`: each call adds
        the other ranks' counts again. The counts travel on the current CUDA device for NCCL and
        on the CPU otherwise. Returns self.
        """
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()):
            return self
        device = torch.device("cpu")
        if dist.get_backend(group) == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        counts = torch.from_numpy(self._counts).to(device, copy=True)
        dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=group)
        self._counts[...] = counts.cpu().numpy()
        return self

    def __repr__(self) -> str:
        return (
            f"SegmentationMetrics(num_classes={self.num_classes}, ignore_index="
            f"{self.ignore_index}, absent={self.absent!r}, beta={self.beta}, "
            f"num_pixels={self.num_pixels})"
        )


# ----------------------------------------------------------------------------------- reporting


def _is_missing(v: float | None) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _pct(v: float | None) -> str:
    return "nan" if _is_missing(v) else f"{100 * v:.2f}"


def _names(results: Mapping[str, Any], class_names: Sequence[str] | None) -> list[str]:
    num = len(results["IoU"])
    if class_names is None:
        return [str(i) for i in range(num)]
    if len(class_names) != num:
        raise ValueError(f"got {len(class_names)} class names for {num} classes")
    return [str(n) for n in class_names]


def _markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A Markdown table: first column left-aligned, the others right-aligned."""
    table = [list(header), *map(list, rows)]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    lines = [
        "| "
        + " | ".join([r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])])
        + " |"
        for r in table
    ]
    rule = "|" + "|".join([":" + "-" * (widths[0] + 1)] + ["-" * (w + 1) + ":" for w in widths[1:]])
    return [lines[0], rule + "|", *lines[1:]]


def format_table(results: Mapping[str, Any], class_names: Sequence[str] | None = None) -> str:
    """Per-class and summary tables (Markdown), values as percentages with 2 decimals.

    Args:
        results: the dict of :meth:`SegmentationMetrics.compute` (or that dict reloaded from
            ``metrics.json``, where NaN became ``None``).
        class_names: one name per class; ``None`` numbers the classes.

    Returns:
        A per-class table (IoU, Acc, Dice, Precision, Recall, Fscore), a blank line, and a
        one-row table of aAcc, mAcc, mIoU, fwIoU, mDice, mFscore. NaN prints as ``nan``.
    """
    names = [show_path(n) for n in _names(results, class_names)]  # escape control characters
    rows = [[name, *(_pct(results[k][i]) for k in PER_CLASS_KEYS)] for i, name in enumerate(names)]
    per_class = _markdown(["Class", *PER_CLASS_KEYS], rows)
    summary = _markdown(
        ["Summary", *SUMMARY_KEYS], [["all", *(_pct(results[k]) for k in SUMMARY_KEYS)]]
    )
    return "\n".join([*per_class, "", *summary])


def _nan_to_none(v: Any) -> Any:
    if isinstance(v, Mapping):
        return {k: _nan_to_none(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_nan_to_none(x) for x in v]
    if isinstance(v, float) and math.isnan(v):
        return None
    return v


def save_results(
    results: Mapping[str, Any],
    class_names: Sequence[str] | None,
    out_dir: str | Path,
    *,
    confusion: np.ndarray | None = None,
) -> dict[str, Path]:
    """Write ``metrics.json`` and ``per_class.csv`` into ``out_dir`` (created if missing).

    ``metrics.json`` holds the keys of ``results`` unchanged (fractions in ``[0, 1]``, NaN
    written as ``null`` so the file is strict JSON), plus ``class_names`` and ``confusion``
    (rows = ground truth, columns = prediction; ``null`` when not given). ``per_class.csv`` has
    one row per class: ``class, IoU, Acc, Dice, Precision, Recall, Fscore`` as fractions, NaN as
    an empty field; a class name that a spreadsheet would run as a formula (starting with ``=``,
    ``+``, ``-``, ``@``, tab or carriage return) gets a leading ``'``, as OWASP advises. Both
    files are UTF-8, each replaced atomically (a symbolic link at its name is replaced, not
    followed).

    Args:
        results: the dict of :meth:`SegmentationMetrics.compute`.
        class_names: one name per class, or ``None`` to number them.
        out_dir: directory to write into.
        confusion: the ``(C, C)`` matrix to store, usually ``metrics.confusion``; with more
            than :data:`MAX_JSON_CLASSES` classes it is written to ``confusion.npy`` and the
            JSON names that file.

    Returns:
        ``{"json": path, "csv": path}``.

    Raises:
        DataError: ``out_dir`` cannot be written.
    """
    names = _names(results, class_names)
    out = Path(out_dir)
    payload = dict(_nan_to_none(dict(results)))
    payload["class_names"] = names
    payload["confusion"] = _confusion_entry(confusion, out)
    json_path = out / "metrics.json"
    with atomic_write(json_path, "metrics file") as fh:
        fh.write((json.dumps(payload, indent=2, allow_nan=False) + "\n").encode())
    rows = io.StringIO(newline="")
    writer = csv.writer(rows)
    writer.writerow(["class", *PER_CLASS_KEYS])
    for i, name in enumerate(names):
        values = (results[k][i] for k in PER_CLASS_KEYS)
        cells = ("" if _is_missing(v) else repr(float(v)) for v in values)
        writer.writerow([_csv_safe(name), *cells])
    csv_path = out / "per_class.csv"
    with atomic_write(csv_path, "metrics file") as fh:
        fh.write(rows.getvalue().encode("utf-8", "backslashreplace"))
    return {"json": json_path, "csv": csv_path}


MAX_JSON_CLASSES = 256
"""Above this many classes the confusion matrix goes to ``confusion.npy``, not into the JSON
(10,000 classes would make a gigabyte of text)."""


def _confusion_entry(confusion: np.ndarray | None, out: Path) -> Any:
    if confusion is None:
        return None
    cm = np.asarray(confusion)
    if len(cm) <= MAX_JSON_CLASSES:
        return cm.tolist()
    with atomic_write(out / "confusion.npy", "confusion matrix") as fh:
        np.save(fh, cm)
    return "confusion.npy"


def _csv_safe(text: str) -> str:
    """``text`` with a leading ``'`` when a spreadsheet would read it as a formula (OWASP)."""
    return f"'{text}" if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text
