"""Tests of denseseg.metrics: hand-worked cases, edge cases, and agreement with the definitions
of mmsegmentation, detectron2, segmentation_models_pytorch and torchmetrics."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch

from denseseg.errors import ConfigError, DataError
from denseseg.metrics import (
    SegmentationMetrics,
    count_pairs,
    format_table,
    metrics_from_confusion,
    save_results,
)
from denseseg.metrics import confusion as confusion_module

NAN = math.nan


def close(a, b, tol: float = 1e-9) -> bool:
    """Equality of floats or float lists where NaN equals NaN."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return a.shape == b.shape and bool(np.allclose(a, b, atol=tol, rtol=0, equal_nan=True))


def same_results(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(close(a[k], b[k]) for k in a)


def brute_counts(pred, target, num_classes: int, ignore_index: int) -> np.ndarray:
    """Pixel-by-pixel reference of count_pairs: (C, C + 1), last column = out-of-range preds."""
    c = num_classes
    out = np.zeros((c, c + 1), dtype=np.int64)
    for p, t in zip(np.asarray(pred).reshape(-1).tolist(), np.asarray(target).reshape(-1).tolist()):
        if t == ignore_index:
            continue
        out[t, p if 0 <= p < c else c] += 1
    return out


def random_maps(rng, shape, num_classes, ignore_index=255, ignore_frac=0.1, absent=()):
    """Random (pred, target) int64 maps; classes in ``absent`` never appear in the target."""
    target = rng.integers(0, num_classes, shape)
    pred = np.where(rng.random(shape) < 0.6, target, rng.integers(0, num_classes, shape))
    for a in absent:
        target[target == a] = (a + 1) % num_classes
    target[rng.random(shape) < ignore_frac] = ignore_index
    return pred, target


# ------------------------------------------------------------------------- hand-worked cases

# C = 3, ignore_index = 255.      target        pred
#                                 0 0 1         0 1 1
#                                 1 2 255       1 0 2   (the last pixel is ignored)
# Confusion n_ij (rows gt i, cols pred j): gt0 -> [1 1 0], gt1 -> [0 2 0], gt2 -> [1 0 0]
# t = [2 2 1], p = [2 3 0], n_ii = [1 2 0], 5 pixels counted.
# aAcc = 3/5.  Acc = [1/2, 1, 0] -> mAcc = 1/2.
# IoU = [1/(2+2-1), 2/(2+3-2), 0/(1+0-0)] = [1/3, 2/3, 0] -> mIoU = 1/3.
# fwIoU = (2*1/3 + 2*2/3 + 1*0) / 5 = 2/5.  Dice = [2/4, 4/5, 0/1] -> mDice = 1.3/3.
# Precision = [1/2, 2/3, 0/0]; F1 = [1/2, 2*(2/3)*1/(2/3+1) = 4/5, F(0/0, 0)].
# Class 2 is never predicted: its precision is 0/0, NaN under "nan" (F NaN too, as mmseg),
# 0 under "zero" and "gt_only" (class 2 is in the ground truth).
HAND_TARGET = np.array([[0, 0, 1], [1, 2, 255]])
HAND_PRED = np.array([[0, 1, 1], [1, 0, 2]])


@pytest.mark.parametrize("absent", ["nan", "zero", "gt_only"])
def test_hand_worked_2x3(absent):
    m = SegmentationMetrics(3, absent=absent)
    m.update(HAND_PRED, HAND_TARGET)
    assert m.confusion.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    assert m.confusion.dtype == np.int64 and m.num_pixels == 5
    r = m.compute()
    assert close(r["aAcc"], 0.6) and close(r["mAcc"], 0.5) and close(r["fwIoU"], 0.4)
    assert close(r["IoU"], [1 / 3, 2 / 3, 0]) and close(r["mIoU"], 1 / 3)
    assert close(r["Acc"], [0.5, 1, 0]) and close(r["Recall"], r["Acc"])
    assert close(r["Dice"], [0.5, 0.8, 0]) and close(r["mDice"], 1.3 / 3)
    p2 = NAN if absent == "nan" else 0.0
    assert close(r["Precision"], [0.5, 2 / 3, p2])
    assert close(r["Fscore"], [0.5, 0.8, p2])
    assert close(r["mFscore"], 0.65 if absent == "nan" else 1.3 / 3)
    assert r["num_pixels"] == 5
    assert all(isinstance(r[k], float) for k in ("aAcc", "mAcc", "mIoU", "fwIoU", "mDice"))
    assert all(isinstance(v, float) for v in r["IoU"])


# C = 4.  target 0 0 1 1, pred 0 2 1 1: class 2 is predicted but absent from the ground
# truth, class 3 appears nowhere.  t = [2 2 0 0], p = [1 2 1 0], n_ii = [1 2 0 0].
ABSENT_TARGET = np.array([[0, 0, 1, 1]])
ABSENT_PRED = np.array([[0, 2, 1, 1]])
ABSENT_EXPECTED = {
    "nan": dict(
        IoU=[0.5, 1, 0, NAN], Acc=[0.5, 1, NAN, NAN], Dice=[2 / 3, 1, 0, NAN],
        Precision=[1, 1, 0, NAN], Fscore=[2 / 3, 1, NAN, NAN],
        mIoU=0.5, mAcc=0.75, mDice=5 / 9, mFscore=5 / 6, aAcc=0.75, fwIoU=0.75,
    ),
    "zero": dict(
        IoU=[0.5, 1, 0, 0], Acc=[0.5, 1, 0, 0], Dice=[2 / 3, 1, 0, 0],
        Precision=[1, 1, 0, 0], Fscore=[2 / 3, 1, 0, 0],
        mIoU=0.375, mAcc=0.375, mDice=5 / 12, mFscore=5 / 12, aAcc=0.75, fwIoU=0.75,
    ),
    "gt_only": dict(
        IoU=[0.5, 1, NAN, NAN], Acc=[0.5, 1, NAN, NAN], Dice=[2 / 3, 1, NAN, NAN],
        Precision=[1, 1, NAN, NAN], Fscore=[2 / 3, 1, NAN, NAN],
        mIoU=0.75, mAcc=0.75, mDice=5 / 6, mFscore=5 / 6, aAcc=0.75, fwIoU=0.75,
    ),
}  # fmt: skip


@pytest.mark.parametrize("absent", ["nan", "zero", "gt_only"])
def test_absent_and_predicted_only_classes(absent):
    m = SegmentationMetrics(4, absent=absent)
    m.update(ABSENT_PRED, ABSENT_TARGET)
    r = m.compute()
    for key, value in ABSENT_EXPECTED[absent].items():
        assert close(r[key], value), (key, r[key], value)
    assert close(r["Recall"], r["Acc"])


def test_empty_and_degenerate():
    for absent in ("nan", "gt_only"):
        r = SegmentationMetrics(3, absent=absent).compute()
        assert all(math.isnan(r[k]) for k in ("aAcc", "mAcc", "mIoU", "fwIoU", "mDice"))
    r = SegmentationMetrics(3, absent="zero").compute()
    assert r["aAcc"] == r["mIoU"] == r["fwIoU"] == 0.0 and r["num_pixels"] == 0
    m = SegmentationMetrics(2)  # a perfect prediction
    m.update(np.array([[0, 1]]), np.array([[0, 1]]))
    r = m.compute()
    assert r["mIoU"] == r["aAcc"] == r["mFscore"] == r["fwIoU"] == 1.0


# ---------------------------------------------------------------------------------- edge cases


def test_ignored_pixels_count_nowhere():
    rng = np.random.default_rng(0)
    pred, target = random_maps(rng, (2, 23, 31), 5, ignore_frac=0.3)
    # Whatever is predicted on ignored pixels (classes or garbage) must not matter.
    wild = pred.copy()
    ign = target == 255
    wild[ign] = rng.choice([0, 4, 7, 255, -3], size=int(ign.sum()))
    a, b = SegmentationMetrics(5), SegmentationMetrics(5)
    a.update(wild, target)
    b.update(pred[~ign], target[~ign])
    assert (a.confusion == b.confusion).all()
    assert a.confusion.sum() == (~ign).sum() and a.out_of_range_predictions.sum() == 0
    assert close(a.compute()["Precision"], b.compute()["Precision"])


def test_out_of_range_predictions_are_misses():
    # target 0 0 1 1 with predictions 0, 9, 1, -1: two misses that are nobody's false positive.
    m = SegmentationMetrics(2)
    m.update(np.array([0, 9, 1, -1]), np.array([0, 0, 1, 1]))
    assert m.confusion.tolist() == [[1, 0], [0, 1]]
    assert m.out_of_range_predictions.tolist() == [1, 1]
    r = m.compute()
    assert close(r["Acc"], [0.5, 0.5]) and close(r["IoU"], [0.5, 0.5])
    assert close(r["Precision"], [1, 1]) and close(r["aAcc"], 0.5) and r["num_pixels"] == 4
    m.update(np.array([200], dtype=np.uint8), np.array([0], dtype=np.uint8))
    assert m.out_of_range_predictions.tolist() == [2, 1]


@pytest.mark.parametrize(
    "target, ignore_index, bad",
    [
        (np.array([[0, 1], [5, 255]], dtype=np.uint8), 255, "5 (1 px)"),
        (np.array([0, 1, -1, -1, 300]), 255, "-1 (2 px), 300 (1 px)"),
        (np.array([0, 1, -1, 256, 255]), -1, "255 (1 px), 256 (1 px)"),
        (torch.tensor([0, 1, 3, 3]), 255, "3 (2 px)"),
    ],
)
def test_bad_target_values_raise(target, ignore_index, bad):
    m = SegmentationMetrics(3, ignore_index=ignore_index)
    pred = np.zeros(tuple(target.shape), dtype=np.int64)
    with pytest.raises(DataError, match="outside") as info:
        m.update(pred, target)
    assert bad in str(info.value) and f"ignore_index={ignore_index}" in str(info.value)
    assert m.num_pixels == 0  # nothing half-added


def test_bad_inputs():
    m = SegmentationMetrics(3)
    with pytest.raises(DataError, match="shape"):
        m.update(np.zeros((2, 3), int), np.zeros((3, 2), int))
    with pytest.raises(TypeError, match="integer"):
        m.update(np.zeros((2, 2), np.float32), np.zeros((2, 2), int))
    for kwargs in ({"absent": "skip"}, {"beta": 0}, {"num_classes": 0}):
        with pytest.raises(ConfigError):
            SegmentationMetrics(**{"num_classes": 3, **kwargs})


DTYPE_CASES = [
    (np.uint8, 255), (np.uint8, 0), (np.uint8, 200), (np.int64, 255), (np.int64, -1),
    (np.int32, 1000), (np.int16, 3), (np.uint16, 255), (np.int8, -1), (np.uint32, 255),
]  # fmt: skip


@pytest.mark.parametrize("dtype, ignore_index", DTYPE_CASES)
@pytest.mark.parametrize("as_torch", [False, True])
def test_dtypes_and_ignore_labels_match_brute_force(dtype, ignore_index, as_torch):
    if as_torch and dtype in (np.uint16, np.uint32):
        pytest.skip("torch has limited unsigned 16/32-bit support")
    rng = np.random.default_rng(1)
    c = 6
    pred, target = random_maps(rng, (2, 9, 13), c, ignore_index=ignore_index)
    pred[0, 0, :3] = [c, c + 5, -1 if np.issubdtype(dtype, np.signedinteger) else 100]
    pred, target = pred.astype(dtype), target.astype(dtype)
    expected = brute_counts(pred, target, c, ignore_index)
    if as_torch:
        pred, target = torch.from_numpy(pred), torch.from_numpy(target)
    got = count_pairs(pred, target, c, ignore_index)
    assert got.dtype == np.int64 and (got == expected).all()


def test_bool_maps_for_binary_segmentation():
    rng = np.random.default_rng(2)
    pred, target = rng.random((7, 9)) < 0.5, rng.random((7, 9)) < 0.3
    got = count_pairs(torch.from_numpy(pred), target, 2, 255)
    assert (got == brute_counts(pred.astype(int), target.astype(int), 2, 255)).all()


def test_shapes_batches_and_streaming(monkeypatch):
    rng = np.random.default_rng(3)
    pred, target = random_maps(rng, (4, 17, 19), 7)
    whole = SegmentationMetrics(7)
    whole.update(pred, target)  # (N, H, W)
    per_image = SegmentationMetrics(7)
    for p, t in zip(pred, target):  # (H, W) each, as numpy and torch uint8
        per_image.update(torch.from_numpy(p.astype(np.uint8)), t.astype(np.uint8))
    flat = SegmentationMetrics(7)
    flat.update(pred.reshape(-1), target.reshape(-1))
    assert (whole.confusion == per_image.confusion).all() and (
        whole.confusion == flat.confusion
    ).all()
    assert same_results(whole.compute(), per_image.compute())
    # Small slices, with out-of-range targets (ignore = -1) only in some of them, still count alike.
    monkeypatch.setattr(confusion_module, "_CHUNK", 100)
    target = np.where(target == 255, 3, target)
    target[0, 0, :5] = -1
    sliced = SegmentationMetrics(7, ignore_index=-1)
    sliced.update(pred, target)
    assert (sliced._counts == brute_counts(pred, target, 7, -1)).all()
    # Non-contiguous inputs (a crop) work too.
    crop = SegmentationMetrics(7, ignore_index=-1)
    crop.update(torch.from_numpy(pred)[:, 2:9, 3:15], target[:, 2:9, 3:15])
    assert (crop._counts == brute_counts(pred[:, 2:9, 3:15], target[:, 2:9, 3:15], 7, -1)).all()


def test_many_classes_use_wide_path():
    rng = np.random.default_rng(4)
    pred, target = random_maps(rng, (3, 11, 7), 300)
    pred[0, 0, 0] = 300
    m = SegmentationMetrics(300)
    m.update(torch.from_numpy(pred), target)
    assert (m._counts == brute_counts(pred, target, 300, 255)).all()
    target[1, 1, 1] = 301
    with pytest.raises(DataError, match=r"301 \(1 px\)"):
        m.update(pred, target)


def test_merge_iadd_reset_and_all_reduce_without_distributed():
    rng = np.random.default_rng(5)
    pred, target = random_maps(rng, (2, 8, 8), 4)
    a, b, whole = SegmentationMetrics(4), SegmentationMetrics(4), SegmentationMetrics(4)
    a.update(pred[0], target[0])
    b.update(pred[1], target[1])
    whole.update(pred, target)
    a += b
    assert (a.confusion == whole.confusion).all()
    assert a.all_reduce() is a and (a.confusion == whole.confusion).all()  # no process group
    with pytest.raises(ValueError, match="merge"):
        a.merge(SegmentationMetrics(5))
    a.reset()
    assert a.num_pixels == 0 and not a.confusion.any()


def _all_reduce_worker(rank: int, init_file: str, queue) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    m = SegmentationMetrics(3)
    m.update(np.array([rank, 2]), np.array([rank, 1]))
    queue.put((rank, m.all_reduce().confusion.tolist()))
    dist.destroy_process_group()


def test_all_reduce_sums_over_processes(tmp_path):
    # fork keeps this quick (no re-import); only gloo on the CPU is used in the children.
    ctx = torch.multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=_all_reduce_worker, args=(r, str(tmp_path / "store"), queue))
        for r in range(2)
    ]
    for proc in procs:
        proc.start()
    results = dict(queue.get(timeout=60) for _ in procs)
    for proc in procs:
        proc.join(timeout=60)
        assert proc.exitcode == 0
    expected = [[1, 0, 0], [0, 1, 2], [0, 0, 0]]  # rank 0: (0->0), (1->2); rank 1: (1->1), (1->2)
    assert results[0] == results[1] == expected


