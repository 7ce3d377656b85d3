"""Adaptive batching in the serving process: requests that arrive while a batch runs share the next.

BentoML's own adaptive batching batches whole HTTP requests of one ``batchable`` endpoint, and its
dispatcher waits on purpose, by an estimate learnt from recent traffic: after a burst it kept
single requests waiting about 95 ms for a long time. Here nothing ever waits on purpose. An idle
model runs a request at once; under load, the requests that queued while the previous batch ran
go together, so the batch size follows the load (up to ``max_batch_size``) and falls back to one
as soon as the load does.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np

RunBatch = Callable[[dict[str, np.ndarray]], np.ndarray]


@dataclass
class _Pending:
    feeds: dict[str, np.ndarray]
    rows: int
    future: asyncio.Future[np.ndarray] = field(repr=False)


class MicroBatcher:
    """Join concurrent requests for one model into batches, run in an executor thread.

    Args:
        run: Runs one batch: named input arrays (same first axis) → output rows.
        executor: Where batches run (onnxruntime releases the GIL, so the event loop keeps
            parsing uploads meanwhile).
        max_batch_size: The most rows one batch may take; a single larger request runs alone.
    """

    def __init__(self, run: RunBatch, executor: Executor, max_batch_size: int = 64) -> None:
        self._run = run
        self._executor = executor
        self.max_batch_size = max_batch_size
        self._queue: asyncio.Queue[_Pending | None] | None = None
        self._consumer: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        # close() runs on the registry watcher's thread; it and the consumer's start are atomic.
        self._lifecycle = threading.Lock()
        self.batches_run = 0
        self.largest_batch = 0

    async def submit(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """Run one request's rows with whatever else is waiting; return its output rows."""
        loop = asyncio.get_running_loop()
        rows = len(next(iter(feeds.values())))
        with self._lifecycle:
            batched = not self._closed and rows < self.max_batch_size
            if batched and self._consumer is None:
                self._loop, self._queue = loop, asyncio.Queue()
                self._consumer = loop.create_task(self._consume())
        if not batched:
            return await loop.run_in_executor(self._executor, self._run, feeds)
        assert self._queue is not None
        pending = _Pending(feeds, rows, loop.create_future())
        self._queue.put_nowait(pending)
        return await pending.future

    def close(self) -> None:
        """Finish what is queued, then stop; later submissions run unbatched.

        Called from the registry watcher's thread when an alias moves to a new version:
        requests already holding this model complete on it, none fails.
        """
        with self._lifecycle:
            self._closed = True
            if self._loop is not None and self._queue is not None:
                # asyncio queues are not thread-safe: the sentinel goes in from the loop itself.
                self._loop.call_soon_threadsafe(self._queue.put_nowait, None)

    async def _consume(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        carried: _Pending | None = None
        while True:
            first = carried or await self._queue.get()
            carried = None
            if first is None:
                return
            batch, rows, stop = [first], first.rows, False
            while not self._queue.empty():
                following = self._queue.get_nowait()
                if following is None:
                    stop = True
                    break
                if rows + following.rows > self.max_batch_size:
                    carried = following
                    break
                batch.append(following)
                rows += following.rows
            await self._run_batch(loop, batch, rows)
            if stop:
                return

    async def _run_batch(
        self, loop: asyncio.AbstractEventLoop, batch: list[_Pending], rows: int
    ) -> None:
        self.batches_run += 1
        self.largest_batch = max(self.largest_batch, rows)
        try:
            names = list(batch[0].feeds)
            feeds = (
                batch[0].feeds
                if len(batch) == 1
                else {name: np.concatenate([item.feeds[name] for item in batch]) for name in names}
            )
            outputs = await loop.run_in_executor(self._executor, self._run, feeds)
        except Exception as error:  # one bad batch fails its own requests, not the consumer
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(error)
            return
        start = 0
        for item in batch:
            if not item.future.done():  # a client that went away cancelled its future
                with contextlib.suppress(asyncio.InvalidStateError):
                    item.future.set_result(outputs[start : start + item.rows])
            start += item.rows
