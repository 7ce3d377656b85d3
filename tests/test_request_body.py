"""Reading a request body: slow and abandoned uploads are refused as client mistakes."""

from __future__ import annotations

import asyncio
from http import HTTPStatus

import pytest
from starlette.requests import Request

from serving.errors import RequestError
from serving.service import _read_body


def _request(messages: list[dict]) -> Request:
    """A request whose client sends ``messages`` and then stays silent."""

    async def receive() -> dict:
        if messages:
            return messages.pop(0)
        await asyncio.sleep(3600)
        raise AssertionError("never reached")

    scope = {"type": "http", "method": "POST", "path": "/v1/screen", "headers": []}
    return Request(scope, receive)


def _first_chunk() -> dict:
    return {"type": "http.request", "body": b"abc", "more_body": True}


def test_an_upload_that_stalls_is_a_408_before_the_service_timeout():
    with pytest.raises(RequestError) as failure:
        asyncio.run(_read_body(_request([_first_chunk()]), timeout_s=0.2))
    assert failure.value.status == HTTPStatus.REQUEST_TIMEOUT
    assert "within 0.2 s (3 bytes arrived)" in str(failure.value)


def test_a_client_gone_mid_upload_is_a_client_error():
    messages = [_first_chunk(), {"type": "http.disconnect"}]
    with pytest.raises(RequestError) as failure:
        asyncio.run(_read_body(_request(messages), timeout_s=5))
    assert failure.value.status == HTTPStatus.BAD_REQUEST
    assert "disconnected" in str(failure.value)


def test_a_complete_upload_is_read_whole():
    messages = [_first_chunk(), {"type": "http.request", "body": b"def", "more_body": False}]
    assert asyncio.run(_read_body(_request(messages), timeout_s=5)) == b"abcdef"
