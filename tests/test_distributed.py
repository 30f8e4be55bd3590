"""Training on several processes (torchrun, DistributedDataParallel, gloo on the CPU).

A 2-process run with per-process batch B computes the same steps as a 1-process run with batch
2B: the sampler shards the epoch's one order, augmentation seeds follow the sample's position,
and every loss is normalised by statistics summed over the processes (the weighted count of
non-ignored pixels, Dice's per-class sums). Tested on a tiny U-Net without batch norm (batch
statistics differ between the two by design), with cross-entropy + Dice, class weights and
ignored pixels (padding after a random scale), so the global normalisation matters; each loss
alone on two simulated ranks, in-process. A rank that fails stops the job with one line.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import tiny_recipe, write_folder_dataset
from denseseg.checkpoint import load_checkpoint
from denseseg.cli import main
from denseseg.config import load_config
from denseseg.engine import distributed
from denseseg.engine.sampler import EpochSampler
from denseseg.engine.tasks.semantic import SemanticTask
from denseseg.engine.trainer import _check_global_batch, train
from denseseg.errors import ConfigError
from denseseg.losses import build_loss
from denseseg.losses.weight_map import PixelWeightedCrossEntropy

COMMON = [
    "model.kwargs={base_channels: 4, depth: 2, batch_norm: false}",
    "data.scale_range=[0.6, 1.0]",
    "data.crop_size=[32, 32]",
    "loss.name=ce+dice",  # the Dice term's per-class sums are global too
    "loss.class_weights=[1.0, 2.0, 3.0]",
    "schedule.name=cosine",
    "train.deterministic=true",
    "train.log_every=1",
    "train.keep_last=0",
]


pytestmark = pytest.mark.usefixtures("nondeterministic_afterwards")


def _env() -> dict[str, str]:
    src = str(Path(__file__).resolve().parents[1] / "src")
    path = os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}


def _overrides(data: Path, out: Path, batch: int) -> list[str]:
    return tiny_recipe(data, out) + COMMON + [f"data.batch_size={batch}"]


def _weights(run: Path) -> tuple[int, dict[str, torch.Tensor]]:
    ckpt = load_checkpoint(run / "last.pt")
    assert not any(k.startswith("module.") for k in ckpt["model"])  # the unwrapped model
    return ckpt["step"], ckpt["model"]


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def _losses(run: Path) -> list[float]:
    with (run / "log.csv").open() as fh:
        return [float(r["loss"]) for r in csv.DictReader(fh) if r["loss"]]


# ---------------------------------------------------------------- no processes
@pytest.mark.parametrize("start", [0, 4, 8], ids=["epoch-start", "resumed-at-4", "resumed-at-8"])
def test_sharded_sampler_takes_the_one_process_batches(start: int) -> None:
    """Each step, rank r of W takes its slice of the W*B samples (and seeds) one process with
    batch W*B takes; only whole global batches; the seeds do not depend on the rank."""
    n, seed, epoch, b, w = 19, 7, 3, 2, 3
    one = list(EpochSampler(n, seed, epoch, start))
    whole = (len(one) // (w * b)) * w * b  # a loader with drop_last keeps these
    ranks = [
        list(EpochSampler(n, seed, epoch, start, rank=r, world=w, batch_size=b)) for r in range(w)
    ]
    assert all(len(r) == whole // w for r in ranks)
    steps = [sum((r[k * b : (k + 1) * b] for r in ranks), []) for k in range(whole // (w * b))]
    assert sum(steps, []) == one[:whole]


# Two simulated ranks, each half of a batch of 4: the loss normalised by the statistics summed
# over both (sum_over_ranks), with DDP's gradient average, must be the whole batch's.
LOSSES = {
    "ce": (3, lambda: build_loss("ce", num_classes=3), 0.0),
    "ce-class-weights-ignore": (3, lambda: build_loss("ce", num_classes=3, class_weights=W3), 0.0),
    "ce-smoothing-aux": (
        3,
        lambda: build_loss("ce", num_classes=3, class_weights=W3, label_smoothing=0.1),
        0.5,
    ),
    "bce": (1, lambda: build_loss("bce", num_classes=1, class_weights=[1.0, 3.0]), 0.0),
    "dice": (3, lambda: build_loss("dice", num_classes=3), 0.0),
    "dice-binary": (1, lambda: build_loss("dice", num_classes=1), 0.0),
    "ce+dice-aux": (
        3,
        lambda: build_loss("ce+dice", num_classes=3, class_weights=W3, dice_weight=0.7),
        0.4,
    ),
    "bce+dice": (1, lambda: build_loss("bce+dice", num_classes=1), 0.0),
    "weight-map": (3, lambda: PixelWeightedCrossEntropy(ignore_index=255), 0.0),
}
W3 = [1.0, 2.0, 3.0]


class _Logits(torch.nn.Module):
    """A "model" whose outputs are fixed leaf tensors, indexed by the batch's "images"."""

    def __init__(self, classes: int, aux: bool) -> None:
        super().__init__()
        self.out = torch.nn.Parameter(torch.randn(4, classes, 6, 6))
        self.aux = torch.nn.Parameter(torch.randn(4, classes, 6, 6)) if aux else None

    def forward(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {"out": self.out[index]}
        return out if self.aux is None else {**out, "aux": self.aux[index]}


def _loss_and_grads(task, model, batch, half) -> tuple[float, list[torch.Tensor]]:
    model.zero_grad()
    index, target, *extra = batch
    loss = task.loss(model, (index[half], target[half], *(e[half] for e in extra)), "cpu")
    loss.backward()
    return loss.item(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("name", list(LOSSES))
def test_global_loss_of_two_ranks_is_the_whole_batch_loss(name: str, monkeypatch) -> None:
    """With class weights, ignored pixels (only in the first half) and a class absent from the
    first half (Dice's per-class means): the ranks' mean loss and their averaged gradients
    equal one process's on the whole batch."""
    torch.manual_seed(0)
    classes, make, aux_weight = LOSSES[name]
    task = SemanticTask()
    task.criterion, task.aux_weight = make(), aux_weight
    model = _Logits(classes, aux=bool(aux_weight))
    target = torch.randint(0, max(classes, 2), (4, 6, 6))
    target[:2][target[:2] == 2] = 0
    target[0, :3] = 255
    batch = [torch.arange(4), target]
    if name == "weight-map":
        batch.append(torch.rand(4, 6, 6) * 5)
    whole, whole_grads = _loss_and_grads(task, model, batch, slice(None))

    halves = [slice(0, 2), slice(2, 4)]
    shares: list[torch.Tensor] = []  # first, each rank's own statistics ...
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "all_reduce_sum", lambda t: shares.append(t.clone()) or t)
    for half in halves:
        _loss_and_grads(task, model, batch, half)
    total = shares[0] + shares[1]  # ... then their sum, as the all-reduce gives it
    monkeypatch.setattr(distributed, "all_reduce_sum", lambda t: t.copy_(total))
    ranks = [_loss_and_grads(task, model, batch, half) for half in halves]

    assert sum(r[0] for r in ranks) / 2 == pytest.approx(whole, rel=1e-5)  # the logged mean
    ddp_average = [(a + b) / 2 for a, b in zip(ranks[0][1], ranks[1][1], strict=True)]
    for got, want in zip(ddp_average, whole_grads, strict=True):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("name", list(LOSSES))
def test_loss_from_its_statistics_is_the_loss(name: str) -> None:
    """``from_statistics(statistics(batch))`` is the batch's loss (the single-process
    ``forward`` stays as it was); an all-ignored batch gives 0, not NaN."""
    torch.manual_seed(1)
    classes, make, _ = LOSSES[name]
    loss = make()
    logits, target = torch.randn(2, classes, 5, 5), torch.randint(0, max(classes, 2), (2, 5, 5))
    extra = (torch.rand(2, 5, 5),) if name == "weight-map" else ()
    stats = loss.statistics(logits, target, *extra)
    assert len(stats) == loss.num_statistics
    assert torch.allclose(loss.from_statistics(stats), loss(logits, target, *extra), atol=1e-6)
    ignored = torch.full_like(target, 255)
    assert loss.from_statistics(loss.statistics(logits, ignored, *extra)).item() == 0.0


@pytest.mark.parametrize(
    ("saved", "now", "refused"),
    [
        ((2, 2), (4, 1), False),
        ((2, 2), (2, 1), True),
        ((4, 1), (2, 2), False),
        ((3, 1), (1, 2), True),
    ],
    ids=["2x2-as-1x4", "2x2-as-1x2", "1x4-as-2x2", "1x3-as-2x1"],
)
def test_resume_on_another_world_size_needs_the_same_global_batch(saved, now, refused) -> None:
    (b0, w0), (b1, w1) = saved, now
    ckpt = {"world_size": w0, "global_batch": b0 * w0}
    if not refused:
        _check_global_batch(Path("run/last.pt"), ckpt, b1, w1)
        return
    with pytest.raises(ConfigError, match=r"run/last\.pt.*global batch.*process\(es\)"):
        _check_global_batch(Path("run/last.pt"), ckpt, b1, w1)


def test_sync_bn_is_a_recipe_key() -> None:
    assert load_config("unet_demo", ["model.sync_bn=true"]).model.sync_bn is True
    assert load_config("unet_demo").model.sync_bn is False
    with pytest.raises(ConfigError, match="model.sync_bn"):
        load_config("unet_demo", ["model.sync_bn=sometimes"])


def test_sync_bn_is_refused_on_a_cpu() -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    with pytest.raises(ConfigError, match=r"^model\.sync_bn: true needs CUDA") as err:
        distributed.convert_sync_bn(model, torch.device("cpu"))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("world", [1, 2], ids=["one-process-unchanged", "two-processes-synced"])
def test_sync_bn_on_cuda(world: int, monkeypatch) -> None:
    """Converting needs neither a GPU nor a process group: only the device type is checked."""
    monkeypatch.setattr(distributed, "world_size", lambda: world)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    converted = distributed.convert_sync_bn(model, torch.device("cuda"))
    kinds = {type(m) for m in converted.modules()}
    assert (torch.nn.SyncBatchNorm in kinds) == (world > 1)
    assert converted.state_dict().keys() == model.state_dict().keys()


def test_sync_bn_on_a_cpu_is_one_line_from_the_cli(data: Path, tmp_path, capsys) -> None:
    """Needs the trainer to call ``convert_sync_bn`` (engine/trainer.py)."""
    overrides = tiny_recipe(data, tmp_path / "run") + ["train.device=cpu", "model.sync_bn=true"]
    argv = ["train", "unet_demo", *overrides]
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("denseseg: error: ")]
    assert "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith("denseseg: error: model.sync_bn: true needs CUDA"), err


