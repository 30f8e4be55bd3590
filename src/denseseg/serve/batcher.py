"""One inference thread behind a queue: requests that arrive within a short window and can share
a forward pass (same options, same image size) are segmented as one batch.

Only images of the same size are batched: padding one to another's size would change the
pixels near its border (the network sees the padding), so a batched answer equals the answer to
the image alone. The event loop never runs the model: it submits a job and awaits its future.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

# predict(key, images, stop): ``stop()`` turns True once every request of the batch has given up.
Predict = Callable[[Hashable, Sequence[Tensor], Callable[[], bool]], Sequence[Any]]


class QueueFull(Exception):
    """More requests are waiting than the server admits."""


@dataclass(eq=False)
class _Job:
    key: Hashable
    image: Tensor
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    cancelled: bool = False
    queued_at: float = field(default_factory=time.monotonic)

    def settle(self, result: Any = None, error: BaseException | None = None) -> None:
        """Hand the result (or the error) to the awaiting request, from the inference thread."""

        def _set() -> None:
            if self.future.done():
                return
            if self.cancelled:  # nobody awaits it: an exception would be logged as unretrieved
                self.future.cancel()
                return
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(result)

        try:
            self.loop.call_soon_threadsafe(_set)
        except RuntimeError:  # the event loop has closed (shutdown): nobody is waiting
            pass


class Batcher:
    """Run ``predict(key, images)`` on one thread, batching jobs of the same ``key``.

    Args:
        predict: ``predict(key, images, stop)`` segments images sharing a key and returns one
            result per image; it may end early (raising) once ``stop()`` is True, when every
            request of the batch has timed out.
        max_batch: most images per call.
        wait_s: how long the first job of a batch waits for more of the same key.
        max_queue: most jobs waiting; :meth:`submit` raises :class:`QueueFull` beyond.
        on_batch: called with each batch's size (metrics).
    """

    def __init__(
        self,
        predict: Predict,
        max_batch: int = 4,
        wait_s: float = 0.005,
        max_queue: int = 16,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        self.predict, self.max_batch, self.wait_s = predict, max_batch, wait_s
        self.max_queue, self.on_batch = max_queue, on_batch
        self._jobs: deque[_Job] = deque()
        self._cond = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="denseseg-infer", daemon=True)
        self._thread.start()

    def __len__(self) -> int:
        return len(self._jobs)

    async def submit(self, key: Hashable, image: Tensor, timeout: float) -> Any:
        """Segment ``image`` in a batch of ``key``'s jobs.

        Raises:
            QueueFull: ``max_queue`` jobs are already waiting.
            TimeoutError: no result within ``timeout`` seconds (the job is dropped if it has
                not started).
        """
        loop = asyncio.get_running_loop()
        job = _Job(key, image, loop, loop.create_future())
        with self._cond:
            if self._stopped or len(self._jobs) >= self.max_queue:
                raise QueueFull
            self._jobs.append(job)
            self._cond.notify()
        try:
            return await asyncio.wait_for(asyncio.shield(job.future), timeout)
        except (TimeoutError, asyncio.CancelledError):
            job.cancelled = True
            raise

    def close(self) -> None:
        """Stop the thread after the batch it is running; waiting jobs get an error."""
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join(timeout=60)
        for job in self._jobs:
            job.settle(error=RuntimeError("the server is shutting down"))
        self._jobs.clear()

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._run(batch)

    def _next_batch(self) -> list[_Job] | None:
        """The oldest job and, within ``wait_s`` of its arrival, up to ``max_batch - 1`` more
        of its key (other keys keep their place); None once closed."""
        with self._cond:
            while not self._jobs and not self._stopped:
                self._cond.wait()
            if self._stopped:
                return None
            first = self._jobs.popleft()
            batch = [first]
            deadline = first.queued_at + self.wait_s
            while len(batch) < self.max_batch:
                batch += self._take(first.key, self.max_batch - len(batch))
                left = deadline - time.monotonic()
                if len(batch) >= self.max_batch or left <= 0 or self._stopped:
                    break
                self._cond.wait(left)
        return [job for job in batch if not job.cancelled]

    def _take(self, key: Hashable, n: int) -> list[_Job]:
        """Remove and return up to ``n`` waiting jobs of ``key`` (lock held)."""
        taken = [job for job in self._jobs if job.key == key][:n]
        for job in taken:
            self._jobs.remove(job)
        return taken

    def _run(self, batch: list[_Job]) -> None:
        if not batch:
            return
        if self.on_batch is not None:
            self.on_batch(len(batch))

        def stop() -> bool:
            return all(job.cancelled for job in batch)

        try:
            results = self.predict(batch[0].key, [job.image for job in batch], stop)
        except Exception as exc:  # the requests of this batch fail, the server goes on
            for job in batch:
                job.settle(error=exc)
            return
        for job, result in zip(batch, results, strict=True):
            job.settle(result)