@pytest.mark.parametrize(
    "dtype, ignore_index", [(torch.uint8, 255), (torch.int64, -1), (torch.int32, 2)]
)
def test_device_path_logic_on_cpu(dtype, ignore_index):
    # The CUDA code path runs on any device; checking it on the CPU covers it without a GPU.
    rng = np.random.default_rng(8)
    pred, target = random_maps(rng, (2, 9, 11), 5, ignore_index=ignore_index)
    pred[0, 0, :2] = [5, 77]
    p, t = torch.from_numpy(pred).to(dtype), torch.from_numpy(target).to(dtype)
    got = confusion_module._count_torch(p, t, 5, ignore_index)
    assert (got == brute_counts(p.long().numpy(), t.long().numpy(), 5, ignore_index)).all()
    t[1, 1, 1] = 9
    with pytest.raises(DataError, match=r"9 \(1 px\)"):
        confusion_module._count_torch(p, t, 5, ignore_index)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    rng = np.random.default_rng(6)
    pred, target = random_maps(rng, (3, 40, 50), 19)
    pred[0, 0, :2] = [19, -4]
    cpu, gpu = SegmentationMetrics(19), SegmentationMetrics(19)
    cpu.update(pred, target)
    gpu.update(torch.from_numpy(pred).cuda(), torch.from_numpy(target.astype(np.uint8)).cuda())
    gpu.update(torch.from_numpy(pred).cuda(), target)  # mixed: numpy target moves to the GPU
    assert (2 * cpu._counts == gpu._counts).all()
    target[0, 0, 0] = 30
    with pytest.raises(DataError, match=r"30 \(1 px\)"):
        gpu.update(torch.from_numpy(pred).cuda(), torch.from_numpy(target).cuda())


