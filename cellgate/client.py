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
refused it as overloaded. `AsyncClient` / `AsyncSession` are the same API for asyncio: both send the
requests `_Handle` and the `_..._call` functions build, so the twins differ only in awaiting.

The typed errors (cellgate/errors.py) and answers (cellgate/results.py) are imported from here.

About 480 lines, over the ~400 guide on purpose: the retry policy, the request builder and both transports'
twins are one set of exactly-once rules, read together; splitting them would put one rule in two files.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
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

from cellgate.errors import (
    REFUSED_BEFORE_WORK,
    BadRequest,
    CellgateAPIError,
    HistoryExhausted,
    HTTPError,
    InputTooLong,
    InternalError,
    MethodNotAllowed,
    ModelMismatch,
    NotFound,
    NotReady,
    Overloaded,
    PayloadTooLarge,
    RateLimited,
    SessionNotFound,
    ShuttingDown,
    StepConflict,
    StoreUnavailable,
    Unauthorized,
    Unreachable,
    ValidationError,
    api_error,
)
from cellgate.results import Generated, ModelInfo, Prediction, PredictResult, SessionInfo, StepResult

__all__ = [
    "DEFAULT_URL",
    "AsyncClient",
    "AsyncSession",
    "BadRequest",
    "Call",
    "CellgateAPIError",
    "Client",
    "Generated",
    "HTTPError",
    "HistoryExhausted",
    "InputTooLong",
    "InternalError",
    "MethodNotAllowed",
    "ModelInfo",
    "ModelMismatch",
    "NotFound",
    "NotReady",
    "Overloaded",
    "PayloadTooLarge",
    "PredictResult",
    "Prediction",
    "RateLimited",
    "Session",
    "SessionInfo",
    "SessionNotFound",
    "ShuttingDown",
    "StepConflict",
    "StepResult",
    "StoreUnavailable",
    "Stream",
    "Unauthorized",
    "Unreachable",
    "ValidationError",
    "api_error",
]

DEFAULT_URL = "http://127.0.0.1:8000"


# ----- retry policy (shared by the sync and async clients) ---------------------------------------


def _may_repeat(exc: BaseException, repeatable: bool) -> bool:
    """Whether sending the same request again is safe and may help."""
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout):
        return True  # never reached the server
    if isinstance(exc, httpx.TransportError):
        return repeatable  # it may have been applied: only an idempotent or if_step request may repeat
    if isinstance(exc, CellgateAPIError):
        return exc.code in REFUSED_BEFORE_WORK or (repeatable and exc.code == "store_unavailable")
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


# ----- the requests (one builder, sent by the sync and the async client alike) --------------------


@dataclass(frozen=True)
class Call:
    """One API request. `repeatable`: sending it again cannot apply it twice (idempotent, or with if_step)."""

    method: str
    path: str
    body: Any = None
    repeatable: bool = False


def _predict_call(text: str, k: int) -> Call:
    return Call("POST", "/v1/predict", {"text": text, "k": k}, repeatable=True)


_MODEL_CALL = Call("GET", "/v1/model", repeatable=True)


def _create_call(text: str, k: int) -> Call:
    return Call("POST", "/v1/sessions", {"text": text, "k": k})  # not exactly-once: resent only if never applied


def _info_call(session_id: str) -> Call:
    return Call("GET", f"/v1/sessions/{session_id}", repeatable=True)


