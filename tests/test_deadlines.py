"""The service's own deadline: a late request is answered and logged, and the two always agree.

BentoML's request timeout cancels a request and answers 504 without the prediction log ever
hearing of it; the service's earlier deadline answers 503 and logs the request as failed. A
request whose record is already being written is not cut short, so that no record says
"prediction" for an answer the hospital never received.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from starlette.requests import Request

from serving import service
from serving.decode_memory import DecodeMemory
from serving.prediction_log import PredictionLog

DEADLINE_S = 0.3


@pytest.fixture
def screening(tmp_path: Path, monkeypatch):
    """The service's request handling over a real prediction log (no models are needed)."""
    monkeypatch.setattr(service, "ANSWER_DEADLINE_S", DEADLINE_S)
    instance = object.__new__(service.Screening.inner)
    instance.log = PredictionLog(tmp_path / "predictions.jsonl")
    yield instance
    instance.log.close()


def _records(screening) -> list[dict]:
    return [json.loads(line) for line in screening.log.path.read_text().splitlines()]


def _answered(exchange) -> None:
    """What a request has established by the time it answers: who asked, which model."""
    exchange.key = SimpleNamespace(hospital="St Mary", region="eu-west", key_id="0123456789ab")
    model = SimpleNamespace(
        name="pneumonia-screening", version="3", alias="champion", onnx_sha256="ab" * 32
    )
    model.threshold = 0.5
    exchange.served = SimpleNamespace(model=model)


def test_the_service_deadlines_come_before_bentomls_timeout():
    # Reversed, BentoML's unlogged 504 would answer first and the prediction log never hear of it.
    # The answer deadline counts from the upload's end, so the two add up.
    assert service.UPLOAD_TIMEOUT_S + service.ANSWER_DEADLINE_S < service.REQUEST_TIMEOUT_S
    assert service.Screening.config["traffic"]["timeout"] == service.REQUEST_TIMEOUT_S


def test_a_request_past_the_deadline_is_a_logged_503(screening):
    async def stuck(exchange):
        await asyncio.sleep(10)  # e.g. a queue behind an overloaded runner

    started = time.monotonic()
    response = asyncio.run(screening._guarded(service._Exchange("/v1/screen"), stuck))
    assert time.monotonic() - started < 5
    assert response.status_code == 503
    assert "could not answer within 0.3 s" in json.loads(response.body)["error"]
    (record,) = _records(screening)
    assert record["outcome"] == "failed" and record["status"] == 503


def _slow_upload(chunks: int, gap_s: float, *, then_disconnect: bool = False) -> Request:
    """A client that sends ``chunks`` chunks ``gap_s`` apart, then waits (or hangs up)."""
    sent = 0

    async def receive() -> dict:
        nonlocal sent
        if sent < chunks:
            sent += 1
            await asyncio.sleep(gap_s)
            return {"type": "http.request", "body": b"x", "more_body": sent < chunks}
        if then_disconnect:
            return {"type": "http.disconnect"}
        await asyncio.sleep(3600)
        raise AssertionError("never reached")

    scope = {"type": "http", "method": "POST", "path": "/v1/monitor", "headers": []}
    return Request(scope, receive)


def test_a_slow_upload_leaves_the_answer_its_whole_deadline(screening):
    """The deadline counts from the upload's end: a slow link is not called an overload."""

    async def answer(exchange):
        _answered(exchange)
        body = await service._read_body(exchange.request, answer_deadline=exchange.deadline)
        await asyncio.sleep(DEADLINE_S * 0.6)  # decoding and inference
        answer = {"request_id": exchange.request_id, "decision": "positive", "bytes": len(body)}
        return await screening._answer(exchange, answer, score=0.9, decision="positive")

    upload = _slow_upload(chunks=4, gap_s=DEADLINE_S * 0.2)  # 0.8 of the deadline
    started = time.monotonic()
    response = asyncio.run(screening._guarded(service._Exchange("/v1/monitor", upload), answer))
    assert time.monotonic() - started > DEADLINE_S  # past a deadline counted from the start
    assert response.status_code == 200 and json.loads(response.body)["bytes"] == 4
    assert _records(screening)[-1]["outcome"] == "prediction"