# -------------------------------------------------------------- agreement with the libraries


def mmseg_reference(preds, targets, num_classes, ignore_index, beta):
    """mmsegmentation's IoUMetric: per-image areas by histogram, summed, then plain float
    division (0/0 -> NaN), F-score from precision and recall, means by nanmean."""
    inter = union = area_pred = area_label = 0
    for pred, label in zip(preds, targets):
        keep = label != ignore_index
        p, t = torch.as_tensor(pred[keep]).float(), torch.as_tensor(label[keep]).float()
        hist = lambda x: torch.histc(x, bins=num_classes, min=0, max=num_classes - 1)  # noqa: E731
        i, ap, al = hist(p[p == t]), hist(p), hist(t)
        inter, area_pred, area_label = inter + i, area_pred + ap, area_label + al
        union = union + ap + al - i
    precision, recall = inter / area_pred, inter / area_label
    f = torch.tensor([(1 + beta**2) * x * y / (beta**2 * x + y) for x, y in zip(precision, recall)])
    per_class = {
        "IoU": inter / union, "Acc": inter / area_label,
        "Dice": 2 * inter / (area_pred + area_label),
        "Precision": precision, "Recall": recall, "Fscore": f,
    }  # fmt: skip
    out = {k: v.double().numpy() for k, v in per_class.items()}
    out["aAcc"] = float(inter.sum() / area_label.sum())
    for key, name in [("IoU", "mIoU"), ("Acc", "mAcc"), ("Dice", "mDice"), ("Fscore", "mFscore")]:
        out[name] = float(np.nanmean(out[key]))
    return out


