"""Domain errors with stable machine codes, and the one function that turns any error into an answer.

Routes raise them; `render` makes the answer and counts it, wherever it is sent from (the app's
exception handlers, the raw step path, the middleware, the WebSocket and SSE streams, /readyz).
Every error body is {"error": {"code": str, "message": str, ...extra}}, except under the paths of the other
protocols the service speaks, whose clients parse their own shape (PROTOCOL_SHAPES, chosen by path prefix):
Open Inference v2's {"error": str} under /v2, OpenAI's {"error": {"message", "type", "param", "code"}} under
/v1/completions and /v1/models.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
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

    def __init__(self, session_id: str, reason: str | None = None, message: str | None = None) -> None:
        # reason: None (unknown, deleted, or gone too long ago to tell), "expired" or "evicted_capacity".
        super().__init__(message or f"session {session_id!r} does not exist or has expired")
        if reason:
            self.extra["reason"] = reason
        self.session_id = session_id
        self.reason = reason


class ProtocolError(CellgateError):
    """An error only the other protocols' routes raise (/v2, OpenAI-style): it reaches their clients in their
    shapes, never a /v1 client in cellgate's (so cellgate.client has no class for it)."""


class ModelNotFound(ProtocolError):
    code, status = "model_not_found", 404


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


class Unsupported(ProtocolError):
    """A protocol feature this server does not implement (shared-memory tensors, ...)."""

    code, status = "unsupported", 400


class SequenceNotStarted(ProtocolError):
    """Open Inference v2: a request for a sequence id that has no state, without sequence_start."""

    code, status = "sequence_not_started", 400


class SequenceExpired(ProtocolError):
    """Open Inference v2: a request for a sequence whose state expired after the idle TTL."""

    code, status = "sequence_expired", 400  # Triton's status for a sequence without state: client handling holds


class SequenceEvicted(ProtocolError):
    """Open Inference v2: a request for a sequence whose state a full memory store evicted."""

    code, status = "sequence_evicted", 400


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
    """The answer for any error, counted in cellgate_errors_total by code, in the shape of the protocol that
    `where` (the request path) belongs to. A non-domain exception is logged with its traceback and answered as
    internal_error, without its text."""
    if not isinstance(exc, CellgateError):
        log.error("unhandled error on %s", where, exc_info=exc)
        exc = InternalError()
    metrics.errors.labels(exc.code).inc()
    return shape_for(where)(exc)


ErrorShape = Callable[[CellgateError], Rendered]


def cellgate_shape(error: CellgateError) -> Rendered:
    return Rendered(error.status, error.headers, json.dumps(error.body()).encode())


def invalid_status(error: CellgateError) -> int:
    """The other protocols' status for an error: 400 for what they call an invalid request (cellgate's 422, and a
    text past the token limit: Triton's INVALID_ARG, OpenAI's context_length_exceeded), others unchanged."""
    return 400 if error.code in ("validation_error", "input_too_long") else error.status


def v2_shape(error: CellgateError) -> Rendered:
    """Open Inference v2 / Triton: {"error": message}."""
    return Rendered(invalid_status(error), error.headers, json.dumps({"error": error.message}).encode())


def openai_error(error: CellgateError) -> dict[str, Any]:
    """OpenAI's error object: the stable code as `code`, the field at fault (if known) as `param`."""
    status = invalid_status(error)
    kind = {401: "authentication_error", 429: "rate_limit_error"}.get(status)
    kind = kind or ("server_error" if status >= 500 else "invalid_request_error")
    return {"message": error.message, "type": kind, "param": error.extra.get("field"), "code": error.code}


def openai_shape(error: CellgateError) -> Rendered:
    """OpenAI: {"error": {...}}, and `x-should-retry: false` where a retry would fail the same way (the client
    otherwise retries 409s: a step conflict from a generation applied nothing, so that one it may; 408, 429
    and 5xx keep the client's own rules)."""
    status = invalid_status(error)
    headers = dict(error.headers)
    if status < 500 and status not in (408, 429) and error.code != "step_conflict":
        headers["x-should-retry"] = "false"
    return Rendered(status, headers, json.dumps({"error": openai_error(error)}).encode())


# Longest prefix first; a prefix matches itself and what lies under it ("/v2" and "/v2/...", never "/v2x").
PROTOCOL_SHAPES: tuple[tuple[str, ErrorShape], ...] = (
    ("/v1/completions", openai_shape),
    ("/v1/models", openai_shape),
    ("/v2", v2_shape),
)


def shape_for(path: str) -> ErrorShape:
    """The error shape of the protocol a request path belongs to (cellgate's own if none)."""
    for prefix, shape in PROTOCOL_SHAPES:
        if path == prefix or path.startswith(prefix + "/"):
            return shape
    return cellgate_shape
