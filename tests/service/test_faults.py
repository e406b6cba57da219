"""Faults the service must survive, with real processes: two replicas on one redis-server, kill -9, Redis
restarted and paused, SIGTERM with work in flight, and overload. Every scenario is compared with a
single-process reference (the in-process service core on the same bundle) bit for bit.

`make soak` runs the long variants at the bottom (CELLGATE_SOAK=1); they are skipped otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as ws_connect_sync

from bench.procs import rss_bytes
from service.sessions import SessionManager
from service.store.redis import RedisStore
from tests.redis_server import RedisServer, replica_env
from tests.servers import ServerProcess, running_server, start_server
from tests.service.harness import service_core

log = logging.getLogger(__name__)
K = 10  # suggestions compared per step: more probabilities, a stricter bit-for-bit check
SOAK = os.environ.get("CELLGATE_SOAK") == "1"
SOAK_SECONDS = float(os.environ.get("CELLGATE_SOAK_SECONDS", "300"))  # the soak's length


def vocabulary(bundle: Path) -> list[str]:
    words: list[str] = json.loads((bundle / "vocab.json").read_text())["words"]
    return [w for w in words if not w.startswith("<")]


def phrases(bundle: Path, count: int, length: int = 3) -> list[str]:
    """Deterministic texts of known words (the same on every run)."""
    words = vocabulary(bundle)
    return [" ".join(words[(7 * i + 3 * j) % len(words)] for j in range(length)) for i in range(count)]


@pytest.fixture
def healthy_redis(redis_server: RedisServer) -> Iterator[RedisServer]:
    """The module's Redis, restored (started, resumed) after a test that broke it."""
    yield redis_server
    if redis_server.process is None or redis_server.process.poll() is not None:
        redis_server.start()
    else:
        redis_server.resume()


@asynccontextmanager
async def reference(bundle: Path) -> AsyncIterator[SessionManager]:
    """The single-process reference: the same Runner/Scheduler/SessionManager in this process."""
    async with service_core(bundle) as manager:
        yield manager


def same(got: dict[str, Any], want: dict[str, Any]) -> None:
    """Bit for bit: the step, every word and every probability (JSON floats round-trip exactly)."""
    assert got["step"] == want["step"]
    assert got["predictions"] == want["predictions"]


async def same_state(redis: RedisServer, session_id: str, ref: SessionManager, ref_id: str) -> None:
    """The (h, C) bytes stored in Redis equal the reference's."""
    stored = redis.client().hget(RedisStore.key(session_id), "state")
    record = await ref.store.get(ref_id)
    assert record is not None
    assert stored == record.state


async def step(
    http: httpx.AsyncClient, server: ServerProcess, session_id: str, text: str, if_step: int | None
) -> httpx.Response:
    return await http.post(
        f"{server.url}/v1/sessions/{session_id}/steps", json={"text": text, "k": K, "if_step": if_step}
    )


async def create(http: httpx.AsyncClient, server: ServerProcess, text: str) -> dict[str, Any]:
    response = await http.post(f"{server.url}/v1/sessions", json={"text": text, "k": K})
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


async def wait_until(condition: Callable[[], Any], deadline: float = 20.0) -> None:
    """Poll an async condition until it holds; fail after the deadline."""
    async with asyncio.timeout(deadline):
        while not await condition():
            await asyncio.sleep(0.05)


def error_code(response: httpx.Response) -> str:
    code: str = response.json()["error"]["code"]
    return code


# ----- two replicas, one Redis --------------------------------------------------------------------------


def test_alternating_replicas_equal_one_process(
    tiny_bundle: Path, replicas: tuple[ServerProcess, ServerProcess], redis_server: RedisServer
) -> None:
    a, b = replicas
    texts = phrases(tiny_bundle, 12)

    async def scenario() -> None:
        async with reference(tiny_bundle) as ref, httpx.AsyncClient(timeout=30) as http:
            got = await create(http, a, texts[0])
            want = await ref.create(texts[0], K, owner="")
            same(got, want)
            sid, ref_id = got["session_id"], want["session_id"]
            for i, text in enumerate(texts[1:]):
                replica = (b, a)[i % 2]
                response = await step(http, replica, sid, text, got["step"])
                assert response.status_code == 200, response.text
                got = response.json()
                want = await ref.step(ref_id, text, K, want["step"], owner="")
                same(got, want)
            await same_state(redis_server, sid, ref, ref_id)
            for replica in (a, b):
                info = (await http.get(f"{replica.url}/v1/sessions/{sid}")).json()
                assert info["step"] == want["step"]

    asyncio.run(scenario())


