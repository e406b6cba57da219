"""OpenAI-style `GET /v1/models` and `POST /v1/completions`: the same SessionManager `complete` and the same
sampler as /generate, in the wire format the `openai` client speaks (SSE chunks ending in `data: [DONE]`).

Stateless by default (the prompt from a zero state, nothing stored); with the extension field `session_id` the
completion continues that session, which advances through the prompt and the words. `user` is OpenAI's
end-user tag and is not a session id: clients set it for abuse tracking, and reading it as one would turn
each of their requests into a 404.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.sse import EventSourceResponse, format_sse_event

from service.catalog import ServedModel
from service.deps import Caller, caller, catalog, event_pump
from service.errors import ValidationFailed, render
from service.protocols import openai as wire
from service.sampling import GenerateOptions, SampledWord
from service.sessions import Continuation

router = APIRouter(prefix="/v1", tags=["openai"])
ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": wire.OpenAIError, "description": "Invalid or unsupported parameters (BadRequestError)"},
    401: {"model": wire.OpenAIError, "description": "Missing or wrong API key (AuthenticationError)"},
    404: {"model": wire.OpenAIError, "description": "Unknown model or session (NotFoundError)"},
    409: {"model": wire.OpenAIError, "description": "The session changed meanwhile, or holds another model's state"},
    413: {"model": wire.OpenAIError, "description": "Body or prompt too long"},
    429: {"model": wire.OpenAIError, "description": "Rate limited (RateLimitError)"},
    503: {"model": wire.OpenAIError, "description": "Overloaded or store unavailable; see Retry-After"},
}
SSE_CHUNK = {
    "type": "object",
    "properties": {"data": {"type": "string", "description": "A completion chunk as JSON, or [DONE] last"}},
    "required": ["data"],
}


def _card(model: ServedModel) -> wire.ModelCard:
    return wire.ModelCard(id=model.name, created=model.created, owned_by="cellgate")


@router.get("/models", response_model=wire.ModelList, responses=ERRORS, summary="Models (OpenAI-style)")
async def list_models(request: Request) -> wire.ModelList:
    caller(request)
    return wire.ModelList(data=[_card(m) for m in catalog(request).models()])


@router.get("/models/{model_id}", response_model=wire.ModelCard, responses=ERRORS, summary="One model")
async def get_model(request: Request, model_id: str) -> wire.ModelCard:
    caller(request)
    return _card(catalog(request).resolve(model_id))


@router.post(
    "/completions",
    response_model=wire.CompletionResponse,
    responses={
        **ERRORS,
        200: {
            "description": "JSON, or with stream=true Server-Sent Events: one chunk per word, then [DONE]",
            "content": {"text/event-stream": {"schema": SSE_CHUNK}},
        },
    },
    summary="Completions (OpenAI-style), sampled word by word from the LSTM",
)
async def completions(body: wire.CompletionRequest, request: Request) -> Any:
    ctx = caller(request)
    model = catalog(request).resolve(body.model)
    options = _options(body, ctx)
    prompts = body.prompts()
    if body.session_id is not None:
        await model.manager.info(body.session_id, ctx.owner)  # a missing session is a plain 404, before any stream
        if len(prompts) != 1:
            raise ValidationFailed("with session_id, prompt must be one text", field="prompt")
    head = {"id": f"cmpl-{secrets.token_hex(12)}", "object": "text_completion", "created": int(time.time())}
    head["model"] = body.model
    if body.stream:
        usage = body.stream_options is not None and body.stream_options.include_usage
        return EventSourceResponse(_stream(ctx, model, body, prompts, options, head, usage))
    done: list[tuple[Continuation, wire.ChoiceText]] = []
    for prompt in prompts:
        text = wire.ChoiceText(options.stop)
        completion = await model.manager.continue_text(prompt, options, ctx.owner, body.session_id, _adder(text))
        done.append((completion, text))
    choices = []
    for i, (completion, text) in enumerate(done):
        text.finish(completion.sampled.text)
        choice = {"index": i, "text": completion.sampled.text, "logprobs": _logprobs(body, text.released)}
        choices.append(choice | {"finish_reason": completion.sampled.finish_reason})
    response = {**head, "choices": choices, "usage": _usage([c for c, _ in done])}
    if body.session_id is not None:
        response |= {"session_id": body.session_id, "step": done[0][0].step}
    return Response(json.dumps(response), media_type="application/json")


def _options(body: wire.CompletionRequest, ctx: Caller) -> GenerateOptions:
    settings = ctx.settings
    max_tokens = 16 if body.max_tokens is None else body.max_tokens
    if max_tokens > settings.max_generate_words:
        raise ValidationFailed(
            f"max_tokens is {max_tokens}; the largest allowed is {settings.max_generate_words}",
            field="max_tokens",
            limit=settings.max_generate_words,
        )
    logprobs = body.logprobs or 0
    if logprobs > settings.max_k:
        raise ValidationFailed(
            f"logprobs is {logprobs}; the largest allowed is {settings.max_k}", field="logprobs", limit=settings.max_k
        )
    temperature = 1.0 if body.temperature is None else body.temperature
    top_p = 1.0 if body.top_p is None else body.top_p
    return GenerateOptions(max_tokens, temperature, body.top_k, top_p, body.seed, body.stops(), logprobs)


def _adder(text: wire.ChoiceText) -> Any:
    async def on_word(word: SampledWord, step: int) -> None:
        text.add(word)

    return on_word


def _logprobs(body: wire.CompletionRequest, released: list[tuple[SampledWord, str, int]]) -> dict[str, Any] | None:
    return None if body.logprobs is None else wire.logprobs_of(released).model_dump()


def _usage(done: list[Continuation]) -> dict[str, int]:
    prompt = sum(c.prompt_tokens for c in done)
    generated = sum(len(c.sampled.ids) for c in done)
    return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}


async def _stream(
    ctx: Caller,
    model: ServedModel,
    body: wire.CompletionRequest,
    prompts: list[str],
    options: GenerateOptions,
    head: dict[str, Any],
    usage: bool,
) -> AsyncIterator[bytes]:
    """One chunk per word as soon as no stop sequence can still swallow it, a last chunk per choice with its
    finish_reason, the usage if asked for, then [DONE]. An error mid-stream is a chunk {"error": ...}."""

    def chunk(index: int, text: str, logprobs: dict[str, Any] | None, finish: str | None) -> bytes:
        choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
        return format_sse_event(data_str=json.dumps({**head, "choices": [choice]}))

    async def run(queue: asyncio.Queue[bytes | None]) -> None:
        done: list[Continuation] = []
        try:
            for index, prompt in enumerate(prompts):
                text = wire.ChoiceText(options.stop)

                async def on_word(word: SampledWord, step: int, text: wire.ChoiceText = text, i: int = index) -> None:
                    for released in text.add(word):
                        await queue.put(chunk(i, released[1], _logprobs(body, [released]), None))

                completion = await model.manager.continue_text(prompt, options, ctx.owner, body.session_id, on_word)
                for released in text.finish(completion.sampled.text):
                    await queue.put(chunk(index, released[1], _logprobs(body, [released]), None))
                await queue.put(chunk(index, "", None, completion.sampled.finish_reason))
                done.append(completion)
            if usage:
                await queue.put(format_sse_event(data_str=json.dumps({**head, "choices": [], "usage": _usage(done)})))
        except Exception as exc:  # a domain error as itself, anything else as internal_error (and logged)
            rendered = render(exc, model.manager.metrics, "/v1/completions")  # counted, in OpenAI's shape
            await queue.put(format_sse_event(data_str=rendered.body.decode()))
        finally:
            await queue.put(format_sse_event(data_str="[DONE]"))
            await queue.put(None)

    async for item in event_pump(run):
        yield item
