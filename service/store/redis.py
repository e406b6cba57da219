"""The shared store: one Redis hash per session, written with its TTL atomically, replaced by compare-and-set.

Layout: key `cellgate:session:<id>`, a hash whose fields come from service.store.codec, plus `write_id`
(see REPLACE_SCRIPT). Every write sets the TTL in the same atomic unit (MULTI for create, one Lua script for
replace), so no record ever lives without an expiry. Expiry itself is Redis's: a session idle for
ttl_seconds disappears, and this process never sees it go (so no ended("expired") event is reported).
Beside each record, `cellgate:lost:<id>` holds the owner's fingerprint and outlives the record by one
more TTL (written in the same atomic units): when the record is gone but that key is not, the session
expired, and `lost()` says so. Deleting a session removes both.

Failure policy: every operation runs under one deadline, connect timeout + socket timeout, and any
Redis error or timeout becomes StoreUnavailable (503 store_unavailable), so a dead or paused Redis makes
requests fail fast instead of hanging. A pooled connection that broke (Redis restarted) is retried
once on a fresh one; a timeout is not retried, because the command may already have run.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.typing import EncodableT

from service.config import Settings
from service.errors import ModelMismatch, StoreUnavailable
from service.store.base import Lost, SessionRecord, SessionStore, StoreEvents
from service.store.codec import RecordFormatError, record_from_fields, record_to_fields

log = logging.getLogger("cellgate.store")

KEY_PREFIX = "cellgate:session:"
LOST_PREFIX = "cellgate:lost:"  # outside KEY_PREFIX, so count()'s SCAN does not see these keys
SCAN_BATCH = 1000  # keys per SCAN round trip in count()

# KEYS = session key, its lost key; ARGV = expected revision, new revision, write id, ttl ms, lost key ttl ms,
# owner, then field/value pairs.
# Idempotent: if the connection broke after Redis ran it, the retry finds the same write id at the new
# revision and reports success instead of a conflict (which would make the caller apply the step twice).
REPLACE_SCRIPT = """
local current = redis.call('HGET', KEYS[1], 'revision')
if current == ARGV[2] and redis.call('HGET', KEYS[1], 'write_id') == ARGV[3] then
    return 1
end
if current ~= ARGV[1] then
    return 0
