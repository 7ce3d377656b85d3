"""Requests as clients send them: bodies, fields and paths that are client mistakes."""

from __future__ import annotations

import asyncio
import json
from http import HTTPStatus
from pathlib import Path

import pytest
import requests
from starlette.requests import Request

from serving.decode_memory import DecodeMemory
from serving.errors import InputError, RequestError
from serving.service import (
    _ARRAY_FIELDS,
    _MONITOR_FIELDS,
    _SCREEN_FIELDS,
    _json_object,
    _multipart,
    _read_body,
    _read_json_body,
)
from tests.conftest import logged_refusal


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


def _posted(body: bytes, content_type: str) -> Request:
    """A request whose client sends ``body`` whole, with ``content_type``."""
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    headers = [
        (b"content-type", content_type.encode()),
        (b"content-length", str(len(body)).encode()),
    ]
    scope = {"type": "http", "method": "POST", "path": "/v1/screen", "headers": headers}
    return Request(scope, receive)


BOUNDARY = "medscreen-test-boundary"
MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"


def _part(name: str, value: bytes, filename: str | None = None) -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
    return f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + value + b"\r\n"


def _closed(*parts: bytes) -> bytes:
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


async def _parsed(request: Request, route: str, accepted: tuple[str, ...]) -> dict:
    """The JSON object of ``request`` as the service's JSON routes read it."""
    body = await _read_json_body(request, route)
    async with DecodeMemory(2**30).hold(0) as reservation:
        return await _json_object(reservation, body, route, accepted)


def _refusal(coroutine: object) -> RequestError:
    with pytest.raises(RequestError) as failure:
        asyncio.run(coroutine)  # type: ignore[arg-type]
    return failure.value


@pytest.mark.parametrize(
    "body",
    [
        b'{"model": "a", "model": "b", "array": [[1, 2], [3, 4]]}',
        b'{"array": [[1, 2], [3, 4]], "model": "pneumonia", "model": "pneumonia"}',
    ],
)
def test_a_json_field_given_twice_is_a_422(body: bytes):
    error = _refusal(_parsed(_posted(body, "application/json"), "/v1/screen/array", _ARRAY_FIELDS))
    assert error.status == HTTPStatus.UNPROCESSABLE_ENTITY
    assert str(error) == "field 'model' is given twice; send each field once"


def test_only_top_level_json_keys_must_be_unique():
    body = b'{"array": [[1, 1], {"x": 1, "x": 2}], "model": "m"}'
    payload = asyncio.run(
        _parsed(_posted(body, "application/json"), "/v1/screen/array", _ARRAY_FIELDS)
    )
    assert payload == {"array": [[1, 1], {"x": 2}], "model": "m"}
    assert json.dumps(payload)  # a plain object, as json.loads gives


def test_a_field_the_route_does_not_take_is_a_422_naming_the_route_s_fields():
    body = b'{"samples": [0.1], "sampling_rate_hz": 360, "lead": "II", "leed": "V1", "x": 1}'
    error = _refusal(_parsed(_posted(body, "application/json"), "/v1/monitor", _MONITOR_FIELDS))
    assert error.status == HTTPStatus.UNPROCESSABLE_ENTITY
    assert str(error) == (
        "/v1/monitor takes no field 'leed' (and 1 more); "
        "its fields are samples, sampling_rate_hz, lead, model"
    )
    body = _closed(_part("file", b"x", "x.png"), _part("patient", b"DOE^JOHN"))
    error = _refusal(_multipart(_posted(body, MULTIPART), "/v1/screen", _SCREEN_FIELDS))
    assert str(error) == "/v1/screen takes no field 'patient'; its fields are file, model"
    # Without a 'file', that is what the client hears about first.
    body = _closed(_part("image", b"x", "x.png"))
    error = _refusal(_multipart(_posted(body, MULTIPART), "/v1/screen", _SCREEN_FIELDS))
    assert "needs the upload in a multipart field named 'file'" in str(error)


def test_a_multipart_field_given_twice_is_a_422():
    body = _closed(_part("model", b"a"), _part("model", b"b"), _part("file", b"x", "x.png"))
    error = _refusal(_multipart(_posted(body, MULTIPART), "/v1/screen", _SCREEN_FIELDS))
    assert error.status == HTTPStatus.UNPROCESSABLE_ENTITY
    assert str(error) == "field 'model' is given twice; send each field once"


