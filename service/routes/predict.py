"""Stateless next-word prediction."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from service.deps import caller, json_reply
from service.schemas import ErrorResponse, PredictRequest, PredictResponse

router = APIRouter(tags=["predict"])

ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "The body could not be read as UTF-8 JSON (bad_request)"},
    401: {"model": ErrorResponse, "description": "Missing or wrong API key"},
    413: {"model": ErrorResponse, "description": "Body or text too long (payload_too_large, input_too_long)"},
    422: {"model": ErrorResponse, "description": "Invalid body (validation_error)"},
    429: {"model": ErrorResponse, "description": "Rate limited"},
    503: {"model": ErrorResponse, "description": "Overloaded or store unavailable; see Retry-After"},
}


@router.post("/v1/predict", response_model=PredictResponse, responses=ERRORS)
async def predict(body: PredictRequest, request: Request) -> Response:
    """Next-word suggestions for text, run from a zero state (no session)."""
    ctx = caller(request)
    ctx.check_k(body.k)
    return json_reply(await ctx.manager.predict(body.text, body.k, body.prefix))
