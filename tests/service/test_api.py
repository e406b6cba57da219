"""Every endpoint and error code of the HTTP API, against a real uvicorn process."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests.servers import ServerProcess


def post(server: ServerProcess, path: str, body: Any = None, **kwargs: Any) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=30, **kwargs)


def create(server: ServerProcess, text: str = "", k: int = 5) -> dict[str, Any]:
    response = post(server, "/v1/sessions", {"text": text, "k": k})
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def error_code(response: httpx.Response) -> str:
    code: str = response.json()["error"]["code"]
    return code


def test_health_and_readiness(server: ServerProcess) -> None:
    assert httpx.get(f"{server.url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{server.url}/readyz")
    assert ready.status_code == 200


def test_model_info(server: ServerProcess) -> None:
    response = httpx.get(f"{server.url}/v1/model")
    assert response.status_code == 200
    info = response.json()
    assert info["version"].startswith("m-")
    assert info["layers"] == 2
    assert info["hidden_size"] == 32
    assert info["providers"] == ["CPUExecutionProvider"]
    assert info["quantized"] is None
    assert info["vocab_size"] > 50


def test_predict_is_sorted_and_excludes_specials(server: ServerProcess) -> None:
    response = post(server, "/v1/predict", {"text": "i stay in", "k": 20})
    assert response.status_code == 200
    body = response.json()
    probs = [p["prob"] for p in body["predictions"]]
    assert len(probs) == 20
    assert probs == sorted(probs, reverse=True)
    assert not {"<unk>", "<pad>"} & {p["word"] for p in body["predictions"]}
    assert body["tokens"] == 3
    assert body["unknown"] == []


def test_predict_reports_unknown_words(server: ServerProcess) -> None:
    body = post(server, "/v1/predict", {"text": "i stay in zanzibar and xylophone"}).json()
    assert body["unknown"] == ["zanzibar", "xylophone"]
    assert body["tokens"] == 6


def test_predict_is_stateless(server: ServerProcess) -> None:
    first = post(server, "/v1/predict", {"text": "we cooked the"}).json()
    post(server, "/v1/predict", {"text": "i stay in india ."})
    assert post(server, "/v1/predict", {"text": "we cooked the"}).json() == first


@pytest.mark.parametrize("k", [0, -1, 51, 10**9])
def test_k_out_of_range_is_422(server: ServerProcess, k: int) -> None:
    response = post(server, "/v1/predict", {"text": "i", "k": k})
    assert response.status_code == 422
    assert error_code(response) == "validation_error"
    assert "k" in response.json()["error"]["message"]


def test_validation_errors_have_stable_shape(server: ServerProcess) -> None:
    for body in ({}, {"text": 3}, {"text": "a", "extra": 1}, [1, 2]):
        response = post(server, "/v1/predict", body)
        assert response.status_code == 422, body
        assert error_code(response) == "validation_error"
        assert "Traceback" not in response.text
    bad_json = httpx.post(
        f"{server.url}/v1/predict", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert bad_json.status_code == 422
    assert error_code(bad_json) == "validation_error"


def test_input_too_long_is_413(server: ServerProcess) -> None:
    response = post(server, "/v1/predict", {"text": "the " * 2049})
    assert response.status_code == 413
    assert error_code(response) == "input_too_long"


def test_unknown_route_and_method(server: ServerProcess) -> None:
    missing = httpx.get(f"{server.url}/v1/nothing")
    assert missing.status_code == 404
    assert error_code(missing) == "not_found"
    wrong = httpx.put(f"{server.url}/v1/predict")
    assert wrong.status_code == 405
    assert error_code(wrong) == "method_not_allowed"


def test_session_lifecycle(server: ServerProcess) -> None:
    created = create(server, "i stay in india .")
    sid = created["session_id"]
    assert created["step"] == 5
    assert len(sid) >= 22  # 128+ bits, URL-safe base64
    info = httpx.get(f"{server.url}/v1/sessions/{sid}").json()
    assert info["step"] == 5
    assert info["model_version"].startswith("m-")
    assert info["expires_at"] > info["last_used_at"] >= info["created_at"]
    stepped = post(server, f"/v1/sessions/{sid}/steps", {"text": "i speak", "if_step": 5})
    assert stepped.status_code == 200
    assert stepped.json()["step"] == 7
    deleted = httpx.delete(f"{server.url}/v1/sessions/{sid}")
    assert deleted.status_code == 204
    gone = httpx.get(f"{server.url}/v1/sessions/{sid}")
    assert gone.status_code == 404
    assert error_code(gone) == "session_not_found"
    assert httpx.delete(f"{server.url}/v1/sessions/{sid}").status_code == 404
    assert post(server, f"/v1/sessions/{sid}/steps", {"text": "x"}).status_code == 404


def test_malformed_session_id_is_rejected(server: ServerProcess) -> None:
    for sid in ("short", "x" * 100, "bad$chars-0123456789abcdef"):
        response = httpx.get(f"{server.url}/v1/sessions/{sid}")
        assert response.status_code == 422, sid
        assert error_code(response) == "validation_error"
        assert "session_id" in response.json()["error"]["message"]


def test_exactly_once_retry_replays_and_conflicts(server: ServerProcess) -> None:
    sid = create(server, "i stay in")["session_id"]
    first = post(server, f"/v1/sessions/{sid}/steps", {"text": "japan .", "if_step": 3})
    assert first.status_code == 200
    retry = post(server, f"/v1/sessions/{sid}/steps", {"text": "japan .", "if_step": 3})
    assert retry.status_code == 200
    assert retry.json() == first.json()  # the stored response, state not moved
    assert httpx.get(f"{server.url}/v1/sessions/{sid}").json()["step"] == 5
    other = post(server, f"/v1/sessions/{sid}/steps", {"text": "france .", "if_step": 3})
    assert other.status_code == 409
    assert error_code(other) == "step_conflict"
    assert other.json()["error"]["current_step"] == 5
    assert httpx.get(f"{server.url}/v1/sessions/{sid}").json()["step"] == 5
    unconditional = post(server, f"/v1/sessions/{sid}/steps", {"text": "it"})
    assert unconditional.json()["step"] == 6


def test_rejected_requests_change_nothing(server: ServerProcess) -> None:
    sid = create(server, "i stay in")["session_id"]
    before = post(server, f"/v1/sessions/{sid}/steps", {"text": "", "k": 5}).json()
    for body in ({"text": "the " * 2049}, {"text": "a", "k": 0}, {"text": "a", "if_step": 99}, {"text": "\x00"}):
        assert post(server, f"/v1/sessions/{sid}/steps", body).status_code >= 400
    after = post(server, f"/v1/sessions/{sid}/steps", {"text": "", "k": 5}).json()
    assert after["step"] == before["step"] == 3
    assert after["predictions"] == before["predictions"]


def test_fork_is_independent(server: ServerProcess) -> None:
    parent = create(server, "i stay in india .")
    child = post(server, f"/v1/sessions/{parent['session_id']}/fork")
    assert child.status_code == 201
    child_body = child.json()
    assert child_body["session_id"] != parent["session_id"]
    assert child_body["step"] == parent["step"]
    assert child_body["predictions"] == parent["predictions"]
    a = post(server, f"/v1/sessions/{child_body['session_id']}/steps", {"text": "it was cold ."}).json()
    b = post(server, f"/v1/sessions/{parent['session_id']}/steps", {"text": "", "k": 5}).json()
    assert a["step"] == parent["step"] + 4
    assert b["step"] == parent["step"]
    assert b["predictions"] == parent["predictions"]


def test_generate_is_deterministic_for_a_seed(server: ServerProcess) -> None:
    a = create(server, "i stay in spain .")
    b = post(server, f"/v1/sessions/{a['session_id']}/fork").json()
    body = {"max_words": 8, "temperature": 0.8, "top_k": 10, "top_p": 0.9, "seed": 7}
    ga = post(server, f"/v1/sessions/{a['session_id']}/generate", body).json()
    gb = post(server, f"/v1/sessions/{b['session_id']}/generate", body).json()
    assert ga["words"] == gb["words"]
    assert len(ga["words"]) == 8
    assert ga["step"] == a["step"] + 8
    assert httpx.get(f"{server.url}/v1/sessions/{a['session_id']}").json()["step"] == ga["step"]
    too_many = post(server, f"/v1/sessions/{a['session_id']}/generate", {"max_words": 10_000})
    assert too_many.status_code == 422


def test_generate_streams_server_sent_events(server: ServerProcess) -> None:
    sid = create(server, "i stay in italy .")["session_id"]
    events: list[tuple[str, dict[str, Any]]] = []
    with httpx.stream(
        "POST", f"{server.url}/v1/sessions/{sid}/generate", json={"max_words": 4, "seed": 3, "stream": True}
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        event = ""
        for line in response.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                events.append((event, json.loads(line[6:])))
    kinds = [e for e, _ in events]
    assert kinds == ["word"] * 4 + ["done"]
    done = events[-1][1]
    assert done["words"] == [d["word"] for _, d in events[:4]]
    assert [d["step"] for _, d in events[:4]] == [6, 7, 8, 9]
    assert httpx.get(f"{server.url}/v1/sessions/{sid}").json()["step"] == 9
    # The same seed from the same state gives the same words without streaming.
    replay = create(server, "i stay in italy .")["session_id"]
    plain = post(server, f"/v1/sessions/{replay}/generate", {"max_words": 4, "seed": 3}).json()
    assert plain["words"] == done["words"]


def test_step_with_explain_returns_gates(server: ServerProcess) -> None:
    sid = create(server)["session_id"]
    body = post(server, f"/v1/sessions/{sid}/steps", {"text": "i stay in", "explain": True}).json()
    explain = body["explain"]
    assert explain["words"] == ["i", "stay", "in"]
    for gate in ("forget_gate", "input_gate", "output_gate", "cell"):
        values = explain[gate]
        assert len(values) == 3  # tokens
        assert len(values[0]) == 2  # layers
        assert len(values[0][0]) == 32  # hidden units
    flat = [v for t in explain["forget_gate"] for layer in t for v in layer]
    assert all(0.0 <= v <= 1.0 for v in flat)


def test_openapi_documents_every_route_and_error(server: ServerProcess) -> None:
    schema = httpx.get(f"{server.url}/openapi.json").json()
    paths = schema["paths"]
    for path in (
        "/v1/predict",
        "/v1/sessions",
        "/v1/sessions/{session_id}",
        "/v1/sessions/{session_id}/steps",
        "/v1/sessions/{session_id}/fork",
        "/v1/sessions/{session_id}/rewind",
        "/v1/sessions/{session_id}/generate",
        "/v1/model",
        "/healthz",
        "/readyz",
    ):
        assert path in paths, path
    step_responses = paths["/v1/sessions/{session_id}/steps"]["post"]["responses"]
    assert {"200", "404", "409", "413", "422", "503"} <= set(step_responses)


def test_request_id_is_echoed(server: ServerProcess) -> None:
    response = httpx.get(f"{server.url}/healthz", headers={"X-Request-ID": "abc-123"})
    assert response.headers["x-request-id"] == "abc-123"
    generated = httpx.get(f"{server.url}/healthz").headers["x-request-id"]
    assert len(generated) == 16
