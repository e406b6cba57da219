"""Hostile and malformed input, and the security promises (API keys, rate limit, CORS, no internals leaked),
against real server processes. Every refused request must leave the session exactly as it was."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as ws_connect

from service.store.redis import RedisStore
from tests.redis_server import RedisServer, replica_env, running_redis
from tests.servers import ServerProcess, running_server

KEY_A, KEY_B = "key-a-0123456789abcdef", "key-b-0123456789abcdef"


def error_code(response: httpx.Response) -> str:
    code: str = response.json()["error"]["code"]
    return code


def assert_clean(response: httpx.Response) -> None:
    """An error body with a stable code and nothing internal: no traceback, no source paths."""
    assert set(response.json()) == {"error"}
    assert {"code", "message"} <= set(response.json()["error"])
    for leak in ("Traceback", ".py", "/work", "site-packages", 'File "'):
        assert leak not in response.text


def create(server: ServerProcess, text: str = "i stay in", **kwargs: Any) -> str:
    response = httpx.post(f"{server.url}/v1/sessions", json={"text": text}, **kwargs)
    assert response.status_code == 201, response.text
    session_id: str = response.json()["session_id"]
    return session_id


def snapshot(server: ServerProcess, session_id: str, **kwargs: Any) -> tuple[int, list[dict[str, Any]]]:
    """The session's step and its next-word distribution (an empty step reads it without moving)."""
    info = httpx.get(f"{server.url}/v1/sessions/{session_id}", **kwargs)
    assert info.status_code == 200, info.text
    peek = httpx.post(f"{server.url}/v1/sessions/{session_id}/steps", json={"text": "", "k": 10}, **kwargs)
    assert peek.status_code == 200, peek.text
    assert peek.json()["step"] == info.json()["step"]
    return info.json()["step"], peek.json()["predictions"]


@pytest.fixture
def session(server: ServerProcess) -> Iterator[str]:
    """A fresh session on the shared server whose state must be the same after the test as before."""
    session_id = create(server)
    before = snapshot(server, session_id)
    yield session_id
    assert snapshot(server, session_id) == before


def steps_url(server: ServerProcess, session_id: str) -> str:
    return f"{server.url}/v1/sessions/{session_id}/steps"


# ----- bodies ---------------------------------------------------------------------------------------------


