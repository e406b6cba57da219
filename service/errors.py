"""Domain errors with stable machine codes, and the one function that turns any error into an answer.

Routes raise them; `render` makes the answer and counts it, wherever it is sent from (the app's
exception handlers, the raw step path, the middleware, the WebSocket and SSE streams, /readyz).
Every error body is {"error": {"code": str, "message": str, ...extra}}.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from service.metrics import Metrics

log = logging.getLogger("cellgate")


class CellgateError(Exception):
    """Base of every error a client may see."""

    code = "internal_error"
    status = 500

    def __init__(self, message: str, *, headers: dict[str, str] | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}
        self.extra = extra

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, **self.extra}}


class InternalError(CellgateError):
    code, status = "internal_error", 500

    def __init__(self) -> None:
        super().__init__("internal error; the request id is in the X-Request-ID header")


class BadRequest(CellgateError):
    code, status = "bad_request", 400


class Unauthorized(CellgateError):
    code, status = "unauthorized", 401


class NotFound(CellgateError):
    """A path the server does not have (not a missing session: that is SessionNotFound)."""

    code, status = "not_found", 404


class MethodNotAllowed(CellgateError):
    code, status = "method_not_allowed", 405


class SessionNotFound(CellgateError):
    code, status = "session_not_found", 404

    def __init__(self, session_id: str) -> None:
        super().__init__(f"session {session_id!r} does not exist or has expired")


class StepConflict(CellgateError):
    code, status = "step_conflict", 409

    def __init__(self, current_step: int, message: str | None = None) -> None:
        super().__init__(message or f"the session is at step {current_step}", current_step=current_step)


class HistoryExhausted(CellgateError):
    code, status = "history_exhausted", 409

    def __init__(self, oldest_step: int, current_step: int) -> None:
        super().__init__(
            f"the oldest step this session can rewind to is {oldest_step}",
            oldest_step=oldest_step,
            current_step=current_step,
        )


class ModelMismatch(CellgateError):
    code, status = "model_mismatch", 409


class PayloadTooLarge(CellgateError):
    code, status = "payload_too_large", 413


class InputTooLong(CellgateError):
    code, status = "input_too_long", 413


class ValidationFailed(CellgateError):
    code, status = "validation_error", 422


class RateLimited(CellgateError):
    code, status = "rate_limited", 429


class Overloaded(CellgateError):
    code, status = "overloaded", 503

    def __init__(self, message: str = "the server is at capacity; retry shortly", retry_after: int = 1) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after)})


class StoreUnavailable(CellgateError):
    code, status = "store_unavailable", 503

    def __init__(self, message: str = "the session store is unavailable", retry_after: int = 1) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after)})


class NotReady(CellgateError):
    code, status = "not_ready", 503


class ShuttingDown(CellgateError):
    code, status = "shutting_down", 503

    def __init__(self) -> None:
        super().__init__("the server is shutting down", headers={"Retry-After": "1", "Connection": "close"})


class HTTPStatusError(CellgateError):
    """An HTTP error the framework raised that has no code of its own here (a Range the demo page's
    static files cannot satisfy, say): its status is kept."""

    code = "http_error"

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message, headers=headers)
        self.status = status


_BY_STATUS: dict[int, type[CellgateError]] = {400: BadRequest, 404: NotFound, 405: MethodNotAllowed}


def from_http_status(status: int, message: str, headers: dict[str, str] | None = None) -> CellgateError:
    """The domain error for an HTTP error raised by the framework (no route, wrong method, unreadable body)."""
    kind = _BY_STATUS.get(status)
    return kind(message, headers=headers) if kind is not None else HTTPStatusError(status, message, headers)


@dataclass(frozen=True, slots=True)
class Rendered:
    """An error as it goes on the wire."""

    status: int
    headers: dict[str, str]
    body: bytes  # {"error": {"code", "message", ...}} as JSON


def render(exc: BaseException, metrics: Metrics, where: str) -> Rendered:
    """The answer for any error, counted in cellgate_errors_total by code. A non-domain exception is logged
    with its traceback (`where` names the path) and answered as internal_error, without its text."""
    if not isinstance(exc, CellgateError):
        log.error("unhandled error on %s", where, exc_info=exc)
        exc = InternalError()
    metrics.errors.labels(exc.code).inc()
    return Rendered(exc.status, exc.headers, json.dumps(exc.body()).encode())
