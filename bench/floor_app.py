"""The framework floor: the same request/response models as a session step, answering a constant.

Served by the same uvicorn settings as cellgate, it shows what FastAPI + uvicorn cost on their own; its
WebSocket stream is the same for streaming: each message parsed and validated as a step, a constant
answer of a step's shape sent back (the echo floor of bench/ws_load.py).
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI, WebSocket, WebSocketDisconnect

from service.schemas import SessionResponse, StepRequest

app = FastAPI()
_CONSTANT: dict[str, Any] = {
    "session_id": "floor-0000000000000000",
    "step": 1,
    "predictions": [{"word": w, "prob": 0.1} for w in ("the", "a", "of", "and", "to")],
    "expires_at": 0.0,
    "unknown": [],
}


@app.post("/v1/sessions/{session_id}/steps", response_model=SessionResponse)
async def step(session_id: str, body: StepRequest) -> dict[str, Any]:
    return _CONSTANT


@app.post("/v1/sessions", status_code=201, response_model=SessionResponse)
async def create() -> dict[str, Any]:
    return _CONSTANT


@app.websocket("/v1/sessions/{session_id}/stream")
async def stream(websocket: WebSocket, session_id: str) -> None:
    await websocket.accept()
    reply = json.dumps(_CONSTANT)
    try:
        while True:
            StepRequest.model_validate_json(await websocket.receive_text())
            await websocket.send_text(reply)
    except WebSocketDisconnect:
        pass
