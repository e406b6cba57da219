"""Raw ASGI helpers for the two layers that answer before FastAPI does (service/middleware.py and the
step hot path, service/routes/fast.py): send a JSON answer or an error, read a body and hand it on."""

from __future__ import annotations

from typing import overload

from starlette.types import Message, Receive, Send

from service.errors import render
from service.metrics import Metrics


async def send_json(send: Send, status: int, body: bytes, extra_headers: dict[str, str] | None = None) -> None:
    """A complete JSON response on a raw ASGI send (the request id header is added by the middleware)."""
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *[(k.lower().encode(), v.encode()) for k, v in (extra_headers or {}).items()],
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def send_error(send: Send, exc: BaseException, metrics: Metrics, where: str) -> None:
    """Any error, rendered and counted by service.errors.render."""
    rendered = render(exc, metrics, where)
    await send_json(send, rendered.status, rendered.body, rendered.headers)


@overload
async def read_body(receive: Receive) -> bytes: ...
@overload
async def read_body(receive: Receive, limit: int) -> bytes | None: ...
async def read_body(receive: Receive, limit: int | None = None) -> bytes | None:
    """The request body, or None as soon as it passes `limit` bytes (None: no limit)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":  # the client went away; the next app hears it from receive
            break
        chunk = message.get("body", b"")
        chunks.append(chunk)
        size += len(chunk)
        if limit is not None and size > limit:
            return None
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def replay(body: bytes, receive: Receive) -> Receive:
    """A receive that hands the already-read body to the next app, then defers to the live channel
    (where the app listens for a disconnect)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed
