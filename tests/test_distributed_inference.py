"""``eval`` and ``predict`` under torchrun, and the sharded COCO evaluation of training.

Each rank takes every world-th item (none twice, no padding); the confusion matrices are summed,
the COCO detections gathered to rank 0, which alone prints and writes the report. In-process
tests play the ranks one after the other with the communication monkeypatched (a "fake
world"); one torchrun run (gloo, 2 processes) checks the real thing against one process.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import write_folder_dataset
from denseseg import load_model
from denseseg.checkpoint import atomic_save
from denseseg.cli import main
from denseseg.engine import distributed as dist
from denseseg.engine.evaluate import evaluate_instances, merge_coco_shards
from denseseg.engine.predict import predict_folder, shard_files
from denseseg.engine.tasks.instance import InstanceTask
from denseseg.errors import ConfigError
from denseseg.metrics.coco import CocoInstanceMetrics
from denseseg.models import create_model

CLASSES = ["background", "bright", "dark"]
# The modules (denseseg.engine re-exports functions of the same names).
evaluate_module = importlib.import_module("denseseg.engine.evaluate")
predict_module = importlib.import_module("denseseg.engine.predict")


def _env() -> dict[str, str]:
    src = str(Path(__file__).resolve().parents[1] / "src")
    path = os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}


def _as_rank(monkeypatch: pytest.MonkeyPatch, rank: int, world: int) -> None:
    """This process plays rank ``rank`` of ``world`` (no process group behind it)."""
    monkeypatch.setattr(dist, "is_distributed", lambda: True)
    monkeypatch.setattr(dist, "rank", lambda: rank)
    monkeypatch.setattr(dist, "world_size", lambda: world)
    monkeypatch.setattr(dist, "barrier", lambda: None)


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())} if folder.exists() else {}


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A folder dataset of equal-sized images (4 in val, 5 in images/ with train's: equal
    sizes, so that no batch is padded and the batches' makeup changes no prediction) and the
    checkpoint of an untrained 3-class U-Net, as ``denseseg train`` writes one."""
    tmp = tmp_path_factory.mktemp("dist_inference")
    data = write_folder_dataset(tmp / "data", n_train=1, n_val=4, size=(32, 40))
    torch.manual_seed(3)
    kwargs = {"num_classes": 3, "in_channels": 3, "base_channels": 4, "depth": 2}
    ckpt = {
        "model": create_model("unet", **kwargs).state_dict(),
        "model_name": "unet",
        "model_kwargs": kwargs,
        "mean": [0.5, 0.5, 0.5],
        "std": [0.2, 0.2, 0.2],
        "class_names": CLASSES,
        "palette": [[0, 0, 0], [200, 30, 30], [30, 200, 30]],
        "step": 1,
    }
    atomic_save(ckpt, tmp / "unet.pt")
    return data, tmp / "unet.pt"


# ---------------------------------------------------------------- sharding the inputs
@pytest.mark.parametrize(
    ("n", "world"), [(5, 2), (7, 3), (2, 4), (1, 1)], ids=["5-on-2", "7-on-3", "2-on-4", "1-on-1"]
)
def test_every_input_goes_to_exactly_one_rank(n: int, world: int) -> None:
    """The ranks' shares of the sorted inputs cover every input once, in order, and agree with
    :func:`dist.shard`'s items (rank r: r, r + W, ...)."""
    files = [Path(f"img_{i:03d}.png") for i in range(n)]
    shares = [shard_files(files, r, world) for r in range(world)]
    assert sorted(sum(shares, [])) == files
    assert all(share == [files[i] for i in range(r, n, world)] for r, share in enumerate(shares))