def test_a_body_over_the_limit_is_413_with_or_without_content_length(server: ServerProcess, session: str) -> None:
    big = json.dumps({"text": "i " * (600 << 10)}).encode()  # 1.2 MB > the default 1 MiB limit
    sized = httpx.post(steps_url(server, session), content=big, headers={"content-type": "application/json"})
    assert sized.status_code == 413
    assert error_code(sized) == "payload_too_large"
    assert_clean(sized)

    def chunks() -> Iterator[bytes]:  # a generator body is sent chunked: no Content-Length to refuse on
        for start in range(0, len(big), 64 << 10):
            yield big[start : start + (64 << 10)]

    chunked = httpx.post(steps_url(server, session), content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in chunked.request.headers
    assert chunked.status_code == 413
    assert error_code(chunked) == "payload_too_large"
    # A small chunked body is still read and served.
    small = httpx.post(
        f"{server.url}/v1/predict",
        content=iter([b'{"text": ', b'"i stay in"}']),
        headers={"content-type": "application/json"},
    )
    assert small.status_code == 200, small.text


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"{not json", 422, "validation_error"),
        (b'{"text": "i stay \xff\xfe in"}', 400, "bad_request"),  # invalid UTF-8
        (b'{"text": "i", "k": 1', 422, "validation_error"),  # truncated
        (b"[]", 422, "validation_error"),
        (b'"just a string"', 422, "validation_error"),
        (b'{"text": null}', 422, "validation_error"),
        (b'{"text": "i", "if_step": "soon"}', 422, "validation_error"),
        (b'{"text": "i", "unexpected": 1}', 422, "validation_error"),
    ],
)
def test_malformed_bodies_are_refused(server: ServerProcess, session: str, body: bytes, status: int, code: str) -> None:
    response = httpx.post(steps_url(server, session), content=body, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    assert error_code(response) == code
    assert_clean(response)


@pytest.mark.parametrize("text", ["\x00", "i stay\x1b[31m in", "\x7f", "a\x85b", "\ud800", "i\x08"])
def test_control_characters_are_refused(server: ServerProcess, session: str, text: str) -> None:
    body = json.dumps({"text": text})  # ASCII with \u escapes: a lone surrogate can be sent this way only
    response = httpx.post(steps_url(server, session), content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert error_code(response) == "validation_error"
    assert "control character" in response.json()["error"]["message"]


@pytest.mark.parametrize("k", [0, -1, -(2**63), 51, 10**9, 10**30, 1.5, "many", None, True])
def test_bad_k_is_refused(server: ServerProcess, session: str, k: object) -> None:
    response = httpx.post(steps_url(server, session), json={"text": "india", "k": k})
    assert response.status_code == 422, response.text
    assert error_code(response) == "validation_error"
    assert_clean(response)


def test_text_of_only_unknown_words_is_served_as_unknown(server: ServerProcess, session: str) -> None:
    a = httpx.post(f"{server.url}/v1/predict", json={"text": "zqxv blorptang"}).json()
    b = httpx.post(f"{server.url}/v1/predict", json={"text": "flibber wuzzle"}).json()
    assert a["unknown"] == ["zqxv", "blorptang"]
    assert a["tokens"] == 2
    assert a["predictions"] == b["predictions"]  # both are <unk> <unk>
    # On a session they are consumed as <unk> tokens (on a fork: the fixture's session must not move).
    fork = httpx.post(f"{server.url}/v1/sessions/{session}/fork").json()
    stepped = httpx.post(steps_url(server, fork["session_id"]), json={"text": "zqxv blorptang"}).json()
    assert stepped["step"] == fork["step"] + 2
    assert stepped["unknown"] == ["zqxv", "blorptang"]


def test_full_width_text_predicts_like_ascii(server: ServerProcess) -> None:
    """NFKC: full-width letters and ligatures are the same words."""
    ascii_text = httpx.post(f"{server.url}/v1/predict", json={"text": "i stay in finland", "k": 10}).json()
    wide = httpx.post(f"{server.url}/v1/predict", json={"text": "ｉ ｓｔａｙ ｉｎ ﬁｎｌａｎｄ", "k": 10}).json()
    assert wide == ascii_text
    a, b = create(server, "i speak"), create(server, "ｉ ｓｐｅａｋ")
    assert snapshot(server, a) == snapshot(server, b)


def test_a_10_mb_websocket_message_closes_with_1009(server: ServerProcess, session: str) -> None:
    with ws_connect(server.url.replace("http", "ws") + f"/v1/sessions/{session}/stream", max_size=None) as ws:
        with contextlib.suppress(ConnectionClosed):  # the send itself may already meet the close
            ws.send(json.dumps({"text": "i " * (5 << 20)}))
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=30)
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1009  # message too big
    assert httpx.get(f"{server.url}/healthz").status_code == 200


@pytest.mark.parametrize(
    ("session_id", "status", "code"),
    [
        ("short", 422, "validation_error"),
        ("x" * 100, 422, "validation_error"),
        ("bad$chars-0123456789abcdef", 422, "validation_error"),
        # Decoded, the id holds slashes: no route has a path of that shape.
        ("..%2F..%2Fetc%2Fpasswd", 404, "not_found"),
    ],
)
def test_a_session_id_of_the_wrong_shape_is_refused(
    server: ServerProcess, session_id: str, status: int, code: str
) -> None:
    for response in (
        httpx.get(f"{server.url}/v1/sessions/{session_id}"),
        httpx.post(f"{server.url}/v1/sessions/{session_id}/steps", json={"text": "i"}),
        httpx.delete(f"{server.url}/v1/sessions/{session_id}"),
    ):
        assert response.status_code == status, response.text
        assert error_code(response) == code
        assert_clean(response)
    well_formed = httpx.get(f"{server.url}/v1/sessions/{'A' * 32}")
    assert well_formed.status_code == 404
    assert error_code(well_formed) == "session_not_found"


# ----- a state written by another model ------------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_replica(
    tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServerProcess, RedisServer]]:
    with (
        running_redis(tmp_path_factory.mktemp("redis")) as redis,
        running_server(tiny_bundle, replica_env(redis)) as server,
    ):
        yield server, redis


def test_a_state_from_another_model_version_is_409_and_untouched(
    redis_replica: tuple[ServerProcess, RedisServer],
) -> None:
    server, redis = redis_replica
    session_id = create(server)
    key = RedisStore.key(session_id)
    client = redis.client()
    ours = client.hget(key, "model_version")
    client.hset(key, "model_version", "m-0000000000000000")
    before = client.hgetall(key)
    for method, path, body in (
        ("POST", "/steps", {"text": "india"}),
        ("POST", "/rewind", {"to_step": 1}),
        ("POST", "/generate", {"max_words": 2}),
        ("POST", "/fork", None),
    ):
        response = httpx.request(method, f"{server.url}/v1/sessions/{session_id}{path}", json=body)
        assert response.status_code == 409, (path, response.text)
        assert error_code(response) == "model_mismatch"
        assert_clean(response)
    assert client.hgetall(key) == before  # nothing was written
    client.hset(key, "model_version", ours or b"")
    assert httpx.post(f"{server.url}/v1/sessions/{session_id}/steps", json={"text": "india"}).json()["step"] == 4


