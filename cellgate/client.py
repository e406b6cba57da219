"""A small typed client for the cellgate HTTP and WebSocket API, with exactly-once step retries.

    with Client("http://127.0.0.1:8000") as client:
        session = client.session("i stay in india .")
        result = session.step("we cooked a song . i speak")
        print(result.predictions[0].word)

`Session.step` and `Session.rewind` always send `if_step` (the step the client believes the session
is at) and repeat the same request after a transport error or timeout: if the first attempt was
applied and only its answer was lost, the server replays the stored answer instead of applying the
words twice. Requests that are not exactly-once (creating and forking sessions, generating) are
repeated only when the server certainly did nothing: the connection was never made, or the server
refused it as overloaded. `AsyncClient` / `AsyncSession` are the same API for asyncio.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

import httpx
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
    wait_random,
)
from websockets.exceptions import ConnectionClosed, InvalidHandshake
from websockets.sync.client import ClientConnection, connect

DEFAULT_URL = "http://127.0.0.1:8000"

# ----- errors ------------------------------------------------------------------------------------


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


_ERRORS: dict[str, type[CellgateAPIError]] = {
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
_REFUSED_BEFORE_WORK = frozenset({"overloaded", "rate_limited", "not_ready", "shutting_down"})


def api_error(status: int, body: Any, retry_after: str | None = None) -> CellgateAPIError:
    """The typed exception for an error body (or for a body that is not one)."""
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict) or "code" not in error:
        return HTTPError(status, "http_error", str(body)[:200])
    code = str(error["code"])
    exc = _ERRORS.get(code, CellgateAPIError)(status, code, str(error.get("message", "")), body)
    if retry_after is not None:
        with suppress(ValueError):
            exc.retry_after = float(retry_after)
    return exc


# ----- results -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prediction:
    word: str
    prob: float


def _predictions(items: list[dict[str, Any]]) -> list[Prediction]:
    return [Prediction(str(p["word"]), float(p["prob"])) for p in items]


@dataclass(frozen=True)
class PredictResult:
    predictions: list[Prediction]
    tokens: int
    unknown: list[str]

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> PredictResult:
        return cls(_predictions(body["predictions"]), int(body["tokens"]), list(body.get("unknown", [])))


@dataclass(frozen=True)
class StepResult:
    """A session's step after a request, and the suggestions its state gives."""

    session_id: str
    step: int
    predictions: list[Prediction]
    expires_at: float
    unknown: list[str] = field(default_factory=list)
    explain: dict[str, Any] | None = None  # gates per token and layer; absent from a replayed answer

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> StepResult:
        return cls(
            str(body["session_id"]),
            int(body["step"]),
            _predictions(body["predictions"]),
            float(body["expires_at"]),
            list(body.get("unknown") or []),
            body.get("explain"),
        )


@dataclass(frozen=True)
class SessionInfo:
    session_id: str
    step: int
    created_at: float
    last_used_at: float
    expires_at: float
    model_version: str
    oldest_step: int

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> SessionInfo:
        return cls(**{name: body[name] for name in cls.__dataclass_fields__})


@dataclass(frozen=True)
class ModelInfo:
    version: str
    vocab_size: int
    layers: int
    hidden_size: int
    providers: list[str]
    quantized: str | None
    metrics: dict[str, Any]

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> ModelInfo:
        return cls(**{name: body[name] for name in cls.__dataclass_fields__})


@dataclass(frozen=True)
class Generated:
    session_id: str
    words: list[str]
    text: str
    step: int


# ----- retry policy (shared by the sync and async clients) ---------------------------------------


def _may_repeat(exc: BaseException, repeatable: bool) -> bool:
    """Whether sending the same request again is safe and may help."""
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout):
        return True  # never reached the server
    if isinstance(exc, httpx.TransportError):
        return repeatable  # it may have been applied: only an idempotent or if_step request may repeat
    if isinstance(exc, CellgateAPIError):
        return exc.code in _REFUSED_BEFORE_WORK or (repeatable and exc.code == "store_unavailable")
    return False


