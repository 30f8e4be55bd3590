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
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Subset

__all__ = [
    "all_reduce_max",
    "all_reduce_sum",
    "barrier",
    "is_main",
    "local_device",
    "process_group",
    "rank",
    "run_torchrun",
    "shard",
    "sum_array",
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
        torch.cuda.set_device(local_device(device))
        dist.init_process_group("nccl", device_id=local_device(device))
    else:
        dist.init_process_group("gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


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


def sum_array(a: np.ndarray) -> np.ndarray:
    """The numpy array ``a`` summed over the processes (e.g. confusion matrices); a new array."""
    if not is_distributed():
        return a
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    return all_reduce_sum(torch.as_tensor(a).to(device)).cpu().numpy()


def shard(dataset: Dataset) -> Dataset:
    """This rank's share of ``dataset`` for evaluation: every ``world``-th item from ``rank``
    on, so that each item is evaluated once (no padding with repeated items)."""
    if not is_distributed():
        return dataset
    return Subset(dataset, range(rank(), len(dataset), world_size()))  # type: ignore[arg-type]


def run_torchrun(nproc: int, args: Sequence[str]) -> int:
    """``python -m torch.distributed.run --standalone --nproc_per_node N -m denseseg ARGS``:
    the single-machine shortcut ``denseseg train --nproc N``; returns torchrun's exit status.

    Ctrl-C reaches the workers through the terminal's process group, SIGTERM sent to this
    process is passed on to torchrun (which passes it to the workers)."""
    import signal

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += ["--nproc_per_node", str(nproc), "-m", "denseseg", *args]
    child = subprocess.Popen(cmd)

    def forward(signum: int, frame: object) -> None:
        child.send_signal(signum)

    # Ctrl-C already reaches torchrun and the workers: passing it on would be a second signal,
    # which stops the workers at once without saving.
    previous = {
        signal.SIGINT: signal.signal(signal.SIGINT, signal.SIG_IGN),
        signal.SIGTERM: signal.signal(signal.SIGTERM, forward),
    }
    try:
        return child.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