end
redis.call('HSET', KEYS[1], 'write_id', ARGV[3], unpack(ARGV, 7))
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('SET', KEYS[2], ARGV[6], 'PX', ARGV[5])
return 1
"""


class RedisStore(SessionStore):
    """Sessions in Redis, shared by every replica that points at it."""

    def __init__(self, settings: Settings, events: StoreEvents | None = None) -> None:
        self.ttl_seconds = settings.session_ttl_seconds
        self.events = events or StoreEvents()
        self._ttl_ms = max(1, math.ceil(settings.session_ttl_seconds * 1000))
        self._lost_ttl_ms = 2 * self._ttl_ms  # the record's TTL, then one more
        # The whole budget of one operation: waiting for a pooled connection, connecting, and the reply.
        self.deadline_seconds = settings.redis_connect_timeout_seconds + settings.redis_socket_timeout_seconds
        pool = BlockingConnectionPool.from_url(
            settings.session_store,
            max_connections=settings.redis_max_connections,
            timeout=settings.redis_socket_timeout_seconds,  # wait for a free pooled connection
            socket_connect_timeout=settings.redis_connect_timeout_seconds,
            socket_timeout=settings.redis_socket_timeout_seconds,
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        )
        self._redis = Redis.from_pool(pool)  # the client owns the pool and closes it
        self._replace = self._redis.register_script(REPLACE_SCRIPT)

    @staticmethod
    def key(session_id: str) -> str:
        """The Redis key of a session."""
        return KEY_PREFIX + session_id

    @staticmethod
    def lost_key(session_id: str) -> str:
        """The key that outlives a session's record, to tell an expired session from one never created."""
        return LOST_PREFIX + session_id

    async def _call(self, operation: str, call: Any) -> Any:
        """Await a Redis call under the deadline; every failure becomes StoreUnavailable."""
        # `call` is Any: redis-py types its commands as "awaitable or value" for its sync and async clients.
        try:
            async with asyncio.timeout(self.deadline_seconds):
                return await call
        except TimeoutError:
            log.warning("redis %s timed out after %.2fs", operation, self.deadline_seconds)
            raise StoreUnavailable(f"the session store did not answer in {self.deadline_seconds:g}s") from None
        except (RedisError, OSError) as exc:
            log.warning("redis %s failed: %s", operation, exc)
            raise StoreUnavailable() from None

    async def get(self, session_id: str) -> SessionRecord | None:
        fields: dict[bytes, bytes] = await self._call("get", self._redis.hgetall(self.key(session_id)))
        if not fields:
            return None
        try:
            return record_from_fields(fields)
        except RecordFormatError as exc:
            log.warning("session %s: %s", session_id, exc)
            raise ModelMismatch(f"session {session_id!r} holds a record this server cannot read") from None

    async def create(self, record: SessionRecord) -> None:
        key = self.key(record.session_id)
        # MULTI/EXEC: the record never exists without its TTL, and a retry rewrites the same content.
        pipe = self._redis.pipeline(transaction=True)
        pipe.delete(key)
        fields: dict[EncodableT, EncodableT] = {name: value for name, value in record_to_fields(record).items()}
        pipe.hset(key, mapping=fields)
        pipe.pexpire(key, self._ttl_ms)
        pipe.set(self.lost_key(record.session_id), record.owner, px=self._lost_ttl_ms)
        await self._call("create", pipe.execute())

    async def replace(self, record: SessionRecord, expected_revision: int) -> bool:
        args: list[bytes | str | int] = [str(expected_revision), str(record.revision), secrets.token_hex(8)]
        args += [self._ttl_ms, self._lost_ttl_ms, record.owner]
        for name, value in record_to_fields(record).items():
            args += [name, value]
        keys = [self.key(record.session_id), self.lost_key(record.session_id)]
        written: int = await self._call("replace", self._replace(keys=keys, args=args))
        return written == 1

    async def delete(self, session_id: str) -> bool:
        pipe = self._redis.pipeline(transaction=True)
        pipe.delete(self.key(session_id))
        pipe.delete(self.lost_key(session_id))
        removed: list[int] = await self._call("delete", pipe.execute())
        return removed[0] > 0

    async def lost(self, session_id: str) -> Lost | None:
        # Redis cannot say why a key went: with an LRU maxmemory policy an evicted record reads as expired too.
        pipe = self._redis.pipeline(transaction=True)
        pipe.exists(self.key(session_id))
        pipe.get(self.lost_key(session_id))
        alive, owner = await self._call("lost", pipe.execute())
        return Lost("expired", owner.decode()) if owner is not None and not alive else None

    async def ping(self) -> None:
        await self._call("ping", self._redis.ping())

    async def count(self) -> int:
        """Sessions under the key prefix, by SCAN: O(keys in the database) per call.

        Chosen over a counter because Redis expires keys silently, so a counter would drift upward
        forever; the cost is one pass over the keyspace per metrics scrape (about 100 round trips per
        100,000 sessions). Each round trip has the usual deadline, so a slow Redis fails the scrape fast.
        """
        total, cursor = 0, 0
        while True:
            reply: tuple[int, list[bytes]] = await self._call(
                "count", self._redis.scan(cursor, match=KEY_PREFIX + "*", count=SCAN_BATCH)
            )
            cursor, keys = reply
            total += len(keys)
            if cursor == 0:
                return total

    async def close(self) -> None:
        try:
            await self._redis.aclose()
        except (RedisError, OSError) as exc:  # closing a dead connection must not fail shutdown
            log.warning("closing redis: %s", exc)
