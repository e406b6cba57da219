"""The naive baseline a tutorial would build: PyTorch eager in FastAPI, one request at a time,
state in a dict. Set NAIVE_CHECKPOINT to a checkpoint directory."""

from __future__ import annotations

import os
import secrets
import threading
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI

from model.checkpoint import load_checkpoint
from model.lm import LSTMState
from service.schemas import CreateSessionRequest, SessionResponse, StepRequest

torch.set_num_threads(1)
_ckpt = load_checkpoint(Path(os.environ["NAIVE_CHECKPOINT"]))
_model = _ckpt.build_model()
_vocab = _ckpt.vocab
_states: dict[str, tuple[LSTMState, int]] = {}
_lock = threading.Lock()  # one request at a time
app = FastAPI()


def _advance(text: str, state: LSTMState | None, k: int) -> tuple[LSTMState, list[dict[str, Any]], int]:
    ids, _ = _vocab.encode(text)
    with torch.no_grad():
        if ids:
            logits, state = _model(torch.tensor([ids]), state)
            last = logits[0, -1]
        else:
            state = state or _model.zero_state(1)
            last = _model.decode(state.hidden[-1, 0])
        probs = last.softmax(-1)
        probs[[0, 1]] = 0
        top = probs.topk(k)
    words = [{"word": _vocab.words[i], "prob": float(p)} for p, i in zip(top.values, top.indices, strict=True)]
    return state, words, len(ids)


@app.post("/v1/sessions", status_code=201, response_model=SessionResponse)
def create(body: CreateSessionRequest) -> dict[str, Any]:
    with _lock:
        state, predictions, n = _advance(body.text, None, body.k)
        sid = secrets.token_urlsafe(24)
        _states[sid] = (state, n)
    return {"session_id": sid, "step": n, "predictions": predictions, "expires_at": 0.0}


@app.post("/v1/sessions/{session_id}/steps", response_model=SessionResponse)
def step(session_id: str, body: StepRequest) -> dict[str, Any]:
    with _lock:
        state, step = _states[session_id]
        state, predictions, n = _advance(body.text, state, body.k)
        _states[session_id] = (state, step + n)
    return {"session_id": session_id, "step": step + n, "predictions": predictions, "expires_at": 0.0}
