"""Adaptive batching in the serving process: requests that arrive while a batch runs share the next.

BentoML's own adaptive batching batches whole HTTP requests of one ``batchable`` endpoint, and its
dispatcher waits on purpose, by an estimate learnt from recent traffic: after a burst it kept
single requests waiting about 95 ms for a long time. Here nothing ever waits on purpose. An idle
model runs a request at once; under load, the requests that queued while the previous batch ran
go together, so the batch size follows the load (up to ``max_batch_size``) and falls back to one
as soon as the load does.

The batch runner is a thread of its own that takes the next batch itself the moment a run
ends. Forming batches on the event loop instead left onnxruntime idle until the busy loop got
round to the hand-over: it ran 87% of the time under load, against 99% now.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

RunBatch = Callable[[dict[str, np.ndarray]], np.ndarray]

logger = logging.getLogger("medscreen.serving")


@dataclass
class _Pending:
    feeds: dict[str, np.ndarray]
    rows: int
    loop: asyncio.AbstractEventLoop = field(repr=False)
    future: asyncio.Future[np.ndarray] = field(repr=False)


def _pieces(feeds: dict[str, np.ndarray], size: int) -> list[dict[str, np.ndarray]]:
    """Split named arrays along their first axis into pieces of at most ``size`` rows."""
    rows = len(next(iter(feeds.values())))
    if rows <= size:
        return [feeds]
    return [
        {name: array[start : start + size] for name, array in feeds.items()}
        for start in range(0, rows, size)
    ]


def _joined(outputs: list[np.ndarray]) -> np.ndarray:
    return outputs[0] if len(outputs) == 1 else np.concatenate(outputs)


def _settle_all(settlements: list[tuple[asyncio.Future[np.ndarray], Any]]) -> None:
    """Set each future's result or error, on its event loop's own thread."""
    for future, result in settlements:
        if future.done():  # a client that went away cancelled its future
            continue
        if not isinstance(result, BaseException):
            future.set_result(result)
            continue
        try:
            future.set_exception(result)
        except TypeError:  # StopIteration cannot travel through a future
            future.set_exception(RuntimeError(f"the batch failed: {type(result).__name__}"))


class FairLock:
    """A lock granted in the order it was asked for.

    The batchers of one process share it, so a model with a steady queue cannot win it again
    and again while another model's batch waits (``threading.Lock`` promises no order).
    """

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._next_ticket = 0
        self._serving = 0

    def __enter__(self) -> None:
        with self._changed:
            ticket = self._next_ticket
            self._next_ticket += 1
            while ticket != self._serving:
                self._changed.wait()

    def __exit__(self, *exc_info: object) -> None:
        with self._changed:
            self._serving += 1
            self._changed.notify_all()


class MicroBatcher:
    """Join concurrent requests for one model into batches, run on a thread of its own.

    Args:
        run: Runs one batch: named input arrays (same first axis) → output rows. onnxruntime
            releases the GIL, so the event loop keeps parsing uploads meanwhile.
        max_batch_size: The most rows one batch may take. A larger request (a long ECG's beats)
            is split into pieces of this size that queue as requests of their own: its
            onnxruntime memory stays that of one batch, and other models' batches take turns
            with its pieces instead of waiting for all of it.
        run_lock: Held around every run; share one between the batchers of a process so that
            its models run one batch at a time (each session already uses the process's cores),
            in the order they asked.
        name: Name of the runner thread.
    """

    def __init__(
        self,
        run: RunBatch,
        max_batch_size: int = 64,
        *,
        run_lock: FairLock | None = None,
        name: str = "batcher",
    ) -> None:
        self._run = run
        self.max_batch_size = max_batch_size
        self._run_lock = run_lock or FairLock()
        self._pending: collections.deque[_Pending] = collections.deque()
        self._changed = threading.Condition()
        self._closed = False
        threading.Thread(target=self._serve, name=name, daemon=True).start()

    async def submit(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """Run one request's rows with whatever else is waiting; return its output rows."""
        loop = asyncio.get_running_loop()
        pieces = [
            _Pending(piece, len(next(iter(piece.values()))), loop, loop.create_future())
            for piece in _pieces(feeds, self.max_batch_size)
        ]
        with self._changed:
            queued = not self._closed
            if queued:
                self._pending.extend(pieces)
                self._changed.notify()
        if not queued:
            outputs = [await asyncio.to_thread(self._run_locked, piece.feeds) for piece in pieces]
            return _joined(outputs)
        try:
            return _joined([await piece.future for piece in pieces])
        finally:
            # A request that failed or gave up leaves its later pieces unrun.
            for piece in pieces:
                if not piece.future.cancel() and not piece.future.cancelled():
                    piece.future.exception()  # retrieved: asyncio would warn of it otherwise

    def close(self) -> None:
        """Finish what is queued, then stop; later submissions run unbatched.

        Called from the registry watcher's thread when an alias moves to a new version:
        requests already holding this model complete on it, none fails.
        """
        with self._changed:
            self._closed = True
            self._changed.notify()

    def _serve(self) -> None:
        batch: list[_Pending] = []
        try:
            while batch := self._next_batch():
                self._run_batch(batch)
        except BaseException as error:  # the runner ends, but nobody may be left waiting on it
            with self._changed:
                self._closed = True  # later requests run unbatched
                stranded = list(self._pending)
                self._pending.clear()
            logger.error("batch runner %s stopped: %r", threading.current_thread().name, error)
            self._deliver(batch, [error] * len(batch))
            self._deliver(stranded, [RuntimeError("the batch runner stopped")] * len(stranded))

    def _next_batch(self) -> list[_Pending]:
        """Wait for work; take every queued request that fits. Empty once closed and drained."""
        batch: list[_Pending] = []
        rows = 0
        with self._changed:
            while not batch:
                while not self._pending and not self._closed:
                    self._changed.wait()
                if not self._pending:
                    return []
                while self._pending and (
                    not batch or rows + self._pending[0].rows <= self.max_batch_size
                ):
                    following = self._pending.popleft()
                    # A caller that is gone (timed out, disconnected) would only delay the rest;
                    # reading its state from this thread is a benign race (at worst it runs).
                    if not following.future.cancelled():
                        batch.append(following)
                        rows += following.rows
        return batch

    def _run_locked(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        with self._run_lock:
            return self._run(feeds)

    def _run_batch(self, batch: list[_Pending]) -> None:
        results: list[np.ndarray | BaseException]
        try:
            feeds = (
                batch[0].feeds
                if len(batch) == 1
                else {
                    name: np.concatenate([item.feeds[name] for item in batch])
                    for name in batch[0].feeds
                }
            )
            outputs = self._run_locked(feeds)
            offsets = itertools.accumulate((item.rows for item in batch), initial=0)
            results = [outputs[start:end] for start, end in itertools.pairwise(offsets)]
        except Exception as error:  # one bad batch fails its own requests, not the runner
            results = [error] * len(batch)
        self._deliver(batch, results)

    @staticmethod
    def _deliver(batch: list[_Pending], results: list[np.ndarray | BaseException]) -> None:
        """Hand each request its result on its own event loop, one wake-up per loop."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for item, result in zip(batch, results, strict=True):
            by_loop.setdefault(item.loop, []).append((item.future, result))
        for loop, settlements in by_loop.items():
            # A loop that has closed has nobody waiting any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_settle_all, settlements)
