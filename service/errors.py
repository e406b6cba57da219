"""Domain errors with stable machine codes. Routes raise them; app.py renders them once.

Every error body is {"error": {"code": str, "message": str, ...extra}}.
"""

from __future__ import annotations

from typing import Any


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


class BadRequest(CellgateError):
    code, status = "bad_request", 400


class Unauthorized(CellgateError):
    code, status = "unauthorized", 401


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
