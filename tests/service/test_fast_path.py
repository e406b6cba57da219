"""The raw hot path for steps and the FastAPI route behind it answer exactly alike."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from types import SimpleNamespace

import httpx
from starlette.types import Receive, Scope, Send

from service.asgi import send_json
from service.routes.fast import STEP_TEMPLATE, FastSteps
from tests.servers import ServerProcess
from tests.service.harness import service_core


def _session(server: ServerProcess) -> str:
    sid: str = httpx.post(f"{server.url}/v1/sessions", json={"text": "i stay in"}).json()["session_id"]
    return sid


def test_json_and_non_json_requests_step_alike(server: ServerProcess) -> None:
    """A JSON step (hot path) and the same step sent chunked (FastAPI route) give the same answer."""
    a, b = _session(server), _session(server)
    body = json.dumps({"text": "india .", "k": 4, "if_step": 3}).encode()
    fast = httpx.post(f"{server.url}/v1/sessions/{a}/steps", content=body, headers={"content-type": "application/json"})

    def chunks() -> object:
        yield body  # a generator body is sent chunked, without Content-Length

    slow = httpx.post(
        f"{server.url}/v1/sessions/{b}/steps", content=chunks(), headers={"content-type": "application/json"}
    )  # type: ignore[arg-type]
    assert fast.status_code == slow.status_code == 200
    fast_body, slow_body = fast.json(), slow.json()
    for body_ in (fast_body, slow_body):
        body_.pop("session_id")
        body_.pop("expires_at")
    assert fast_body == slow_body


def test_a_json_step_never_reaches_the_router(tiny_bundle: Path) -> None:
    """FastSteps answers a well-formed JSON step itself and hands everything else on: the router behind it
    (here a recorder that answers 418) sees only the chunked step and the one that fails validation."""
    reached: list[str] = []

    async def router(scope: Scope, receive: Receive, send: Send) -> None:
        reached.append((await receive())["body"].decode())
        await send_json(send, 418, b"{}")

    async def scenario() -> list[httpx.Response]:
        async with service_core(tiny_bundle) as manager:
            state = SimpleNamespace(
                settings=manager.settings, manager=manager, metrics=manager.metrics, rate_limiter=None
            )
            fast = FastSteps(router, state=state, route=SimpleNamespace(path=STEP_TEMPLATE))
            sid = (await manager.create("i stay in", 3, ""))["session_id"]
            url = f"/v1/sessions/{sid}/steps"
            body = json.dumps({"text": "india .", "k": 3})

            async def chunks() -> object:
                yield body.encode()

            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=fast), base_url="http://c") as client:
                return [
                    await client.post(url, content=body, headers={"content-type": "application/json"}),
                    await client.post(url, content=chunks(), headers={"content-type": "application/json"}),  # type: ignore[arg-type]
                    await client.post(url, json={"text": "india .", "k": 0}),
                ]

    answered, chunked, invalid = asyncio.run(scenario())
    assert answered.status_code == 200
    assert answered.json()["step"] == 5
    assert (chunked.status_code, invalid.status_code) == (418, 418)
    assert reached == ['{"text": "india .", "k": 3}', '{"text":"india .","k":0}']


def test_invalid_bodies_get_the_standard_validation_error(server: ServerProcess) -> None:
    sid = _session(server)
    for bad in ({"text": 5}, {"text": "a", "k": 0}, {"text": "a", "unexpected": True}, {}):
        response = httpx.post(f"{server.url}/v1/sessions/{sid}/steps", json=bad)
        assert response.status_code == 422, bad
        assert response.json()["error"]["code"] == "validation_error"
    assert httpx.get(f"{server.url}/v1/sessions/{sid}").json()["step"] == 3


def test_hot_path_errors_and_metrics_use_the_route_template(server: ServerProcess) -> None:
    missing = httpx.post(f"{server.url}/v1/sessions/{'Z' * 32}/steps", json={"text": "a"})
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "session_not_found"
    assert missing.headers["x-request-id"]
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'route="/v1/sessions/{session_id}/steps"' in metrics
    assert "Z" * 32 not in metrics  # never a raw path or session id as a label