def test_a_file_part_given_twice_is_named_like_any_field():
    body = _closed(_part("file", b"x", "a.png"), _part("file", b"y", "b.png"))
    error = _refusal(_multipart(_posted(body, MULTIPART), "/v1/screen", _SCREEN_FIELDS))
    assert error.status == HTTPStatus.UNPROCESSABLE_ENTITY
    assert str(error) == "field 'file' is given twice; send each field once"


def test_a_boundary_is_masked_in_the_log_whatever_quotes_it_holds(tmp_path: Path):
    boundary = "x' MRN4711 DOE JOHN '--"
    body = f'--{boundary}\r\nContent-Disposition: form-data; name="model"\r\n\r\na\r\n'
    error = _refusal(
        _multipart(
            _posted(body.encode(), f"multipart/form-data; boundary={boundary}"), "/x", ("model",)
        )
    )
    assert "no closing boundary" in str(error) and "MRN4711" in str(error)  # the client's
    line = logged_refusal(error, tmp_path)
    assert "MRN4711" not in line and "DOE" not in line
    assert json.loads(line)["error"].startswith(
        "the multipart body is incomplete: it has no closing boundary ('…') after 78 bytes"
    )


def test_a_multipart_body_without_its_closing_boundary_is_a_400_saying_so():
    body = _part("model", b"a") + _part("file", b"\x89PNG not all of it", "x.png")
    error = _refusal(_multipart(_posted(body, MULTIPART), "/v1/screen", _SCREEN_FIELDS))
    assert error.status == HTTPStatus.BAD_REQUEST
    assert "the multipart body is incomplete: it has no closing boundary" in str(error)
    assert "named 'file'" not in str(error)


def test_a_complete_multipart_body_gives_its_file_and_fields():
    body = _closed(_part("model", b"a"), _part("file", b"content", "x.png"))
    quoted = f'multipart/form-data; boundary="{BOUNDARY}"'  # a quoted boundary is the same
    data, fields = asyncio.run(_multipart(_posted(body, quoted), "/v1/screen", _SCREEN_FIELDS))
    assert data == b"content" and fields == {"model": "a"}


@pytest.mark.parametrize(
    "preamble",
    [
        b"This is a multi-part message in MIME format.\r\n",  # as JavaMail writes one
        b"two lines\r\nof preamble\r\n",
        b"\r\n",
    ],
)
def test_a_multipart_preamble_is_skipped_as_mime_allows(preamble: bytes):
    body = preamble + _closed(_part("model", b"a"), _part("file", b"content", "x.png"))
    data, fields = asyncio.run(_multipart(_posted(body, MULTIPART), "/v1/screen", _SCREEN_FIELDS))
    assert data == b"content" and fields == {"model": "a"}


def test_a_multipart_body_whose_delimiter_never_starts_a_line_is_a_400():
    body = b"text" + _closed(_part("file", b"content", "x.png"))  # "text--BOUNDARY": no line
    error = _refusal(_multipart(_posted(body, MULTIPART), "/v1/screen", _SCREEN_FIELDS))
    assert error.status == HTTPStatus.BAD_REQUEST
    assert "the multipart body cannot be parsed" in str(error)


def test_the_boundary_parameter_is_named_in_any_case():
    body = _closed(_part("model", b"a"), _part("file", b"content", "x.png"))
    for spelling in ("Boundary", "BOUNDARY"):  # parameter names are case-insensitive
        content_type = f"multipart/form-data; {spelling}={BOUNDARY}"
        data, fields = asyncio.run(
            _multipart(_posted(body, content_type), "/v1/screen", _SCREEN_FIELDS)
        )
        assert data == b"content" and fields == {"model": "a"}


def test_a_media_type_is_matched_whole_not_by_its_prefix():
    body = _closed(_part("model", b"a"), _part("file", b"content", "x.png"))
    # "multipart/form-dataX" parsed as multipart found no parts and blamed the fields (422).
    error = _refusal(
        _multipart(_posted(body, f"multipart/form-dataX; boundary={BOUNDARY}"), "/v1/screen", ())
    )
    assert error.status == HTTPStatus.UNSUPPORTED_MEDIA_TYPE and "takes multipart/form-data" in str(
        error
    )
    for content_type in ("application/jsonX", "application/json-seq"):
        error = _refusal(_read_json_body(_posted(b"{}", content_type), "/v1/monitor"))
        assert error.status == HTTPStatus.UNSUPPORTED_MEDIA_TYPE, content_type
    for content_type in ("Application/JSON", "application/json; charset=utf-8"):
        assert asyncio.run(_read_json_body(_posted(b"{}", content_type), "/v1/monitor")) == b"{}"


