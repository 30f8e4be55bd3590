"""A training run's folder: created with a clear error, locked against a second run, cleaned.

Two trainings writing into one ``train.out_dir`` would lose each other's checkpoints and
interleave ``log.csv``. :class:`RunLock` takes an exclusive ``flock`` on ``out_dir/.lock`` (and
writes the holder's PID and host into it) before any data is read; a second run is refused in one
line naming the holder. The kernel releases the lock when its process ends however it ends
(``kill -9`` included), so a lock file left behind by a dead run is stale by construction and the
next run simply takes it over. The file itself is never deleted: deleting it while another
process opens it would let two runs lock two different files.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from types import TracebackType

from denseseg.engine.outputs import check_out_folder
from denseseg.errors import ConfigError

try:  # POSIX; on Windows the run is not locked (msvcrt's locks are advisory per byte range)
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".lock"


def make_run_folder(out_dir: str | os.PathLike, key: str = "train.out_dir") -> Path:
    """Create ``out_dir`` (and parents); an impossible folder ends in one line naming ``key``."""
    if not str(out_dir).strip():
        raise ConfigError(f"{key} is empty; name the folder for checkpoints and logs")
    out = Path(out_dir)
    check_out_folder(out, f"{key}={out}")  # a file where the folder (or a parent) should be
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{key}={out} cannot be created ({exc.strerror or exc})") from None
    return out


class RunLock:
    """Exclusive lock on a run folder, held from ``acquire()`` (or ``with``) until ``release()``.

    Raises:
        ConfigError: another live process holds the folder, or the lock file cannot be written.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.path = Path(folder) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)  # never through a link
        try:
            fd = os.open(self.path, flags, 0o644)
        except OSError as exc:
            if self.path.is_symlink():
                raise ConfigError(
                    f"{self.path} is a symbolic link; the run folder's lock must be a plain "
                    "file: remove the link"
                ) from None
            raise ConfigError(
                f"cannot lock the run folder {self.path.parent} ({exc.strerror or exc})"
            ) from None
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = self._holder(fd)
                os.close(fd)
                raise ConfigError(
                    f"{self.path.parent} is in use by another training ({holder}); wait for it "
                    "to finish or set train.out_dir to another folder"
                ) from None
        self._fd = fd
        self._write_holder(fd)
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()

    @staticmethod
    def _write_holder(fd: int) -> None:
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)

    @staticmethod
    def _holder(fd: int) -> str:
        try:
            info = json.loads(os.pread(fd, 4096, 0) or b"{}")
            since = time.strftime("%Y-%m-%d %H:%M", time.localtime(float(info["since"])))
            return f"PID {int(info['pid'])} on {info['host']}, started {since}"
        except (ValueError, KeyError, TypeError, OSError):
            return "a process that has not written its PID yet"