def detectron2_reference(preds, targets, num_classes, ignore_index):
    """detectron2's SemSegEvaluator: a (C+1)^2 matrix indexed [pred, gt] with ignored gt moved
    to the extra class; IoU/acc only where the class has ground truth (pos_gt > 0)."""
    n = num_classes
    conf = np.zeros((n + 1, n + 1), dtype=np.int64)
    for pred, gt in zip(preds, targets):
        gt = np.where(gt == ignore_index, n, gt)
        conf += np.bincount(
            (n + 1) * pred.reshape(-1) + gt.reshape(-1), minlength=conf.size
        ).reshape(conf.shape)
    tp = conf.diagonal()[:-1].astype(float)
    pos_gt = conf[:-1, :-1].sum(axis=0).astype(float)
    pos_pred = conf[:-1, :-1].sum(axis=1).astype(float)
    acc, iou = np.full(n, np.nan), np.full(n, np.nan)
    acc_valid = pos_gt > 0
    acc[acc_valid] = tp[acc_valid] / pos_gt[acc_valid]
    union = pos_gt + pos_pred - tp
    iou_valid = acc_valid & (union > 0)
    iou[iou_valid] = tp[iou_valid] / union[iou_valid]
    weights = pos_gt / pos_gt.sum()
    return {
        "IoU": iou, "Acc": acc,
        "mIoU": iou[iou_valid].sum() / iou_valid.sum(),
        "mAcc": acc[acc_valid].sum() / acc_valid.sum(),
        "fwIoU": (iou[iou_valid] * weights[iou_valid]).sum(), "aAcc": tp.sum() / pos_gt.sum(),
    }  # fmt: skip


def smp_reference(preds, targets, num_classes, ignore_index, beta):
    """segmentation_models_pytorch: per-image tp/fp/fn per class (ignored pixels set to -1 on
    both sides), summed over images ("macro"), scores with zero_division=0, plain mean."""
    tp = fp = fn = 0
    for pred, target in zip(preds, targets):
        ign = target == ignore_index
        out, tgt = np.where(ign, -1, pred), np.where(ign, -1, target)
        hist = lambda x: np.bincount(x[x >= 0], minlength=num_classes)  # noqa: E731
        tp_i = hist(np.where(out == tgt, tgt, -1))
        tp, fp, fn = tp + tp_i, fp + hist(out) - tp_i, fn + hist(tgt) - tp_i

    def zdiv(a, b):
        return np.divide(a, b, out=np.zeros(num_classes), where=b > 0)

    b2 = beta**2
    scores = {
        "IoU": zdiv(tp, tp + fp + fn), "Recall": zdiv(tp, tp + fn), "Precision": zdiv(tp, tp + fp),
        "Fscore": zdiv((1 + b2) * tp, (1 + b2) * tp + b2 * fn + fp),
    }  # fmt: skip
    scores.update({"mIoU": scores["IoU"].mean(), "mFscore": scores["Fscore"].mean()})
    return scores


