"""Traffic that touches every counted path of a live service, so that /metrics shows every series it can."""

from __future__ import annotations

import json

import httpx
from websockets.sync.client import connect

TEXT = "i stay in india . it was cold today ."


def exercise(url: str) -> int:
    """Drive predict, sessions (step, replay, conflict, fork, rewind, generate, SSE, delete), WS and errors.

    Returns how many HTTP requests were sent (WebSocket messages not included).
    """
    sent = 0
    with httpx.Client(base_url=url, timeout=30) as client:

        def call(method: str, path: str, expected: int, body: object = None) -> httpx.Response:
            nonlocal sent
            sent += 1
            response = client.request(method, path, json=body)
            assert response.status_code == expected, (method, path, response.status_code, response.text)
            return response

        call("GET", "/healthz", 200)
        call("GET", "/readyz", 200)
        call("GET", "/v1/model", 200)
        call("POST", "/v1/predict", 200, {"text": TEXT + " i speak", "k": 3})
        created = call("POST", "/v1/sessions", 201, {"text": TEXT, "k": 3}).json()
        sid, step = created["session_id"], created["step"]
        stepped = call("POST", f"/v1/sessions/{sid}/steps", 200, {"text": "i speak", "if_step": step}).json()
        # The same request again is answered from the stored response (an idempotent replay) ...
        call("POST", f"/v1/sessions/{sid}/steps", 200, {"text": "i speak", "if_step": step})
        # ... while a stale if_step with other words is a step conflict.
        call("POST", f"/v1/sessions/{sid}/steps", 409, {"text": "hindi", "if_step": step - 1})
        fork = call("POST", f"/v1/sessions/{sid}/fork", 201).json()["session_id"]
        call("POST", f"/v1/sessions/{sid}/rewind", 200, {"to_step": step, "k": 3})
        call("POST", f"/v1/sessions/{sid}/generate", 200, {"max_words": 3, "seed": 1})
        streamed = call("POST", f"/v1/sessions/{fork}/generate", 200, {"max_words": 3, "seed": 1, "stream": True})
        assert "event: done" in streamed.text
        call("GET", f"/v1/sessions/{sid}", 200)
        call("DELETE", f"/v1/sessions/{fork}", 204)
        call("GET", f"/v1/sessions/{fork}", 404)
        call("GET", "/no/such/route", 404)
        call("POST", "/v1/predict", 422, {"text": TEXT, "k": 0})
        assert stepped["step"] > step

    ws_url = url.replace("http://", "ws://", 1) + f"/v1/sessions/{sid}/stream"
    with connect(ws_url, open_timeout=10, close_timeout=5) as ws:
        ws.send(json.dumps({"text": "i speak", "k": 3}))
        reply = json.loads(ws.recv(timeout=30))
        assert "step" in reply, reply
    return sent
