"""Ctrl-C and SIGTERM stop training after the current step with a consistent last.pt: resuming
gives the uninterrupted run's weights bit for bit (CPU, deterministic mode), wherever the signal
lands. A second signal stops at once without saving. The run folder is locked against a second
training, stale temporaries of a killed save are removed, log.csv is rewritten atomically."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import denseseg.engine.trainer as trainer
from conftest import tiny_recipe, write_folder_dataset
from denseseg.checkpoint import atomic_save, load_checkpoint
from denseseg.config import load_config
from denseseg.engine.run_folder import RunLock
from denseseg.engine.sampler import SeededTransformDataset
from denseseg.engine.tasks import SemanticTask
from denseseg.errors import ConfigError, Interrupted

STEPS = 10
COMMON = [
    f"train.max_steps={STEPS}",
    "train.eval_every=4",
    "train.ckpt_every=3",
    "train.keep_last=0",
    "train.deterministic=true",
    "train.log_every=1",
]


pytestmark = pytest.mark.usefixtures("nondeterministic_afterwards")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("interrupt") / "data"
    return write_folder_dataset(root, val_sizes=[(32, 40), (28, 36), (36, 30)])


@pytest.fixture(scope="module")
def reference(data: Path, tmp_path_factory) -> dict[str, torch.Tensor]:
    out = tmp_path_factory.mktemp("reference") / "run"
    trainer.train(load_config("unet_demo", tiny_recipe(data, out) + COMMON))
    return _state(out)


def _state(run: Path) -> dict[str, torch.Tensor]:
    ckpt = load_checkpoint(run / "last.pt")
    assert ckpt["step"] == STEPS
    moments = {
        f"opt.{i}.{k}": v for i, s in ckpt["optimizer"]["state"].items() for k, v in s.items()
    }
    return {**ckpt["model"], **moments}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class _Trigger:
    """Sends ``signum`` to this process at the ``at``-th call (signals run between bytecodes,
    so the handler fires right there, inside whatever the call is part of)."""

    def __init__(self, signum: int, at: int, times: int = 1) -> None:
        self.signum, self.at, self.times, self.calls = signum, at, times, 0

    def __call__(self, *args, **kwargs) -> None:
        self.calls += 1
        if self.at <= self.calls < self.at + self.times:
            os.kill(os.getpid(), self.signum)


def _arm(point: str, trigger: _Trigger, monkeypatch) -> None:
    """Make ``trigger`` fire inside ``point`` of the training loop."""

    def wrap(module, name):
        real = getattr(module, name)

        def wrapped(*args, **kwargs):
            trigger()
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapped)

    if point == "data":
        wrap(SeededTransformDataset, "__getitem__")
    elif point == "evaluation":
        wrap(SemanticTask, "evaluate")
    elif point in ("checkpoint save", "scheduler"):
        wrap(trainer, "atomic_save" if point == "checkpoint save" else "lr_factor")
    elif point in ("forward (batch norm)", "backward"):
        real_build = trainer.build_model_for

        def build(*args, **kwargs):
            model, saved = real_build(*args, **kwargs)
            bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
            conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
            if point == "backward":
                conv.weight.register_hook(lambda grad: trigger())
            else:
                bn.register_forward_pre_hook(lambda *a: trigger())
            return model, saved

        monkeypatch.setattr(trainer, "build_model_for", build)
    else:  # inside the optimiser's step, before and after the parameter update
        from torch.optim.optimizer import (
            register_optimizer_step_post_hook,
            register_optimizer_step_pre_hook,
        )

        register = {"optimizer step (pre)": register_optimizer_step_pre_hook}
        handle = register.get(point, register_optimizer_step_post_hook)(lambda *a: trigger())
        monkeypatch.setattr(_Trigger, "handle", handle, raising=False)


POINTS = [
    ("data", 7),
    ("forward (batch norm)", 5),
    ("backward", 4),
    ("optimizer step (pre)", 6),
    ("optimizer step (post)", 2),
    ("scheduler", 8),
    ("evaluation", 1),
    ("checkpoint save", 2),
]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize(("point", "at"), POINTS, ids=[p for p, _ in POINTS])
def test_signal_anywhere_resumes_bit_for_bit(
    data: Path, reference, tmp_path: Path, monkeypatch, point: str, at: int, signum: int
) -> None:
    out = tmp_path / "run"
    cfg = load_config("unet_demo", tiny_recipe(data, out) + COMMON)
    trigger = _Trigger(signum, at)
    _arm(point, trigger, monkeypatch)
    try:
        with pytest.raises(Interrupted, match=rf"{signal.Signals(signum).name} at step \d+"):
            trainer.train(cfg)
    finally:
        if hasattr(_Trigger, "handle"):
            _Trigger.handle.remove()
    assert trigger.calls >= at
    stopped = load_checkpoint(out / "last.pt")["step"]
    assert 0 < stopped < STEPS
    monkeypatch.undo()
    trainer.train(cfg, resume=True)
    assert _same(_state(out), reference)
    logged = [int(r.split(",")[0]) for r in (out / "log.csv").read_text().splitlines()[1:]]
    assert [s for s in logged if s <= STEPS] == sorted(logged)  # no step logged twice


def test_second_signal_stops_at_once_without_saving(data: Path, tmp_path: Path, monkeypatch):
    out = tmp_path / "run"
    trigger = _Trigger(signal.SIGINT, 5, times=2)  # two Ctrl-C inside one forward pass
    _arm("forward (batch norm)", trigger, monkeypatch)
    with pytest.raises(Interrupted, match="without saving.*holds step 3") as info:
        trainer.train(load_config("unet_demo", tiny_recipe(data, out) + COMMON))
    assert info.value.exit_code == 130
    assert load_checkpoint(out / "last.pt")["step"] == 3  # the periodic save, untouched


def test_handlers_restored(data: Path, tmp_path: Path) -> None:
    before = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]
    trainer.train(load_config("unet_demo", tiny_recipe(data, tmp_path / "r") + COMMON))
    assert [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)] == before


def test_stale_temporaries_removed_and_log_rewritten(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = load_config("unet_demo", tiny_recipe(data, out) + COMMON + ["train.keep_last=5"])
    trainer.train(cfg)
    stale = out / ".last.pt.k3j2_x.tmp"  # what a save killed mid-write leaves
    stale.write_bytes(b"half a checkpoint")
    (out / "log.csv").write_text((out / "log.csv").read_text() + "garbage,row\n")
    atomic_save(load_checkpoint(out / "step_0000003.pt"), out / "last.pt")  # back to step 3
    trainer.train(cfg, resume=True)
    assert not stale.exists()
    rows = (out / "log.csv").read_text().splitlines()
    assert "garbage" not in "".join(rows) and not list(out.glob(".log.csv*"))


def test_checkpoints_follow_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        atomic_save({"x": torch.zeros(1)}, tmp_path / "a.pt")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.pt").stat().st_mode) == 0o640  # group may read


def test_second_training_on_the_same_folder_is_refused(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    with pytest.raises(ConfigError, match=rf"{out} is in use by another training \(PID"):
        with RunLock(out), RunLock(out):
            pass
    with RunLock(out):  # released: takes it again, the file left behind is no obstacle
        pass


def test_a_run_that_fails_before_writing_leaves_no_folder(data: Path, tmp_path: Path) -> None:
    from denseseg.engine.trainer import train
    from denseseg.errors import DataError

    new, kept = tmp_path / "new" / "run", tmp_path / "kept"
    kept.mkdir()
    for out in (new, kept):
        cfg = load_config("unet_demo", [*tiny_recipe(data, out), "data.train_split=nosuch"])
        with pytest.raises(DataError, match="has no split 'nosuch'"):
            train(cfg)
    assert not new.exists()  # made by the run: removed again (its parent stays)
    assert kept.is_dir() and not list(kept.iterdir())  # the user's folder: kept, no lock left


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "denseseg", *args]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def test_a_second_process_is_refused_while_the_folder_is_locked(data: Path, tmp_path: Path):
    out = tmp_path / "run"
    out.mkdir()
    with RunLock(out):
        second = subprocess.run(
            _cli("train", "unet_demo", *tiny_recipe(data, out)),
            env=ENV,
            capture_output=True,
            text=True,
        )
    assert second.returncode == 2
    assert second.stderr.strip().splitlines() == [
        f"denseseg: error: {out} is in use by another training "
        + second.stderr.split("another training ", 1)[1].strip()
    ]
    assert f"PID {os.getpid()}" in second.stderr and not (out / "log.csv").exists()


def _wait_for_step(log: Path, step: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    end = time.time() + timeout
    while time.time() < end and proc.poll() is None:
        if log.is_file() and len(log.read_text().splitlines()) > step:
            return
        time.sleep(0.02)


@pytest.mark.heavy  # minutes: make test-all
def test_real_signals_from_outside(data: Path, tmp_path: Path) -> None:
    """As a user does it, in 3 processes: Ctrl-C in a terminal (SIGINT to the whole process
    group, loader workers included) at a random moment, then `kill` (SIGTERM) of the resumed run,
    then a final resume; the weights equal an uninterrupted run's, which has no loader workers
    and evaluates less often (neither may change what training computes)."""
    steps = ["train.max_steps=30"]
    reference = tmp_path / "reference"
    trainer.train(load_config("unet_demo", tiny_recipe(data, reference) + COMMON + steps))
    out = tmp_path / "run"
    args = ["train", "unet_demo", *tiny_recipe(data, out), *COMMON, *steps, "train.eval_every=1"]
    args.append("data.num_workers=1")
    for signum, extra in ((signal.SIGINT, []), (signal.SIGTERM, ["--resume"])):
        proc = subprocess.Popen(
            _cli(*args, *extra), env=ENV, stderr=subprocess.PIPE, text=True, start_new_session=True
        )
        begun = load_checkpoint(out / "last.pt")["step"] if extra else 0
        _wait_for_step(out / "log.csv", begun + 2, proc)
        if signum == signal.SIGINT:
            os.killpg(proc.pid, signum)  # what the terminal does on Ctrl-C
        else:
            proc.send_signal(signum)
        err = proc.communicate(timeout=60)[1]
        if proc.returncode == 0:
            pytest.skip("the run ended before the signal came (an unusually fast machine)")
        assert proc.returncode == 128 + signum, err
        assert "Traceback" not in err and f"{signum.name} at step" in err
    done = subprocess.run(_cli(*args, "--resume"), env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    a = load_checkpoint(reference / "last.pt")
    b = load_checkpoint(out / "last.pt")
    assert a["step"] == b["step"] == 30
    assert _same(a["model"], b["model"])


def test_resume_mid_epoch_with_dropout(data: Path, tmp_path: Path, monkeypatch) -> None:
    """A model that draws from the global RNG while training (dropout here; Mask R-CNN's box
    sampler too) resumes exactly from the middle of an epoch: the loader of the resumed epoch
    must not draw from the global RNG where the uninterrupted run's did not."""
    dropout = ["model.kwargs={base_channels: 4, depth: 2, batch_norm: true, dropout: 0.5}"]
    over = COMMON + dropout + ["train.eval_every=0"]
    trainer.train(load_config("unet_demo", tiny_recipe(data, tmp_path / "ref") + over))
    out = tmp_path / "run"
    cfg = load_config("unet_demo", tiny_recipe(data, out) + over)
    _arm("optimizer step (post)", _Trigger(signal.SIGINT, 4), monkeypatch)  # step 4 of 3 per epoch
    try:
        with pytest.raises(Interrupted, match="SIGINT at step 4"):
            trainer.train(cfg)
    finally:
        _Trigger.handle.remove()
    monkeypatch.undo()
    trainer.train(cfg, resume=True)
    assert _same(_state(out), _state(tmp_path / "ref"))


