"""Stop training cleanly on Ctrl-C (SIGINT) or ``kill`` (SIGTERM).

A signal handler that raises can fire anywhere: inside the optimiser's update, between two
parameter tensors, while batch-norm statistics are half updated. A checkpoint saved from there
mixes two steps. :class:`StopOnSignal` therefore only records the signal; the training loop
checks :attr:`StopOnSignal.signum` between steps, saves a consistent ``last.pt`` and leaves. A
second signal means "stop now": it raises :class:`KeyboardInterrupt`, and nothing is saved (the
last periodic checkpoint stays as it was).
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType, TracebackType

log = logging.getLogger("denseseg")

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopOnSignal:
    """While active (``with``), SIGINT and SIGTERM set :attr:`signum` instead of raising."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():  # handlers live there only
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)  # type: ignore[arg-type]
        self._previous = {}

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        log.warning(
            "%s: stopping after this step, then saving last.pt (send it again to stop at once "
            "without saving)",
            signal.Signals(signum).name,
        )


def ignore_stop_signals(worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: Ctrl-C reaches the whole process group; the main process
    decides when to stop, so its loader workers ignore SIGINT. SIGTERM keeps its default: the
    loader's own shutdown (and Python's at exit) ends workers with it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
