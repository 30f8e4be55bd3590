"""Training on several processes (torchrun, DistributedDataParallel, gloo on the CPU).

A 2-process run with per-process batch B computes the same steps as a 1-process run with batch
2B: the sampler shards the epoch's one order, augmentation seeds follow the sample's position,
and the cross-entropy is divided by the global count of weighted, non-ignored pixels. Tested on a
tiny U-Net without batch norm (batch statistics differ between the two by design), with class
weights and ignored pixels (padding after a random scale), so the global normalisation matters.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import tiny_recipe, write_folder_dataset
from denseseg.checkpoint import load_checkpoint
from denseseg.config import load_config
from denseseg.engine.sampler import EpochSampler
from denseseg.engine.trainer import _check_global_batch, train
from denseseg.errors import ConfigError
from denseseg.losses.cross_entropy import CrossEntropyLoss

COMMON = [
    "model.kwargs={base_channels: 4, depth: 2, batch_norm: false}",
    "data.scale_range=[0.6, 1.0]",
    "data.crop_size=[32, 32]",
    "loss.class_weights=[1.0, 2.0, 3.0]",
    "schedule.name=cosine",
    "train.deterministic=true",
    "train.log_every=1",
    "train.keep_last=0",
]


@pytest.fixture(autouse=True)
def _nondeterministic_afterwards():
    yield
    torch.use_deterministic_algorithms(False)


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


def test_global_cross_entropy_is_the_whole_batch_mean() -> None:
    """Summed losses over summed weights of the shards == the mean of the whole batch, with
    class weights and ignored pixels (the shards' ignored counts differ)."""
    torch.manual_seed(0)
    logits, target = torch.randn(4, 3, 6, 6), torch.randint(0, 3, (4, 6, 6))
    target[0, :4] = 255
    ce = CrossEntropyLoss(ignore_index=255, weight=torch.tensor([1.0, 2.0, 3.0]))
    parts = [ce.sum_and_weight(logits[i : i + 2], target[i : i + 2]) for i in (0, 2)]
    total = sum(p[0] for p in parts) / sum(p[1] for p in parts)
    assert torch.allclose(total, ce(logits, target), atol=1e-6)


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
    with pytest.raises(ConfigError, match=r"run/last\.pt.*data\.batch_size=.*processes"):
        _check_global_batch(Path("run/last.pt"), ckpt, b1, w1)


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
    with pytest.raises(ConfigError, match="data.batch_size=2 on 1 processes"):
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
