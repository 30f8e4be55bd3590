"""Training on several processes with PyTorch's own engine (``torchrun``).

``torchrun --nproc_per_node N -m denseseg train RECIPE`` starts N processes, each with
``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` in its environment. :func:`process_group` joins
them (gloo on a CPU, NCCL on CUDA, one device per process: ``cuda:LOCAL_RANK``) for the length
of a training run; a process started without torchrun's environment makes no process group and
trains exactly as before. The helpers below work in both cases: with one process they return
their input unchanged and never communicate.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset, Subset

from denseseg.errors import ConfigError, DensesegError, Interrupted

log = logging.getLogger("denseseg")

T = TypeVar("T")

__all__ = [
    "AnotherRankFailed",
    "all_reduce_max",
    "all_reduce_sum",
    "barrier",
    "broadcast_object",
    "convert_sync_bn",
    "gather_objects",
    "is_main",
    "local_device",
    "process_group",
    "quiet_unless_main",
    "rank",
    "run_torchrun",
    "shard",
    "sum_array",
    "sum_over_ranks",
    "torchrun_local_world_size",
    "undo_gradient_average",
    "world_size",
]


def _env_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def is_distributed() -> bool:
    """True while a process group of more than one process is active."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (torchrun's ``RANK``; 0 without a process group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0") or 0)


def world_size() -> int:
    """The number of training processes (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Rank 0: the process that locks the run folder, logs, prints and saves checkpoints."""
    return rank() == 0


def local_device(device: torch.device) -> torch.device:
    """``device`` made this process's own: ``cuda:LOCAL_RANK`` for CUDA under torchrun."""
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[None]:
    """Join torchrun's process group for the block (gloo on CPU, NCCL on CUDA) and leave it
    afterwards; without torchrun's environment (or with ``WORLD_SIZE=1``) do nothing."""
    if _env_world_size() <= 1 or not dist.is_available() or dist.is_initialized():
        yield
        return
    if device.type == "cuda":
        _check_gpu_count(local_device(device))
        torch.cuda.set_device(local_device(device))
        dist.init_process_group("nccl", device_id=local_device(device))
    else:
        dist.init_process_group("gloo")
    try:
        yield
    except Interrupted as exc:  # every rank stops after the same step: rank 0 says so
        exc.quiet = not is_main()
        raise
    except Exception as exc:
        if not _first_to_fail():
            raise AnotherRankFailed(exc) from None
        raise
    finally:
        dist.destroy_process_group()


def _check_gpu_count(device: torch.device) -> None:
    """One process per GPU: a local rank beyond the visible GPUs is one clear error."""
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise ConfigError(
            f"{os.environ.get('LOCAL_WORLD_SIZE', '?')} processes on this machine but {count} "
            "visible GPU(s): one process per GPU; lower --nproc (--nproc_per_node) or use "
            "--device cpu / train.device=cpu"
        )


class AnotherRankFailed(DensesegError):
    """This rank stopped because another rank of the run failed first (a collective found its
    peer gone): that rank says why, so the command line prints nothing for this one."""

    exit_code = 3
    quiet = True

    def __init__(self, cause: BaseException) -> None:
        super().__init__(
            f"rank {rank()} stopped because another rank failed first ({type(cause).__name__} "
            f"here: {' '.join(str(cause).split())[:200]})"
        )


def _first_to_fail() -> bool:
    """Claim the run's first failure in the process group's store: True for the first rank
    that fails (it reports), False on the ranks that fail after it (their collectives found
    it gone)."""
    me = str(rank()).encode()
    try:
        store = dist.distributed_c10d._get_default_store()
        return store.compare_set("denseseg/first_failure", "", me) == me
    except Exception:  # the store went with the failed rank: nothing to compare with
        return True


def convert_sync_bn(model: nn.Module, device: torch.device) -> nn.Module:
    """``model.sync_bn: true``: ``model`` with its batch norm layers made SyncBatchNorm, whose
    statistics run over the global batch, when several CUDA processes train; ``model`` itself
    with one process (its batch is the whole batch already).

    Raises:
        ConfigError: on a CPU, where SyncBatchNorm has no kernel.
    """
    if device.type != "cuda":
        raise ConfigError(
            f"model.sync_bn: true needs CUDA (SyncBatchNorm has no CPU kernel); training runs "
            f"on {device.type}: set model.sync_bn=false"
        )
    if world_size() == 1:
        log.info("model.sync_bn: one process, whose batch is the whole batch; nothing to sync")
        return model
    n = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    log.info("model.sync_bn: %d batch norm layers synchronised over %d processes", n, world_size())
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


