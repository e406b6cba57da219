"""A Hypothesis state machine over create / step / retry / stale step / fork / delete / expire, driven over
HTTP against two real replicas sharing a real redis-server, checked after every rule against a reference
model (which sessions exist, at which step, what a retry must replay) and, for every number the service
returns, against a single-process reference server (in-memory store) given the same operations."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, multiple, rule, run_state_machine_as_test

from service.store.redis import RedisStore
from tests.redis_server import RedisServer
from tests.servers import ServerProcess

K = 8


@dataclass
class Session:
    """The reference model of one session."""

    session_id: str  # on the replicas
    reference_id: str  # the same session on the reference server
    step: int
    alive: bool = True
    last: tuple[dict[str, Any], dict[str, Any]] | None = None  # the last applied step: request, response


def test_sessions_behave_like_the_reference_model(
    tiny_bundle: Path, replicas: tuple[ServerProcess, ServerProcess], redis_server: RedisServer, server: ServerProcess
) -> None:
    words = [w for w in json.loads((tiny_bundle / "vocab.json").read_text())["words"] if not w.startswith("<")]
    texts = st.lists(st.sampled_from(words), min_size=1, max_size=4).map(" ".join)
    maybe_empty = st.one_of(st.just(""), texts)
    replica = st.sampled_from(replicas)
    redis = redis_server.client()
    http = httpx.Client(timeout=30)

    def post(target: ServerProcess, path: str, body: dict[str, Any] | None = None) -> httpx.Response:
        return http.post(f"{target.url}{path}", json=body)

    def same(got: httpx.Response, want: httpx.Response) -> None:
        assert got.status_code == want.status_code, (got.text, want.text)
        assert got.json()["step"] == want.json()["step"]
        assert got.json()["predictions"] == want.json()["predictions"]  # bit for bit

    def gone(response: httpx.Response) -> None:
        assert response.status_code == 404, response.text
        assert response.json()["error"]["code"] == "session_not_found"

    class Sessions(RuleBasedStateMachine):
        sessions = Bundle("sessions")

        @rule(target=sessions, text=maybe_empty, at=replica)
        def create(self, text: str, at: ServerProcess) -> Session:
            got = post(at, "/v1/sessions", {"text": text, "k": K})
            want = post(server, "/v1/sessions", {"text": text, "k": K})
            assert got.status_code == 201, got.text
            same(got, want)
            return Session(got.json()["session_id"], want.json()["session_id"], got.json()["step"])

        @rule(session=sessions, text=texts, at=replica)
        def step(self, session: Session, text: str, at: ServerProcess) -> None:
            body = {"text": text, "k": K, "if_step": session.step}
            got = post(at, f"/v1/sessions/{session.session_id}/steps", body)
            if not session.alive:
                gone(got)
                return
            same(got, post(server, f"/v1/sessions/{session.reference_id}/steps", body))
            assert got.json()["step"] == session.step + len(text.split())
            session.step = got.json()["step"]
            session.last = (body, got.json())

        @rule(session=sessions, at=replica)
        def retry(self, session: Session, at: ServerProcess) -> None:
            """The last step again, as a client that lost the answer would: replayed, not reapplied."""
            if session.last is None:
                return
            body, first_answer = session.last
            got = post(at, f"/v1/sessions/{session.session_id}/steps", body)
            if not session.alive:
                gone(got)
                return
            assert got.status_code == 200, got.text
            assert got.json() == first_answer

        @rule(session=sessions, text=texts, at=replica)
        def stale_step(self, session: Session, text: str, at: ServerProcess) -> None:
            got = post(at, f"/v1/sessions/{session.session_id}/steps", {"text": text, "if_step": session.step + 1})
            if not session.alive:
                gone(got)
                return
            assert got.status_code == 409, got.text
            assert got.json()["error"]["code"] == "step_conflict"
            assert got.json()["error"]["current_step"] == session.step

        @rule(target=sessions, session=sessions, at=replica)
        def fork(self, session: Session, at: ServerProcess) -> Any:
            got = post(at, f"/v1/sessions/{session.session_id}/fork")
            if not session.alive:
                gone(got)
                return multiple()
            want = post(server, f"/v1/sessions/{session.reference_id}/fork")
            assert got.status_code == 201, got.text
            same(got, want)
            assert got.json()["session_id"] != session.session_id
            return Session(got.json()["session_id"], want.json()["session_id"], session.step)

        @rule(session=sessions, at=replica)
        def delete(self, session: Session, at: ServerProcess) -> None:
            got = http.delete(f"{at.url}/v1/sessions/{session.session_id}")
            if not session.alive:
                gone(got)
                return
            assert got.status_code == 204, got.text
            assert http.delete(f"{server.url}/v1/sessions/{session.reference_id}").status_code == 204
            session.alive = False

        @rule(session=sessions)
        def expire(self, session: Session) -> None:
            """Its TTL runs out: Redis drops the key (shortened to 1 ms here rather than waited for)."""
            key = RedisStore.key(session.session_id)
            if not session.alive:
                assert redis.exists(key) == 0
                return
            assert redis.pexpire(key, 1)
            deadline = time.monotonic() + 10
            while redis.exists(key):  # EXISTS expires the key itself once its time has passed
                assert time.monotonic() < deadline, "the key never expired"
            assert http.delete(f"{server.url}/v1/sessions/{session.reference_id}").status_code == 204
            session.alive = False

        @rule(session=sessions, at=replica)
        def inspect(self, session: Session, at: ServerProcess) -> None:
            got = http.get(f"{at.url}/v1/sessions/{session.session_id}")
            if not session.alive:
                gone(got)
                return
            assert got.status_code == 200, got.text
            assert got.json()["step"] == session.step

    try:
        run_state_machine_as_test(
            Sessions,
            settings=settings(
                max_examples=15,
                stateful_step_count=20,
                deadline=None,
                derandomize=True,
                suppress_health_check=list(HealthCheck),
            ),
        )
    finally:
        http.close()
