"""Writing a file so that a reader never sees half of it, and printing file names safely.

:func:`atomic_write` is the one writer behind every file denseseg produces (checkpoints, images,
masks, metric tables, plots): it writes a temporary file in the target's folder and
``os.replace`` s it onto the target. :func:`show_path` turns any file name into printable text
for messages.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from denseseg.errors import DataError

__all__ = ["TMP_SUFFIX", "atomic_write", "show_path"]

PathLike = str | os.PathLike

TMP_SUFFIX = ".tmp"
"""Suffix of :func:`atomic_write`'s temporary files, named ``.NAME.RANDOM.tmp``."""


def show_path(path: PathLike | str) -> str:
    """``path`` as text that always prints: a byte the file system name does not decode in
    (a lone surrogate) is shown as ``\\xNN``, control characters as escapes.

    Args:
        path: A file name or path.

    Returns:
        The path, escaped where needed; unchanged when it is printable already.
    """
    text = os.fsdecode(path)
    if text.isprintable():
        return text
    return "".join(_show_char(c) for c in text)


def _show_char(c: str) -> str:
    if c.isprintable():
        return c
    if 0xDC80 <= ord(c) <= 0xDCFF:  # os.fsdecode's stand-in for the undecodable byte
        return f"\\x{ord(c) - 0xDC00:02x}"
    return c.encode("unicode_escape").decode("ascii")


@contextmanager
def atomic_write(path: PathLike, what: str = "file") -> Iterator[BinaryIO]:
    """Write ``path`` through a temporary file in its folder, then ``os.replace`` it there.

    A reader sees the old file or the new one, never half of one; a symbolic link (or any
    other entry) at ``path`` is replaced, not written through, so a link planted in an output
    folder cannot redirect the write. The new file gets the usual permissions (0666 less the
    umask). Missing parent folders are created. If the body raises, ``path`` is left as it was.

    Args:
        path: The file to write.
        what: What it is, for messages (``"image"``, ``"metrics file"``, ...).

    Yields:
        A binary file object open for writing.

    Raises:
        DataError: The folder cannot be written (read-only, full, ``path`` is a folder, ...).
    """
    path = Path(path)
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _create_temporary(path)
        with os.fdopen(fd, "wb") as fh:
            yield fh
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        raise DataError(f"cannot write {what} {show_path(path)} ({_reason(exc, path)})") from None
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def _reason(exc: OSError, path: Path) -> str:
    """What went wrong writing ``path``, and what to do."""
    if not exc.errno:  # raised by a writer (Pillow: "cannot write mode RGBA as JPEG")
        return str(exc)
    if isinstance(exc, IsADirectoryError):
        return "a folder of that name is in the way; remove it or choose another name"
    blocking = [p for p in path.parents if p.exists() and not p.is_dir()]
    if blocking:  # mkdir met a file where a folder should be
        return f"{show_path(blocking[-1])} is a file, not a folder; choose another folder"
    return f"{exc.strerror}; check that the folder is writable and has free space"


def _create_temporary(path: Path) -> tuple[int, Path]:
    """Create ``.<name>.<random>.tmp`` beside ``path``; O_EXCL never opens an existing entry
    (nor follows a link), and mode 0666 lets the umask set the permissions as for any file."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = path.parent / f".{path.name[:200]}.{secrets.token_hex(4)}{TMP_SUFFIX}"
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