def test_the_same_if_step_on_both_replicas_applies_once(
    tiny_bundle: Path, replicas: tuple[ServerProcess, ServerProcess], redis_server: RedisServer
) -> None:
    """100 races: the same step twice (one applies, the other replays) or two different steps
    (one applies, the other gets 409); never both, never neither."""
    a, b = replicas
    words = vocabulary(tiny_bundle)
    outcomes: Counter[str] = Counter()

    async def scenario() -> None:
        limits = httpx.Limits(max_keepalive_connections=4)
        async with reference(tiny_bundle) as ref, httpx.AsyncClient(timeout=30, limits=limits) as http:
            got = await create(http, a, "i stay in")
            want = await ref.create("i stay in", K, owner="")
            sid, ref_id, start = got["session_id"], want["session_id"], got["step"]
            current = start
            for trial in range(100):
                first = words[trial % len(words)]
                second = first if trial % 2 == 0 else words[(trial + 1) % len(words)]
                ra, rb = await asyncio.gather(step(http, a, sid, first, current), step(http, b, sid, second, current))
                if first == second:
                    assert (ra.status_code, rb.status_code) == (200, 200), (ra.text, rb.text)
                    assert ra.json() == rb.json()  # the loser got the winner's stored response
                    outcomes["replay"] += 1
                    winner, text = ra, first
                else:
                    assert sorted([ra.status_code, rb.status_code]) == [200, 409], (ra.text, rb.text)
                    winner, loser = (ra, rb) if ra.status_code == 200 else (rb, ra)
                    text = first if winner is ra else second
                    assert error_code(loser) == "step_conflict"
                    assert loser.json()["error"]["current_step"] == current + 1
                    outcomes["conflict"] += 1
                want = await ref.step(ref_id, text, K, current, owner="")
                same(winner.json(), want)
                current = want["step"]
            assert current == start + 100  # no step lost, none doubled
            info = (await http.get(f"{b.url}/v1/sessions/{sid}")).json()
            assert info["step"] == current
            await same_state(redis_server, sid, ref, ref_id)

    asyncio.run(scenario())
    assert outcomes == {"replay": 50, "conflict": 50}


def test_kill_9_mid_stream_then_resume_on_the_other_replica(
    tiny_bundle: Path, replicas: tuple[ServerProcess, ServerProcess], redis_server: RedisServer
) -> None:
    a, b = replicas
    texts = phrases(tiny_bundle, 20, length=2)
    doomed = start_server(tiny_bundle, replica_env(redis_server))

    async def scenario() -> None:
        async with reference(tiny_bundle) as ref, httpx.AsyncClient(timeout=30) as http:
            got = await create(http, doomed, "i stay in")
            want = await ref.create("i stay in", K, owner="")
            sid, ref_id = got["session_id"], want["session_id"]
            ws = await ws_connect(doomed.url.replace("http", "ws") + f"/v1/sessions/{sid}/stream")
            for text in texts[:8]:
                await ws.send(json.dumps({"text": text, "k": K, "if_step": got["step"]}))
                got = json.loads(await ws.recv())
                want = await ref.step(ref_id, text, K, want["step"], owner="")
                same(got, want)
            # The next message goes out and the replica dies before its answer is read: the client cannot
            # know whether the step was applied, so it resends it, with the same if_step, elsewhere.
            pending = {"text": texts[8], "k": K, "if_step": got["step"]}
            await ws.send(json.dumps(pending))
            assert doomed.stop(signal.SIGKILL) == -signal.SIGKILL
            with contextlib.suppress(ConnectionClosed, OSError):
                await ws.close()
            response = await http.post(f"{a.url}/v1/sessions/{sid}/steps", json=pending)
            assert response.status_code == 200, response.text
            got = response.json()
            want = await ref.step(ref_id, texts[8], K, want["step"], owner="")
            same(got, want)
            for i, text in enumerate(texts[9:]):
                response = await step(http, (b, a)[i % 2], sid, text, got["step"])
                assert response.status_code == 200, response.text
                got = response.json()
                want = await ref.step(ref_id, text, K, want["step"], owner="")
                same(got, want)
            await same_state(redis_server, sid, ref, ref_id)

    try:
        asyncio.run(scenario())
    finally:
        doomed.stop()


# ----- Redis down, restarted, paused ----------------------------------------------------------------------


