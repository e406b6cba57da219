"""SessionManager semantics with the real runner: streaming equals one pass, TTL, LRU, rewind."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model.corpus import longrange_text
from service.errors import HistoryExhausted, StepConflict
from service.store.base import SessionRecord
from service.store.memory import MemoryStore
from tests.servers import running_server
from tests.service.harness import service_core, stored_state

WORDS = longrange_text(seed=5, episodes=30, gap_max=30).split()


@st.composite
def split_text(draw: st.DrawFn) -> tuple[list[str], list[int]]:
    start = draw(st.integers(0, len(WORDS) - 60))
    length = draw(st.integers(1, 60))
    words = WORDS[start : start + length]
    cuts = sorted(draw(st.sets(st.integers(1, max(1, length - 1)), max_size=8)))
    return words, [c for c in cuts if c < length]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=split_text())
def test_steps_equal_one_stateless_pass(tiny_bundle: Path, case: tuple[list[str], list[int]]) -> None:
    """Any split of a text into steps gives the predictions and (h, C) of one pass over it."""
    words, cuts = case
    pieces = [" ".join(words[a:b]) for a, b in zip([0, *cuts], [*cuts, len(words)], strict=True)]

    async def scenario() -> None:
        async with service_core(tiny_bundle) as manager:
            whole = await manager.create(" ".join(words), 10, owner="")
            h_whole, c_whole = await stored_state(manager, whole["session_id"])
            session = await manager.create(pieces[0], 10, owner="")
            last = session
            for piece in pieces[1:]:
                last = await manager.step(session["session_id"], piece, 10, last["step"], owner="")
            assert last["step"] == whole["step"] == len(words)
            h, c = await stored_state(manager, session["session_id"])
            np.testing.assert_allclose(h, h_whole, atol=1e-5)
            np.testing.assert_allclose(c, c_whole, atol=1e-5, rtol=1e-5)
            assert [p["word"] for p in last["predictions"]] == [p["word"] for p in whole["predictions"]]
            for got, want in zip(last["predictions"], whole["predictions"], strict=True):
                assert got["prob"] == pytest.approx(want["prob"], abs=1e-5)

    asyncio.run(scenario())


def _record(session_id: str, used_at: float) -> SessionRecord:
    return SessionRecord(session_id, "", "m-x", 0, 0, b"", used_at, used_at)


def test_memory_store_expires_idle_sessions() -> None:
    now = [1000.0]
    ended: list[str] = []
    from service.store.base import StoreEvents

    store = MemoryStore(ttl_seconds=60, max_sessions=10, events=StoreEvents(ended.append), clock=lambda: now[0])

    async def scenario() -> None:
        await store.create(_record("a", 1000.0))
        await store.create(_record("b", 1030.0))
        now[0] = 1070.0  # a idle 70 s > 60, b idle 40 s
        assert store.sweep() == 1
        assert await store.get("a") is None
        assert await store.get("b") is not None
        now[0] = 1100.0  # b idle exactly 70 s: expired on read even before a sweep
        assert await store.get("b") is None
        assert await store.count() == 0

    asyncio.run(scenario())
    assert ended == ["expired", "expired"]


def test_memory_store_evicts_least_recently_used() -> None:
    ended: list[str] = []
    from service.store.base import StoreEvents

    store = MemoryStore(ttl_seconds=60, max_sessions=2, events=StoreEvents(ended.append), clock=lambda: 0.0)

    async def scenario() -> None:
        await store.create(_record("a", 0.0))
        await store.create(_record("b", 0.0))
        a = await store.get("a")
        assert a is not None
        assert await store.replace(a.evolve(step=1), a.revision)  # a written after b: b is now least recent
        await store.create(_record("c", 0.0))
        assert await store.get("b") is None
        assert await store.get("a") is not None
        assert await store.get("c") is not None

    asyncio.run(scenario())
    assert ended == ["evicted_capacity"]


def test_compare_and_set_refuses_a_stale_revision() -> None:
    store = MemoryStore(ttl_seconds=60, max_sessions=2, clock=lambda: 0.0)

    async def scenario() -> None:
        await store.create(_record("a", 0.0))
        first = await store.get("a")
        assert first is not None
        assert await store.replace(first.evolve(step=3), first.revision)
        assert not await store.replace(first.evolve(step=4), first.revision)  # written on a stale read
        current = await store.get("a")
        assert current is not None
        assert current.step == 3

    asyncio.run(scenario())


def test_capacity_eviction_on_a_real_server(tiny_bundle: Path) -> None:
    with running_server(tiny_bundle, {"CELLGATE_MAX_SESSIONS": "3"}) as server:
        ids = [httpx.post(f"{server.url}/v1/sessions", json={}).json()["session_id"] for _ in range(4)]
        assert httpx.get(f"{server.url}/v1/sessions/{ids[0]}").status_code == 404
        assert all(httpx.get(f"{server.url}/v1/sessions/{i}").status_code == 200 for i in ids[1:])
        metrics = httpx.get(f"{server.url}/metrics").text
        assert 'cellgate_sessions_ended_total{reason="evicted_capacity"} 1.0' in metrics
        assert "cellgate_sessions_created_total 4.0" in metrics


def test_rewind_restores_exact_state(tiny_bundle: Path) -> None:
    async def scenario() -> None:
        async with service_core(tiny_bundle, session_history=8) as manager:
            s = await manager.create("i stay in", 5, owner="")
            sid = s["session_id"]
            h3, c3 = await stored_state(manager, sid)
            await manager.step(sid, "india .", 5, None, owner="")
            await manager.step(sid, "it was", 5, None, owner="")
            back = await manager.rewind(sid, 3, 5, None, owner="")
            assert back["step"] == 3
            assert back["predictions"] == s["predictions"]
            h, c = await stored_state(manager, sid)
            assert h.tobytes() == h3.tobytes()
            assert c.tobytes() == c3.tobytes()
            with pytest.raises(StepConflict):
                await manager.rewind(sid, 4, 5, None, owner="")
            for _ in range(3):
                await manager.step(sid, "the old river", 5, None, owner="")
            with pytest.raises(HistoryExhausted) as exhausted:
                await manager.rewind(sid, 0, 5, None, owner="")
            assert exhausted.value.extra["oldest_step"] >= 12 - 8

    asyncio.run(scenario())
