"""What model is being served."""

from __future__ import annotations

from fastapi import APIRouter, Request

from service.deps import caller
from service.schemas import ErrorResponse, ModelInfo

router = APIRouter(tags=["model"])


@router.get("/v1/model", response_model=ModelInfo, responses={401: {"model": ErrorResponse}})
async def model_info(request: Request) -> ModelInfo:
    caller(request)
    runner = request.app.state.runner
    manifest = runner.bundle.manifest
    return ModelInfo(
        version=runner.bundle.model_version,
        vocab_size=runner.vocab_size,
        layers=runner.layers,
        hidden_size=runner.hidden_size,
        providers=runner.providers,
        quantized=runner.bundle.quantized,
        metrics=manifest.get("training", {}).get("metrics", {}),
    )
