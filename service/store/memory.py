"""The embedded store: an LRU dict with idle TTL, for one process."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import Callable

from service.store.base import Lost, SessionRecord, SessionStore, StoreEvents


class MemoryStore(SessionStore):
    """Sessions in this process's memory; they die with it (see SECURITY.md)."""

    def __init__(
        self,
        ttl_seconds: float,
        max_sessions: int,
        events: StoreEvents | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.ttl_seconds = ttl_seconds
        self.max_sessions = max_sessions
        self.events = events or StoreEvents()
        self._clock = clock
        self._records: OrderedDict[str, SessionRecord] = OrderedDict()  # least recently used first
        # Sessions that expired or were evicted, and when: kept for one more TTL (at most max_sessions of them,
        # about 100 bytes each), so that a client is told its session expired rather than that it never was.
        self._lost: OrderedDict[str, tuple[Lost, float]] = OrderedDict()  # oldest first
        self._sweeper: asyncio.Task[None] | None = None

    def _expired(self, record: SessionRecord, now: float) -> bool:
        return now - record.last_used_at > self.ttl_seconds

    async def get(self, session_id: str) -> SessionRecord | None:
        record = self._records.get(session_id)
        if record is None:
            return None
        now = self._clock()
        if self._expired(record, now):
            del self._records[session_id]
            self._end(record, "expired", now)
            return None
        # Reads do not refresh recency: the order stays by last write, which is last_used_at order.
        return record

    def _end(self, record: SessionRecord, reason: str, now: float) -> None:
        self.events.ended(reason)
        self._lost[record.session_id] = (Lost(reason, record.owner), now)
        self._lost.move_to_end(record.session_id)
        while len(self._lost) > self.max_sessions:
            self._lost.popitem(last=False)

    async def create(self, record: SessionRecord) -> None:
        self._lost.pop(record.session_id, None)
        self._records[record.session_id] = record
        self._records.move_to_end(record.session_id)
        while len(self._records) > self.max_sessions:
            _, evicted = self._records.popitem(last=False)
            self._end(evicted, "evicted_capacity", self._clock())

    async def replace(self, record: SessionRecord, expected_revision: int) -> bool:
        current = self._records.get(record.session_id)
        if current is None or current.revision != expected_revision:
            return False
        self._records[record.session_id] = record
        self._records.move_to_end(record.session_id)
        return True

    async def delete(self, session_id: str) -> bool:
        self._lost.pop(session_id, None)
        return self._records.pop(session_id, None) is not None

    async def lost(self, session_id: str) -> Lost | None:
        entry = self._lost.get(session_id)
        if entry is None or self._clock() - entry[1] > self.ttl_seconds:
            return None
        return entry[0]

    async def ping(self) -> None:
        return None

    async def count(self) -> int:
        return len(self._records)

    def sweep(self) -> int:
        """Drop expired sessions from the cold end; returns how many."""
        now = self._clock()
        removed = 0
        while self._records:
            session_id, record = next(iter(self._records.items()))
            if not self._expired(record, now):
                break  # LRU order: everything after this was used more recently
            del self._records[session_id]
            self._end(record, "expired", now)
            removed += 1
        while self._lost and now - next(iter(self._lost.values()))[1] > self.ttl_seconds:
            self._lost.popitem(last=False)
        return removed

    async def start(self) -> None:
        async def loop() -> None:
            interval = max(0.05, min(30.0, self.ttl_seconds / 4))
            while True:
                await asyncio.sleep(interval)
                self.sweep()

        self._sweeper = asyncio.create_task(loop(), name="session-sweeper")

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
