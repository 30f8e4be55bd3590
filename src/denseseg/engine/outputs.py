"""Where prediction writes, checked before anything is written: no user file is ever overwritten.

:func:`check_out_folder` refuses an output folder that is a file or lies under one;
:func:`refuse_out_in_input` an output folder that is, or lies inside, the input folder;
:func:`plan_outputs` names each input's outputs and refuses two inputs that would share one;
:class:`NoClobber` refuses, just before each write, a target that is an input image or a file
this run has already written (by device and inode, so links and case-insensitive names are
caught). The messages name the command-line options (``--out``) the user sets.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from denseseg.errors import ConfigError, DataError

__all__ = ["NoClobber", "check_out_folder", "plan_outputs", "refuse_out_in_input"]


def check_out_folder(folder: Path, option: str) -> None:
    """Refuse an output folder that is a file or lies under one, before any work is done.

    Args:
        folder: the folder to write into (it may not exist yet).
        option: the option and value named in the error, e.g. ``"--out runs/x"``.

    Raises:
        ConfigError: ``folder``, or a folder above it, is a file.
    """
    for part in (folder, *folder.parents):
        if part.exists():
            if not part.is_dir():
                raise ConfigError(f"{option}: {part} is a file, not a folder; choose another")
            return


def refuse_out_in_input(source: Path, out: Path) -> None:
    """Refuse an output folder that is the input folder (or lies inside it), or that is the
    folder of the input file: predictions would land among, or over, the images.

    Raises:
        ConfigError: ``out`` is, or lies inside, the input folder.
    """
    dst = out.resolve()
    if source.is_dir():
        src = source.resolve()
        if dst == src or src in dst.parents:
            where = "is" if dst == src else "lies inside"
            raise ConfigError(
                f"--out {out} {where} the input folder {source}; predictions would be written "
                "among (or over) the images: choose an --out outside it"
            )
        return
    folders = {source.resolve().parent, source.absolute().parent.resolve()}
    if dst in folders:
        raise ConfigError(
            f"--out {out} is the folder of the input {source}; predictions would be written "
            "among (or over) the images: choose another --out"
        )


def _output_stem(path: Path) -> str:
    # Leading dots would hide the outputs, and "..png" would lose its suffix ("_.png").
    return path.stem.lstrip(".") or "_"


def plan_outputs(
    files: Sequence[Path], out: Path, instance: bool, probs: bool
) -> dict[Path, list[Path]]:
    """The files each input gets in ``out``; refuses two inputs that would share one.

    Semantic models: ``STEM.png`` (label map), ``STEM_overlay.png`` and, with ``probs``,
    ``STEM_probs.npy``; instance models: ``STEM_instances.png``.

    Raises:
        ConfigError: two inputs map to one output name (``a.png`` and ``a.jpg``).
    """
    owner: dict[str, Path] = {}
    plan = {}
    for path in files:
        stem = _output_stem(path)
        names = [f"{stem}_instances.png"] if instance else [f"{stem}.png", f"{stem}_overlay.png"]
        if probs and not instance:
            names.append(f"{stem}_probs.npy")
        for name in names:
            first = owner.setdefault(os.path.normcase(name), path)
            if first != path:
                raise ConfigError(
                    f"inputs {first} and {path} would both be written as {out / name}; rename "
                    "one of them or predict them separately"
                )
        plan[path] = [out / name for name in names]
    return plan


class NoClobber:
    """Refuses to write over an input image, or over a file this run has already written.

    Files are told apart by device and inode, so a symlink or hard link to an input, and
    names a case-insensitive folder takes as one file, are caught too. Called with each
    output just before it is written; the previous output is recorded then.

    Args:
        inputs: the input images.
    """

    def __init__(self, inputs: Sequence[Path]) -> None:
        self.owner: dict[tuple[int, int], str] = {}
        for path in inputs:
            self._record(path, f"the input image {path}")
        self.pending: tuple[Path, str] | None = None

    def __call__(self, target: Path, source: Path | None = None) -> None:
        """Check ``target`` (written next, for the input ``source``) and record the previous
        target, now written."""
        if self.pending is not None:
            self._record(*self.pending)
        self.check(target)
        self.pending = (target, f"written a moment ago for {source or 'this run'}")

    def check(self, target: Path) -> None:
        """Raise DataError if ``target`` is an input or a file this run wrote."""
        key = _file_key(target)
        what = self.owner.get(key) if key is not None else None
        if what is not None:
            raise DataError(
                f"will not write {target}: it is {what}; rename one of the inputs or choose "
                "another --out"
            )

    def _record(self, path: Path, what: str) -> None:
        key = _file_key(path)
        if key is not None:
            self.owner.setdefault(key, what)


def _file_key(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino
