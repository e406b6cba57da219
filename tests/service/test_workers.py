"""`cellgate serve --workers 2`: test_faults.py's scenarios with two workers of ONE server instead of two
replicas — any session through any worker equals one process bit for bit, a raced if_step applies
once, a worker killed mid-stream is replaced while its sessions go on elsewhere, a Redis restart,
the private LMDB store removed at exit, SIGTERM draining every worker, and per-worker metrics.

A keep-alive connection stays on the worker that accepted it, so a client with one connection is
pinned to one worker; which one is read from the access log (every line names its worker).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as ws_connect_sync

from bench.procs import descendants
from tests.redis_server import RedisServer, replica_env
from tests.servers import ServerProcess, running_server, start_server
from tests.service.test_faults import (
    K,
    _read_sse,
    error_code,
    phrases,
    reference,
    same,
    same_state,
    vocabulary,
    wait_until,
)


@pytest.fixture(scope="module")
def workers(tiny_bundle: Path, redis_server: RedisServer) -> Iterator[ServerProcess]:
    """One `--workers 2` server on the module's redis-server, access log on (it names the worker)."""
    env = replica_env(redis_server, CELLGATE_WORKERS="2", CELLGATE_ACCESS_LOG="true")
    with running_server(tiny_bundle, env) as server:
        yield server


def served_by(server: ServerProcess, request_id: str, deadline: float = 10.0) -> int:
    """The worker index in the access-log line of this request (polled: it is written after the response)."""
    stop = time.monotonic() + deadline
    while time.monotonic() < stop:
        for line in list(server.log):
            if request_id in line and '"cellgate.access"' in line:
                worker: int = json.loads(line)["worker"]
                return worker
        time.sleep(0.02)
    raise AssertionError(f"no access-log line for {request_id}")


def worker_pids(server: ServerProcess) -> dict[int, int]:
    """Worker index -> pid, from the supervisor's children's command lines (`python -m service.worker ...`)."""
    found = {}
    for pid in descendants(server.pid):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"service.worker" in argv:
            found[int(argv[-2])] = pid
    return found