async def ready(http: httpx.AsyncClient, *servers: ServerProcess) -> bool:
    statuses = [(await http.get(f"{s.url}/readyz")).status_code for s in servers]
    return all(code == 200 for code in statuses)


async def assert_store_unavailable(http: httpx.AsyncClient, servers: tuple[ServerProcess, ...], sid: str) -> None:
    """/readyz is 503 and session requests fail with 503 store_unavailable (they return: no hang)."""
    for server in servers:
        readiness = await http.get(f"{server.url}/readyz")
        assert readiness.status_code == 503
        assert error_code(readiness) == "store_unavailable"
        refused = await step(http, server, sid, "it", None)
        assert refused.status_code == 503
        assert error_code(refused) == "store_unavailable"
        assert refused.headers["retry-after"] == "1"
        created = await http.post(f"{server.url}/v1/sessions", json={"text": "i"})
        assert created.status_code == 503
        assert error_code(created) == "store_unavailable"
    # Stateless prediction does not need the store and keeps working.
    assert (await http.post(f"{servers[0].url}/v1/predict", json={"text": "i stay in"})).status_code == 200


def test_sessions_survive_a_redis_restart(
    tiny_bundle: Path, replicas: tuple[ServerProcess, ServerProcess], healthy_redis: RedisServer
) -> None:
    a, b = replicas

    async def scenario() -> None:
        # The client's timeout is far above the store deadline: a hang would show as a ReadTimeout here.
        async with reference(tiny_bundle) as ref, httpx.AsyncClient(timeout=20) as http:
            got = await create(http, a, "we cooked the")
            want = await ref.create("we cooked the", K, owner="")
            sid, ref_id = got["session_id"], want["session_id"]
            healthy_redis.stop()  # SIGTERM: Redis fsyncs the AOF and exits
            await assert_store_unavailable(http, (a, b), sid)
            healthy_redis.start()  # same port and dir: the AOF is replayed
            await wait_until(lambda: ready(http, a, b))
            response = await step(http, b, sid, "old river", got["step"])
            assert response.status_code == 200, response.text
            want = await ref.step(ref_id, "old river", K, want["step"], owner="")
            same(response.json(), want)
            await same_state(healthy_redis, sid, ref, ref_id)

    asyncio.run(scenario())


def test_a_paused_redis_fails_fast_and_recovers(
    tiny_bundle: Path, replicas: tuple[ServerProcess, ServerProcess], healthy_redis: RedisServer
) -> None:
    a, b = replicas

    async def scenario() -> None:
        async with reference(tiny_bundle) as ref, httpx.AsyncClient(timeout=20) as http:
            got = await create(http, a, "i speak")
            want = await ref.create("i speak", K, owner="")
            sid, ref_id = got["session_id"], want["session_id"]
            healthy_redis.pause()  # SIGSTOP: connections are accepted by the kernel, nothing answers
            try:
                await assert_store_unavailable(http, (a, b), sid)
                # A step that failed may still be applied later (Redis runs what it had read): the retry
                # with the same if_step below is correct either way.
                failed = await step(http, a, sid, "french", got["step"])
                assert failed.status_code == 503
            finally:
                healthy_redis.resume()
            await wait_until(lambda: ready(http, a, b))
            response = await step(http, b, sid, "french", got["step"])
            assert response.status_code == 200, response.text
            want = await ref.step(ref_id, "french", K, want["step"], owner="")
            same(response.json(), want)
            await same_state(healthy_redis, sid, ref, ref_id)

    asyncio.run(scenario())


# ----- graceful shutdown -------------------------------------------------------------------------------------


def _read_sse(url: str, events: list[tuple[str, dict[str, Any]]], first: threading.Event) -> None:
    body = {"max_words": 12, "seed": 1, "stream": True}
    with httpx.stream("POST", url, json=body, timeout=30) as response:
        assert response.status_code == 200
        event = ""
        for line in response.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                events.append((event, json.loads(line[6:])))
                first.set()


def _in_flight(server: ServerProcess) -> float:
    for line in httpx.get(f"{server.url}/metrics").text.splitlines():
        if line.startswith("cellgate_http_requests_in_flight "):
            return float(line.split()[1])
    raise AssertionError("no in-flight gauge")


def _half_sent_request(server: ServerProcess, body: bytes) -> socket.socket:
    """A POST the server has started (headers read, so the app runs) whose body has not all arrived."""
    host, port = server.url.removeprefix("http://").split(":")
    raw = socket.create_connection((host, int(port)), timeout=20)
    head = f"POST /v1/predict HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nContent-Length: {len(body)}"
    raw.sendall(head.encode() + b"\r\n\r\n" + body[:5])
    deadline = time.monotonic() + 20
    while _in_flight(server) < 3:  # the stream, this request, and the scrape itself
        assert time.monotonic() < deadline, "the half-sent request never reached the app"
        time.sleep(0.02)
    return raw


