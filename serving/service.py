"""The BentoML service hospitals call: every registered task behind one authenticated API.

Routes (mounted on the BentoML server, which keeps ``/readyz``, ``/livez`` and ``/metrics``):

- ``GET /v1/models``: the models this key may use, each with its card.
- ``POST /v1/screen``: multipart ``file`` (PNG, JPEG, DICOM, or NIfTI for 3D models), optional
  form field ``model``.
- ``POST /v1/screen/array``: JSON ``{"array": [...], "model": ...}`` of raw uint8 pixel values.
- ``POST /v1/monitor``: JSON ``{"samples": [...], "sampling_rate_hz": ..., "lead": ...}`` ECG.
- ``POST /v1/monitor/dicom``: multipart ``file`` with a DICOM ECG waveform, optional ``lead``.

Every request needs ``Authorization: Bearer <key>`` or ``X-API-Key: <key>`` (``medscreen keys
create``); an ``Authorization`` of another scheme (a proxy's) leaves ``X-API-Key`` to be read.
Every answer names the model version and threshold behind it, and every prediction request,
answered or refused (and every refused model listing), is written to the hash-chained prediction
log before the response leaves; a model listing that is answered and a path that is no route are
not.
Requests are parsed here rather than by BentoML's typed IO so that every client mistake gets a
4xx in one JSON form; ``/v1/openapi.json`` publishes the bodies and answers that
:mod:`serving.schemas` describes.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import io
import json
import logging
import math
import os
import re
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from email.message import Message
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import bentoml
import numpy as np
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.routing import APIRoute
from PIL import Image
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Route
from starlette.staticfiles import StaticFiles

from serving.api_keys import (
    ApiKey,
    AuthError,
    KeyStore,
    KeyStoreError,
    is_medscreen_authorization,
)
from serving.batching import FairLock, MicroBatcher
from serving.decode_memory import DecodeMemory, Reservation
from serving.errors import InputError, RequestError, shown
from serving.inputs import (
    MAX_UPLOAD_BYTES,
    DecodedImage,
    EcgBeats,
    EcgSignal,
    beats_for_model,
    beats_memory_estimate,
    canonical_lead,
    decode_array,
    decode_image,
    decode_memory_estimate,
    decode_volume,
    dicom_ecg_memory_estimate,
    ecg_from_dicom,
    ecg_from_json,
    is_dicom,
    is_nifti,
)
from serving.monitoring import monitoring_answer
from serving.pool import ModelPool, Served, default_references
from serving.prediction_log import PredictionLog, PredictionLogError, PredictionRecord
from serving.schemas import (
    MONITOR_DICOM_UPLOAD,
    SCREEN_UPLOAD,
    ArrayRequest,
    ErrorAnswer,
    ModelList,
    MonitoringAnswer,
    MonitorRequest,
    ScreeningAnswer,
)
from serving.settings import (
    MODELS_ENV,
    access_log_enabled,
    decode_memory_bytes,
    key_store_path,
    max_batch_size,
    prediction_log_path,
    tracking_uri,
)
from serving.supervision import end_with_supervisor

logger = logging.getLogger("medscreen.serving")


def _configure_logging() -> None:
    """BentoML only configures its own loggers; give ours a handler of its own."""
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(
            logging.Formatter("%(asctime)s [%(levelname)s] [medscreen] %(message)s")
        )
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


_configure_logging()

# Decoding a small upload takes microseconds; a large one (a 1024 px DICOM, a volume) goes to a
# thread so that the event loop keeps accepting requests.
_INLINE_DECODE_BYTES = 64 * 1024
_MULTIPART = "multipart/form-data"
# Each route's fields, as its published request body names them.
_SCREEN_FIELDS = tuple(SCREEN_UPLOAD["properties"])
_MONITOR_DICOM_FIELDS = tuple(MONITOR_DICOM_UPLOAD["properties"])
_ARRAY_FIELDS = tuple(ArrayRequest.model_fields)
_MONITOR_FIELDS = tuple(MonitorRequest.model_fields)
# BentoML answers a request still running after REQUEST_TIMEOUT_S with a 504 that bypasses the
# prediction log, so the service keeps its own, earlier deadlines, each answered and logged: a
# slow upload is a 408, and a request not answered within ANSWER_DEADLINE_S of its upload's end
# a 503 (from the end: a slow link must not eat the time its input needs). Once its record is
# being written a request is no longer cut short (the record and the answer must agree);
# BentoML's timeout stays only as a backstop for a stalled disk.
UPLOAD_TIMEOUT_S = 45.0
ANSWER_DEADLINE_S = 55.0
REQUEST_TIMEOUT_S = 120

api = FastAPI(
    title="medscreen",
    description="Screening and monitoring models, trained once and shared by every region.",
    docs_url=None,  # FastAPI's page loads Swagger UI from a CDN: /docs below serves it from here
    openapi_url="/openapi.json",
    # A slash redirect sends the upload and its key again, to a URL built from the Host header.
    redirect_slashes=False,
)
# The Swagger UI files that BentoML ships: the docs page loads nothing from another origin, in
# a browser on the hospital's network where integrators paste their key.
SWAGGER_ASSETS = Path(bentoml.__file__).parent / "_internal" / "server" / "static_content"
api.mount("/docs-assets", StaticFiles(directory=SWAGGER_ASSETS), name="docs-assets")


@api.get("/docs", include_in_schema=False)
async def _docs() -> HTMLResponse:
    return get_swagger_ui_html(
        openapi_url="/v1/openapi.json",
        title="medscreen API",
        swagger_js_url="/v1/docs-assets/swagger-ui-bundle.js",
        swagger_css_url="/v1/docs-assets/swagger-ui.css",
        swagger_favicon_url="/v1/docs-assets/favicon-light-32x32.png",
    )


def _no_route(path: str) -> str:
    """The 404 message, for the API's own routes and for BentoML's paths alike."""
    hint = "; routes take no trailing slash" if path.endswith("/") else ""
    return f"no route {path}{hint}; the routes are listed at /v1/docs"


@api.exception_handler(StarletteHTTPException)
async def _route_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    """Unknown routes and methods answer in the same JSON form as every other mistake."""
    status = HTTPStatus(error.status_code)
    if status == HTTPStatus.NOT_FOUND:
        message = _no_route(request.url.path)
    elif status == HTTPStatus.METHOD_NOT_ALLOWED:
        message = f"{request.method} is not allowed on {request.url.path}"
    else:
        message = str(error.detail)
    request_id = str(uuid.uuid4())
    return JSONResponse(
        error_body(request_id, status, message),
        status_code=status.value,
        headers={"X-Request-ID": request_id},
    )


class JsonNotFound:
    """BentoML answers paths outside its routes with a plain-text 404; answer in our JSON form.

    A path with a trailing slash gets the same 404, not Starlette's redirect to the path
    without it: that redirect tells the client to send the upload and its key again, to a URL
    built from the request's Host header.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        """Pass everything through, but a plain-text 404 becomes the JSON error body."""
        # The routes' own answers are JSON already; only other paths need the check.
        if scope["type"] != "http" or scope["path"] in _ROUTE_PATHS:
            await self.app(scope, receive, send)
            return
        replaced = False

        async def send_json_404(message: dict) -> None:
            nonlocal replaced
            if message["type"] == "http.response.start" and message["status"] in (404, 307):
                headers = dict(message.get("headers", []))
                plain_404 = message["status"] == 404 and headers.get(
                    b"content-type", b""
                ).startswith(b"text/plain")
                slash_redirect = message["status"] == 307 and _only_a_slash_apart(
                    scope["path"], headers.get(b"location", b"").decode("latin-1")
                )
                if plain_404 or slash_redirect:
                    replaced = True
                    request_id = str(uuid.uuid4())
                    # Rendered as the API's own 404s are, byte for byte alike in form.
                    body = JSONResponse(
                        error_body(request_id, HTTPStatus.NOT_FOUND, _no_route(scope["path"]))
                    ).body
                    await send(
                        {
                            "type": "http.response.start",
                            "status": 404,
                            "headers": [
                                (b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()),
                                (b"x-request-id", request_id.encode()),
                            ],
                        }
                    )
                    await send({"type": "http.response.body", "body": body})
                    return
            if replaced:
                return  # the plain-text body is dropped
            await send(message)

        await self.app(scope, receive, send_json_404)