def test_an_error_with_loader_workers_exits(tmp_path: Path) -> None:
    """A data error met by a loader worker ends the process with one line, and the process
    exits: the workers must not outlive it (they once ignored SIGTERM, and Python's exit
    waited for them forever)."""
    data = write_folder_dataset(tmp_path / "data", n_train=4, n_val=1)
    image = data / "images" / "train_002.png"
    image.write_bytes(image.read_bytes()[:200])
    args = ["train", "unet_demo", *tiny_recipe(data, tmp_path / "run"), "data.num_workers=1"]
    done = subprocess.run(_cli(*args), env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("denseseg: error: ")
    assert "train_002.png" in done.stderr and "Traceback" not in done.stderr


def test_start_up_summary(data: Path, tmp_path: Path, caplog, monkeypatch) -> None:
    import logging

    monkeypatch.setattr(logging.getLogger("denseseg"), "propagate", True)
    with caplog.at_level(logging.INFO, logger="denseseg"):
        trainer.train(load_config("unet_demo", tiny_recipe(data, tmp_path / "r")))
    line = next(r.getMessage() for r in caplog.records if "parameters" in r.getMessage())
    assert line.startswith("unet (semantic, ") and "6 training / 3 validation samples" in line
    assert "batch 2 x 1 process(es) = 2, 3 steps per epoch; cpu, float32; 8 steps" in line
