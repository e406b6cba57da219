"""Sessions: create, inspect, step, fork, rewind, generate, delete."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Path, Request, Response, status
from fastapi.sse import EventSourceResponse, format_sse_event

from service.deps import caller, event_pump, json_reply
from service.errors import ValidationFailed, render
from service.metrics import Metrics
from service.routes.predict import ERRORS
from service.sampling import GenerateOptions, SampledWord
from service.schemas import (
    CreateSessionRequest,
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
    RewindRequest,
    SessionInfo,
    SessionResponse,
    StepRequest,
)

router = APIRouter(prefix="/v1/sessions", tags=["sessions"])

SessionId = Path(min_length=16, max_length=64, pattern=r"^[A-Za-z0-9_\-]+$", description="The id returned at creation.")
# One Server-Sent Event (OpenAPI 3.1 describes each event of a stream): `data` is JSON text.
SSE_EVENT = {
    "type": "object",
    "properties": {
        "event": {"type": "string", "enum": ["word", "done", "error"]},
        "data": {"type": "string", "contentMediaType": "application/json"},
    },
    "required": ["event", "data"],
}
SESSION_ERRORS: dict[int | str, dict[str, Any]] = {
    **ERRORS,
    404: {"model": ErrorResponse, "description": "Unknown or expired session (session_not_found)"},
    409: {
        "model": ErrorResponse,
        "description": "step_conflict (with current_step), history_exhausted (with oldest_step) or model_mismatch",
    },
}


@router.post("", status_code=status.HTTP_201_CREATED, response_model=SessionResponse, responses=ERRORS)
async def create_session(body: CreateSessionRequest, request: Request) -> Response:
    """A new session, optionally primed with text."""
    ctx = caller(request)
    ctx.check_k(body.k)
    reply = await ctx.manager.create(body.text, body.k, ctx.owner, body.prefix)
    return json_reply(reply, status.HTTP_201_CREATED)


@router.get("/{session_id}", response_model=SessionInfo, responses=SESSION_ERRORS)
async def get_session(request: Request, session_id: str = SessionId) -> dict[str, Any]:
    ctx = caller(request)
    return await ctx.manager.info(session_id, ctx.owner)


@router.delete(
    "/{session_id}", status_code=status.HTTP_204_NO_CONTENT, response_class=Response, responses=SESSION_ERRORS
)
async def delete_session(request: Request, session_id: str = SessionId) -> Response:
    ctx = caller(request)
    await ctx.manager.delete(session_id, ctx.owner)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/{session_id}/steps", response_model=SessionResponse, responses=SESSION_ERRORS)
async def step(body: StepRequest, request: Request, session_id: str = SessionId) -> Response:
    """Advance the session's (h, C) through the words of text; exactly once per if_step. With a prefix, the
    predictions complete the word being typed; a prefix without text changes nothing."""
    ctx = caller(request)
    ctx.check_k(body.k)
    reply = await ctx.manager.step(session_id, body.text, body.k, body.if_step, ctx.owner, body.explain, body.prefix)
    return json_reply(reply)


@router.post(
    "/{session_id}/fork", status_code=status.HTTP_201_CREATED, response_model=SessionResponse, responses=SESSION_ERRORS
)
async def fork(request: Request, session_id: str = SessionId) -> Response:
    """A new session holding a copy of this one's state and step."""
    ctx = caller(request)
    return json_reply(await ctx.manager.fork(session_id, ctx.owner), status.HTTP_201_CREATED)


@router.post("/{session_id}/rewind", response_model=SessionResponse, responses=SESSION_ERRORS)
async def rewind(body: RewindRequest, request: Request, session_id: str = SessionId) -> Response:
    """Restore exactly the state the session had after to_step tokens (undo words)."""
    ctx = caller(request)
    ctx.check_k(body.k)
    return json_reply(await ctx.manager.rewind(session_id, body.to_step, body.k, body.if_step, ctx.owner))


@router.post(
    "/{session_id}/generate",
    response_model=GenerateResponse,
    responses={
        **SESSION_ERRORS,
        200: {
            "description": "JSON, or with stream=true an SSE stream: one `word` event per word, then `done`",
            "content": {"text/event-stream": {"schema": SSE_EVENT}},
        },
    },
)
async def generate(body: GenerateRequest, request: Request, session_id: str = SessionId) -> Any:
    """Sample words from the session's state; the session advances through them."""
    ctx = caller(request)
    manager, settings, owner = ctx.manager, ctx.settings, ctx.owner
    if body.max_words > settings.max_generate_words:
        raise ValidationFailed(
            f"max_words is {body.max_words}; the largest allowed is {settings.max_generate_words}",
            field="max_words",
            limit=settings.max_generate_words,
        )
    options = GenerateOptions(body.max_words, body.temperature, body.top_k, body.top_p, body.seed)
    if not body.stream:
        return json_reply(await manager.generate(session_id, options, owner))
    await manager.info(session_id, owner)  # a missing session is a plain 404, not an empty stream
    metrics, where = request.app.state.metrics, request.url.path
    return EventSourceResponse(_event_stream(manager, session_id, options, owner, metrics, where))


async def _event_stream(
    manager: Any, session_id: str, options: GenerateOptions, owner: str, metrics: Metrics, where: str
) -> AsyncIterator[bytes]:
    async def run(queue: asyncio.Queue[bytes | None]) -> None:
        async def on_word(word: SampledWord, step: int) -> None:
            data = json.dumps({"word": word.word, "step": step})
            await queue.put(format_sse_event(data_str=data, event="word"))

        try:
            result = await manager.generate(session_id, options, owner, on_word=on_word)
            await queue.put(format_sse_event(data_str=json.dumps(result), event="done"))
        except Exception as exc:  # a domain error as itself, anything else as internal_error (and logged)
            await queue.put(format_sse_event(data_str=render(exc, metrics, where).body.decode(), event="error"))
        finally:
            await queue.put(None)

    async for item in event_pump(run):
        yield item