def _only_a_slash_apart(path: str, location: str) -> bool:
    """Whether ``location`` is Starlette's redirect of ``path`` with a slash added or removed."""
    moved_to = urlsplit(location).path
    return moved_to != path and moved_to.rstrip("/") == path.rstrip("/")


# Every path that is no route is one label on /metrics: a path can carry anything (an MRN, a
# name), GET /metrics needs no key, and each new label stays in the metrics store for good.
_UNMATCHED_LABEL = "unmatched"
_REAL_PATH = "medscreen.path"  # the scope key that carries the path past the metrics middleware
# BentoML's own routes besides /metrics (the index page and its OpenAPI documents, the probes).
_BENTOML_PATHS = frozenset({"/", "/docs.json", "/schema.json", "/livez", "/healthz", "/readyz"})
# BentoML's index page loads Google Tag Manager in a browser on the hospital's network, and its
# OpenAPI document has no key scheme: ours replace them.
_OUR_PAGES = {"/": "/v1/docs", "/docs.json": "/v1/openapi.json"}


class RouteLabelledMetrics:
    """BentoML's HTTP request metrics, labelled by route instead of by the path a client sends.

    BentoML's instrumentation labels ``bentoml_service_request_*`` with the raw path, so a 404
    for ``/v1/monitor/MRN_4711`` put ``MRN_4711`` on the unauthenticated ``GET /metrics``, and
    random paths grew it without bound. It is switched off on the service
    (``metrics={"enabled": False}``) and BentoML's own middleware is run here instead, with the
    same metric names, on a scope whose path is the route or :data:`_UNMATCHED_LABEL`. The switch
    also removes ``GET /metrics``, which is answered here as BentoML answers it.
    """

    def __init__(self, app: Any) -> None:
        from bentoml._internal.configuration.containers import BentoMLContainer
        from bentoml._internal.server.http.instruments import RunnerTrafficMetricsMiddleware

        self.app = app
        self.container = BentoMLContainer
        self.instrumented = RunnerTrafficMetricsMiddleware(
            self._with_real_path,
            namespace=BentoMLContainer.api_server_config.metrics.namespace.get(),
        )

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        """Count an HTTP request under its route's label; answer ``GET /metrics``."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if path == "/metrics":
            response = await self._metrics(scope)
            await response(scope, receive, send)
            return
        label = path if path in _LABELLED_PATHS else _UNMATCHED_LABEL
        await self.instrumented({**scope, "path": label, _REAL_PATH: path}, receive, send)

    async def _with_real_path(self, scope: dict, receive: Any, send: Any) -> None:
        scope["path"] = scope.pop(_REAL_PATH)  # the copy made above; the label is taken by now
        ours = _OUR_PAGES.get(scope["path"])
        if ours is not None and scope["method"] in ("GET", "HEAD"):
            await RedirectResponse(ours, status_code=HTTPStatus.TEMPORARY_REDIRECT)(
                scope, receive, send
            )
            return
        await self.app(scope, receive, send)

    async def _metrics(self, scope: dict) -> Response:
        if scope["method"] not in ("GET", "HEAD"):
            request_id = str(uuid.uuid4())
            status = HTTPStatus.METHOD_NOT_ALLOWED
            return JSONResponse(
                error_body(request_id, status, f"{scope['method']} is not allowed on /metrics"),
                status_code=status.value,
                headers={"X-Request-ID": request_id, "Allow": "GET, HEAD"},
            )
        client = self.container.metrics_client.get()
        content = await asyncio.to_thread(client.generate_latest)
        return Response(content, media_type=client.CONTENT_TYPE_LATEST)


@dataclass
class _Exchange:
    """What one request has established so far, for its answer and its log record."""

    route: str
    request: Request | None = None  # None where no client waits (the service's own tests)
    request_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    started: float = field(default_factory=time.perf_counter)
    key: ApiKey | None = None
    served: Served | None = None
    input_sha256: str | None = None
    input_format: str | None = None
    deadline: asyncio.Timeout | None = None

    def latency_ms(self) -> float:
        return (time.perf_counter() - self.started) * 1000

    async def check_client_waits(self) -> None:
        """Refuse to go on for a client that hung up: its answer would never be delivered.

        Raises:
            RequestError: if the client disconnected, so the log records a failure, not an
                answer nobody received.
        """
        if self.request is not None and await self.request.is_disconnected():
            raise RequestError("the client disconnected before its answer was ready")


def error_body(request_id: str, status: HTTPStatus, message: str) -> dict[str, Any]:
    """The JSON body of a refused request: ``error`` says what to change."""
    return {"error": message, "status": status.value, "request_id": request_id}


async def _read_body(
    request: Request,
    timeout_s: float = UPLOAD_TIMEOUT_S,
    *,
    answer_deadline: asyncio.Timeout | None = None,
) -> bytes:
    """The request body, refused with 413 past the upload limit (checked while reading).

    An upload still arriving after ``timeout_s`` is refused with 408 (and logged), before
    BentoML's own request timeout would answer 504 with nothing in the prediction log. Once the
    upload is complete, ``answer_deadline`` (the request's) is set ``ANSWER_DEADLINE_S`` ahead.
    """
    declared = request.headers.get("content-length", "")
    limit = MAX_UPLOAD_BYTES + 64 * 1024  # room for the multipart envelope
    if declared.isdigit() and int(declared) > limit:
        raise RequestError(
            f"the request is {declared} bytes; the limit is {limit} bytes",
            HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
        )
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise RequestError(
                        f"the request is over the limit of {limit} bytes",
                        HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                    )
                chunks.append(chunk)
    except TimeoutError:
        raise RequestError(
            f"the upload did not complete within {timeout_s:g} s ({size} bytes arrived); check "
            "the connection, or send a smaller file",
            HTTPStatus.REQUEST_TIMEOUT,
        ) from None
    except ClientDisconnect:
        raise RequestError(
            f"the client disconnected before the upload was complete ({size} bytes arrived)"
        ) from None
    if answer_deadline is not None:
        answer_deadline.reschedule(asyncio.get_running_loop().time() + ANSWER_DEADLINE_S)
    return b"".join(chunks)


def _content_type_header(content_type: str) -> Message:
    """A Content-Type parsed (media type lower-cased; "multipart/form-dataX" is not multipart)."""
    header = Message()
    header["content-type"] = content_type
    return header


async def _multipart(
    request: Request,
    route: str,
    accepted: tuple[str, ...],
    *,
    answer_deadline: asyncio.Timeout | None = None,
) -> tuple[bytes, dict[str, str]]:
    """The ``file`` part and the text fields of a multipart upload whose fields are ``accepted``."""
    content_type = request.headers.get("content-type", "")
    header = _content_type_header(content_type)
    # Parameter names are case-insensitive: "Boundary=" is a boundary too.
    boundary = header.get_param("boundary")
    if header.get_content_type() != _MULTIPART or not isinstance(boundary, str):
        raise RequestError(
            f"{route} takes {_MULTIPART} with the upload in a field named 'file' "
            f"(got Content-Type {content_type or 'none'!r})",
            HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
        )
    body = await _read_body(request, answer_deadline=answer_deadline)
    _check_closed(body, boundary)
    # starlette's form parser reads the cached body
    request._body = _without_preamble(body, boundary)
    try:
        # Two files are parsed so that a repeated 'file' is named below, not a parser error.
        form = await request.form(max_files=2, max_fields=8)
    except Exception as error:  # the multipart parser raises several kinds on a broken body
        raise RequestError(
            f"the multipart body cannot be parsed: {error} (send the upload as a file part, "
            "with a filename; text fields are limited to 1 MB)"
        ) from error
    repeated = [
        name for name, count in Counter(name for name, _ in form.multi_items()).items() if count > 1
    ]
    if repeated:
        await form.close()
        raise _given_twice(repeated[0])
    upload = form.get("file")
    if isinstance(upload, str):
        raise RequestError(
            "field 'file' arrived as a text field: send it as a file part (its "
            "Content-Disposition needs a filename)",
            HTTPStatus.UNPROCESSABLE_ENTITY,
        )
    if upload is None:
        raise RequestError(
            f"{route} needs the upload in a multipart field named 'file' "
            f"(got fields {sorted(form.keys())})",
            HTTPStatus.UNPROCESSABLE_ENTITY,
        )
    try:
        _check_known_fields(route, form.keys(), accepted)
        for name, value in form.multi_items():
            if name != "file" and not isinstance(value, str):
                # Dropped, a model or lead sent as a file would fall back to the default.
                raise RequestError(
                    f"field {name!r} arrived as a file part: send it as a text field (its "
                    "Content-Disposition without a filename)",
                    HTTPStatus.UNPROCESSABLE_ENTITY,
                )
        data = await upload.read()
    finally:
        await form.close()
    fields = {name: value for name, value in form.items() if isinstance(value, str)}
    return data, fields


def _check_no_query(request: Request, route: str) -> None:
    """Refuse a query string: ``?model=`` or ``?lead=`` would be ignored for the defaults."""
    if request.scope.get("query_string"):
        names = sorted({name for name, _ in request.query_params.multi_items()})
        raise RequestError(
            f"{route} takes no query parameters (got "
            f"{shown(names[0]) if names else 'a query string'}): send every field in the body",
            HTTPStatus.UNPROCESSABLE_ENTITY,
        )


def _check_known_fields(route: str, given: Iterable[str], accepted: tuple[str, ...]) -> None:
    """Refuse fields the route does not take: a misspelt ``lead`` would fall back to the default."""
    unknown = sorted(set(given) - set(accepted))
    if unknown:
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise RequestError(
            f"{route} takes no field {shown(unknown[0])}{more}; its fields are "
            f"{', '.join(accepted)}",
            HTTPStatus.UNPROCESSABLE_ENTITY,
        )


def _check_closed(body: bytes, boundary: str) -> None:
    """Refuse a multipart body without its closing boundary (``--BOUNDARY--``).

    The parser drops a part that is never closed without complaint, so a cut upload would
    otherwise be reported as a request without a ``file`` field.
    """
    # The header is read as latin-1 (as starlette reads it), so the boundary is encoded so too.
    if f"--{boundary}--".encode("latin-1", "replace") not in body:
        raise RequestError(
            # repr quotes it whatever it holds, so the prediction log masks it (it is the client's).
            f"the multipart body is incomplete: it has no closing boundary ({f'--{boundary}--'!r}) "
            f"after {len(body)} bytes; the upload was cut short or the client did not finish it"
        )


def _without_preamble(body: bytes, boundary: str) -> bytes:
    """Drop any preamble before the first boundary, which MIME allows and the parser refuses.

    MIME libraries (JavaMail's, for one) write a line such as "This is a multi-part message in
    MIME format." there. The first part starts at the first line that is ``--BOUNDARY``; a body
    without one is left to the parser to refuse.
    """
    delimiter = f"--{boundary}".encode("latin-1", "replace")
    if body.startswith(delimiter):
        return body
    start = body.find(b"\r\n" + delimiter + b"\r\n")
    return body if start < 0 else body[start + 2 :]


def _given_twice(name: str) -> RequestError:
    return RequestError(
        f"field {shown(name)} is given twice; send each field once",
        HTTPStatus.UNPROCESSABLE_ENTITY,
    )


class _RepeatedKeys(dict):
    """A JSON object with a key given more than once (json keeps the last silently)."""

    repeated: str


def _json_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` that marks an object whose keys repeat (checked at the top level)."""
    result = dict(pairs)
    if len(result) == len(pairs):
        return result
    seen: set[str] = set()
    marked = _RepeatedKeys(result)
    marked.repeated = next(key for key, _ in pairs if key in seen or seen.add(key))
    return marked


async def _read_json_body(
    request: Request, route: str, *, answer_deadline: asyncio.Timeout | None = None
) -> bytes:
    """The raw bytes of a JSON body (refused with 415 under another content type)."""
    content_type = request.headers.get("content-type", "")
    if _content_type_header(content_type).get_content_type() != "application/json":
        raise RequestError(
            f"{route} takes application/json (got Content-Type {content_type or 'none'!r})",
            HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
        )
    return await _read_body(request, answer_deadline=answer_deadline)


def _json_memory_estimate(body: bytes) -> int:
    """About how many bytes parsing ``body`` and decoding its values will hold at their peak."""
    return _JSON_BYTES_PER_BODY_BYTE * len(body)


async def _json_object(
    reservation: Reservation, body: bytes, route: str, accepted: tuple[str, ...]
) -> dict[str, Any]:
    """The parsed object of a JSON body whose fields are ``accepted``.

    Parsed on the loop when small (a thread hop costs more), else in a thread under
    ``reservation``.
    """
    try:
        if len(body) <= _INLINE_DECODE_BYTES:
            payload = json.loads(body, object_pairs_hook=_json_pairs)
        else:
            payload = await reservation.run(lambda: json.loads(body, object_pairs_hook=_json_pairs))
    except (ValueError, UnicodeDecodeError, RecursionError) as error:
        reason = "nested too deeply" if isinstance(error, RecursionError) else str(error)
        raise RequestError(f"the body is not valid JSON: {reason}") from error
    if not isinstance(payload, dict):
        raise RequestError(
            f"the JSON body must be an object, got {type(payload).__name__}",
            HTTPStatus.UNPROCESSABLE_ENTITY,
        )
    if isinstance(payload, _RepeatedKeys):  # only the top level names fields
        raise _given_twice(payload.repeated)
    _check_known_fields(route, payload, accepted)
    return payload


def _model_field(fields: dict[str, Any]) -> str | None:
    name = fields.get("model")
    if name is not None and not isinstance(name, str):
        raise RequestError("field 'model' must be a model name (a string)")
    return name or None


# Quoted values in error messages come from the client or the file; the log keeps neither.
# A repr() escapes its own quote inside the value, so escapes are skipped over.
# A quote opens after a non-word character or a bytes prefix (b'...'), as repr writes values
# into messages; the apostrophe of "model's" opens nothing.
_QUOTED = re.compile(r"(?:(?<!\w)|(?<=\bb))(?:'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\")")


def _finite(score: float) -> float:
    if not math.isfinite(score):
        raise ValueError("the model produced a score that is not a number")
    return score


def _checked_lead(served: Served, signal: EcgSignal) -> EcgSignal:
    """Refuse a lead the model was not trained on (its beats look different)."""
    card_signal = served.model.card.signal
    assert card_signal is not None
    if canonical_lead(signal.lead) != canonical_lead(card_signal.lead):
        raise InputError(
            f"model {served.model.name!r} was trained on lead {card_signal.lead}; "
            f"send that lead (got {signal.lead!r})",
            HTTPStatus.UNPROCESSABLE_ENTITY,
        )
    return signal


_INLINE_DECODE_PIXELS = 256 * 256
# Decodes estimated under this run at once in the default thread pool (one per thread: six on
# 2 cores, so at most 384 MiB); larger ones wait for their share of the DecodeMemory budget.
_UNBUDGETED_DECODE_BYTES = 64 * 2**20
# Peak memory per body byte while a JSON body is parsed and decoded, measured on 2026-12-01: 9
# for floats, 13 for small whole numbers, 27 for an hour of ECG, up to 63 for single-element
# lists nested 20-64 deep (Python holds each list, float and dict as an object). The worst
# case with a margin, so that a hostile body cannot take more than its share.
_JSON_BYTES_PER_BODY_BYTE = 80


def _budgeted(cost: int) -> int:
    """The share of the decode budget a step estimated at ``cost`` bytes holds."""
    return cost if cost > _UNBUDGETED_DECODE_BYTES else 0


async def _decode_picture(
    memory: DecodeMemory, decode: Callable[[], DecodedImage], data: bytes
) -> DecodedImage:
    """Decode small PNG/JPEG pictures on the loop (a thread hop costs more), others in a thread.

    The size is taken from the picture's header, not the file's length: a small file can hold a
    very large picture. A decode estimated over :data:`_UNBUDGETED_DECODE_BYTES` waits for its
    share of ``memory`` first.
    """
    if len(data) <= _INLINE_DECODE_BYTES and not is_dicom(data):
        try:
            with Image.open(io.BytesIO(data)) as header:
                inline = header.width * header.height <= _INLINE_DECODE_PIXELS
        except Exception:  # the decoder reports what is wrong with the file
            inline = True
        if inline:
            return decode()

    def decode_unless_large() -> DecodedImage | int:
        # The estimate reads the header (0.5 ms for a DICOM), so it runs here, off the loop.
        cost = decode_memory_estimate(data)
        return cost if cost > _UNBUDGETED_DECODE_BYTES else decode()

    decoded = await asyncio.to_thread(decode_unless_large)
    if isinstance(decoded, int):
        decoded = await memory.run(decoded, decode)
    return decoded


@bentoml.service(
    name="medscreen",
    workers=int(os.environ.get("MEDSCREEN_WORKERS", "1")),
    traffic={"timeout": REQUEST_TIMEOUT_S},
    # The prediction log records every request; BentoML's access log would repeat it per
    # request at a cost the batcher notices (MEDSCREEN_ACCESS_LOG=true turns it back on).
    logging={"access": {"enabled": access_log_enabled()}},
    # No trace exporter is configured, yet a span per request costs about a tenth of the event
    # loop's time; the prediction log's request id is the trace an auditor follows.
    tracing={"excluded_urls": ["/v1/"]},
    # BentoML labels its request metrics with the raw path; RouteLabelledMetrics replaces it.
    metrics={"enabled": False},
)
@bentoml.asgi_app(api, path="/v1")
class Screening:
    """Serves every configured registered model, with keys, a prediction log and batching."""

    def __init__(self) -> None:
        end_with_supervisor()
        tracking = tracking_uri()
        configured = [ref for ref in os.environ.get(MODELS_ENV, "").split(",") if ref.strip()]
        # One batch at a time per process, whatever its model, in turn: the sessions' threads
        # are sized to the cores the event loop leaves free.
        run_lock = FairLock()
        batch_limit = max_batch_size()
        self.pool = ModelPool(
            configured or default_references(tracking),
            tracking=tracking,
            make_batcher=lambda model: MicroBatcher(
                model.run,
                batch_limit,
                run_lock=run_lock,
                name=f"onnxruntime-{model.name}-{model.version}",
            ),
            reload_seconds=float(os.environ.get("MEDSCREEN_RELOAD_SECONDS", "5")),
        )
        self.pool.start_watching()
        self.keys = KeyStore(key_store_path())
        self.log = PredictionLog(prediction_log_path(), head_interval_seconds=0.5)
        self.decode_memory = DecodeMemory(decode_memory_bytes())
        api.state.screening = self
        # Everything loaded so far (MLflow, onnx, the models) lives as long as the process: moved
        # out of the collector's reach, full collections stop pausing every request for tens
        # of milliseconds (p99 at concurrency 32 fell from about 280 ms to under 100 ms).
        gc.collect()
        gc.freeze()
        for served in self.pool.all():
            model = served.model
            logger.info(
                "serving %s version %s (alias %s, threshold %.6f, ONNX SHA-256 %s)",
                model.name,
                model.version,
                model.alias,
                model.threshold,
                model.onnx_sha256,
            )

    @bentoml.on_shutdown
    def _shutdown(self) -> None:
        self.pool.stop()
        for served in self.pool.all():
            served.batcher.close()
        self.log.close()

    # -- the routes ---------------------------------------------------------------------------

    async def list_models(self, request: Request) -> JSONResponse:
        """Answer ``GET /v1/models``."""

        async def describe(exchange: _Exchange) -> JSONResponse:
            key = self._authenticate(request, exchange)
            models = [
                served.model.describe()
                for served in self.pool.all()
                if key.grants(served.model.name)
            ]
            return self._json(exchange, {"request_id": exchange.request_id, "models": models})

        return await self._guarded(_Exchange("/v1/models"), describe)

    async def screen(self, request: Request) -> JSONResponse:
        """Answer ``POST /v1/screen``."""

        async def decode(exchange: _Exchange) -> tuple[Served, DecodedImage]:
            data, fields = await _multipart(
                request, exchange.route, _SCREEN_FIELDS, answer_deadline=exchange.deadline
            )
            served = self._select(exchange, _model_field(fields), monitoring=False)
            exchange.input_sha256 = hashlib.sha256(data).hexdigest()
            card_input = served.model.card.input
            assert card_input is not None
            if served.model.card.is_volume:
                if not is_nifti(data):
                    raise InputError(
                        f"model {served.model.name!r} takes 3D volumes: upload a NIfTI file "
                        "(.nii or .nii.gz) or POST the voxels to /v1/screen/array",
                        HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                    )
                shape = (card_input.depth, card_input.height, card_input.width)
                # A 512^3 volume takes 1.4-1.5 GB and 6-7 s to decode here: alone.
                decoded = await self.decode_memory.run(
                    self.decode_memory.capacity,
                    lambda: decode_volume(data, depth=shape[0], height=shape[1], width=shape[2]),
                )
            else:
                channels = 1 if card_input.channels == "grayscale" else 3
                decoded = await _decode_picture(
                    self.decode_memory,
                    lambda: decode_image(
                        data,
                        channels=channels,
                        height=card_input.height,
                        width=card_input.width,
                        refuse_blank=True,
                    ),
                    data,
                )
            return served, decoded

        return await self._screen(request, "/v1/screen", decode)

    async def screen_array(self, request: Request) -> JSONResponse:
        """Answer ``POST /v1/screen/array``."""

        async def decode(exchange: _Exchange) -> tuple[Served, DecodedImage]:
            body = await _read_json_body(request, exchange.route, answer_deadline=exchange.deadline)
            cost = _budgeted(_json_memory_estimate(body))
            async with self.decode_memory.hold(cost) as reservation:
                payload = await _json_object(reservation, body, exchange.route, _ARRAY_FIELDS)
                served = self._select(exchange, _model_field(payload), monitoring=False)
                exchange.input_sha256 = hashlib.sha256(body).hexdigest()
                if "array" not in payload:
                    raise RequestError(
                        "the JSON body needs a field 'array' with the pixel values "
                        f"(got fields {sorted(payload)})",
                        HTTPStatus.UNPROCESSABLE_ENTITY,
                    )
                shape = served.model.input_shape
                decoded = await reservation.run(lambda: decode_array(payload["array"], shape=shape))
            return served, decoded

        return await self._screen(request, "/v1/screen/array", decode)

    async def monitor(self, request: Request) -> JSONResponse:
        """Answer ``POST /v1/monitor``."""

        async def read(exchange: _Exchange) -> tuple[Served, EcgSignal]:
            # The parsed lists, many times the samples' size, are gone when this returns.
            body = await _read_json_body(request, exchange.route, answer_deadline=exchange.deadline)
            cost = _budgeted(_json_memory_estimate(body))
            async with self.decode_memory.hold(cost) as reservation:
                payload = await _json_object(reservation, body, exchange.route, _MONITOR_FIELDS)
                served = self._select(exchange, _model_field(payload), monitoring=True)
                exchange.input_sha256 = hashlib.sha256(body).hexdigest()
                return served, await reservation.run(lambda: ecg_from_json(payload))

        async def decode(exchange: _Exchange) -> tuple[Served, Any]:
            served, signal = await read(exchange)
            signal = _checked_lead(served, signal)
            exchange.input_format = signal.source_format
            return served, await self._beats(signal)

        return await self._monitor(request, "/v1/monitor", decode)

    async def monitor_dicom(self, request: Request) -> JSONResponse:
        """Answer ``POST /v1/monitor/dicom``."""

        async def decode(exchange: _Exchange) -> tuple[Served, Any]:
            data, fields = await _multipart(
                request, exchange.route, _MONITOR_DICOM_FIELDS, answer_deadline=exchange.deadline
            )
            served = self._select(exchange, _model_field(fields), monitoring=True)
            exchange.input_sha256 = hashlib.sha256(data).hexdigest()
            card_signal = served.model.card.signal
            assert card_signal is not None
            lead = fields.get("lead") or card_signal.lead
            cost = _budgeted(dicom_ecg_memory_estimate(data))
            async with self.decode_memory.hold(cost) as reservation:
                signal = await reservation.run(lambda: ecg_from_dicom(data, lead=lead))
            signal = _checked_lead(served, signal)
            exchange.input_format = signal.source_format
            return served, await self._beats(signal)

        return await self._monitor(request, "/v1/monitor/dicom", decode)

    # -- the shared request path --------------------------------------------------------------

    async def _beats(self, signal: EcgSignal) -> EcgBeats:
        """Cut ``signal`` into the model's beats, under its share of the decode budget."""
        cost = _budgeted(beats_memory_estimate(signal))
        async with self.decode_memory.hold(cost) as reservation:
            return await reservation.run(lambda: beats_for_model(signal))

    async def _screen(
        self,
        request: Request,
        route: str,
        decode: Callable[[_Exchange], Awaitable[tuple[Served, DecodedImage]]],
    ) -> JSONResponse:
        async def predict(exchange: _Exchange) -> JSONResponse:
            self._authenticate(request, exchange)
            _check_no_query(request, route)
            served, decoded = await decode(exchange)
            exchange.input_format = decoded.source_format
            model = served.model
            feeds = {model.input_names[0]: decoded.pixels[None]}
            probabilities = await served.batcher.submit(feeds)
            probability = _finite(float(model.positive_probability(probabilities)[0]))
            decision = "positive" if probability >= model.threshold else "negative"
            answer = {
                "request_id": exchange.request_id,
                "model": {"name": model.name, "version": model.version, "alias": model.alias},
                "finding": model.card.positive_finding,
                "probability": probability,
                "threshold": model.threshold,
                "sensitivity_target": model.card.operating_point.sensitivity_target,
                "decision": decision,
                "class_probabilities": dict(
                    zip(
                        model.card.classes,
                        np.asarray(probabilities[0], dtype=float).tolist(),
                        strict=True,
                    )
                ),
                "input": {
                    "format": decoded.source_format,
                    **dict(
                        zip(
                            ("depth", "height", "width")[-len(decoded.source_shape) :],
                            decoded.source_shape,
                            strict=True,
                        )
                    ),
                },
            }
            return await self._answer(exchange, answer, score=probability, decision=decision)

        return await self._guarded(_Exchange(route, request), predict)

    async def _monitor(
        self,
        request: Request,
        route: str,
        decode: Callable[[_Exchange], Awaitable[tuple[Served, Any]]],
    ) -> JSONResponse:
        async def predict(exchange: _Exchange) -> JSONResponse:
            self._authenticate(request, exchange)
            _check_no_query(request, route)
            served, beats = await decode(exchange)
            model = served.model
            feeds = dict(
                zip(
                    model.input_names,
                    (beats.windows, beats.templates, beats.rr_seconds),
                    strict=True,
                )
            )
            # An hour of beats takes seconds to run; an image, a millisecond (not worth a check).
            await exchange.check_client_waits()
            probabilities = await served.batcher.submit(feeds)
            answer, score, summary = monitoring_answer(model, beats, probabilities)
            answer = {"request_id": exchange.request_id, **answer}
            return await self._answer(
                exchange, answer, score=_finite(score), decision=answer["decision"], summary=summary
            )

        return await self._guarded(_Exchange(route, request), predict)

    async def _guarded(
        self, exchange: _Exchange, handle: Callable[[_Exchange], Awaitable[JSONResponse]]
    ) -> JSONResponse:
        """Run a request; every way it can fail is answered in one JSON form and logged."""
        try:
            async with asyncio.timeout(ANSWER_DEADLINE_S) as exchange.deadline:
                return await handle(exchange)
        except (AuthError, RequestError, InputError) as error:
            return await self._refuse(exchange, error)
        except Exception as error:
            if isinstance(error, TimeoutError) and exchange.deadline.expired():
                failure = RequestError(
                    f"the service could not answer within {ANSWER_DEADLINE_S:g} s of receiving "
                    "the request (it is overloaded); try again later",
                    HTTPStatus.SERVICE_UNAVAILABLE,
                )
            else:
                logger.exception("request %s %s failed", exchange.request_id, exchange.route)
                failure = RequestError(
                    "the service could not process this request; it is logged under its "
                    "request id for the operators",
                    HTTPStatus.INTERNAL_SERVER_ERROR,
                )
            return await self._refuse(exchange, failure)

    def _authenticate(self, request: Request, exchange: _Exchange) -> ApiKey:
        authorization = request.headers.get("authorization")
        api_key = request.headers.get("x-api-key")
        # A proxy's own Authorization (Basic, another scheme) must not hide the hospital's key.
        if api_key and not is_medscreen_authorization(authorization):
            presented = api_key
        else:
            presented = authorization or api_key
        try:
            exchange.key = self.keys.authenticate(presented)
        except KeyStoreError as error:
            logger.error("key store unusable: %s", error)
            raise RequestError(
                "the service cannot check keys right now; try again later",
                HTTPStatus.SERVICE_UNAVAILABLE,
            ) from error
        return exchange.key

    def _select(self, exchange: _Exchange, name: str | None, *, monitoring: bool) -> Served:
        key = exchange.key
        assert key is not None
        if name is not None:
            # Authorisation first: a key learns nothing about models it may not use.
            self.keys.authorise(key, name)
        # Without a name, only the key's models are candidates.
        served = self.pool.select(name, monitoring=monitoring, allowed=key.grants)
        exchange.served = served
        return served

    async def _answer(
        self,
        exchange: _Exchange,
        answer: dict[str, Any],
        *,
        score: float,
        decision: str,
        summary: dict[str, int | float | str] | None = None,
    ) -> JSONResponse:
        assert exchange.served is not None and exchange.key is not None
        model = exchange.served.model
        await exchange.check_client_waits()  # no record of an answer nobody will receive
        response = self._json(exchange, answer)  # serialised before it is recorded as sent
        latency_ms = exchange.latency_ms()
        if exchange.deadline is not None:
            if exchange.deadline.expired():
                await asyncio.sleep(0)  # its cancellation lands here: nothing recorded as sent
            exchange.deadline.reschedule(None)  # a record being written is not cut short
        try:
            await self.log.append_async(
                PredictionRecord(
                    request_id=exchange.request_id,
                    outcome="prediction",
                    status=HTTPStatus.OK.value,
                    route=exchange.route,
                    **self._who(exchange),
                    input_sha256=exchange.input_sha256,
                    input_format=exchange.input_format,
                    score=score,
                    threshold=model.threshold,
                    decision=decision,
                    summary=summary,
                    latency_ms=latency_ms,
                )
            )
        except (PredictionLogError, ValueError) as error:
            # Nothing leaves unrecorded: without a durable record there is no answer.
            logger.error("request %s: prediction log failed: %s", exchange.request_id, error)
            return self._json(
                exchange,
                error_body(
                    exchange.request_id,
                    HTTPStatus.SERVICE_UNAVAILABLE,
                    "the prediction could not be recorded, so it is withheld; try again later",
                ),
                HTTPStatus.SERVICE_UNAVAILABLE,
            )
        logger.debug(
            "request %s %s model %s/%s score %.6f decision %s latency %.1f ms",
            exchange.request_id,
            exchange.route,
            model.name,
            model.version,
            score,
            decision,
            latency_ms,
        )
        return response

    async def _refuse(
        self, exchange: _Exchange, error: AuthError | RequestError | InputError
    ) -> JSONResponse:
        status = HTTPStatus(error.status)
        message = getattr(error, "message", None) or str(error)
        logger.info("request %s %s refused: %s", exchange.request_id, exchange.route, status.value)
        try:
            await self.log.append_async(
                PredictionRecord(
                    request_id=exchange.request_id,
                    outcome="failed",
                    status=status.value,
                    route=exchange.route,
                    **self._who(exchange),
                    input_sha256=exchange.input_sha256,
                    input_format=exchange.input_format,
                    latency_ms=exchange.latency_ms(),
                    error=_QUOTED.sub("'…'", message)[:1000],
                )
            )
        except (PredictionLogError, ValueError) as log_error:
            logger.error("request %s: prediction log failed: %s", exchange.request_id, log_error)
        return self._json(exchange, error_body(exchange.request_id, status, message), status)

    @staticmethod
    def _who(exchange: _Exchange) -> dict[str, str | None]:
        key, served = exchange.key, exchange.served
        return {
            "hospital": key.hospital if key else None,
            "region": key.region if key else None,
            "key_id": key.key_id if key else None,
            "model_name": served.model.name if served else None,
            "model_version": served.model.version if served else None,
            "model_alias": served.model.alias if served else None,
            "model_sha256": served.model.onnx_sha256 if served else None,
        }

    @staticmethod
    def _json(
        exchange: _Exchange, body: dict[str, Any], status: HTTPStatus = HTTPStatus.OK
    ) -> JSONResponse:
        headers = {"X-Request-ID": exchange.request_id}
        if status == HTTPStatus.UNAUTHORIZED:
            headers["WWW-Authenticate"] = "Bearer"
        return JSONResponse(body, status_code=status.value, headers=headers)


# The first added is the outer: the metrics see the answer as the client gets it.
Screening.add_asgi_middleware(RouteLabelledMetrics)
Screening.add_asgi_middleware(JsonNotFound)


# The routes are plain functions that hand over to the service instance: FastAPI would run
# BentoML's synchronous dependency that supplies ``self`` to class-method routes in a thread,
# one thread hop per request.
def _screening(request: Request) -> Screening:
    return request.app.state.screening


_WHY = {
    400: "the body cannot be read: not the format it claims, or a broken multipart or JSON body",
    401: "no API key, or one that is malformed, unknown or revoked",
    403: "the key may not use this model",
    404: "no model of that name is served here",
    408: "the upload was still arriving after the upload deadline",
    413: "the upload is over the size limit",
    415: "a Content-Type or file format the route does not take (for example a DICOM transfer "
    "syntax without a decoder here)",
    422: "readable but unusable: a missing or wrong field, a blank image, the wrong shape or "
    "lead, or a model of the other kind",
    500: "a fault of the service, logged under the request id for its operators",
    503: "the service cannot answer now (overloaded, keys or prediction log unavailable); "
    "nothing was decided: try again later",
}


def _documented(
    answer: type, statuses: tuple[int, ...], body: tuple[str, dict[str, Any]] | None = None
) -> dict[str, Any]:
    """Route arguments that publish its answer, its refusals and its body in the OpenAPI."""
    extra: dict[str, Any] = {"security": [{"bearerAuth": []}, {"apiKeyHeader": []}]}
    if body is not None:
        media_type, schema = body
        extra["requestBody"] = {"required": True, "content": {media_type: {"schema": schema}}}
    return {
        "response_model": None,
        "responses": {
            200: {"model": answer},
            **{
                status: {"model": ErrorAnswer, "description": _WHY[status]}
                for status in sorted(statuses)
            },
        },
        "openapi_extra": extra,
    }


_ALWAYS = (401, 500, 503)
_UPLOAD = (*_ALWAYS, 400, 403, 404, 408, 413, 415, 422)


def _json_body(model: type[BaseModel]) -> tuple[str, dict[str, Any]]:
    return "application/json", model.model_json_schema(ref_template="#/components/schemas/{model}")


@api.get("/models", **_documented(ModelList, _ALWAYS))
async def list_models(request: Request) -> JSONResponse:
    """The models this key may use, each with its card (intended use, version, threshold)."""
    return await _screening(request).list_models(request)


@api.post("/screen", **_documented(ScreeningAnswer, _UPLOAD, (_MULTIPART, SCREEN_UPLOAD)))
async def screen(request: Request) -> JSONResponse:
    """Screen one upload (PNG, JPEG, DICOM; NIfTI for 3D models) for the positive finding."""
    return await _screening(request).screen(request)


@api.post("/screen/array", **_documented(ScreeningAnswer, _UPLOAD, _json_body(ArrayRequest)))
async def screen_array(request: Request) -> JSONResponse:
    """Screen raw uint8 pixel or voxel values sent as a JSON array (field ``array``)."""
    return await _screening(request).screen_array(request)


@api.post("/monitor", **_documented(MonitoringAnswer, _UPLOAD, _json_body(MonitorRequest)))
async def monitor(request: Request) -> JSONResponse:
    """Classify every beat of a single-lead ECG sent as JSON samples; summarise alerts."""
    return await _screening(request).monitor(request)


@api.post(
    "/monitor/dicom",
    **_documented(MonitoringAnswer, _UPLOAD, (_MULTIPART, MONITOR_DICOM_UPLOAD)),
)
async def monitor_dicom(request: Request) -> JSONResponse:
    """Classify every beat of one lead of a DICOM ECG waveform (form field ``lead``)."""
    return await _screening(request).monitor_dicom(request)


_generated_openapi = api.openapi


def _openapi_with_key_scheme() -> dict[str, Any]:
    """FastAPI's document, with the two ways of sending the API key that routes refer to."""
    if api.openapi_schema is None:
        components = _generated_openapi().setdefault("components", {})
        about = "A hospital's API key (msk_...), issued with `medscreen keys create`."
        components.setdefault("securitySchemes", {}).update(
            bearerAuth={"type": "http", "scheme": "bearer", "description": about},
            apiKeyHeader={
                "type": "apiKey",
                "in": "header",
                "name": "X-API-Key",
                "description": about,
            },
        )
    return api.openapi_schema


api.openapi = _openapi_with_key_scheme  # type: ignore[method-assign]

_ROUTE_PATHS = frozenset(f"/v1{route.path}" for route in api.routes if isinstance(route, APIRoute))
# The API's routes with its documentation (/v1/docs, /v1/openapi.json), and BentoML's.
_LABELLED_PATHS = _BENTOML_PATHS | {
    f"/v1{route.path}" for route in api.routes if isinstance(route, Route)
}
