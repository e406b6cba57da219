"""WebSocket streaming: one answer per message, in order, on one session."""

from __future__ import annotations

import json

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from pydantic import ValidationError

from service.deps import Caller, identify, presented_key
from service.errors import CellgateError, SessionNotFound, ShuttingDown, ValidationFailed, render
from service.schemas import RewindRequest, StepRequest
from service.sessions import Reply, SessionManager

router = APIRouter(tags=["sessions"])

SESSION_GONE = 4404  # close code sent after session_not_found
UNAUTHORIZED = 4401


def _validation_message(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors())


@router.websocket("/v1/sessions/{session_id}/stream")
async def stream(websocket: WebSocket, session_id: str) -> None:
    """Messages {"text", "k", "if_step"?, "explain"?, "prefix"?} or {"rewind_to", "k"} -> {"step", "predictions"}."""
    app = websocket.app
    settings = app.state.settings
    manager: SessionManager = app.state.manager
    metrics = app.state.metrics
    # Browsers cannot set headers on a WebSocket, hence the query parameter.
    key = presented_key(websocket.headers, websocket.query_params.get("api_key"))
    await websocket.accept()
    try:
        owner = identify(key, settings)
        await manager.info(session_id, owner)
    except CellgateError as exc:
        await websocket.send_text(render(exc, metrics, websocket.url.path).body.decode())
        await websocket.close(SESSION_GONE if isinstance(exc, SessionNotFound) else UNAUTHORIZED)
        return
    metrics.websocket_connections.inc()
    app.state.websockets.add(websocket)
    try:
        while True:
            raw = await websocket.receive_text()
            try:
                if app.state.draining:
                    raise ShuttingDown()
                reply = await _answer(raw, Caller(manager, settings, owner), session_id)
                metrics.websocket_messages.labels("ok").inc()
                await websocket.send_text(reply.body.decode())
            except CellgateError as exc:
                metrics.websocket_messages.labels("error").inc()
                await websocket.send_text(render(exc, metrics, websocket.url.path).body.decode())
                if isinstance(exc, SessionNotFound | ShuttingDown):
                    await websocket.close(SESSION_GONE if isinstance(exc, SessionNotFound) else 1001)
                    return
    except WebSocketDisconnect:
        pass
    finally:
        app.state.websockets.discard(websocket)
        metrics.websocket_connections.dec()


async def _answer(raw: str, ctx: Caller, session_id: str) -> Reply:
    try:
        message = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValidationFailed(f"message is not valid JSON: {exc.msg}") from None
    if not isinstance(message, dict):
        raise ValidationFailed("message must be a JSON object")
    try:
        if "rewind_to" in message:
            rewind = RewindRequest(to_step=message["rewind_to"], k=message.get("k", 5), if_step=message.get("if_step"))
            ctx.check_k(rewind.k)
            result = await ctx.manager.rewind(session_id, rewind.to_step, rewind.k, rewind.if_step, ctx.owner)
        else:
            step = StepRequest.model_validate(message)
            ctx.check_k(step.k)
            result = await ctx.manager.step(
                session_id, step.text, step.k, step.if_step, ctx.owner, step.explain, step.prefix
            )
    except ValidationError as exc:
        raise ValidationFailed(_validation_message(exc)) from None
    return result