@contextlib.contextmanager
def quiet_unless_main() -> Iterator[None]:
    """For the block, ranks other than 0 log errors only (denseseg's logger)."""
    logger = logging.getLogger("denseseg")
    level = logger.level
    if not is_main():
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def broadcast_object(obj: T) -> T:
    """Rank 0's ``obj`` (any picklable object) on every rank; ``obj`` itself with one process."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    """Wait for every process (nothing with one process)."""
    if is_distributed():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over the processes (in place; ``t`` itself with one process)."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """``t``'s element-wise maximum over the processes (in place)."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def sum_over_ranks(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Each of ``tensors`` summed over the processes (one all-reduce for all of them), with
    autograd through this process's own values, the other processes' being constants; the
    tensors themselves with one process. For losses normalised by global statistics."""
    if not is_distributed():
        return list(tensors)
    flat = torch.cat([t.reshape(-1) for t in tensors])
    total = all_reduce_sum(flat.detach().clone())
    summed = flat + (total - flat).detach()
    parts = summed.split([t.numel() for t in tensors])
    return [p.reshape(t.shape) for p, t in zip(parts, tensors, strict=True)]


def undo_gradient_average(loss: torch.Tensor) -> torch.Tensor:
    """``loss`` with its value kept and its gradient multiplied by the number of processes.

    DistributedDataParallel averages the processes' gradients. A process whose loss is the
    global batch's (from :func:`sum_over_ranks` statistics) has as gradient its own share
    of the global gradient; the shares must be summed, not averaged: this undoes the
    division."""
    world = world_size()
    if world == 1:
        return loss
    return loss * world - (loss * (world - 1)).detach()


def sum_array(a: np.ndarray) -> np.ndarray:
    """The numpy array ``a`` summed over the processes (e.g. confusion matrices); a new array."""
    if not is_distributed():
        return a
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    return all_reduce_sum(torch.as_tensor(a).to(device)).cpu().numpy()


def gather_objects(obj: object) -> list | None:
    """Every process's ``obj`` (picklable), in rank order, on rank 0; None on the other ranks;
    ``[obj]`` with one process. Every rank must call it (e.g. the detections of each shard)."""
    if not is_distributed():
        return [obj]
    gathered: list | None = [None] * world_size() if is_main() else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def shard(dataset: Dataset) -> Dataset:
    """This rank's share of ``dataset`` for evaluation: every ``world``-th item from ``rank``
    on, so that each item is evaluated once (no padding with repeated items)."""
    if not is_distributed():
        return dataset
    return Subset(dataset, range(rank(), len(dataset), world_size()))  # type: ignore[arg-type]


def torchrun_local_world_size() -> int | None:
    """The number of processes torchrun started on this machine, where this process is one of
    them (``LOCAL_WORLD_SIZE``); None outside torchrun."""
    if not dist.is_torchelastic_launched():
        return None
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


_SIGNAL_EXITS = (128 + signal.SIGINT, 128 + signal.SIGTERM)


def run_torchrun(nproc: int, args: Sequence[str]) -> int:
    """Run ``python -m denseseg ARGS`` on ``nproc`` processes of this machine with torchrun's
    own launcher (``torch.distributed.launcher``, ``--standalone`` rendezvous), in this process:
    the shortcut ``denseseg train|eval|predict --nproc N``. Returns the exit status.

    Each worker prints its own errors; a failed worker stops the others (torchrun's agent
    ends them) and is summed up in one line, ``denseseg: error: rank R failed (exit code C)``,
    instead of torchrun's report; the status is the worker's. Ctrl-C and SIGTERM reach the
    launcher, which passes them on to the workers once (they save and stop after the step)."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    with tempfile.TemporaryDirectory(prefix="denseseg-torchrun-") as logs, _launcher_settings():
        config = LaunchConfig(
            min_nodes=1,
            max_nodes=1,
            nproc_per_node=nproc,
            run_id=f"denseseg-{os.getpid()}",
            rdzv_backend="c10d",
            rdzv_endpoint="localhost:0",  # a free port, as torchrun --standalone
            max_restarts=0,
            monitor_interval=0.1,
            logs_specs=DefaultLogsSpecs(log_dir=logs),
        )
        try:
            elastic_launch(config, sys.executable)("-m", "denseseg", *args)
        except ChildFailedError as exc:
            return _failed(exc)
        except SignalException as exc:
            return 128 + int(exc.sigval)
    return 0


def _failed(exc: Exception) -> int:
    """The failed worker in one line (it printed its own message); its exit status.
    Workers stopped by a signal after saving (Ctrl-C, SIGTERM) said so themselves."""
    rank, failure = min(exc.failures.items(), key=_cause_first)  # type: ignore[attr-defined]
    code = failure.exitcode
    if code in _SIGNAL_EXITS:
        return code
    if code < 0:
        line = f"rank {rank} was killed by {failure.signal_name()}"
    else:
        line = f"rank {rank} failed (exit code {code}); its message is above"
    print(f"denseseg: error: {line}", file=sys.stderr)
    return code if code > 0 else 128 - code


def _cause_first(item: tuple[int, Any]) -> tuple:
    """Sort key of ``(rank, failure)``, the cause first: after it come the ranks another's
    failure stopped and those the launcher stopped (SIGTERM); then the earlier failure (to
    the second), and a rank killed by a signal (out of memory, say) before one that failed
    in the same second (its collective broke), then the lower rank."""
    code, when = item[1].exitcode, item[1].timestamp
    return code == AnotherRankFailed.exit_code, code == -signal.SIGTERM, when, code >= 0, item[0]


@contextlib.contextmanager
def _launcher_settings() -> Iterator[None]:
    """For the launcher's run: torchelastic's log silenced (its failure report and rendezvous
    chatter; each worker says what failed), torchrun's ``OMP_NUM_THREADS=1`` default for the
    workers, and the signal handlers and variables torchelastic sets restored afterwards."""
    names = ("torch.distributed.elastic", "torch.distributed.launcher")
    loggers = [logging.getLogger(n) for n in names]
    saved = [(lg.propagate, lg.handlers[:]) for lg in loggers]
    for lg in loggers:
        lg.propagate, lg.handlers = False, [logging.NullHandler()]
    signals = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT]
    handlers = {s: signal.getsignal(s) for s in signals}
    env = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "TORCHELASTIC_SIGNALS_TO_HANDLE")}
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        yield
    finally:
        for lg, (propagate, hs) in zip(loggers, saved, strict=True):
            lg.propagate, lg.handlers = propagate, hs
        for s, h in handlers.items():
            signal.signal(s, h)
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
