"""One ASGI middleware for what every HTTP request needs: request id, body limit, metrics, access log,
and refusing new work while draining."""

from __future__ import annotations

import logging
import random
import re
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.asgi import read_body, replay, send_error
from service.errors import PayloadTooLarge, ShuttingDown
from service.metrics import Metrics

access_log = logging.getLogger("cellgate.access")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._\-]{1,128}$")


class ServiceMiddleware:
    def __init__(self, app: ASGIApp, metrics: Metrics, max_body_bytes: int, draining: Any) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.draining = draining  # callable -> bool
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        # Request ids identify, they do not protect: a fast PRNG is enough (secrets costs a syscall).
        request_id = given if given and _REQUEST_ID.match(given) else f"{random.getrandbits(64):016x}"
        scope.setdefault("state", {})["request_id"] = request_id
        status = 500
        method = scope["method"]

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        self.metrics.in_flight.inc()
        try:
            length = headers.get(b"content-length")
            path = scope["path"]
            if self.draining() and path not in ("/healthz", "/metrics"):
                await send_error(send_wrapper, ShuttingDown(), self.metrics, path)
            elif length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
                # Refused from the header alone: the body is never read.
                await send_error(send_wrapper, _too_large(self.max_body_bytes), self.metrics, path)
            elif length is not None:
                # The server never hands the app more than Content-Length bytes: no need to count.
                await self.app(scope, receive, send_wrapper)
            else:
                # No Content-Length (chunked): read at most the limit before the app runs. Raising from
                # receive() instead does not work: FastAPI turns any error while reading a body into a 400.
                body = await read_body(receive, self.max_body_bytes)
                if body is None:
                    await send_error(send_wrapper, _too_large(self.max_body_bytes), self.metrics, path)
                else:
                    await self.app(scope, replay(body, receive), send_wrapper)
        finally:
            self.metrics.in_flight.dec()
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            elapsed = time.perf_counter() - started
            key = (template, method, status)
            children = self._children.get(key)
            if children is None:  # labels() costs a lock and a dict lookup; routes x statuses is small
                children = (
                    self.metrics.requests.labels(template, method, str(status)),
                    self.metrics.request_duration.labels(template, method),
                )
                self._children[key] = children
            children[0].inc()
            children[1].observe(elapsed)
            if access_log.isEnabledFor(logging.INFO):
                access_log.info(
                    "request",
                    extra={
                        "request_id": request_id,
                        "method": method,
                        "route": template,
                        "path": scope["path"],
                        "status": status,
                        "duration_ms": round(elapsed * 1000, 3),
                        "client": (scope.get("client") or ("", 0))[0],
                    },
                )


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"the request body exceeds {limit} bytes", limit=limit)
