"""The package's own exception types.

Every error a user can cause (a bad path, an unreadable image, a bad label value, an unknown
option) raises a subclass of :class:`DensesegError` whose message names the file or option and
what to do. The CLI prints that message on one line and exits non-zero, never a traceback.
:func:`require_extra` imports an optional dependency (pycocotools, timm, ...) when a feature
first needs it, or raises :class:`MissingExtraError` naming the extra that installs it.
"""

from __future__ import annotations

import importlib
from typing import Any


class DensesegError(Exception):
    """Base class for errors caused by user input; the message is shown as is."""


class ConfigError(DensesegError):
    """A recipe, an override or an argument names an unknown key or holds a bad value."""


class DataError(DensesegError):
    """A dataset file is missing, unreadable, or holds values the dataset does not allow."""


class NotAnImageError(DataError):
    """A file (or an upload) is not an image in a format that is read."""


class ImageTooLargeError(DataError):
    """An image claims more pixels than the reader's limit (a decompression-bomb guard)."""


class CheckpointError(DensesegError):
    """A checkpoint or weights file is missing, truncated or does not fit the model."""


class Interrupted(DensesegError):
    """Training stopped on a signal (Ctrl-C, ``kill``); the CLI exits with 128 + the signal."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + int(signum)


class MissingExtraError(ConfigError):
    """A feature needs an optional dependency (an extra of the package) that is not installed."""


def require_extra(module: str, extra: str, feature: str, hint: str = "") -> Any:
    """Import the optional dependency ``module``, or say in one line which extra installs it.

    Args:
        module: the module to import, e.g. ``"pycocotools.mask"``.
        extra: the extra of ``pyproject.toml`` that installs it, e.g. ``"coco"``.
        feature: what needs it, as the subject of the message, e.g. ``"COCO evaluation"``.
        hint: appended to the message, e.g. another way round.

    Raises:
        MissingExtraError: ``"<feature> needs the extra denseseg[<extra>]: pip install
            'denseseg[<extra>]'"``.
    """
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtraError(
            f"{feature} needs the extra denseseg[{extra}]: pip install 'denseseg[{extra}]'"
            + (f" {hint}" if hint else "")
        ) from None