def random_dataset(seed, num_classes=6, absent=(2,), predicted_absent=(4,)):
    """Five random (pred, target) images; some classes never in the gt, one never anywhere."""
    rng = np.random.default_rng(seed)
    preds, targets = [], []
    for _ in range(5):
        pred, target = random_maps(rng, (12, 15), num_classes, absent=absent + predicted_absent)
        pred[pred == absent[0]] = (absent[0] + 1) % num_classes  # so class 2 appears nowhere
        preds.append(pred)
        targets.append(target)
    return preds, targets


def run_ours(preds, targets, num_classes, absent, beta=1.0):
    m = SegmentationMetrics(num_classes, absent=absent, beta=beta)
    for p, t in zip(preds, targets):
        m.update(p, t)
    return m.compute()


@pytest.mark.parametrize("seed, beta", [(0, 1.0), (1, 2.0), (2, 0.5)])
def test_matches_mmsegmentation_definition(seed, beta):
    preds, targets = random_dataset(seed)
    ref = mmseg_reference(preds, targets, 6, 255, beta)
    ours = run_ours(preds, targets, 6, "nan", beta)
    assert math.isnan(ours["IoU"][2]) and ours["IoU"][4] == 0.0  # absent / predicted-only
    for key, value in ref.items():
        assert close(ours[key], value, 1e-6), key


@pytest.mark.parametrize("seed", [0, 1])
def test_matches_detectron2_definition(seed):
    preds, targets = random_dataset(seed)
    ref = detectron2_reference(preds, targets, 6, 255)
    ours = run_ours(preds, targets, 6, "gt_only")
    assert math.isnan(ours["IoU"][4])
    for key, value in ref.items():
        assert close(ours[key], value), key


@pytest.mark.parametrize("seed, beta", [(0, 1.0), (1, 2.0)])
def test_matches_segmentation_models_pytorch_definition(seed, beta):
    preds, targets = random_dataset(seed)
    ref = smp_reference(preds, targets, 6, 255, beta)
    ours = run_ours(preds, targets, 6, "zero", beta)
    for key, value in ref.items():
        assert close(ours[key], value), key


