"""Readiness follows the engine: /readyz turns 503 once the batching task is dead, and steps are refused
rather than left waiting. The app runs in-process (its real lifespan: bundle, runner, scheduler, store) so
the test can reach its event loop and kill the task."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import httpx

from service.app import create_app
from service.config import Settings


def test_readyz_turns_503_when_the_batching_task_dies(tiny_bundle: Path) -> None:
    app = create_app(Settings(bundle=tiny_bundle))

    async def scenario() -> list[httpx.Response]:
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://cellgate") as client,
        ):
            ready = await client.get("/readyz")
            sid = (await client.post("/v1/sessions", json={"text": "i stay in"})).json()["session_id"]
            task = next(t for t in asyncio.all_tasks() if t.get_name() == "batch-scheduler")
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            dead = await client.get("/readyz")
            step = await client.post(f"/v1/sessions/{sid}/steps", json={"text": "india ."})
            alive = await client.get("/healthz")
            metrics = await client.get("/metrics")
            return [ready, dead, step, alive, metrics]

    ready, dead, step, alive, metrics = asyncio.run(scenario())
    assert ready.status_code == 200
    assert dead.status_code == 503
    assert dead.json()["error"] == {"code": "not_ready", "message": "the batching task has stopped"}
    assert step.status_code == 503
    assert step.json()["error"]["code"] == "not_ready"
    assert alive.status_code == 200  # liveness is the process; readiness is the engine
    assert "cellgate_ready 0.0" in metrics.text