@pytest.mark.parametrize(
    ("codes", "line", "status"),
    [
        ({0: 3, 1: 2}, "rank 1 failed (exit code 2); its message is above", 2),
        ({0: -15, 1: 2}, "rank 1 failed (exit code 2); its message is above", 2),
        ({0: 1, 1: -9}, "rank 1 was killed by SIGKILL", 137),
        ({0: -15, 1: -9}, "rank 1 was killed by SIGKILL", 137),
        ({0: 143, 1: 143}, None, 143),
    ],
    ids=[
        "not-the-rank-it-stopped",
        "not-the-rank-the-launcher-stopped",
        "killed-by-a-signal",
        "killed-not-the-rank-the-launcher-stopped",
        "stopped-by-sigterm",
    ],
)
def test_the_launcher_names_the_failed_rank_in_one_line(codes, line, status, capsys) -> None:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    failures = {r: ProcessFailure(r, 100 + r, c, "/nonexistent") for r, c in codes.items()}
    assert distributed._failed(ChildFailedError("denseseg", failures)) == status
    err = capsys.readouterr().err
    assert err == (f"denseseg: error: {line}\n" if line else "")


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "unet_demo", "--nproc", "4"],
        ["eval", "--model", "camvid", "--root", "data", "--out", "{tmp}/ev", "--nproc", "3"],
        ["predict", "image.png", "--out", "{tmp}/pr", "--nproc", "4"],
    ],
    ids=["train", "eval", "predict"],
)
def test_nproc_unlike_torchruns_own_is_refused(argv, tmp_path, monkeypatch, capsys) -> None:
    """A worker torchrun started (2 on this machine) given another ``--nproc``: one line."""
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("denseseg: error: --nproc ") and err.count("\n") == 1, err
    assert "under torchrun, which started 2 processes" in err