def test_matches_torchmetrics():
    tm = pytest.importorskip("torchmetrics.classification")
    rng = np.random.default_rng(7)
    c = 5
    pred, target = (torch.from_numpy(x) for x in random_maps(rng, (3, 20, 30), c, absent=(3,)))
    kw = {"num_classes": c, "ignore_index": 255}
    nan_m, zero_m = SegmentationMetrics(c), SegmentationMetrics(c, absent="zero")
    nan_m.update(pred, target)
    zero_m.update(pred, target)
    nan_r, zero_r = nan_m.compute(), zero_m.compute()
    confmat = tm.MulticlassConfusionMatrix(**kw)(pred, target)
    assert (torch.from_numpy(nan_m.confusion) == confmat).all()
    # Per class, torchmetrics divides 0/0 to 0; its macro mean skips classes absent everywhere.
    assert close(zero_r["IoU"], tm.MulticlassJaccardIndex(average=None, **kw)(pred, target), 1e-6)
    assert close(
        nan_r["mIoU"], tm.MulticlassJaccardIndex(average="macro", **kw)(pred, target), 1e-6
    )
    assert close(zero_r["Acc"], tm.MulticlassAccuracy(average=None, **kw)(pred, target), 1e-6)
    assert close(nan_r["aAcc"], tm.MulticlassAccuracy(average="micro", **kw)(pred, target), 1e-6)
    pred2, target2 = (torch.from_numpy(x) for x in random_maps(rng, (2, 20, 30), c))
    every = SegmentationMetrics(c)  # all classes present in the gt: macro accuracy agrees
    every.update(pred2, target2)
    acc = tm.MulticlassAccuracy(average="macro", **kw)(pred2, target2)
    assert close(every.compute()["mAcc"], acc, 1e-6)


def test_metrics_from_confusion_accepts_square_matrix():
    m = SegmentationMetrics(3)
    m.update(HAND_PRED, HAND_TARGET)
    assert same_results(metrics_from_confusion(m.confusion), m.compute())


# ------------------------------------------------------------------------------------ reports


def test_format_table():
    m = SegmentationMetrics(3)
    m.update(HAND_PRED, HAND_TARGET)
    text = format_table(m.compute(), ["road", "sky", "car"])
    lines = text.splitlines()
    assert [c.strip() for c in lines[0].split("|")[1:-1]] == [
        "Class", "IoU", "Acc", "Dice", "Precision", "Recall", "Fscore"
    ]  # fmt: skip
    car = next(line for line in lines if line.startswith("| car"))
    assert [c.strip() for c in car.split("|")[1:-1]] == [
        "car",
        "0.00",
        "0.00",
        "0.00",
        "nan",
        "0.00",
        "nan",
    ]
    sky = next(line for line in lines if line.startswith("| sky"))
    assert [c.strip() for c in sky.split("|")[2:-1]] == [
        "66.67",
        "100.00",
        "80.00",
        "66.67",
        "100.00",
        "80.00",
    ]
    summary = lines[lines.index("") + 1 :]
    assert [c.strip() for c in summary[0].split("|")[2:-1]] == [
        "aAcc",
        "mAcc",
        "mIoU",
        "fwIoU",
        "mDice",
        "mFscore",
    ]
    assert [c.strip() for c in summary[2].split("|")[2:-1]] == [
        "60.00",
        "50.00",
        "33.33",
        "40.00",
        "43.33",
        "65.00",
    ]
    assert "| 0 " in format_table(m.compute(), None)
    with pytest.raises(ValueError, match="2 class names for 3 classes"):
        format_table(m.compute(), ["a", "b"])


def test_save_results_writes_strict_json_and_csv(tmp_path):
    m = SegmentationMetrics(3)
    m.update(HAND_PRED, HAND_TARGET)
    results = m.compute()
    paths = save_results(results, ["road", "sky", "car"], tmp_path / "eval", confusion=m.confusion)
    assert paths == {"json": tmp_path / "eval/metrics.json", "csv": tmp_path / "eval/per_class.csv"}

    def no_constants(name):
        raise AssertionError(f"invalid JSON constant {name}")

    saved = json.loads(paths["json"].read_text(), parse_constant=no_constants)
    assert saved["class_names"] == ["road", "sky", "car"]
    assert saved["confusion"] == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    assert saved["Precision"][2] is None and close(saved["mIoU"], 1 / 3)
    assert saved["num_pixels"] == 5
    rows = list(csv.reader(paths["csv"].open()))
    assert rows[0] == ["class", "IoU", "Acc", "Dice", "Precision", "Recall", "Fscore"]
    assert rows[3][0] == "car" and rows[3][4] == "" and float(rows[2][1]) == pytest.approx(2 / 3)
    # A reloaded file prints like the original.
    assert format_table(saved, saved["class_names"]) == format_table(
        results, ["road", "sky", "car"]
    )
