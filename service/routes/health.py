"""Liveness, readiness and the Prometheus scrape endpoint."""

from __future__ import annotations

import contextlib
from typing import Any

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.errors import CellgateError, NotReady, render
from service.schemas import ErrorResponse, Status

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Status, summary="Liveness: 200 while the process lives")
async def healthz() -> Status:
    return Status(status="ok")


@router.get(
    "/readyz",
    response_model=Status,
    responses={
        503: {"model": ErrorResponse, "description": "Not warmed up, draining, batching stopped, or the store is down"}
    },
    summary="Readiness: model loaded and warmed up, session store answering",
)
async def readyz(request: Request) -> Response:
    problem = await readiness(request.app.state)
    if problem is not None:
        rendered = render(problem, request.app.state.metrics, request.url.path)
        return Response(rendered.body, rendered.status, rendered.headers, media_type="application/json")
    return Response(b'{"status":"ready"}', media_type="application/json")


async def readiness(state: Any) -> CellgateError | None:
    """Why the service is not ready (loading, draining, batching stopped, store down), or None; sets cellgate_ready."""
    try:
        if not getattr(state, "ready", False):
            raise NotReady("the model is still loading")
        if state.draining:
            raise NotReady("the server is shutting down")
        if not state.manager.scheduler.alive:
            raise NotReady("the batching task has stopped")
        await state.manager.store.ping()
    except CellgateError as exc:
        state.metrics.ready.set(0)
        return exc
    state.metrics.ready.set(1)
    return None


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    state = request.app.state
    manager = getattr(state, "manager", None)
    if manager is not None:
        # Sampled at scrape time: the store is the one place that knows, and a scrape is cheap.
        with contextlib.suppress(CellgateError):
            state.metrics.active_sessions.set(await manager.store.count())
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
