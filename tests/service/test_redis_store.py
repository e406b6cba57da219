"""The SessionStore contract, run against MemoryStore, RedisStore and LmdbStore alike, and each one's own
guarantees."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from service.config import Settings
from service.errors import ModelMismatch, StoreUnavailable
from service.store.base import SessionRecord, SessionStore, Snapshot, StoreEvents
from service.store.codec import record_to_fields
from service.store.lmdb import LmdbStore
from service.store.memory import MemoryStore
from service.store.redis import REPLACE_SCRIPT, RedisStore
from tests.redis_server import RedisServer, free_port, running_redis

StoreFactory = Callable[[float], SessionStore]


def redis_settings(url: str, ttl: float = 60.0) -> Settings:
    return Settings(
        session_store=url,
        session_ttl_seconds=ttl,
        redis_connect_timeout_seconds=0.25,
        redis_socket_timeout_seconds=0.25,
        redis_max_connections=8,
    )


@pytest.fixture(params=["memory", "redis", "lmdb"])
def make_store(request: pytest.FixtureRequest) -> StoreFactory:
    """A factory (call it inside the event loop that uses the store) for each backend, on an empty store."""
    if request.param == "memory":
        return lambda ttl: MemoryStore(ttl_seconds=ttl, max_sessions=1000)
    if request.param == "lmdb":
        directory: Path = request.getfixturevalue("tmp_path") / "lmdb"
        return lambda ttl: LmdbStore(directory, ttl, max_sessions=1000, map_size=1 << 26)
    server: RedisServer = request.getfixturevalue("redis_server")
    server.client().flushdb()
    return lambda ttl: RedisStore(redis_settings(server.url, ttl))


def run(make_store: StoreFactory, scenario: Callable[[SessionStore], Awaitable[None]], ttl: float = 60.0) -> None:
    async def main() -> None:
        store = make_store(ttl)
        await store.start()
        try:
            await scenario(store)
        finally:
            await store.close()

    asyncio.run(main())


def record(session_id: str | None = None, **changes: object) -> SessionRecord:
    # Arbitrary bytes (including NUL and invalid UTF-8) must survive: the state is raw float32.
    base = SessionRecord(
        session_id=session_id or secrets.token_urlsafe(24),
        owner="owner-fingerprint",
        model_version="m-test",
        step=7,
        revision=0,
        state=bytes(range(256)) * 2,
        created_at=time.time() - 0.125,  # sub-second floats must round-trip exactly
        last_used_at=time.time(),
        last_request="step:3:abc",
        last_response=b'{"step": 7}',
        history=(Snapshot(3, b"\x00" * 512), Snapshot(7, bytes(range(256)) * 2)),
        history_tokens=(4, 5, 6, 7),
    )
    return base.evolve(**changes) if changes else base


# ----- the contract ---------------------------------------------------------------------------------


def test_create_then_get_round_trips_every_field(make_store: StoreFactory) -> None:
    async def scenario(store: SessionStore) -> None:
        original = record()
        await store.create(original)
        assert await store.get(original.session_id) == original
        assert await store.get("no-such-session-0000") is None
        await store.ping()

    run(make_store, scenario)


def test_replace_is_compare_and_set_on_revision(make_store: StoreFactory) -> None:
    async def scenario(store: SessionStore) -> None:
        first = record()
        await store.create(first)
        second = first.evolve(step=9, state=b"\x01" * 512)
        assert await store.replace(second, expected_revision=first.revision)
        stale = first.evolve(step=100)  # written on top of a read that is no longer current
        assert not await store.replace(stale, expected_revision=first.revision)
        assert await store.get(first.session_id) == second
        missing = record()
        assert not await store.replace(missing.evolve(step=1), expected_revision=missing.revision)
        assert await store.get(missing.session_id) is None

    run(make_store, scenario)


def test_concurrent_replaces_from_one_revision_have_one_winner(make_store: StoreFactory) -> None:
    async def scenario(store: SessionStore) -> None:
        base = record()
        await store.create(base)
        attempts = [base.evolve(step=100 + i) for i in range(16)]
        won = await asyncio.gather(*(store.replace(a, base.revision) for a in attempts))
        assert sum(won) == 1
        stored = await store.get(base.session_id)
        assert stored == attempts[won.index(True)]

    run(make_store, scenario)


def test_delete(make_store: StoreFactory) -> None:
    async def scenario(store: SessionStore) -> None:
        kept, dropped = record(), record()
        await store.create(kept)
        await store.create(dropped)
        assert await store.count() == 2
        assert await store.delete(dropped.session_id)
        assert not await store.delete(dropped.session_id)
        assert await store.get(dropped.session_id) is None
        assert await store.get(kept.session_id) == kept
        assert await store.count() == 1

    run(make_store, scenario)


async def wait_until_gone(store: SessionStore, session_id: str, deadline: float = 10.0) -> None:
    async with asyncio.timeout(deadline):
        while await store.get(session_id) is not None:
            await asyncio.sleep(0.02)


def test_idle_sessions_expire(make_store: StoreFactory) -> None:
    async def scenario(store: SessionStore) -> None:
        # Idleness counts from the write (the memory store reads last_used_at, Redis its own TTL).
        fresh = record()
        await store.create(fresh)
        assert await store.get(fresh.session_id) == fresh
        await wait_until_gone(store, fresh.session_id)
        assert await store.count() == 0

    run(make_store, scenario, ttl=0.3)


def test_lost_tells_an_expired_session_from_one_never_created_or_deleted(make_store: StoreFactory) -> None:
    async def scenario(store: SessionStore) -> None:
        idle, deleted = record(), record()
        await store.create(idle)
        await store.create(deleted)
        assert await store.lost(idle.session_id) is None  # still there
        assert await store.delete(deleted.session_id)
        await wait_until_gone(store, idle.session_id)
        lost = await store.lost(idle.session_id)
        assert lost is not None
        assert (lost.reason, lost.owner) == ("expired", idle.owner)
        assert await store.lost(deleted.session_id) is None
        assert await store.lost(secrets.token_urlsafe(24)) is None
        await store.create(idle)  # the same id again: alive, so not lost
        assert await store.lost(idle.session_id) is None

    run(make_store, scenario, ttl=0.3)


def test_memory_store_remembers_evictions_for_one_ttl() -> None:
    now = [0.0]
    store = MemoryStore(ttl_seconds=60, max_sessions=1, clock=lambda: now[0])

    async def scenario() -> None:
        first = record(last_used_at=0.0)
        await store.create(first)
        await store.create(record(last_used_at=0.0))  # over capacity: the first goes
        lost = await store.lost(first.session_id)
        assert lost is not None
        assert lost.reason == "evicted_capacity"
        now[0] = 61.0
        assert await store.lost(first.session_id) is None  # forgotten after one more TTL

    asyncio.run(scenario())


# ----- Redis specifics --------------------------------------------------------------------------------


def test_every_redis_write_carries_the_ttl(redis_server: RedisServer) -> None:
    client = redis_server.client()

    async def scenario() -> None:
        store = RedisStore(redis_settings(redis_server.url, ttl=120))
        try:
            first = record()
            await store.create(first)
            key = RedisStore.key(first.session_id)
            assert 0 < client.pttl(key) <= 120_000
            lost_key = RedisStore.lost_key(first.session_id)
            assert 120_000 < client.pttl(lost_key) <= 240_000  # outlives the record by one more TTL
            client.pexpire(key, 5_000)  # shorten them, then check the CAS write restores the full TTLs
            client.pexpire(lost_key, 5_000)
            assert await store.replace(first.evolve(step=8), first.revision)
            assert 5_000 < client.pttl(key) <= 120_000
            assert 120_000 < client.pttl(lost_key) <= 240_000
            assert not await store.replace(first.evolve(step=9), first.revision)
        finally:
            await store.close()

    asyncio.run(scenario())


def test_replace_script_is_idempotent_for_one_write(redis_server: RedisServer) -> None:
    """A retried replace (connection broke after Redis ran it) succeeds again instead of conflicting."""
    client = redis_server.client()
    base = record()
    keys = RedisStore.key(base.session_id), RedisStore.lost_key(base.session_id)
    client.hset(keys[0], mapping=record_to_fields(base))  # type: ignore[arg-type]
    new = base.evolve(step=8)
    fields = [item for pair in record_to_fields(new).items() for item in pair]
    args = [str(base.revision), str(new.revision), "write-1", 60_000, 120_000, base.owner, *fields]
    assert client.eval(REPLACE_SCRIPT, 2, *keys, *args) == 1
    assert client.eval(REPLACE_SCRIPT, 2, *keys, *args) == 1  # the same write, retried
    other = [str(base.revision), str(new.revision), "write-2", 60_000, 120_000, base.owner, *fields]
    assert client.eval(REPLACE_SCRIPT, 2, *keys, *other) == 0  # a different write on the stale revision
    assert int(client.hget(keys[0], "revision") or 0) == new.revision
    assert client.get(keys[1]) == base.owner.encode()


def test_a_record_that_does_not_decode_is_model_mismatch(redis_server: RedisServer) -> None:
    client = redis_server.client()
    session_id = secrets.token_urlsafe(24)
    client.hset(RedisStore.key(session_id), mapping={"session_id": session_id, "step": "not a number"})

    async def scenario() -> None:
        store = RedisStore(redis_settings(redis_server.url))
        try:
            with pytest.raises(ModelMismatch):
                await store.get(session_id)
        finally:
            await store.close()

    asyncio.run(scenario())


def test_records_survive_a_redis_restart_and_the_pool_reconnects(tmp_path: Path) -> None:
    with running_redis(tmp_path) as server:

        async def scenario() -> None:
            store = RedisStore(redis_settings(server.url))
            try:
                kept = record()
                await store.create(kept)
                server.stop()  # SIGTERM: the AOF is flushed; the pooled connection is now dead
                server.start()  # same port and dir: the AOF is replayed
                # The dead pooled connection fails once and is retried on a fresh one: no error surfaces.
                assert await store.get(kept.session_id) == kept
                server.stop()
                with pytest.raises(StoreUnavailable):
                    await store.get(kept.session_id)
                server.start()
                assert await store.replace(kept.evolve(step=8), kept.revision)
                assert (await store.get(kept.session_id)) == kept.evolve(step=8)
            finally:
                await store.close()

        asyncio.run(scenario())


def test_unreachable_and_paused_redis_fail_fast_with_store_unavailable(tmp_path: Path) -> None:
    async def refused() -> None:
        store = RedisStore(redis_settings(f"redis://127.0.0.1:{free_port()}/0"))
        try:
            for call in (store.ping(), store.get("x" * 32), store.create(record()), store.count()):
                with pytest.raises(StoreUnavailable):
                    await call
        finally:
            await store.close()

    asyncio.run(refused())

    with running_redis(tmp_path) as server:

        async def paused() -> None:
            store = RedisStore(redis_settings(server.url))
            try:
                await store.ping()
                server.pause()
                try:
                    # The kernel still accepts the connection; only the deadline can end these calls.
                    with pytest.raises(StoreUnavailable):
                        await store.ping()
                    with pytest.raises(StoreUnavailable):
                        await store.replace(record(), 0)
                finally:
                    server.resume()
                await store.ping()  # and it recovers on its own
            finally:
                await store.close()

        asyncio.run(paused())


# ----- LMDB specifics ---------------------------------------------------------------------------------


def test_the_lmdb_sweep_drops_the_expired_then_the_least_recently_written(tmp_path: Path) -> None:
    now = [1000.0]
    ended: list[str] = []
    events = StoreEvents(ended=ended.append)
    store = LmdbStore(tmp_path / "lmdb", 10.0, max_sessions=2, map_size=1 << 26, events=events, clock=lambda: now[0])

    async def scenario() -> None:
        old, older, newer, newest = (record(last_used_at=t) for t in (980.0, 995.0, 996.0, 999.0))
        for r in (old, older, newer, newest):
            await store.create(r)
        assert await store.count() == 4
        assert store.sweep() == 2  # `old` is idle > 10 s; of the three live, the least recently written goes
        assert sorted(ended) == ["evicted_capacity", "expired"]
        assert await store.get(older.session_id) is None
        assert await store.get(newer.session_id) == newer
        assert await store.get(newest.session_id) == newest
        now[0] = 1007.0  # newer is now idle 11 s: a read finds it expired and removes it
        assert await store.get(newer.session_id) is None
        assert ended[-1] == "expired"
        assert await store.count() == 1

    try:
        asyncio.run(scenario())
    finally:
        asyncio.run(store.close())


def test_a_full_lmdb_store_is_store_unavailable_and_keeps_what_it_had(tmp_path: Path) -> None:
    store = LmdbStore(tmp_path / "lmdb", 60.0, max_sessions=100, map_size=1 << 20)

    async def scenario() -> None:
        kept = record()
        await store.create(kept)
        big = record(state=bytes(2_000_000), history=())  # twice the whole map
        with pytest.raises(StoreUnavailable):
            await store.create(big)
        assert await store.get(kept.session_id) == kept

    try:
        asyncio.run(scenario())
    finally:
        asyncio.run(store.close())
