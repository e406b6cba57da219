"""The Python client against a real server, including retries that must not apply a step twice."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from cellgate.client import (
    AsyncClient,
    CellgateAPIError,
    Client,
    HistoryExhausted,
    InputTooLong,
    Prediction,
    SessionNotFound,
    StepConflict,
    Unauthorized,
    Unreachable,
    ValidationError,
)
from cellgate.errors import ERRORS
from service import errors as server_errors
from tests.servers import ServerProcess, running_server

PRIMER = "i stay in india ."
REST = "we cooked a song . i speak"


class LossyProxy:
    """A TCP proxy in front of the server that can lose answers: the request reaches the server and is
    applied, then the connection is cut before the answer gets back (what a dropped link or a client
    timeout looks like)."""

    def __init__(self, target: str) -> None:
        parts = urlsplit(target)
        self.target = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.to_lose = 0
        self.lost = 0
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def lose_next_answers(self, count: int = 1) -> None:
        with self.lock:
            self.to_lose = count

    def close(self) -> None:
        self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            threading.Thread(target=self._pipe, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, True), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, answers: bool) -> None:
        with closing(source), closing(sink):
            while True:
                try:
                    data = source.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                if answers:
                    with self.lock:
                        lose = self.to_lose > 0
                        if lose:
                            self.to_lose -= 1
                            self.lost += 1
                    if lose:
                        # Cut both sides so the other pipe stops too; the server already did the work.
                        for sock in (source, sink):
                            sock.shutdown(socket.SHUT_RDWR)
                        return
                try:
                    sink.sendall(data)
                except OSError:
                    return


@pytest.fixture
def proxy(server: ServerProcess) -> Iterator[LossyProxy]:
    proxy = LossyProxy(server.url)
    yield proxy
    proxy.close()


def words(predictions: list[Prediction]) -> list[str]:
    return [p.word for p in predictions]


def replays(server: ServerProcess) -> float:
    """The server's count of retried steps answered from the stored response."""
    for line in httpx.get(f"{server.url}/metrics").text.splitlines():
        if line.startswith("cellgate_idempotent_replays_total "):
            return float(line.split()[1])
    raise AssertionError("no replay counter in /metrics")


def test_session_steps_forks_rewinds_and_generates(server: ServerProcess) -> None:
    with Client(server.url) as client:
        model = client.model()
        assert model.layers >= 1
        session = client.session(PRIMER)
        assert session.current_step == 5
        result = session.step(REST, k=3, explain=True)
        assert result.step == session.current_step == 12
        assert len(result.predictions) == 3
        assert result.explain is not None
        assert result.explain["words"] == REST.split()
        assert len(result.explain["forget_gate"][0]) == model.layers

        # Stepping in a session gives what one stateless run over the whole text gives.
        whole = client.predict(f"{PRIMER} {REST}", k=3)
        assert words(result.predictions) == words(whole.predictions)
        for got, want in zip(result.predictions, whole.predictions, strict=True):
            assert got.prob == pytest.approx(want.prob, abs=1e-5)

        # A fork carries the state; stepping it leaves the original alone.
        fork = session.fork()
        assert fork.id != session.id
        assert fork.current_step == 12
        assert fork.step("hindi .").step == 14
        assert session.info().step == 12

        rewound = session.rewind(5, k=3)
        assert rewound.step == 5
        assert words(rewound.predictions) == words(client.predict(PRIMER, k=3).predictions)

        generated = fork.generate(max_words=4, seed=7)
        assert len(generated.words) == 4
        assert fork.current_step == generated.step == 18
        assert fork.info().step == 18
        fork.delete()
        with pytest.raises(SessionNotFound):
            fork.info()
        fork.delete()  # deleting again is not an error: a lost answer may have hidden the first delete


def test_typed_errors_mirror_the_api_codes(server: ServerProcess) -> None:
    with Client(server.url) as client:
        session = client.session(PRIMER)
        with pytest.raises(ValidationError) as invalid:
            session.step("we", k=10_000)
        assert invalid.value.status == 422
        assert invalid.value.detail["limit"] == 50

        # A second handle on the same session moves it on; the first one's if_step is now stale.
        other = client.attach(session.id)
        other.step("we cooked")
        with pytest.raises(StepConflict) as conflict:
            session.step("i speak")
        assert conflict.value.current_step == 7
        assert session.sync() == 7
        assert session.step("i speak").step == 9

        with pytest.raises(StepConflict):
            session.rewind(100)
        session.step(" ".join(["we cooked a song ."] * 10))  # 50 tokens: more than the 32 of history
        with pytest.raises(HistoryExhausted) as exhausted:
            session.rewind(0)
        assert exhausted.value.oldest_step > 0
        with pytest.raises(InputTooLong):
            client.predict("we " * 3000)
        with pytest.raises(SessionNotFound):
            client.attach("A" * 32)
        assert all(isinstance(e, CellgateAPIError) for e in (invalid.value, conflict.value, exhausted.value))