def test_an_unreadable_record_is_409_not_500(redis_replica: tuple[ServerProcess, RedisServer]) -> None:
    server, redis = redis_replica
    session_id = create(server)
    redis.client().hset(RedisStore.key(session_id), "step", "NaN-ish")
    response = httpx.post(f"{server.url}/v1/sessions/{session_id}/steps", json={"text": "india"})
    assert response.status_code == 409
    assert error_code(response) == "model_mismatch"
    assert_clean(response)


# ----- API keys, rate limit, CORS ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed(tiny_bundle: Path) -> Iterator[ServerProcess]:
    env = {"CELLGATE_API_KEYS": f"{KEY_A},{KEY_B}", "CELLGATE_ACCESS_LOG": "false"}
    with running_server(tiny_bundle, env) as server:
        yield server


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_a_session_belongs_to_the_key_that_created_it(keyed: ServerProcess) -> None:
    session_id = create(keyed, headers=bearer(KEY_A))
    before = snapshot(keyed, session_id, headers=bearer(KEY_A))
    unknown = httpx.get(f"{keyed.url}/v1/sessions/{'Z' * 32}", headers={"X-API-Key": KEY_B})
    for method, path, body in (
        ("GET", "", None),
        ("POST", "/steps", {"text": "india"}),
        ("POST", "/fork", None),
        ("POST", "/rewind", {"to_step": 0}),
        ("DELETE", "", None),
    ):
        other = httpx.request(
            method, f"{keyed.url}/v1/sessions/{session_id}{path}", json=body, headers={"X-API-Key": KEY_B}
        )
        # Exactly what an unknown id gets: the id is no oracle for another key's sessions.
        assert other.status_code == unknown.status_code == 404
        assert error_code(other) == error_code(unknown) == "session_not_found"
    stream = keyed.url.replace("http", "ws") + f"/v1/sessions/{session_id}/stream"
    with ws_connect(stream, additional_headers={"X-API-Key": KEY_B}) as ws:
        assert json.loads(ws.recv(timeout=10))["error"]["code"] == "session_not_found"
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=10)
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 4404
    assert snapshot(keyed, session_id, headers=bearer(KEY_A)) == before


@pytest.mark.parametrize("headers", [{}, bearer("wrong"), {"X-API-Key": ""}, {"Authorization": f"Basic {KEY_A}"}])
def test_a_missing_or_wrong_key_is_401(keyed: ServerProcess, headers: dict[str, str]) -> None:
    for response in (
        httpx.post(f"{keyed.url}/v1/predict", json={"text": "i"}, headers=headers),
        httpx.post(f"{keyed.url}/v1/sessions", json={}, headers=headers),
        httpx.get(f"{keyed.url}/v1/model", headers=headers),
    ):
        assert response.status_code == 401
        assert error_code(response) == "unauthorized"
        assert_clean(response)
    with ws_connect(
        keyed.url.replace("http", "ws") + f"/v1/sessions/{'Z' * 32}/stream", additional_headers=headers
    ) as ws:
        assert json.loads(ws.recv(timeout=10))["error"]["code"] == "unauthorized"
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=10)
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 4401
    # Probes stay open: an orchestrator has no key.
    assert httpx.get(f"{keyed.url}/healthz").status_code == 200
    assert httpx.get(f"{keyed.url}/readyz").status_code == 200


def test_the_rate_limit_is_per_key_with_retry_after(tiny_bundle: Path) -> None:
    env = {
        "CELLGATE_API_KEYS": f"{KEY_A},{KEY_B}",
        "CELLGATE_RATE_LIMIT_PER_SECOND": "0.001",  # refills one request in ~17 minutes: only the burst counts
        "CELLGATE_RATE_LIMIT_BURST": "3",
        "CELLGATE_ACCESS_LOG": "false",
    }
    with running_server(tiny_bundle, env) as server:
        statuses = [
            httpx.post(f"{server.url}/v1/predict", json={"text": "i"}, headers=bearer(KEY_A)).status_code
            for _ in range(3)
        ]
        assert statuses == [200, 200, 200]
        limited = httpx.post(f"{server.url}/v1/predict", json={"text": "i"}, headers=bearer(KEY_A))
        assert limited.status_code == 429
        assert error_code(limited) == "rate_limited"
        assert limited.headers["retry-after"] == "1"
        assert_clean(limited)
        assert httpx.post(f"{server.url}/v1/predict", json={"text": "i"}, headers=bearer(KEY_B)).status_code == 200


def test_cors_is_closed_by_default(server: ServerProcess) -> None:
    origin = {"Origin": "https://evil.example"}
    preflight = httpx.options(f"{server.url}/v1/predict", headers={**origin, "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in preflight.headers
    simple = httpx.post(f"{server.url}/v1/predict", json={"text": "i"}, headers=origin)
    assert simple.status_code == 200
    assert "access-control-allow-origin" not in simple.headers


def test_without_keys_it_binds_to_loopback_and_says_so(server: ServerProcess) -> None:
    assert server.url.startswith("http://127.0.0.1:")
    assert any("no API keys configured" in line for line in server.log)