class _Handle:
    """What Session and AsyncSession share: the id, the latest answer, each operation's request, and what an
    answer changes here. The twins only send."""

    def __init__(self, last: StepResult) -> None:
        self.id = last.session_id
        self.last = last  # the latest answer: step and predictions

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.id!r}, step={self.current_step})"

    @property
    def current_step(self) -> int:
        return self.last.step

    @property
    def predictions(self) -> list[Prediction]:
        return self.last.predictions

    def _path(self, tail: str = "") -> str:
        return f"/v1/sessions/{self.id}{tail}"

    def _step_message(self, text: str, k: int, explain: bool) -> dict[str, Any]:
        # if_step is the step this handle believes the session is at: a resend is applied at most once.
        return {"text": text, "k": k, "if_step": self.current_step, "explain": explain}

    def _step_call(self, text: str, k: int, explain: bool) -> Call:
        return Call("POST", self._path("/steps"), self._step_message(text, k, explain), repeatable=True)

    def _rewind_call(self, to_step: int, k: int) -> Call:
        body = {"to_step": to_step, "k": k, "if_step": self.current_step}
        return Call("POST", self._path("/rewind"), body, repeatable=True)

    def _fork_call(self) -> Call:
        return Call("POST", self._path("/fork"))

    def _generate_call(self, max_words: int, temperature: float, top_k: int, top_p: float, seed: int | None) -> Call:
        body = {"max_words": max_words, "temperature": temperature, "top_k": top_k, "top_p": top_p, "seed": seed}
        return Call("POST", self._path("/generate"), body)  # not exactly-once: never resent once sent

    def _info_call(self) -> Call:
        return _info_call(self.id)

    def _delete_call(self) -> Call:
        return Call("DELETE", self._path(), repeatable=True)

    def _advanced(self, body: dict[str, Any]) -> StepResult:
        self.last = StepResult.from_json(body)
        return self.last

    def _generated(self, body: dict[str, Any]) -> Generated:
        self.last = StepResult(self.id, int(body["step"]), [], self.last.expires_at)
        return Generated(body["session_id"], list(body["words"]), body["text"], int(body["step"]))

    def _synced(self, info: SessionInfo) -> int:
        self.last = StepResult(self.id, info.step, [], info.expires_at)
        return info.step


class _Endpoint:
    """Where and how both clients connect."""

    def __init__(self, url: str, api_key: str | None, timeout: float, retries: int) -> None:
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        self.retries = retries
        self.headers = _headers(api_key)

    def ws_url(self, session_id: str) -> str:
        return f"{self.url.replace('http', 'ws', 1)}/v1/sessions/{session_id}/stream"


# ----- the synchronous client --------------------------------------------------------------------


