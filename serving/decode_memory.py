"""A memory budget for the large decodes of one worker.

A small file can declare a large picture: at 6000 x 6000 pixels, a 100 kB 16-bit PNG took 412
MiB while it was decoded and a 1.7 MB RLE DICOM 910 MiB (measured), and the default thread pool
would run six such decodes at once. A 29 MB JSON body of nested lists took up to 1.8 GB to parse
and check, and an hour of ECG about 150-390 MiB to cut into beats. Large decodes therefore wait
for a share of the budget, in arrival order, and hold it until their threads end, even when
their request gives up on its deadline first.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

R = TypeVar("R")


class DecodeMemory:
    """Bytes that the large decodes of one worker may hold at once.

    A decode costing more than the whole budget runs alone. Waiters are served first come,
    first served, so a large decode is not starved by a stream of smaller ones.

    Args:
        capacity: The budget in bytes.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"the decode memory budget must be positive (got {capacity})")
        self.capacity = capacity
        self.in_use = 0
        # Each waiter's future belongs to the loop it waits in: no loop is bound at creation.
        self._waiting: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    async def run(self, cost: int, function: Callable[[], R]) -> R:
        """Run ``function`` in a thread once ``cost`` bytes of the budget are free.

        Args:
            cost: The decode's estimated peak memory in bytes (capped at the whole budget).
            function: The decode.

        Returns:
            What ``function`` returns.
        """
        async with self.hold(cost) as reservation:
            return await reservation.run(function)

    @contextlib.asynccontextmanager
    async def hold(self, cost: int) -> AsyncIterator[Reservation]:
        """Hold ``cost`` bytes of the budget across several steps of one request.

        A JSON body is parsed in one thread, checked on the loop and decoded in another: the
        parsed values live through all three, so the share must too. The share is given back
        once the block is left and every thread started with :meth:`Reservation.run` has ended.

        Args:
            cost: The steps' estimated peak memory in bytes (capped at the whole budget).

        Yields:
            The reservation, whose :meth:`Reservation.run` runs a step in a thread.
        """
        share = min(max(cost, 0), self.capacity)
        await self._acquire(share)
        reservation = Reservation(self, share)
        try:
            yield reservation
        finally:
            reservation._leave()

    async def _acquire(self, share: int) -> None:
        if share == 0:  # holds nothing, so it need not queue behind anyone
            return
        if not self._waiting and self.in_use + share <= self.capacity:
            self.in_use += share
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (share, waiter)
        self._waiting.append(entry)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self._release(share)  # granted just as the request gave up
            else:
                if entry in self._waiting:
                    self._waiting.remove(entry)
                self._grant()  # the head may have left: those behind it may fit now
            raise

    def _release(self, share: int) -> None:
        self.in_use -= share
        self._grant()

    def _grant(self) -> None:
        while self._waiting:
            share, waiter = self._waiting[0]
            if waiter.done():  # cancelled: its request gave up and has not run yet
                self._waiting.popleft()
                continue
            if self.in_use + share > self.capacity:
                return
            self._waiting.popleft()
            self.in_use += share
            waiter.set_result(None)


class Reservation:
    """A share of a :class:`DecodeMemory` budget, held by one request and its threads.

    Args:
        memory: The budget the share was taken from.
        share: The bytes held.
    """

    def __init__(self, memory: DecodeMemory, share: int) -> None:
        self.memory = memory
        self.share = share
        self._holders = 1  # the request itself, until it leaves the block

    async def run(self, function: Callable[[], R]) -> R:
        """Run ``function`` in a thread under this share, held until the thread ends.

        Args:
            function: One step of the request's work.

        Returns:
            What ``function`` returns.
        """
        self._holders += 1
        try:
            running = asyncio.ensure_future(asyncio.to_thread(function))
        except BaseException:
            self._leave()
            raise

        def thread_ended(finished: asyncio.Future[R]) -> None:
            self._leave()
            if not finished.cancelled():
                finished.exception()  # retrieved, so that an abandoned failure is not reported

        running.add_done_callback(thread_ended)
        try:
            return await asyncio.shield(running)
        finally:
            # A failure's traceback holds this frame: without the future in it, there is no
            # cycle, and the step's values (a parsed body) are freed with the failure.
            del running

    def _leave(self) -> None:
        self._holders -= 1
        if self._holders == 0:
            self.memory._release(self.share)
