"""The embedded store: an LRU dict with idle TTL, for one process."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import Callable

from service.store.base import SessionRecord, SessionStore, StoreEvents


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
        self._sweeper: asyncio.Task[None] | None = None

    def _expired(self, record: SessionRecord, now: float) -> bool:
        return now - record.last_used_at > self.ttl_seconds

    async def get(self, session_id: str) -> SessionRecord | None:
        record = self._records.get(session_id)
        if record is None:
            return None
        if self._expired(record, self._clock()):
            del self._records[session_id]
            self.events.ended("expired")
            return None
        # Reads do not refresh recency: the order stays by last write, which is last_used_at order.
        return record

    async def create(self, record: SessionRecord) -> None:
        self._records[record.session_id] = record
        self._records.move_to_end(record.session_id)
        while len(self._records) > self.max_sessions:
            self._records.popitem(last=False)
            self.events.ended("evicted_capacity")

    async def replace(self, record: SessionRecord, expected_revision: int) -> bool:
        current = self._records.get(record.session_id)
        if current is None or current.revision != expected_revision:
            return False
        self._records[record.session_id] = record
        self._records.move_to_end(record.session_id)
        return True

    async def delete(self, session_id: str) -> bool:
        return self._records.pop(session_id, None) is not None

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
            self.events.ended("expired")
            removed += 1
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
