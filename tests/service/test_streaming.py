"""WebSocket streaming and concurrency on one session, against a real uvicorn process."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from tests.servers import ServerProcess


def ws_url(server: ServerProcess, sid: str) -> str:
    return server.url.replace("http://", "ws://") + f"/v1/sessions/{sid}/stream"


def new_session(server: ServerProcess, text: str = "") -> dict[str, Any]:
    response = httpx.post(f"{server.url}/v1/sessions", json={"text": text})
    assert response.status_code == 201
    body: dict[str, Any] = response.json()
    return body


def test_websocket_answers_each_message_in_order(server: ServerProcess) -> None:
    sid = new_session(server)["session_id"]
    words = "i stay in greece . we cooked a song . i speak".split()
    with connect(ws_url(server, sid)) as ws:
        for word in words:  # pipelined: send everything, then read
            ws.send(json.dumps({"text": word, "k": 3}))
        answers = [json.loads(ws.recv(timeout=30)) for _ in words]
    assert [a["step"] for a in answers] == list(range(1, len(words) + 1))
    assert all(len(a["predictions"]) == 3 for a in answers)
    # The stream's final predictions equal one stateless run over the whole text.
    stateless = httpx.post(f"{server.url}/v1/predict", json={"text": " ".join(words), "k": 3}).json()
    assert [p["word"] for p in answers[-1]["predictions"]] == [p["word"] for p in stateless["predictions"]]
    for got, want in zip(answers[-1]["predictions"], stateless["predictions"], strict=True):
        assert got["prob"] == pytest.approx(want["prob"], abs=1e-5)


def test_websocket_errors_keep_the_socket_open(server: ServerProcess) -> None:
    sid = new_session(server, "i stay in")["session_id"]
    with connect(ws_url(server, sid)) as ws:
        ws.send("not json")
        assert json.loads(ws.recv(timeout=30))["error"]["code"] == "validation_error"
        ws.send(json.dumps({"text": "x", "k": 0}))
        assert json.loads(ws.recv(timeout=30))["error"]["code"] == "validation_error"
        ws.send(json.dumps({"text": "india", "if_step": 99}))
        conflict = json.loads(ws.recv(timeout=30))["error"]
        assert conflict["code"] == "step_conflict"
        assert conflict["current_step"] == 3
        ws.send(json.dumps({"text": "india", "k": 2}))
        assert json.loads(ws.recv(timeout=30))["step"] == 4


def test_websocket_to_unknown_session_closes_with_4404(server: ServerProcess) -> None:
    with connect(ws_url(server, "A" * 32)) as ws:
        assert json.loads(ws.recv(timeout=30))["error"]["code"] == "session_not_found"
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=30)
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 4404


def test_websocket_closes_when_session_deleted(server: ServerProcess) -> None:
    sid = new_session(server)["session_id"]
    with connect(ws_url(server, sid)) as ws:
        ws.send(json.dumps({"text": "i"}))
        assert json.loads(ws.recv(timeout=30))["step"] == 1
        assert httpx.delete(f"{server.url}/v1/sessions/{sid}").status_code == 204
        ws.send(json.dumps({"text": "stay"}))
        assert json.loads(ws.recv(timeout=30))["error"]["code"] == "session_not_found"
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=30)


def test_concurrent_steps_to_one_session_lose_nothing(server: ServerProcess) -> None:
    """50 unconditional one-word steps fired at once: all applied, each exactly once, in arrival order."""
    sid = new_session(server)["session_id"]

    async def fire() -> list[int]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            responses = await asyncio.gather(
                *(client.post(f"/v1/sessions/{sid}/steps", json={"text": "the"}) for _ in range(50))
            )
        assert all(r.status_code == 200 for r in responses)
        return sorted(r.json()["step"] for r in responses)

    steps = asyncio.run(fire())
    assert steps == list(range(1, 51))  # every step saw a distinct state: none lost, none doubled
    assert httpx.get(f"{server.url}/v1/sessions/{sid}").json()["step"] == 50


def test_concurrent_conditional_steps_apply_once(server: ServerProcess) -> None:
    """The same if_step raced 20 times with different texts: exactly one applies, the rest conflict."""
    sid = new_session(server, "i stay in")["session_id"]

    async def race() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            return await asyncio.gather(
                *(client.post(f"/v1/sessions/{sid}/steps", json={"text": f"w{i}", "if_step": 3}) for i in range(20))
            )

    responses = asyncio.run(race())
    assert sorted(r.status_code for r in responses) == [200] + [409] * 19
    assert httpx.get(f"{server.url}/v1/sessions/{sid}").json()["step"] == 4