def _server_error_types() -> list[type[server_errors.CellgateError]]:
    """Every error a /v1 client can receive (ProtocolError's branch reaches only the other protocols' clients)."""
    found, pending = [], [server_errors.CellgateError]
    while pending:
        kind = pending.pop()
        if kind is server_errors.ProtocolError:
            continue
        found.append(kind)
        pending.extend(kind.__subclasses__())
    return found


def test_the_client_knows_every_code_the_server_sends() -> None:
    """The client's table of typed errors and the server's hierarchy name the same codes, each once."""
    server_codes = {kind.code for kind in _server_error_types()}
    assert len(server_codes) > 15
    assert set(ERRORS) == server_codes
    for code, kind in ERRORS.items():
        assert kind.code == code
        assert issubclass(kind, CellgateAPIError)


def test_a_lost_answer_is_retried_and_the_step_applied_once(server: ServerProcess, proxy: LossyProxy) -> None:
    with Client(proxy.url, retries=2) as client:
        session = client.session(PRIMER)
        replays_before = replays(server)
        proxy.lose_next_answers(1)
        result = session.step(REST, k=3)
    assert proxy.lost == 1  # the first answer never arrived: the client had to send the step again
    assert replays(server) == replays_before + 1  # ... and the server answered it from the stored response
    assert result.step == 12  # 5 + 7 tokens, once
    with Client(server.url) as client:
        assert client.attach(session.id).info().step == 12
        fresh = client.predict(f"{PRIMER} {REST}", k=3)
    assert words(result.predictions) == words(fresh.predictions)


def test_a_lost_rewind_answer_is_retried_once(server: ServerProcess, proxy: LossyProxy) -> None:
    with Client(proxy.url, retries=2) as client:
        session = client.session(f"{PRIMER} {REST}")
        proxy.lose_next_answers(1)
        assert session.rewind(5).step == 5
        assert proxy.lost == 1
        # Had the retry been applied as a new rewind after a step, the step would differ; it is exact.
        assert session.step("i speak").step == 7


def test_without_if_step_protection_generate_is_not_resent(server: ServerProcess, proxy: LossyProxy) -> None:
    with Client(proxy.url, retries=3) as client:
        session = client.session(PRIMER)
        proxy.lose_next_answers(1)
        with pytest.raises(Unreachable):
            session.generate(max_words=3, seed=1)
    with Client(server.url) as direct:
        assert direct.attach(session.id).info().step == 8  # generated once, not once per retry


def test_stream_steps_and_resends_after_a_dropped_connection(server: ServerProcess, proxy: LossyProxy) -> None:
    with Client(proxy.url, retries=2) as client:
        session = client.session()
        with session.stream() as stream:
            for word in PRIMER.split():
                stream.step(word, k=3)
            assert session.current_step == 5
            proxy.lose_next_answers(1)  # the answer to the next message is lost with its connection
            result = stream.step("we", k=3)
            assert proxy.lost == 1
            assert result.step == 6  # resent on a new connection with the same if_step: applied once
            assert stream.rewind(5).step == 5
        assert session.info().step == 5


def test_unreachable_server_is_a_typed_error() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with Client(f"http://127.0.0.1:{port}", retries=1) as client, pytest.raises(Unreachable) as error:
        client.predict("i stay")
    assert isinstance(error.value.__cause__, httpx.ConnectError)


def test_api_keys(tiny_bundle: Path) -> None:
    with running_server(tiny_bundle, {"CELLGATE_API_KEYS": "s3cret", "CELLGATE_ACCESS_LOG": "false"}) as server:
        with Client(server.url) as anonymous, pytest.raises(Unauthorized):
            anonymous.session()
        with Client(server.url, api_key="s3cret") as client:
            session = client.session(PRIMER)
            with session.stream() as stream:
                assert stream.step("we").step == 6
            assert session.info().step == 6


def test_async_client(server: ServerProcess) -> None:
    async def run() -> tuple[int, int, list[str]]:
        async with AsyncClient(server.url) as client:
            session = await client.session(PRIMER)
            result = await session.step(REST, k=3)
            fork = await session.fork()
            await session.rewind(5)
            info = await fork.info()
            await fork.delete()
            return result.step, info.step, words(result.predictions)

    step, fork_step, predicted = asyncio.run(run())
    assert (step, fork_step) == (12, 12)
    with Client(server.url) as client:
        assert predicted == words(client.predict(f"{PRIMER} {REST}", k=3).predictions)
