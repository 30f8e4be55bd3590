"""Progress bars: tqdm's, all silenced by ``denseseg -q`` (the environment variable
``DENSESEG_QUIET=1``, which the processes of ``--nproc`` inherit)."""

from __future__ import annotations

import os
from typing import Any

from tqdm.auto import tqdm as _tqdm

QUIET_ENV = "DENSESEG_QUIET"


def tqdm(*args: Any, **kwargs: Any) -> _tqdm:
    """``tqdm.auto.tqdm``, disabled when ``DENSESEG_QUIET=1``."""
    if os.environ.get(QUIET_ENV) == "1":
        kwargs["disable"] = True
    return _tqdm(*args, **kwargs)
