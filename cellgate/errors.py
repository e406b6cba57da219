"""The client's typed errors: one class per machine code the server sends (service/errors.py's hierarchy),
and `api_error`, which picks the class for an error answer. Import them from cellgate.client."""

from __future__ import annotations

from contextlib import suppress
from typing import Any


class CellgateAPIError(Exception):
    """An error answer from the server ({"error": {"code", "message"}}), or no answer at all."""

    code: str = "error"  # each subclass names the server's code it stands for

    def __init__(self, status: int, code: str, message: str, body: dict[str, Any] | None = None) -> None:
        super().__init__(f"{status} {code}: {message}" if status else f"{code}: {message}")
        self.status = status
        self.code = code  # the server's own code, also for codes this client has no class for
        self.message = message
        self.body = body or {}
        self.retry_after: float | None = None  # seconds, from Retry-After

    @property
    def detail(self) -> dict[str, Any]:
        """The error object's extra fields (current_step, oldest_step, limit, ...)."""
        error = self.body.get("error")
        return error if isinstance(error, dict) else {}


class Unreachable(CellgateAPIError):
    """No answer: the connection failed or timed out (after the retries)."""

    code = "unreachable"


class BadRequest(CellgateAPIError):
    code = "bad_request"


class Unauthorized(CellgateAPIError):
    code = "unauthorized"


class NotFound(CellgateAPIError):
    """A path the server does not have (a wrong URL), not a missing session."""

    code = "not_found"


class MethodNotAllowed(CellgateAPIError):
    code = "method_not_allowed"


class SessionNotFound(CellgateAPIError):
    code = "session_not_found"


class StepConflict(CellgateAPIError):
    """The session is not at the step the request expected; `current_step` says where it is."""

    code = "step_conflict"

    @property
    def current_step(self) -> int:
        return int(self.detail["current_step"])


class HistoryExhausted(CellgateAPIError):
    """A rewind further back than the server keeps history."""

    code = "history_exhausted"

    @property
    def oldest_step(self) -> int:
        return int(self.detail["oldest_step"])


class ModelMismatch(CellgateAPIError):
    code = "model_mismatch"


class PayloadTooLarge(CellgateAPIError):
    code = "payload_too_large"


class InputTooLong(CellgateAPIError):
    code = "input_too_long"


class ValidationError(CellgateAPIError):
    code = "validation_error"


class RateLimited(CellgateAPIError):
    code = "rate_limited"


class Overloaded(CellgateAPIError):
    code = "overloaded"


class StoreUnavailable(CellgateAPIError):
    code = "store_unavailable"


class NotReady(CellgateAPIError):
    code = "not_ready"


class ShuttingDown(CellgateAPIError):
    code = "shutting_down"


class InternalError(CellgateAPIError):
    code = "internal_error"


class HTTPError(CellgateAPIError):
    """An HTTP error without a code of its own, or an answer that is not a cellgate error body."""

    code = "http_error"


# code -> class: every code the server's hierarchy has (tests/test_client.py holds the two equal).
ERRORS: dict[str, type[CellgateAPIError]] = {
    cls.code: cls
    for cls in (
        BadRequest,
        Unauthorized,
        NotFound,
        MethodNotAllowed,
        SessionNotFound,
        StepConflict,
        HistoryExhausted,
        ModelMismatch,
        PayloadTooLarge,
        InputTooLong,
        ValidationError,
        RateLimited,
        Overloaded,
        StoreUnavailable,
        NotReady,
        ShuttingDown,
        InternalError,
        HTTPError,
    )
}
# The server refused these before doing any work, so even a request that is not exactly-once may repeat.
REFUSED_BEFORE_WORK = frozenset({"overloaded", "rate_limited", "not_ready", "shutting_down"})


def api_error(status: int, body: Any, retry_after: str | None = None) -> CellgateAPIError:
    """The typed exception for an error body (or for a body that is not one)."""
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict) or "code" not in error:
        return HTTPError(status, "http_error", str(body)[:200])
    code = str(error["code"])
    exc = ERRORS.get(code, CellgateAPIError)(status, code, str(error.get("message", "")), body)
    if retry_after is not None:
        with suppress(ValueError):
            exc.retry_after = float(retry_after)
    return exc
