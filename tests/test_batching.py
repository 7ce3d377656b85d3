"""The service's batcher: concurrent requests share batches, close drains, errors stay local."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time

import numpy as np
import pytest

from serving.batching import FairLock, MicroBatcher


def _slow_double(batch_sizes: list[int]):
    def run(feeds: dict[str, np.ndarray]) -> np.ndarray:
        batch_sizes.append(len(feeds["x"]))
        time.sleep(0.02)  # long enough for the other requests to queue behind it
        return feeds["x"] * 2

    return run


def test_concurrent_requests_are_batched_and_each_gets_its_own_rows():
    sizes: list[int] = []
    batcher = MicroBatcher(_slow_double(sizes), max_batch_size=16)

    async def scenario() -> list[np.ndarray]:
        return await asyncio.gather(
            *(
                batcher.submit({"x": np.full((1, 3), value, dtype=np.float32)})
                for value in range(40)
            )
        )

    results = asyncio.run(scenario())
    for value, result in enumerate(results):
        np.testing.assert_array_equal(result, np.full((1, 3), 2 * value))
    assert sum(sizes) == 40 and max(sizes) <= 16
    assert len(sizes) < 40  # joined: fewer runs than requests


def test_the_runner_takes_the_next_batch_while_the_event_loop_is_busy():
    # A batch must not wait for the event loop to hand it over (onnxruntime would idle).
    sizes: list[int] = []
    batcher = MicroBatcher(_slow_double(sizes), max_batch_size=8)

    async def scenario() -> int:
        tasks = [
            asyncio.ensure_future(batcher.submit({"x": np.full((1, 1), value)}))
            for value in range(20)
        ]
        await asyncio.sleep(0)  # every request is queued
        time.sleep(0.5)  # the loop is busy, e.g. decoding uploads
        rows_run_meanwhile = sum(sizes)
        results = await asyncio.gather(*tasks)
        assert [float(result[0, 0]) for result in results] == [2.0 * v for v in range(20)]
        return rows_run_meanwhile

    assert asyncio.run(scenario()) == 20
    assert len(sizes) >= 3 and max(sizes) <= 8


def test_an_idle_batcher_runs_a_lone_request_at_once():
    sizes: list[int] = []
    batcher = MicroBatcher(_slow_double(sizes))

    async def scenario() -> None:
        for _ in range(3):
            await batcher.submit({"x": np.ones((1, 2), dtype=np.float32)})

    started = time.perf_counter()
    asyncio.run(scenario())
    assert sizes == [1, 1, 1]
    assert time.perf_counter() - started < 3 * 0.02 + 0.5


def test_a_failing_batch_fails_its_requests_and_the_batcher_lives_on():
    calls = {"n": 0}

    def run(feeds: dict[str, np.ndarray]) -> np.ndarray:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("broken batch")
        return feeds["x"]

    batcher = MicroBatcher(run)

    async def scenario() -> np.ndarray:
        with pytest.raises(RuntimeError, match="broken batch"):
            await batcher.submit({"x": np.ones((1, 1))})
        return await batcher.submit({"x": np.zeros((1, 1))})

    np.testing.assert_array_equal(asyncio.run(scenario()), np.zeros((1, 1)))


def test_a_run_that_raises_stop_iteration_still_answers_its_requests():
    calls = {"n": 0}

    def run(feeds: dict[str, np.ndarray]) -> np.ndarray:
        calls["n"] += 1
        if calls["n"] == 1:
            raise StopIteration  # a future cannot carry it as such
        return feeds["x"]

    batcher = MicroBatcher(run)

    async def scenario() -> np.ndarray:
        with pytest.raises(RuntimeError, match="StopIteration"):
            await asyncio.wait_for(batcher.submit({"x": np.ones((1, 1))}), timeout=5)
        return await asyncio.wait_for(batcher.submit({"x": np.zeros((1, 1))}), timeout=5)

    np.testing.assert_array_equal(asyncio.run(scenario()), np.zeros((1, 1)))


class _RunnerKilled(BaseException):
    pass


def test_a_runner_that_dies_leaves_no_request_waiting():
    calls = {"n": 0}

    def run(feeds: dict[str, np.ndarray]) -> np.ndarray:
        calls["n"] += 1
        if calls["n"] == 1:
            raise _RunnerKilled
        return feeds["x"] * 3

    batcher = MicroBatcher(run)

    async def scenario() -> np.ndarray:
        with pytest.raises(_RunnerKilled):
            await asyncio.wait_for(batcher.submit({"x": np.ones((1, 1))}), timeout=5)
        # The runner is gone; later requests run unbatched instead of queueing for nobody.
        return await asyncio.wait_for(batcher.submit({"x": np.ones((1, 1))}), timeout=5)

    np.testing.assert_array_equal(asyncio.run(scenario()), np.full((1, 1), 3.0))


def test_close_from_another_thread_finishes_queued_requests():
    sizes: list[int] = []
    batcher = MicroBatcher(_slow_double(sizes))

    async def scenario() -> list[np.ndarray]:
        tasks = [
            asyncio.ensure_future(batcher.submit({"x": np.full((1, 1), value)}))
            for value in range(10)
        ]
        await asyncio.sleep(0)
        closer = threading.Thread(target=batcher.close)
        closer.start()
        closer.join()
        results = await asyncio.gather(*tasks)
        # After close, requests still succeed (unbatched).
        results.append(await batcher.submit({"x": np.full((1, 1), 99)}))
        return results

    results = asyncio.run(scenario())
    assert [float(result[0, 0]) for result in results] == [2.0 * v for v in range(10)] + [198.0]


def test_the_run_lock_is_granted_in_the_order_it_was_asked_for():
    lock, granted = FairLock(), []

    def take(number: int) -> None:
        with lock:
            granted.append(number)

    with lock:
        waiters = []
        for number in range(5):
            waiter = threading.Thread(target=take, args=(number,))
            waiter.start()
            waiters.append(waiter)
            while lock._next_ticket != number + 2:  # this one is queued before the next starts
                time.sleep(0.001)
    for waiter in waiters:
        waiter.join(timeout=10)
    assert granted == [0, 1, 2, 3, 4]


def _recorded_model(name: str, runs: list[str]):
    """A model that takes 10 ms a batch and records its name in ``runs`` for each."""

    def run(feeds: dict[str, np.ndarray]) -> np.ndarray:
        runs.append(name)
        time.sleep(0.01)
        return feeds["x"]

    return run


def test_two_busy_models_sharing_the_run_lock_take_turns():
    lock, runs = FairLock(), []

    first = MicroBatcher(_recorded_model("first", runs), max_batch_size=1, run_lock=lock)
    second = MicroBatcher(_recorded_model("second", runs), max_batch_size=1, run_lock=lock)

    async def scenario() -> None:
        await asyncio.gather(
            *(
                batcher.submit({"x": np.zeros((1, 1))})
                for _ in range(8)
                for batcher in (first, second)
            )
        )

    asyncio.run(scenario())
    assert sorted(runs) == ["first"] * 8 + ["second"] * 8
    assert all(a != b for a, b in itertools.pairwise(runs)), runs


def test_requests_cancelled_while_queued_are_not_run():
    """Callers that are gone (timed out, disconnected) must not delay the ones still waiting."""
    sizes: list[int] = []
    batcher = MicroBatcher(_slow_double(sizes), max_batch_size=8)

    async def scenario() -> np.ndarray:
        first = asyncio.ensure_future(batcher.submit({"x": np.full((1, 1), 1.0)}))
        await asyncio.sleep(0.005)  # the first batch is running
        gone = [
            asyncio.ensure_future(batcher.submit({"x": np.full((1, 1), 9.0)})) for _ in range(30)
        ]
        await asyncio.sleep(0)
        for task in gone:
            task.cancel()
        live = await batcher.submit({"x": np.full((1, 1), 3.0)})
        await first
        return live

    live = asyncio.run(scenario())
    batcher.close()
    assert float(live[0, 0]) == 6.0
    assert sum(sizes) == 2, sizes  # the first and the live request, none of the 30


def test_a_request_over_the_batch_size_runs_in_pieces_and_gets_its_rows_in_order():
    # One long ECG: its onnxruntime memory must stay that of one batch, not of all its beats.
    sizes: list[int] = []
    batcher = MicroBatcher(_slow_double(sizes), max_batch_size=8)
    rows = np.arange(45, dtype=np.float32).reshape(45, 1)

    async def scenario() -> tuple[np.ndarray, np.ndarray]:
        return await asyncio.gather(
            batcher.submit({"x": rows}), batcher.submit({"x": np.full((1, 1), 100.0)})
        )

    long, short = asyncio.run(scenario())
    np.testing.assert_array_equal(long, rows * 2)
    assert float(short[0, 0]) == 200.0
    assert sum(sizes) == 46 and max(sizes) <= 8, sizes
    batcher.close()
    after_close = asyncio.run(batcher.submit({"x": rows}))
    np.testing.assert_array_equal(after_close, rows * 2)
    assert max(sizes) <= 8, sizes


def test_another_model_takes_turns_with_the_pieces_of_a_long_request():
    lock, runs = FairLock(), []

    ecg = MicroBatcher(_recorded_model("ecg", runs), max_batch_size=4, run_lock=lock)
    screening = MicroBatcher(_recorded_model("screening", runs), max_batch_size=4, run_lock=lock)

    async def scenario() -> None:
        long = asyncio.ensure_future(ecg.submit({"x": np.zeros((40, 1))}))
        await asyncio.sleep(0.015)  # the first pieces run
        await screening.submit({"x": np.zeros((1, 1))})
        assert not long.done()  # answered between the pieces, not after all ten
        await long

    asyncio.run(scenario())
    assert runs.count("ecg") == 10 and runs.count("screening") == 1
    assert runs[-1] == "ecg", runs


def test_a_failed_piece_fails_its_request_and_its_later_pieces_are_not_run(recwarn):
    sizes: list[int] = []

    def run(feeds: dict[str, np.ndarray]) -> np.ndarray:
        sizes.append(len(feeds["x"]))
        time.sleep(0.01)
        if float(feeds["x"][0, 0]) == 4.0:  # the second piece
            raise RuntimeError("broken piece")
        return feeds["x"]

    batcher = MicroBatcher(run, max_batch_size=4)

    async def scenario() -> np.ndarray:
        with pytest.raises(RuntimeError, match="broken piece"):
            await batcher.submit({"x": np.arange(40, dtype=np.float32).reshape(40, 1)})
        return await batcher.submit({"x": np.full((1, 1), 7.0)})

    np.testing.assert_array_equal(asyncio.run(scenario()), np.full((1, 1), 7.0))
    # The third piece may already have been taken; none after it ran.
    assert sizes[:2] == [4, 4] and sizes[-1] == 1 and len(sizes) <= 4, sizes
    batcher.close()


def test_a_long_request_that_gives_up_leaves_its_later_pieces_unrun():
    sizes: list[int] = []
    batcher = MicroBatcher(_slow_double(sizes), max_batch_size=4)

    async def scenario() -> None:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(batcher.submit({"x": np.zeros((400, 1))}), timeout=0.05)
        await batcher.submit({"x": np.zeros((1, 1))})  # queued behind what is left

    asyncio.run(scenario())
    batcher.close()
    assert sizes[-1] == 1 and sum(sizes) < 40, sizes  # of 100 pieces, a handful ran