# ---------------------------------------------------------------- COCO evaluation, fake world
class FakeInstanceSegmenter:
    """Reads the instances back from the image (channel 0: instance id, 1: class), shifts
    some masks, adds a false positive of a tied score per image: AP well between 0 and 1."""

    class_names = CLASSES
    max_detections = 100

    def predict_batch(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        return [self._predict(image) for image in images]

    def _predict(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        ids, cls = image[0].long(), image[1].long()
        g = torch.Generator().manual_seed(int(image.long().sum()))
        keys = [k for k in ids.unique().tolist() if k > 0]
        masks = [torch.roll(ids == k, k - 1, dims=1) for k in keys]
        labels = [int(cls[ids == k][0]) for k in keys]
        spurious = torch.zeros_like(ids, dtype=torch.bool)
        spurious[:5, :6] = True
        masks, labels = [*masks, spurious], [*labels, 1]
        scores = [*torch.rand(len(keys), generator=g).tolist(), 0.5]
        boxes = [_box(m) for m in masks]
        return {
            "boxes": torch.tensor(boxes, dtype=torch.float32),
            "labels": torch.tensor(labels),
            "scores": torch.tensor(scores),
            "masks": torch.stack(masks),
        }


def _box(mask: torch.Tensor) -> list[float]:
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def _instance_items(n: int = 7) -> list[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """Images of mixed sizes with 1-3 square instances each (overlaps allowed)."""
    rng = np.random.default_rng(0)
    items = []
    for i in range(n):
        h, w = [(40, 48), (36, 52), (44, 40)][i % 3]
        ids, cls = np.zeros((h, w), np.uint8), np.zeros((h, w), np.uint8)
        masks, labels = [], []
        for k in range(1, int(rng.integers(1, 4)) + 1):
            s, label = int(rng.integers(6, 14)), int(rng.integers(1, 3))
            y, x = int(rng.integers(0, h - s)), int(rng.integers(0, w - s))
            m = np.zeros((h, w), bool)
            m[y : y + s, x : x + s] = True
            ids[m], cls[m] = k, label
            masks.append(torch.from_numpy(m))
            labels.append(label)
        image = torch.from_numpy(np.stack([ids, cls, np.zeros_like(ids)]))
        target = {
            "boxes": torch.tensor([_box(m) for m in masks]),
            "labels": torch.tensor(labels),
            "masks": torch.stack(masks).to(torch.uint8),
        }
        items.append((image, target))
    return items


def _coco(metrics: dict[str, float]) -> str:
    return json.dumps(metrics, sort_keys=True)  # NaN-safe, exact (repr of each float)


@pytest.mark.parametrize("world", [2, 3], ids=["2-ranks", "3-ranks"])
def test_sharded_coco_evaluation_is_the_one_process_one(monkeypatch, world: int) -> None:
    """Each rank evaluates its shard (every item once), rank 0 alone runs COCOeval on the
    gathered detections and gets the one-process metrics bit for bit; the other ranks take
    rank 0's through the broadcast."""
    items, seg = _instance_items(), FakeInstanceSegmenter()
    one = evaluate_instances(seg, items, batch_size=2, progress=False)
    assert 0.05 < one["segm_AP"] < 0.95 and one["num_images"] == len(items)
    sent, seen, broadcast = [], [], []
    monkeypatch.setattr(dist, "broadcast_object", lambda obj: broadcast.append(obj) or obj)
    for rank in [*range(1, world), 0]:  # rank 0 last: it gathers what the others sent
        _as_rank(monkeypatch, rank, world)
        monkeypatch.setattr(
            dist, "gather_objects", lambda obj, r=rank: sent.append(obj) if r else [obj, *sent]
        )
        seen.append(evaluate_instances(seg, items, batch_size=2, progress=False, shard=True))
    assert broadcast[:-1] == [None] * (world - 1)  # COCOeval ran on rank 0 only
    assert _coco(seen[-1]) == _coco(one)
    assert sum(len(part.images) for part in sent) == len(items) - len(range(0, len(items), world))


def test_merged_shards_are_filled_as_one_process_fills_them() -> None:
    """Images, annotations (ids too) and detections in one process's order and numbering."""
    items, seg = _instance_items(), FakeInstanceSegmenter()
    whole = CocoInstanceMetrics(CLASSES)
    for image, target in items:
        whole.update(target, seg.predict_batch([image])[0])
    parts = []
    for rank in range(3):
        part = CocoInstanceMetrics(CLASSES)
        for image, target in items[rank::3]:
            part.update(target, seg.predict_batch([image])[0])
        parts.append(part)
    merged = merge_coco_shards(parts)
    assert (merged.images, merged.gts, merged.dets) == (whole.images, whole.gts, whole.dets)


def test_training_evaluation_of_instance_models_is_sharded(monkeypatch) -> None:
    """InstanceTask.evaluate asks for the sharded evaluation; only rank 0 shows progress."""
    calls = []
    monkeypatch.setattr(
        "denseseg.engine.tasks.instance.evaluate_instances", lambda *a, **kw: calls.append(kw)
    )
    _as_rank(monkeypatch, 1, 2)
    cfg = type("Cfg", (), {})()
    cfg.data = type("Data", (), {"eval_batch_size": 2, "num_workers": 0})()
    cfg.train = type("Train", (), {"progress": True})()
    InstanceTask().evaluate(object(), [], cfg)
    assert calls == [{"batch_size": 2, "num_workers": 0, "progress": False, "shard": True}]


# ---------------------------------------------------------------- predict, fake world
def test_each_rank_writes_its_own_inputs_outputs(workspace, monkeypatch, tmp_path) -> None:
    """Rank 0 checks, then each rank writes the outputs of its inputs only; together they are
    the one-process outputs, byte for byte."""
    data, ckpt = workspace
    seg = load_model(ckpt, device="cpu")
    images = sorted((data / "images").iterdir())
    predict_folder(seg, data / "images", tmp_path / "one")
    one = _tree(tmp_path / "one")
    out = tmp_path / "two"
    monkeypatch.setattr(dist, "broadcast_object", lambda obj: obj)
    for rank, owned in ((0, images[0::2]), (1, images)):
        _as_rank(monkeypatch, rank, 2)
        done = predict_folder(seg, data / "images", out)
        assert done.inputs == images and len(done.written) == 2 * len(images)  # the whole job
        assert set(_tree(out)) == {f"{p.stem}{s}.png" for p in owned for s in ("", "_overlay")}
    assert _tree(out) == one


@pytest.mark.parametrize("rank", [0, 1], ids=["rank-0-checks", "rank-1-takes-the-verdict"])
def test_a_refused_job_is_refused_on_every_rank_before_any_write(
    workspace, monkeypatch, tmp_path, rank: int
) -> None:
    """An output already in --out: rank 0 refuses and broadcasts its error; every rank raises
    it and no rank writes (rank 1 never checks, it takes rank 0's verdict)."""
    data, ckpt = workspace
    seg = load_model(ckpt, device="cpu")
    out = tmp_path / "out"
    out.mkdir()
    (out / "train_000.png").write_bytes(b"a user's mask")
    before = _tree(out)
    verdict = ConfigError(f"--out {out} already holds 1 of the files predict would write")
    broadcast = []
    monkeypatch.setattr(
        dist, "broadcast_object", lambda obj: broadcast.append(obj) or (obj or verdict)
    )
    _as_rank(monkeypatch, rank, 2)
    with pytest.raises(ConfigError, match="already holds 1 of the files predict would write"):
        predict_folder(seg, data / "images", out)
    assert _tree(out) == before
    assert (broadcast[0] is None) == (rank == 1)  # rank 0 sent its error, rank 1 had none


# ---------------------------------------------------------------- torchrun, 2 processes
WORKER = """
import json, os, sys
import torch
torch.set_num_threads(1)
from denseseg.cli import main
from denseseg.engine import distributed as dist
from test_distributed_inference import FakeInstanceSegmenter, _instance_items
from denseseg.engine.evaluate import evaluate_instances

# One process group for the three jobs (the commands join it themselves when started alone;
# joining twice in one process is torch's problem, not tested here).
out = sys.argv[1]
with open(os.path.join(out, "commands.json")) as fh:
    commands = json.load(fh)
with dist.process_group(torch.device("cpu")):
    codes = [main(argv) for argv in commands]
    coco = evaluate_instances(FakeInstanceSegmenter(), _instance_items(), shard=True)
    with open(os.path.join(out, f"coco.{dist.rank()}.json"), "w") as fh:
        json.dump({"codes": codes, "coco": coco}, fh)
"""


def test_eval_and_predict_on_two_processes_give_the_one_process_files(workspace, tmp_path) -> None:
    """Under torchrun (gloo, 2 processes): ``eval`` sums the shards' confusion matrices (every
    pixel once) and rank 0 alone prints the table and writes the report, equal to one
    process's; ``predict`` writes the one-process outputs, byte for byte, nothing more; the
    sharded COCO evaluation gathers the detections and gives every rank the one-process
    metrics."""
    data, ckpt = workspace
    ev = ["eval", "--model", str(ckpt), "--root", str(data), "--dataset", "folder"]
    ev += ["--batch-size", "2", "--device", "cpu"]
    pr = ["predict", str(data / "images"), "--model", str(ckpt), "--device", "cpu"]
    pr += ["--batch-size", "2"]
    two = [[*ev, "--out", str(tmp_path / "eval2"), "--json", str(tmp_path / "m.json")]]
    two += [[*pr, "--out", str(tmp_path / "pred2")]]
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    (tmp_path / "commands.json").write_text(json.dumps(two))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = _env()
    env["PYTHONPATH"] += os.pathsep + str(Path(__file__).parent)
    with subprocess.Popen(
        [*cmd, str(script), str(tmp_path)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as child:
        # The one-process references, while the workers start.
        assert main([*ev, "--out", str(tmp_path / "eval1")]) == 0
        assert main([*pr, "--out", str(tmp_path / "pred1")]) == 0
        coco = evaluate_instances(FakeInstanceSegmenter(), _instance_items(), progress=False)
        stdout, stderr = child.communicate(timeout=240)
    assert child.returncode == 0, stderr[-3000:]
    assert stdout.count("mIoU") == 1, stdout  # the table, printed by rank 0 only
    one, two_ = _tree(tmp_path / "eval1"), _tree(tmp_path / "eval2")
    assert json.loads(two_["metrics.json"])["num_pixels"] == 4 * 32 * 40  # each image once
    assert set(two_) == set(one) >= {"per_class.csv", "confusion_matrix.png", "per_class_iou.png"}
    assert two_["metrics.json"] == one["metrics.json"] == (tmp_path / "m.json").read_bytes()
    assert two_["per_class.csv"] == one["per_class.csv"]
    assert _tree(tmp_path / "pred2") == _tree(tmp_path / "pred1")
    assert len(_tree(tmp_path / "pred2")) == 2 * 5
    for rank in (0, 1):
        said = json.loads((tmp_path / f"coco.{rank}.json").read_text())
        assert said["codes"] == [0, 0] and _coco(said["coco"]) == _coco(coco)