def _finish(raw: socket.socket, rest: bytes) -> bytes:
    raw.sendall(rest)
    reply = b""
    while chunk := raw.recv(65536):  # the server closes the connection after answering while draining
        reply += chunk
    return reply


def test_sigterm_drains_in_flight_work_and_exits_0(tiny_bundle: Path) -> None:
    drain = 15.0
    # Each lone batch waits 0.2 s for company, so the 12-word generation below spans a few seconds.
    env = {
        "CELLGATE_MAX_WAIT_US": "200000",
        "CELLGATE_DRAIN_TIMEOUT_SECONDS": str(drain),
        "CELLGATE_ACCESS_LOG": "false",
    }
    server = start_server(tiny_bundle, env)
    try:
        sessions = [httpx.post(f"{server.url}/v1/sessions", json={"text": "i stay in"}).json() for _ in range(2)]
        ws_url = server.url.replace("http", "ws") + f"/v1/sessions/{sessions[0]['session_id']}/stream"
        with ws_connect_sync(ws_url) as ws:
            ws.send(json.dumps({"text": "india"}))
            assert json.loads(ws.recv())["step"] == 4
            events: list[tuple[str, dict[str, Any]]] = []
            first_word = threading.Event()
            sse_url = f"{server.url}/v1/sessions/{sessions[1]['session_id']}/generate"
            reader = threading.Thread(target=_read_sse, args=(sse_url, events, first_word), daemon=True)
            reader.start()
            assert first_word.wait(20), "the stream never started"
            body = json.dumps({"text": "i stay in", "k": 3}).encode()
            with _half_sent_request(server, body) as raw:
                server.process.send_signal(signal.SIGTERM)

                # The open WebSocket is told why, then closed with 1001 (going away): draining has begun.
                goodbye = json.loads(ws.recv(timeout=20))
                assert goodbye["error"]["code"] == "shutting_down"
                with pytest.raises(ConnectionClosed) as closed:
                    ws.recv(timeout=20)
                assert closed.value.rcvd is not None
                assert closed.value.rcvd.code == 1001
                # New work is refused: the listener is closed, or the request is answered 503 shutting_down.
                try:
                    late = httpx.post(f"{server.url}/v1/predict", json={"text": "i"}, timeout=5)
                    assert late.status_code == 503
                    assert late.json()["error"]["code"] == "shutting_down"
                except httpx.TransportError:
                    pass
                # The in-flight request completes once its body arrives.
                reply = _finish(raw, body[5:])
            assert reply.startswith(b"HTTP/1.1 200"), reply[:200]
            assert json.loads(reply.split(b"\r\n\r\n", 1)[1])["tokens"] == 3
        # The stream that was running completes: every word, then `done`.
        reader.join(drain)
        assert not reader.is_alive()
        assert [e for e, _ in events] == ["word"] * 12 + ["done"]
        assert server.process.wait(drain + 10) == 0
        assert not any("Cancel" in line and "running task" in line for line in server.log)
    finally:
        server.stop()


# ----- overload ---------------------------------------------------------------------------------------------

OVERLOAD_ENV = {
    "CELLGATE_QUEUE_SIZE": "2",
    "CELLGATE_MAX_BATCH": "1",
    "CELLGATE_QUEUE_TIMEOUT_SECONDS": "1",
    "CELLGATE_ACCESS_LOG": "false",
}
CAPACITY = 3  # queue_size + max_batch: requests the server holds at once


async def overload(server: ServerProcess, text: str, *, requests: int | None, seconds: float | None) -> Counter[str]:
    """2 × capacity clients sending back to back, until `requests` each or `seconds` have passed."""
    outcomes: Counter[str] = Counter()
    stop_at = None if seconds is None else time.monotonic() + seconds

    async def client(http: httpx.AsyncClient) -> None:
        sent = 0
        while (requests is None or sent < requests) and (stop_at is None or time.monotonic() < stop_at):
            sent += 1
            response = await http.post(f"{server.url}/v1/predict", json={"text": text, "k": 3})
            if response.status_code == 200:
                outcomes["ok"] += 1
                continue
            assert response.status_code == 503, response.text
            assert error_code(response) == "overloaded"
            assert response.headers["retry-after"] == "1"
            outcomes["overloaded"] += 1

    limits = httpx.Limits(max_connections=2 * CAPACITY)
    async with httpx.AsyncClient(timeout=30, limits=limits) as http:
        await asyncio.gather(*(client(http) for _ in range(2 * CAPACITY)))
    return outcomes