def _retry_options(retries: int, repeatable: bool) -> dict[str, Any]:
    backoff = wait_exponential(multiplier=0.1, max=2.0) + wait_random(0, 0.1)  # 0.1 s, 0.2 s, ... plus jitter

    def wait(state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        after = exc.retry_after if isinstance(exc, CellgateAPIError) else None
        return min(after, 5.0) if after is not None else float(backoff(state))

    return {
        "retry": retry_if_exception(lambda exc: _may_repeat(exc, repeatable)),
        "stop": stop_after_attempt(retries + 1),
        "wait": wait,
        "reraise": True,
    }


def _unreachable(url: httpx.URL, exc: httpx.TransportError) -> Unreachable:
    kind = "timed out" if isinstance(exc, httpx.TimeoutException) else "failed"
    return Unreachable(0, "unreachable", f"{url}: request {kind}: {exc!r}")


def _decode(response: httpx.Response) -> Any:
    if response.status_code >= 400:
        try:
            body = response.json()
        except ValueError:
            body = response.text
        raise api_error(response.status_code, body, response.headers.get("retry-after"))
    return response.json() if response.content else None


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


# ----- the synchronous client --------------------------------------------------------------------


class Client:
    """The HTTP API. `retries` is how many times a failed request that may safely repeat is resent."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        api_key: str | None = None,
        timeout: float = 10.0,
        retries: int = 3,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        self.retries = retries
        self._http = httpx.Client(base_url=self.url, headers=_headers(api_key), timeout=timeout, transport=transport)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def request(self, method: str, path: str, body: Any = None, *, repeatable: bool = False) -> Any:
        """The decoded JSON answer; a `repeatable` request (idempotent, or with if_step) is resent on any failure."""
        try:
            for attempt in Retrying(**_retry_options(self.retries, repeatable)):
                with attempt:
                    return _decode(self._http.request(method, path, json=body))
        except httpx.TransportError as exc:
            raise _unreachable(self._http.base_url.join(path), exc) from exc
        raise AssertionError("unreachable: tenacity re-raises the last error")

    def predict(self, text: str, k: int = 5) -> PredictResult:
        """Stateless suggestions for text."""
        return PredictResult.from_json(self.request("POST", "/v1/predict", {"text": text, "k": k}, repeatable=True))

    def model(self) -> ModelInfo:
        return ModelInfo.from_json(self.request("GET", "/v1/model", repeatable=True))

    def session(self, text: str = "", k: int = 5) -> Session:
        """A new session, primed with text; its first suggestions are in `.last`."""
        return Session(self, StepResult.from_json(self.request("POST", "/v1/sessions", {"text": text, "k": k})))

    def attach(self, session_id: str) -> Session:
        """A handle on an existing session (for example one made by another process)."""
        info = SessionInfo.from_json(self.request("GET", f"/v1/sessions/{session_id}", repeatable=True))
        return Session(self, StepResult(info.session_id, info.step, [], info.expires_at))

    def ws_url(self, session_id: str) -> str:
        return f"{self.url.replace('http', 'ws', 1)}/v1/sessions/{session_id}/stream"


class Session:
    """One server-side session: its (h, C) live on the server; this object tracks its step."""

    def __init__(self, client: Client, last: StepResult) -> None:
        self.client = client
        self.id = last.session_id
        self.last = last  # the latest answer: step and predictions

    def __repr__(self) -> str:
        return f"Session({self.id!r}, step={self.current_step})"

    @property
    def current_step(self) -> int:
        return self.last.step

    @property
    def predictions(self) -> list[Prediction]:
        return self.last.predictions

    def _path(self, tail: str = "") -> str:
        return f"/v1/sessions/{self.id}{tail}"

    def _advance(self, tail: str, body: dict[str, Any]) -> StepResult:
        self.last = StepResult.from_json(self.client.request("POST", self._path(tail), body, repeatable=True))
        return self.last

    def step(self, text: str, k: int = 5, explain: bool = False) -> StepResult:
        """Feed words, exactly once: raises StepConflict if the session moved on without this client."""
        return self._advance("/steps", {"text": text, "k": k, "if_step": self.current_step, "explain": explain})

    def rewind(self, to_step: int, k: int = 5) -> StepResult:
        """Restore the state the session had after `to_step` tokens (undo words)."""
        return self._advance("/rewind", {"to_step": to_step, "k": k, "if_step": self.current_step})

    def fork(self) -> Session:
        """A new session holding a copy of this one's state."""
        return Session(self.client, StepResult.from_json(self.client.request("POST", self._path("/fork"))))

    def generate(
        self,
        max_words: int = 20,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> Generated:
        """Sample words; the session advances through them (not exactly-once: never resent once sent)."""
        body = {"max_words": max_words, "temperature": temperature, "top_k": top_k, "top_p": top_p, "seed": seed}
        result = self.client.request("POST", self._path("/generate"), body)
        self.last = StepResult(self.id, int(result["step"]), [], self.last.expires_at)
        return Generated(result["session_id"], list(result["words"]), result["text"], int(result["step"]))

    def info(self) -> SessionInfo:
        return SessionInfo.from_json(self.client.request("GET", self._path(), repeatable=True))

    def sync(self) -> int:
        """Catch up with the server's step (after a StepConflict, say); returns it."""
        info = self.info()
        self.last = StepResult(self.id, info.step, [], info.expires_at)
        return info.step

    def delete(self) -> None:
        """End the session. Deleting twice is not an error: a lost answer may have hidden the first."""
        with suppress(SessionNotFound):
            self.client.request("DELETE", self._path(), repeatable=True)

    @contextmanager
    def stream(self, open_timeout: float | None = None) -> Iterator[Stream]:
        """The session's WebSocket: one answer per message, in order."""
        stream = Stream(self, open_timeout if open_timeout is not None else self.client.timeout)
        try:
            yield stream
        finally:
            stream.close()


class Stream:
    """Steps over the session's WebSocket, exactly once: after a dropped connection it resends with the same if_step."""

    def __init__(self, session: Session, timeout: float) -> None:
        self.session = session
        self.timeout = timeout
        self._ws: ClientConnection | None = None
        self._open = ExitStack()  # websockets wants its connections used as context managers

    def _connect(self) -> ClientConnection:
        if self._ws is None:
            client = self.session.client
            url = client.ws_url(self.session.id)
            try:
                connection = connect(url, additional_headers=_headers(client.api_key), open_timeout=self.timeout)
            except (OSError, InvalidHandshake, TimeoutError) as exc:
                raise Unreachable(0, "unreachable", f"{url}: {exc!r}") from exc
            self._ws = self._open.enter_context(connection)
        return self._ws

    def close(self) -> None:
        self._ws = None
        self._open.close()

    def _exchange(self, message: dict[str, Any]) -> StepResult:
        last: Exception | None = None
        for _ in range(self.session.client.retries + 1):
            ws = self._connect()
            try:
                ws.send(json.dumps(message))
                answer = json.loads(ws.recv(timeout=self.timeout))
            except (ConnectionClosed, TimeoutError) as exc:
                self.close()
                code = exc.rcvd.code if isinstance(exc, ConnectionClosed) and exc.rcvd else None
                if code == 4404:
                    raise SessionNotFound(404, "session_not_found", f"session {self.session.id!r} is gone") from exc
                last = exc  # the same message (same if_step) on a new connection is applied at most once
                continue
            if "error" in answer:
                raise api_error(0, answer)
            self.session.last = StepResult.from_json(answer)
            return self.session.last
        raise Unreachable(0, "unreachable", f"the stream kept failing: {last!r}") from last

    def step(self, text: str, k: int = 5, explain: bool = False) -> StepResult:
        session = self.session
        return self._exchange({"text": text, "k": k, "if_step": session.current_step, "explain": explain})

    def rewind(self, to_step: int, k: int = 5) -> StepResult:
        return self._exchange({"rewind_to": to_step, "k": k, "if_step": self.session.current_step})


# ----- the asyncio client ------------------------------------------------------------------------


class AsyncClient:
    """`Client` for asyncio (no WebSocket stream)."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        api_key: str | None = None,
        timeout: float = 10.0,
        retries: int = 3,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.retries = retries
        self._http = httpx.AsyncClient(
            base_url=self.url, headers=_headers(api_key), timeout=timeout, transport=transport
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def request(self, method: str, path: str, body: Any = None, *, repeatable: bool = False) -> Any:
        try:
            async for attempt in AsyncRetrying(**_retry_options(self.retries, repeatable)):
                with attempt:
                    return _decode(await self._http.request(method, path, json=body))
        except httpx.TransportError as exc:
            raise _unreachable(self._http.base_url.join(path), exc) from exc
        raise AssertionError("unreachable: tenacity re-raises the last error")

    async def predict(self, text: str, k: int = 5) -> PredictResult:
        body = await self.request("POST", "/v1/predict", {"text": text, "k": k}, repeatable=True)
        return PredictResult.from_json(body)

    async def model(self) -> ModelInfo:
        return ModelInfo.from_json(await self.request("GET", "/v1/model", repeatable=True))

    async def session(self, text: str = "", k: int = 5) -> AsyncSession:
        body = await self.request("POST", "/v1/sessions", {"text": text, "k": k})
        return AsyncSession(self, StepResult.from_json(body))


class AsyncSession:
    """`Session` for asyncio: the same exactly-once steps."""

    def __init__(self, client: AsyncClient, last: StepResult) -> None:
        self.client = client
        self.id = last.session_id
        self.last = last

    @property
    def current_step(self) -> int:
        return self.last.step

    async def _advance(self, tail: str, body: dict[str, Any]) -> StepResult:
        answer = await self.client.request("POST", f"/v1/sessions/{self.id}{tail}", body, repeatable=True)
        self.last = StepResult.from_json(answer)
        return self.last

    async def step(self, text: str, k: int = 5, explain: bool = False) -> StepResult:
        return await self._advance("/steps", {"text": text, "k": k, "if_step": self.current_step, "explain": explain})

    async def rewind(self, to_step: int, k: int = 5) -> StepResult:
        return await self._advance("/rewind", {"to_step": to_step, "k": k, "if_step": self.current_step})

    async def fork(self) -> AsyncSession:
        body = await self.client.request("POST", f"/v1/sessions/{self.id}/fork")
        return AsyncSession(self.client, StepResult.from_json(body))

    async def info(self) -> SessionInfo:
        return SessionInfo.from_json(await self.client.request("GET", f"/v1/sessions/{self.id}", repeatable=True))

    async def delete(self) -> None:
        with suppress(SessionNotFound):
            await self.client.request("DELETE", f"/v1/sessions/{self.id}", repeatable=True)
