"""ASGI middleware that rejects malformed uploads before BentoML parses them.

BentoML answers a multipart body without a boundary with a 500; a hospital integrator needs a
4xx that says what to send instead.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from http import HTTPStatus
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class UploadContractMiddleware:
    """Checks Content-Type and Content-Length of uploads to the given routes.

    Args:
        app: The wrapped ASGI application.
        routes: Paths that take a multipart ``file`` upload.
        max_bytes: Largest accepted request body.
    """

    def __init__(self, app: ASGIApp, routes: tuple[str, ...], max_bytes: int) -> None:
        self.app = app
        self.routes = routes
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer 413/415 for uploads that cannot be right; pass everything else through."""
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in self.routes:
            headers = {key.lower(): value for key, value in scope.get("headers", [])}
            content_type = headers.get(b"content-type", b"").decode("latin-1").lower()
            length = headers.get(b"content-length", b"").decode("latin-1")
            if (
                not content_type.startswith("multipart/form-data")
                or "boundary=" not in content_type
            ):
                await _reject(
                    send,
                    HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                    f"{scope['path']} takes multipart/form-data with the image in a field named "
                    f"'file' (got Content-Type {content_type or 'none'!r})",
                )
                return
            if length.isdigit() and int(length) > self.max_bytes:
                await _reject(
                    send,
                    HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                    f"the request is {length} bytes; the limit is {self.max_bytes}",
                )
                return
        await self.app(scope, receive, send)


async def _reject(send: Send, status: HTTPStatus, message: str) -> None:
    body = json.dumps({"error": message, "status": status.value}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status.value,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