def long_text(bundle: Path) -> str:
    words = vocabulary(bundle)
    return " ".join(words[i % len(words)] for i in range(2000))  # near max_tokens_per_request


def test_overload_is_refused_with_retry_after(tiny_bundle: Path) -> None:
    with running_server(tiny_bundle, OVERLOAD_ENV) as server:
        outcomes = asyncio.run(overload(server, long_text(tiny_bundle), requests=8, seconds=None))
        assert outcomes["ok"] + outcomes["overloaded"] == 8 * 2 * CAPACITY
        assert outcomes["ok"] > 0
        assert outcomes["overloaded"] > 0
        assert httpx.get(f"{server.url}/readyz").status_code == 200
        assert httpx.post(f"{server.url}/v1/predict", json={"text": "i stay in"}).status_code == 200


@pytest.mark.skipif(not SOAK, reason="soak: run with `make soak` (CELLGATE_SOAK=1)")
def test_soak_overload_for_30_seconds(tiny_bundle: Path) -> None:
    with running_server(tiny_bundle, OVERLOAD_ENV) as server:
        text = long_text(tiny_bundle)
        asyncio.run(overload(server, text, requests=None, seconds=5))  # warm-up: allocator and caches settle
        before = rss_bytes(server.pid)
        outcomes = asyncio.run(overload(server, text, requests=None, seconds=30))
        after = rss_bytes(server.pid)
        log.info("30 s at 2x capacity: %s; RSS %.1f -> %.1f MiB", dict(outcomes), before / 2**20, after / 2**20)
        assert outcomes["ok"] > 0
        assert outcomes["overloaded"] > 0
        assert after < before * 1.10
        assert httpx.get(f"{server.url}/readyz").status_code == 200


@pytest.mark.skipif(not SOAK, reason="soak: run with `make soak` (CELLGATE_SOAK=1)")
@pytest.mark.timeout(SOAK_SECONDS + 600)  # however long the soak is asked to run, with 10 minutes to spare
def test_soak_rss_stays_flat_for_5_minutes(tiny_bundle: Path, redis_server: RedisServer) -> None:
    """Sessions created, streamed, stepped and deleted for 5 minutes: RSS grows < 10 % after warm-up."""
    seconds = SOAK_SECONDS
    texts = phrases(tiny_bundle, 50)

    async def traffic(server: ServerProcess, until: float) -> int:
        done = 0

        async def worker(http: httpx.AsyncClient, n: int) -> None:
            nonlocal done
            while time.monotonic() < until:
                got = await create(http, server, texts[n % len(texts)])
                sid = got["session_id"]
                for i in range(10):
                    response = await step(http, server, sid, texts[(n + i) % len(texts)], got["step"])
                    assert response.status_code == 200, response.text
                    got = response.json()
                ws = await ws_connect(server.url.replace("http", "ws") + f"/v1/sessions/{sid}/stream")
                for i in range(5):
                    await ws.send(json.dumps({"text": texts[i], "if_step": got["step"]}))
                    got = json.loads(await ws.recv())
                await ws.close()
                assert (await http.delete(f"{server.url}/v1/sessions/{sid}")).status_code == 204
                done += 1

        async with httpx.AsyncClient(timeout=30) as http:
            await asyncio.gather(*(worker(http, n) for n in range(8)))
        return done

    with running_server(tiny_bundle, replica_env(redis_server)) as server:
        warm_up = min(30.0, seconds / 10)
        asyncio.run(traffic(server, time.monotonic() + warm_up))
        before = rss_bytes(server.pid)
        # RSS after each tenth of the run: a leak climbs through the series, warm-up flattens out.
        sessions, series = 0, [before]
        for _ in range(10):
            sessions += asyncio.run(traffic(server, time.monotonic() + seconds / 10))
            series.append(rss_bytes(server.pid))
        after = series[-1]
        log.info("soak %.0f s: %d sessions; RSS %.1f -> %.1f MiB", seconds, sessions, before / 2**20, after / 2**20)
        log.info("RSS every %.0f s (MiB): %s", seconds / 10, " ".join(f"{rss / 2**20:.1f}" for rss in series))
        assert sessions > 0
        assert after < before * 1.10