# ---------------------------------------------------------------- torchrun, 2 processes
@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ddp") / "data"
    return write_folder_dataset(root, n_train=8, val_sizes=[(32, 40), (28, 36), (36, 30)])


@pytest.fixture(scope="module")
def reference(data: Path, tmp_path_factory) -> Path:
    """One process with batch 4."""
    out = tmp_path_factory.mktemp("one") / "run"
    train(load_config("unet_demo", _overrides(data, out, 4)))
    torch.use_deterministic_algorithms(False)
    return out


def test_two_processes_equal_one_with_twice_the_batch(
    data: Path, reference: Path, tmp_path
) -> None:
    """``denseseg train --nproc 2`` (torchrun, gloo) with batch 2 == 1 process with batch 4:
    the same steps, loss curve and final weights; rank 0 alone writes; evaluation sharded."""
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "denseseg", "train", "--nproc", "2", "unet_demo"]
    run = subprocess.run(
        cmd + _overrides(data, out, 2), env=_env(), capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("trained 8 steps") == 1  # printed by rank 0 only
    step, weights = _weights(out)
    ref_step, ref_weights = _weights(reference)
    assert step == ref_step == 8
    assert _close(weights, ref_weights)
    assert _losses(out) == pytest.approx(_losses(reference), abs=2e-5)
    two, one = (load_checkpoint(r / "last.pt")["metrics"] for r in (out, reference))
    assert two["num_pixels"] == one["num_pixels"] == 32 * 40 + 28 * 36 + 36 * 30  # each once
    assert two["mIoU"] == pytest.approx(one["mIoU"], abs=0.01)  # a few near-ties may flip


KILLER = """
import os, signal, sys
import torch
torch.set_num_threads(1)
from denseseg.config import load_config
from denseseg.engine.hooks import HookBase
from denseseg.engine.trainer import train

class KillAt(HookBase):  # after step 5's update; last.pt holds step 4
    def after_step(self, trainer):
        if trainer.step == 5:
            os.kill(os.getpid(), signal.SIGKILL)

train(load_config("unet_demo", sys.argv[1:]), hooks=[KillAt()])
"""


def test_killed_two_process_run_resumes_on_one(data: Path, reference: Path, tmp_path) -> None:
    """Every rank SIGKILLed after step 5 (last.pt of step 4); resumed by 1 process with the
    same global batch it ends as the uninterrupted run; another global batch is refused."""
    script = tmp_path / "killer.py"
    script.write_text(textwrap.dedent(KILLER))
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    run = subprocess.run(
        [*cmd, str(script), *_overrides(data, out, 2)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode != 0
    assert load_checkpoint(out / "last.pt")["step"] == 4, run.stderr[-3000:]
    before = (out / "last.pt").read_bytes()
    with pytest.raises(ConfigError, match=r"data.batch_size=2 on 1 process\(es\) makes 2"):
        train(load_config("unet_demo", _overrides(data, out, 2)), resume=True)
    assert (out / "last.pt").read_bytes() == before
    train(load_config("unet_demo", _overrides(data, out, 4)), resume=True)
    step, weights = _weights(out)
    assert step == 8
    assert _close(weights, _weights(reference)[1])


SIGNALLER = """
import os, signal, sys
import torch
torch.set_num_threads(1)
from denseseg.config import load_config
from denseseg.engine.hooks import HookBase
from denseseg.engine.trainer import train
from denseseg.errors import Interrupted

class SignalRank0(HookBase):  # rank 0 alone gets SIGTERM, after step 5
    def after_step(self, trainer):
        if trainer.step == 5 and trainer.rank == 0:
            os.kill(os.getpid(), signal.SIGTERM)

try:
    train(load_config("unet_demo", sys.argv[2:]), hooks=[SignalRank0()])
except Interrupted as exc:
    with open(f"{sys.argv[1]}.{os.environ['RANK']}", "w") as fh:
        fh.write(str(exc))
"""


@pytest.mark.heavy  # make test-all: keeps make test under 15 minutes
def test_a_signal_on_one_rank_stops_every_rank_after_the_same_step(
    data: Path, reference: Path, tmp_path
) -> None:
    """SIGTERM on rank 0 after step 5: the flag is agreed after step 6, both ranks stop there,
    rank 0 saves last.pt of step 6, and a 1-process resume ends as the uninterrupted run."""
    script = tmp_path / "signaller.py"
    script.write_text(textwrap.dedent(SIGNALLER))
    out, said = tmp_path / "stopped", tmp_path / "said"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    run = subprocess.run(
        [*cmd, str(script), str(said), *_overrides(data, out, 2)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    for rank in (0, 1):
        assert "at step 6: saved" in Path(f"{said}.{rank}").read_text()
    assert load_checkpoint(out / "last.pt")["step"] == 6
    train(load_config("unet_demo", _overrides(data, out, 4)), resume=True)
    step, weights = _weights(out)
    assert step == 8
    assert _close(weights, _weights(reference)[1])


def test_a_rank_that_fails_stops_the_job_with_one_line(tmp_path) -> None:
    """Rank 1 alone reads a broken image in its first batch: it prints its one error line, the
    job stops within seconds (rank 0 is quiet though its collective broke), and the launcher
    adds one line naming the rank, with the rank's exit status; no traceback, no torchrun
    report."""
    root = write_folder_dataset(tmp_path / "data", n_train=8)
    first = [i for i, _ in EpochSampler(8, 0, rank=1, world=2, batch_size=2)][:2]
    for i in first:
        (root / "images" / f"train_{i:03d}.png").write_bytes(b"not a png")
    cmd = [sys.executable, "-m", "denseseg", "train", "--nproc", "2", "unet_demo"]
    cmd += tiny_recipe(root, tmp_path / "run") + ["model.kwargs={base_channels: 4, depth: 2}"]
    run = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    watchdog = threading.Timer(300, run.terminate)  # a hung job: SIGTERM reaches every rank
    watchdog.start()
    err, failed_at = [], None
    for line in run.stderr:  # type: ignore[union-attr]
        err.append(line.decode())
        if failed_at is None and line.startswith(b"denseseg: error:"):
            failed_at = time.monotonic()
    code, stopped_in = run.wait(), time.monotonic() - (failed_at or 0)
    watchdog.cancel()
    text = "".join(err)
    errors = [line for line in err if line.startswith("denseseg: error:")]
    assert code == 2, text
    assert len(errors) == 2, text
    assert f"train_{first[0]:03d}.png" in errors[0] or f"train_{first[1]:03d}.png" in errors[0]
    assert errors[1] == "denseseg: error: rank 1 failed (exit code 2); its message is above\n", text
    for noise in ("Traceback", "ChildFailedError", "torch.distributed", "[rank"):
        assert noise not in text, text
    # Not a timing test: a job whose peers waited on the broken collective would sit for gloo's
    # 30-minute timeout (or the watchdog's 300 s); on a loaded two-core machine the shutdown of
    # two torch processes alone can take tens of seconds.
    assert stopped_in < 90, f"{stopped_in:.1f} s from the error to the end\n{text}"


def test_more_processes_than_gpus_is_one_line(monkeypatch) -> None:
    """Local rank 1 of 2 on a machine with one visible GPU: refused before NCCL is touched."""
    from denseseg.engine import distributed

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: pytest.fail("set_device reached"))
    with pytest.raises(ConfigError, match="2 processes on this machine but 1 visible GPU"):
        with distributed.process_group(torch.device("cuda")):
            pass