def test_a_client_value_is_echoed_cut_short():
    # A 1 MB JSON key given twice: the answer names it, but not whole.
    key = "k" * 1_000_000
    body = f'{{"{key}": 1, "{key}": 2}}'.encode()
    error = _refusal(_parsed(_posted(body, "application/json"), "/v1/screen/array", _ARRAY_FIELDS))
    assert str(error).startswith("field 'kkkk") and len(str(error)) < 200


def test_the_log_masks_quoted_values_not_apostrophes(tmp_path: Path):
    message = (
        "the image is 10000 x 10 pixels; cropped to the model's 28 x 28 input it would keep "
        "0.1% of itself; model 'MRN4711' and bytes b'DOE' are the client's"
    )
    line = logged_refusal(InputError(message, HTTPStatus.UNPROCESSABLE_ENTITY), tmp_path)
    assert "MRN4711" not in line and "DOE" not in line
    assert json.loads(line)["error"] == (
        "the image is 10000 x 10 pixels; cropped to the model's 28 x 28 input it would keep "
        "0.1% of itself; model '…' and bytes b'…' are the client's"
    )


@pytest.mark.slow
def test_a_path_that_is_no_route_never_becomes_a_metrics_label(served_model):
    url = served_model.url
    for path in ("/v1/monitor/MRN_4711", "/MRN_4712", "/v1/screen/MRN_4713/x"):
        assert requests.get(f"{url}{path}", timeout=30).status_code == 404
    assert requests.post(f"{url}/v1/screen", timeout=30).status_code == 401
    metrics = requests.get(f"{url}/metrics", timeout=30)
    assert metrics.status_code == 200
    assert "MRN_47" not in metrics.text
    totals = [line for line in metrics.text.splitlines() if "_request_total{" in line]
    # Every path that is no route shares one label; a route keeps its own.
    assert any('endpoint="unmatched"' in line and 'code="404"' in line for line in totals)
    assert any('endpoint="/v1/screen"' in line and 'code="401"' in line for line in totals)
    assert all(line.startswith("bentoml_service_request_total{") for line in totals), totals
    assert requests.post(f"{url}/metrics", timeout=30).status_code == 405


@pytest.mark.slow
def test_a_trailing_slash_is_no_route_and_no_redirect(served_model, service_keys):
    headers = {"Authorization": f"Bearer {service_keys.all_models}", "Host": "elsewhere.example"}
    for path in ("/v1/screen/", "/v1/models/"):
        # A redirect would send the upload and its key to a URL built from the Host header.
        response = requests.post(
            f"{served_model.url}{path}", headers=headers, timeout=30, allow_redirects=False
        )
        assert response.status_code in (404, 405), (path, response.status_code)
        assert "location" not in response.headers and "error" in response.json()
    # Nor does a folder of files without its slash (Starlette's mount redirected it).
    response = requests.get(
        f"{served_model.url}/v1/docs-assets", headers=headers, timeout=30, allow_redirects=False
    )
    assert response.status_code == 404 and "location" not in response.headers
    assert "no route /v1/docs-assets;" in response.json()["error"]
    outer_404 = response
    response = requests.get(f"{served_model.url}/v1/models/", headers=headers, timeout=30)
    assert "routes take no trailing slash" in response.json()["error"]
    # BentoML's paths and the API's own answer 404 in one form, down to the JSON's spacing.
    for answer in (outer_404, response):
        compact = json.dumps(answer.json(), separators=(",", ":"), ensure_ascii=False)
        assert answer.content == compact.encode(), answer.content


@pytest.mark.slow
def test_an_unknown_model_name_is_not_echoed_whole(served_model, service_keys):
    response = requests.post(
        f"{served_model.url}/v1/screen/array",
        json={"model": "m" * 1_000_000, "array": [[0, 255], [255, 0]]},
        headers={"Authorization": f"Bearer {service_keys.all_models}"},
        timeout=60,
    )
    assert response.status_code == 404 and "is not served here" in response.json()["error"]
    assert len(response.content) < 1_000  # the 1 MB name came back whole before