@dataclass
class Pinned:
    """An HTTP client with one keep-alive connection, which the worker `worker` accepted."""

    client: httpx.AsyncClient
    worker: int

    async def call(self, server: ServerProcess, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """The request, checked (in the access log) to have been served by this client's worker."""
        request_id = f"req-{time.monotonic_ns()}"
        response = await self.client.request(method, path, headers={"X-Request-ID": request_id}, **kwargs)
        assert served_by(server, request_id) == self.worker, "the pinned connection moved to another worker"
        return response


@asynccontextmanager
async def pinned(server: ServerProcess) -> AsyncIterator[tuple[Pinned, Pinned]]:
    """Two clients on different workers (0 and 1): new connections are opened until both were seen."""
    found: dict[int, Pinned] = {}
    opened: list[httpx.AsyncClient] = []
    try:
        for attempt in range(64):
            client = httpx.AsyncClient(base_url=server.url, timeout=30, limits=httpx.Limits(max_connections=1))
            opened.append(client)
            request_id = f"pin-{server.pid}-{attempt}-{time.monotonic_ns()}"
            assert (await client.get("/healthz", headers={"X-Request-ID": request_id})).status_code == 200
            worker = served_by(server, request_id)
            found.setdefault(worker, Pinned(client, worker))
            if len(found) == 2:
                break
        assert set(found) == {0, 1}, "64 new connections all went to one worker"
        yield found[0], found[1]
    finally:
        for client in opened:
            await client.aclose()


def test_any_session_through_any_worker_equals_one_process(
    tiny_bundle: Path, workers: ServerProcess, redis_server: RedisServer
) -> None:
    texts = phrases(tiny_bundle, 12)

    async def scenario() -> None:
        async with reference(tiny_bundle) as ref, pinned(workers) as (w0, w1):
            created = await w0.call(workers, "POST", "/v1/sessions", json={"text": texts[0], "k": K})
            assert created.status_code == 201, created.text
            got, want = created.json(), await ref.create(texts[0], K, owner="")
            same(got, want)
            sid, ref_id = got["session_id"], want["session_id"]
            for i, text in enumerate(texts[1:]):
                body = {"text": text, "k": K, "if_step": got["step"]}
                response = await (w1, w0)[i % 2].call(workers, "POST", f"/v1/sessions/{sid}/steps", json=body)
                assert response.status_code == 200, response.text
                got, want = response.json(), await ref.step(ref_id, text, K, want["step"], owner="")
                same(got, want)
            await same_state(redis_server, sid, ref, ref_id)
            # Rewind through the other worker, fork through the first, step the fork through the other.
            back = got["step"] - 3
            rewound = await w1.call(workers, "POST", f"/v1/sessions/{sid}/rewind", json={"to_step": back, "k": K})
            assert rewound.status_code == 200, rewound.text
            same(rewound.json(), await ref.rewind(ref_id, back, K, None, owner=""))
            fork = await w0.call(workers, "POST", f"/v1/sessions/{sid}/fork")
            assert fork.status_code == 201, fork.text
            child = fork.json()["session_id"]
            stepped = await w1.call(workers, "POST", f"/v1/sessions/{child}/steps", json={"text": "i speak", "k": K})
            ref_child = (await ref.fork(ref_id, owner=""))["session_id"]
            same(stepped.json(), await ref.step(ref_child, "i speak", K, None, owner=""))
            assert (await w0.call(workers, "GET", f"/v1/sessions/{sid}")).json()["step"] == back
            # Deleted through one worker: gone through the other.
            assert (await w1.call(workers, "DELETE", f"/v1/sessions/{sid}")).status_code == 204
            missing = await w0.call(workers, "GET", f"/v1/sessions/{sid}")
            assert missing.status_code == 404
            assert error_code(missing) == "session_not_found"

    asyncio.run(scenario())


def test_the_same_if_step_on_both_workers_applies_once(tiny_bundle: Path, workers: ServerProcess) -> None:
    """40 races across the two workers: the same step twice replays, two different steps conflict."""
    words = vocabulary(tiny_bundle)

    async def scenario() -> None:
        async with reference(tiny_bundle) as ref, pinned(workers) as (w0, w1):
            got = (await w0.client.post("/v1/sessions", json={"text": "i stay in", "k": K})).json()
            want = await ref.create("i stay in", K, owner="")
            sid, ref_id, current = got["session_id"], want["session_id"], got["step"]
            for trial in range(40):
                first = words[trial % len(words)]
                second = first if trial % 2 == 0 else words[(trial + 1) % len(words)]
                path = f"/v1/sessions/{sid}/steps"
                ra, rb = await asyncio.gather(
                    w0.client.post(path, json={"text": first, "k": K, "if_step": current}),
                    w1.client.post(path, json={"text": second, "k": K, "if_step": current}),
                )
                if first == second:
                    assert (ra.status_code, rb.status_code) == (200, 200), (ra.text, rb.text)
                    assert ra.json() == rb.json()
                    winner, text = ra, first
                else:
                    assert sorted([ra.status_code, rb.status_code]) == [200, 409], (ra.text, rb.text)
                    winner = ra if ra.status_code == 200 else rb
                    text = first if winner is ra else second
                    loser = rb if winner is ra else ra
                    assert error_code(loser) == "step_conflict"
                want = await ref.step(ref_id, text, K, current, owner="")
                same(winner.json(), want)
                current = want["step"]
            assert (await w1.client.get(f"/v1/sessions/{sid}")).json()["step"] == current

    asyncio.run(scenario())


def test_a_killed_worker_is_replaced_and_its_sessions_go_on(tiny_bundle: Path, workers: ServerProcess) -> None:
    texts = phrases(tiny_bundle, 10, length=2)

    async def scenario() -> None:
        async with reference(tiny_bundle) as ref, pinned(workers) as (w0, w1):
            got = (await w0.client.post("/v1/sessions", json={"text": "i stay in", "k": K})).json()
            want = await ref.create("i stay in", K, owner="")
            sid, ref_id = got["session_id"], want["session_id"]
            for text in texts[:4]:
                got = (await w0.client.post(f"/v1/sessions/{sid}/steps", json={"text": text, "k": K})).json()
                same(got, want := await ref.step(ref_id, text, K, None, owner=""))
            doomed = worker_pids(workers)[0]
            os.kill(doomed, signal.SIGKILL)  # the supervisor and worker 1 stay
            # The client does not know whether its last step was applied: it resends it, same if_step, elsewhere.
            pending = {"text": texts[4], "k": K, "if_step": got["step"]}
            for _ in range(2):  # the first may race the kill; the replay answers the same
                response = await w1.client.post(f"/v1/sessions/{sid}/steps", json=pending)
                assert response.status_code == 200, response.text
            same(response.json(), await ref.step(ref_id, texts[4], K, want["step"], owner=""))

            async def replaced() -> bool:
                return worker_pids(workers).get(0) not in (None, doomed)

            await wait_until(replaced, deadline=60)
            assert any("worker 0" in line and "starting a new one" in line for line in workers.log)
            # The replacement serves: new connections reach both workers again.
            async with pinned(workers) as (n0, _):
                step = await n0.client.post(f"/v1/sessions/{sid}/steps", json={"text": texts[5], "k": K})
                assert step.status_code == 200, step.text

    asyncio.run(scenario())


def test_without_a_store_url_the_workers_share_a_private_lmdb_removed_at_exit(tiny_bundle: Path) -> None:
    stale = Path("/dev/shm") / "cellgate-workers-999999999-left"  # a supervisor that died by SIGKILL
    stale.mkdir(exist_ok=True)
    server = start_server(tiny_bundle, {"CELLGATE_WORKERS": "2", "CELLGATE_ACCESS_LOG": "false"})
    try:
        assert not stale.exists()
        [line] = [line for line in server.log if "sessions are shared through lmdb://" in line]
        directory = Path(json.loads(line)["message"].split("lmdb://")[1])
        assert directory.is_dir()
        assert directory.parent.stat().st_mode & 0o777 == 0o700
        session = httpx.post(f"{server.url}/v1/sessions", json={"text": "i stay in"})
        assert session.status_code == 201
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(30) == 0
        assert not directory.parent.exists()
    finally:
        server.stop()
        if stale.exists():
            stale.rmdir()


def test_sigterm_drains_every_worker_and_exits_0(tiny_bundle: Path) -> None:
    env = {"CELLGATE_WORKERS": "2", "CELLGATE_MAX_WAIT_US": "200000", "CELLGATE_DRAIN_TIMEOUT_SECONDS": "15"}
    server = start_server(tiny_bundle, env)
    try:
        children = descendants(server.pid)
        assert len(children) == 2
        sessions = [httpx.post(f"{server.url}/v1/sessions", json={"text": "i stay in"}).json() for _ in range(2)]
        with ws_connect_sync(
            server.url.replace("http", "ws") + f"/v1/sessions/{sessions[0]['session_id']}/stream"
        ) as ws:
            ws.send(json.dumps({"text": "india"}))
            assert json.loads(ws.recv())["step"] == 4
            events: list[tuple[str, dict[str, Any]]] = []
            first_word = threading.Event()
            sse_url = f"{server.url}/v1/sessions/{sessions[1]['session_id']}/generate"
            reader = threading.Thread(target=_read_sse, args=(sse_url, events, first_word), daemon=True)
            reader.start()
            assert first_word.wait(20), "the stream never started"
            server.process.send_signal(signal.SIGTERM)
            goodbye = json.loads(ws.recv(timeout=20))
            assert goodbye["error"]["code"] == "shutting_down"
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv(timeout=20)
            assert closed.value.rcvd is not None
            assert closed.value.rcvd.code == 1001
        reader.join(30)
        assert not reader.is_alive()
        assert [e for e, _ in events] == ["word"] * 12 + ["done"]
        assert server.process.wait(30) == 0
        assert not [pid for pid in children if Path(f"/proc/{pid}").exists()]
    finally:
        server.stop()


def test_metrics_add_up_over_workers_with_a_process_series_each(workers: ServerProcess) -> None:
    async def scenario() -> None:
        async with pinned(workers) as (w0, w1):
            before = (await w0.client.get("/metrics")).text
            for client in (w0, w1, w1):
                assert (await client.client.post("/v1/predict", json={"text": "i stay in"})).status_code == 200
            after = (await w0.client.get("/metrics")).text

        def predicts(text: str) -> float:
            line = next(
                (
                    line
                    for line in text.splitlines()
                    if line.startswith("cellgate_http_requests_total{")
                    and 'route="/v1/predict"' in line
                    and 'status="200"' in line
                ),
                "x 0",
            )
            return float(line.rsplit(" ", 1)[1])

        assert predicts(after) - predicts(before) == 3  # one scrape of one worker counts both workers' requests
        memory = [line for line in after.splitlines() if line.startswith("process_resident_memory_bytes{")]
        assert {line.split('pid="')[1].split('"')[0] for line in memory} == {
            str(p) for p in worker_pids(workers).values()
        }
        assert "cellgate_ready 1.0" in after.splitlines()

    asyncio.run(scenario())