def test_a_request_still_running_a_deadline_after_its_upload_is_a_503(screening):
    async def stuck(exchange):
        await service._read_body(exchange.request, answer_deadline=exchange.deadline)
        await asyncio.sleep(10)

    upload = _slow_upload(chunks=2, gap_s=DEADLINE_S * 0.4)
    started = time.monotonic()
    response = asyncio.run(screening._guarded(service._Exchange("/v1/monitor", upload), stuck))
    assert DEADLINE_S * 1.7 < time.monotonic() - started < 5
    assert response.status_code == 503
    assert "within 0.3 s of receiving the request" in json.loads(response.body)["error"]
    assert _records(screening)[-1]["status"] == 503


def test_a_client_gone_before_its_answer_is_logged_as_failed_not_answered(screening):
    """Its answer is never delivered, so no record may say it was."""

    async def answer(exchange):
        _answered(exchange)
        await service._read_body(exchange.request)
        answer = {"request_id": exchange.request_id, "decision": "positive"}
        return await screening._answer(exchange, answer, score=0.9, decision="positive")

    gone = _slow_upload(chunks=1, gap_s=0, then_disconnect=True)
    response = asyncio.run(screening._guarded(service._Exchange("/v1/monitor", gone), answer))
    assert response.status_code == 400
    (record,) = _records(screening)
    assert (record["outcome"], record["status"]) == ("failed", 400)
    assert "disconnected before its answer was ready" in record["error"]
    assert record["score"] is None and record["decision"] is None


def test_a_record_being_written_at_the_deadline_is_not_cut_short(screening):
    """The answer is sent and recorded as sent, even when the log is slow past the deadline."""
    screening.log.append(service.PredictionRecord(
        request_id="warm-up", outcome="failed", status=400, route="/v1/screen",
        error="x", latency_ms=1.0,
    ))  # fmt: skip
    held = threading.Event()

    def hold_the_log_lock() -> None:  # another worker process writing, or a slow disk
        descriptor = os.open(screening.log.lock_path, os.O_RDWR)
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        held.set()
        time.sleep(2 * DEADLINE_S)
        os.close(descriptor)

    async def answer(exchange):
        _answered(exchange)
        threading.Thread(target=hold_the_log_lock).start()
        held.wait()
        await asyncio.sleep(DEADLINE_S / 2)
        answer = {"request_id": exchange.request_id, "decision": "positive"}
        return await screening._answer(exchange, answer, score=0.9, decision="positive")

    response = asyncio.run(screening._guarded(service._Exchange("/v1/screen"), answer))
    assert response.status_code == 200
    record = _records(screening)[-1]
    assert record["outcome"] == "prediction" and record["decision"] == "positive"


def test_decodes_stay_one_at_a_time_when_their_requests_give_up():
    # A request cut short by the deadline stops waiting, but its decode thread runs on: the
    # next decode must not start beside it (each NIfTI decode can take 1.4 GB).
    decode_s, deadline_s, arrival_gap_s = 0.3, 0.4, 0.1
    running, peak = 0, 0
    lock = threading.Lock()

    def decode() -> str:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(decode_s)
        with lock:
            running -= 1
        return "decoded"

    async def request(memory: DecodeMemory, arrival_s: float) -> str:
        await asyncio.sleep(arrival_s)
        try:
            async with asyncio.timeout(deadline_s):
                return await memory.run(memory.capacity, decode)  # as a volume's decode
        except TimeoutError:
            return "gave up"

    async def requests() -> list[str]:
        memory = DecodeMemory(2**30)
        return await asyncio.gather(*(request(memory, i * arrival_gap_s) for i in range(8)))

    answers = asyncio.run(requests())  # returns once every decode thread has ended
    assert peak == 1
    assert answers[0] == "decoded" and "gave up" in answers