class Client(_Endpoint):
    """The HTTP API. `retries` is how many times a failed request that may safely repeat is resent."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        api_key: str | None = None,
        timeout: float = 10.0,
        retries: int = 3,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        super().__init__(url, api_key, timeout, retries)
        self._http = httpx.Client(base_url=self.url, headers=self.headers, timeout=timeout, transport=transport)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def send(self, call: Call) -> Any:
        """The decoded JSON answer; a repeatable call is resent on any failure, another only if never applied."""
        try:
            for attempt in Retrying(**_retry_options(self.retries, call.repeatable)):
                with attempt:
                    return _decode(self._http.request(call.method, call.path, json=call.body))
        except httpx.TransportError as exc:
            raise _unreachable(self._http.base_url.join(call.path), exc) from exc
        raise AssertionError("unreachable: tenacity re-raises the last error")

    def predict(self, text: str, k: int = 5) -> PredictResult:
        """Stateless suggestions for text."""
        return PredictResult.from_json(self.send(_predict_call(text, k)))

    def model(self) -> ModelInfo:
        return ModelInfo.from_json(self.send(_MODEL_CALL))

    def session(self, text: str = "", k: int = 5) -> Session:
        """A new session, primed with text; its first suggestions are in `.last`."""
        return Session(self, StepResult.from_json(self.send(_create_call(text, k))))

    def attach(self, session_id: str) -> Session:
        """A handle on an existing session (for example one made by another process)."""
        info = SessionInfo.from_json(self.send(_info_call(session_id)))
        return Session(self, StepResult(info.session_id, info.step, [], info.expires_at))


class Session(_Handle):
    """One server-side session: its (h, C) live on the server; this object tracks its step."""

    def __init__(self, client: Client, last: StepResult) -> None:
        super().__init__(last)
        self.client = client

    def step(self, text: str, k: int = 5, explain: bool = False) -> StepResult:
        """Feed words, exactly once: raises StepConflict if the session moved on without this client."""
        return self._advanced(self.client.send(self._step_call(text, k, explain)))

    def rewind(self, to_step: int, k: int = 5) -> StepResult:
        """Restore the state the session had after `to_step` tokens (undo words)."""
        return self._advanced(self.client.send(self._rewind_call(to_step, k)))

    def fork(self) -> Session:
        """A new session holding a copy of this one's state."""
        return Session(self.client, StepResult.from_json(self.client.send(self._fork_call())))

    def generate(
        self,
        max_words: int = 20,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> Generated:
        """Sample words; the session advances through them (not exactly-once: never resent once sent)."""
        return self._generated(self.client.send(self._generate_call(max_words, temperature, top_k, top_p, seed)))

    def info(self) -> SessionInfo:
        return SessionInfo.from_json(self.client.send(self._info_call()))

    def sync(self) -> int:
        """Catch up with the server's step (after a StepConflict, say); returns it."""
        return self._synced(self.info())

    def delete(self) -> None:
        """End the session. Deleting twice is not an error: a lost answer may have hidden the first."""
        with suppress(SessionNotFound):
            self.client.send(self._delete_call())

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
                connection = connect(url, additional_headers=client.headers, open_timeout=self.timeout)
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
            return self.session._advanced(answer)
        raise Unreachable(0, "unreachable", f"the stream kept failing: {last!r}") from last

    def step(self, text: str, k: int = 5, explain: bool = False) -> StepResult:
        return self._exchange(self.session._step_message(text, k, explain))

    def rewind(self, to_step: int, k: int = 5) -> StepResult:
        return self._exchange({"rewind_to": to_step, "k": k, "if_step": self.session.current_step})


# ----- the asyncio client: the same requests, awaited --------------------------------------------


class AsyncClient(_Endpoint):
    """`Client` for asyncio (no WebSocket stream)."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        api_key: str | None = None,
        timeout: float = 10.0,
        retries: int = 3,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(url, api_key, timeout, retries)
        self._http = httpx.AsyncClient(base_url=self.url, headers=self.headers, timeout=timeout, transport=transport)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def send(self, call: Call) -> Any:
        """`Client.send`, awaited."""
        try:
            async for attempt in AsyncRetrying(**_retry_options(self.retries, call.repeatable)):
                with attempt:
                    return _decode(await self._http.request(call.method, call.path, json=call.body))
        except httpx.TransportError as exc:
            raise _unreachable(self._http.base_url.join(call.path), exc) from exc
        raise AssertionError("unreachable: tenacity re-raises the last error")

    async def predict(self, text: str, k: int = 5) -> PredictResult:
        return PredictResult.from_json(await self.send(_predict_call(text, k)))

    async def model(self) -> ModelInfo:
        return ModelInfo.from_json(await self.send(_MODEL_CALL))

    async def session(self, text: str = "", k: int = 5) -> AsyncSession:
        return AsyncSession(self, StepResult.from_json(await self.send(_create_call(text, k))))


class AsyncSession(_Handle):
    """`Session` for asyncio: the same exactly-once steps."""

    def __init__(self, client: AsyncClient, last: StepResult) -> None:
        super().__init__(last)
        self.client = client

    async def step(self, text: str, k: int = 5, explain: bool = False) -> StepResult:
        return self._advanced(await self.client.send(self._step_call(text, k, explain)))

    async def rewind(self, to_step: int, k: int = 5) -> StepResult:
        return self._advanced(await self.client.send(self._rewind_call(to_step, k)))

    async def fork(self) -> AsyncSession:
        return AsyncSession(self.client, StepResult.from_json(await self.client.send(self._fork_call())))

    async def info(self) -> SessionInfo:
        return SessionInfo.from_json(await self.client.send(self._info_call()))

    async def delete(self) -> None:
        with suppress(SessionNotFound):
            await self.client.send(self._delete_call())
