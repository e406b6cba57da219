"""The embedded multi-process store: one LMDB environment that every worker of `cellgate serve --workers N`
maps into memory, with compare-and-set on the revision, idle TTL and a capacity, as the in-memory store.

Why LMDB and not the Redis store the replicas use: a step reads and writes its session once each, and
through redis-py's asyncio client those two round trips cost ~1.3 ms of worker CPU on the 2-core AVX2
machine (docs/serving_peers.md) — three times a whole step — while the same read and compare-and-set
on a memory-mapped B-tree cost ~0.1 ms, with no server process to supervise. LMDB serialises writers
across processes with its own lock and lets readers run beside them; each operation here is one
short transaction, run inline (microseconds, so the event loop never waits for long).

Layout: database `sessions`, key = session id, value = codec.record_to_blob (a fixed header with the revision and the
last write's time, then the fields). Expiry: a record idle for ttl_seconds is gone on its next read,
and a sweep (one worker at a time, under a file lock) removes the expired and, over max_sessions,
the least recently written. Durability: none (sync off), like the in-memory store: the environment
lives in a private directory on /dev/shm that the supervisor removes at exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lmdb

from service.errors import ModelMismatch, StoreUnavailable
from service.store.base import Lost, SessionRecord, SessionStore, StoreEvents
from service.store.codec import RecordFormatError, blob_header, record_from_blob, record_to_blob

log = logging.getLogger("cellgate.store")

SCHEME = "lmdb://"
SWEEP_BATCH = 1000  # expired keys deleted per write transaction, so writers never wait long
LOST_HEADER = struct.Struct("<d")  # when the session ended (Unix seconds)


def path_of(url: str) -> Path:
    """The environment directory of an lmdb:///path URL."""
    return Path(url.removeprefix(SCHEME))


class LmdbStore(SessionStore):
    """Sessions in an LMDB environment shared by every process that opens the same directory."""

    def __init__(
        self,
        path: Path,
        ttl_seconds: float,
        max_sessions: int,
        map_size: int,
        events: StoreEvents | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self.ttl_seconds = ttl_seconds
        self.max_sessions = max_sessions
        self.events = events or StoreEvents()
        self._clock = clock
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        # sync/metasync off: nothing is flushed to disk (the data lives as long as the service, as in memory);
        # readahead off: random access to small records.
        self._env = lmdb.open(
            str(path),
            map_size=map_size,
            sync=False,
            metasync=False,
            readahead=False,
            meminit=False,
            max_readers=512,
            max_dbs=2,
        )
        self._sessions = self._env.open_db(b"sessions")
        # Sessions that expired or were evicted, for one more TTL (as the in-memory store keeps them): key =
        # session id, value = LOST_HEADER (when) + reason + NUL + owner.
        self._lost = self._env.open_db(b"lost")
        self._sweeper: asyncio.Task[None] | None = None

    @contextlib.contextmanager
    def _txn(self, write: bool = False, buffers: bool = False) -> Iterator[Any]:
        try:
            # Any: lmdb types begin() by overloads on a literal `buffers`; both transaction kinds are used here.
            env: Any = self._env
            with env.begin(write=write, buffers=buffers) as txn:
                yield txn
        except lmdb.MapFullError:
            log.error("the shared session store is full: raise CELLGATE_LMDB_MAP_SIZE_BYTES")
            raise StoreUnavailable("the session store is full") from None
        except lmdb.Error as exc:
            log.warning("lmdb: %s", exc)
            raise StoreUnavailable() from None

    def _expired(self, last_used_at: float, now: float) -> bool:
        return now - last_used_at > self.ttl_seconds

    async def get(self, session_id: str) -> SessionRecord | None:
        key = session_id.encode()
        try:
            with self._txn(buffers=True) as txn:  # decoded inside the read: each field is copied once
                blob = txn.get(key, db=self._sessions)
                if blob is None:
                    return None
                revision, last_used_at = blob_header(blob)
                if not self._expired(last_used_at, self._clock()):
                    return record_from_blob(blob)
        except (RecordFormatError, ValueError) as exc:
            log.warning("session %s: %s", session_id, exc)
            raise ModelMismatch(f"session {session_id!r} holds a record this server cannot read") from None
        self._end_if(key, revision, "expired")
        return None

    async def create(self, record: SessionRecord) -> None:
        with self._txn(write=True) as txn:
            txn.put(record.session_id.encode(), record_to_blob(record), db=self._sessions)
            txn.delete(record.session_id.encode(), db=self._lost)

    async def replace(self, record: SessionRecord, expected_revision: int) -> bool:
        blob = record_to_blob(record)  # encoded outside the write lock
        with self._txn(write=True, buffers=True) as txn:  # the stored revision is read in place, not copied
            current = txn.get(record.session_id.encode(), db=self._sessions)
            if current is None or blob_header(current)[0] != expected_revision:
                return False
            txn.put(record.session_id.encode(), blob, db=self._sessions)
            return True

    def _end_if(self, key: bytes, revision: int, reason: str) -> None:
        """End a session that still holds `revision` (nobody rewrote it meanwhile): remember how, report it."""
        with self._txn(write=True, buffers=True) as txn:
            self._end(txn, key, revision, reason)

    def _end(self, txn: Any, key: bytes, revision: int, reason: str) -> bool:
        current = txn.get(key, db=self._sessions)
        if current is None or blob_header(current)[0] != revision:
            return False
        owner = record_from_blob(current).owner
        txn.delete(key, db=self._sessions)
        txn.put(key, LOST_HEADER.pack(self._clock()) + reason.encode() + b"\0" + owner.encode(), db=self._lost)
        self.events.ended(reason)
        return True

    async def delete(self, session_id: str) -> bool:
        with self._txn(write=True) as txn:
            txn.delete(session_id.encode(), db=self._lost)
            return bool(txn.delete(session_id.encode(), db=self._sessions))

    async def lost(self, session_id: str) -> Lost | None:
        with self._txn() as txn:
            value = txn.get(session_id.encode(), db=self._lost)
        if value is None:
            return None
        (ended_at,) = LOST_HEADER.unpack_from(value)
        if self._clock() - ended_at > self.ttl_seconds:
            return None
        reason, _, owner = value[LOST_HEADER.size :].partition(b"\0")
        return Lost(reason.decode(), owner.decode())

    async def ping(self) -> None:
        with self._txn() as txn:
            txn.stat(self._sessions)

    async def count(self) -> int:
        with self._txn() as txn:
            entries: int = txn.stat(self._sessions)["entries"]
            return entries

    def sweep(self) -> int:
        """Remove expired records, then the least recently written over max_sessions; returns how many.

        Scans headers under a read transaction (writers go on), deletes in short write transactions,
        each deletion re-checked against the revision seen, so a session written meanwhile stays."""
        now = self._clock()
        expired: list[tuple[bytes, int]] = []
        live: list[tuple[float, bytes, int]] = []
        with self._txn(buffers=True) as txn:  # memoryviews into the map: no record is copied
            for key, value in txn.cursor(db=self._sessions):
                revision, last_used_at = blob_header(value)
                if self._expired(last_used_at, now):
                    expired.append((bytes(key), revision))
                else:
                    live.append((last_used_at, bytes(key), revision))
        over = len(live) - self.max_sessions
        evicted = [(key, revision) for _, key, revision in sorted(live)[: max(0, over)]]
        removed = 0
        for reason, victims in (("expired", expired), ("evicted_capacity", evicted)):
            for start in range(0, len(victims), SWEEP_BATCH):
                with self._txn(write=True, buffers=True) as txn:
                    for key, revision in victims[start : start + SWEEP_BATCH]:
                        removed += self._end(txn, key, revision, reason)
        with self._txn(buffers=True) as txn:  # the memory of lost sessions lasts one TTL
            old = [
                bytes(k) for k, v in txn.cursor(db=self._lost) if now - LOST_HEADER.unpack_from(v)[0] > self.ttl_seconds
            ]
        for start in range(0, len(old), SWEEP_BATCH):
            with self._txn(write=True) as txn:
                for key in old[start : start + SWEEP_BATCH]:
                    txn.delete(key, db=self._lost)
        return removed

    def _sweep_if_first(self) -> None:
        """Sweep unless another process is sweeping right now (one flock on the environment's lock file)."""
        with open(self.path / "sweep.lock", "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return
            self.sweep()

    async def start(self) -> None:
        async def loop() -> None:
            interval = max(0.05, min(30.0, self.ttl_seconds / 4))
            while True:
                await asyncio.sleep(interval)
                try:
                    self._sweep_if_first()
                except StoreUnavailable:
                    log.warning("the session sweep failed; retrying in %.1f s", interval)

        self._sweeper = asyncio.create_task(loop(), name="session-sweeper")

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        self._env.close()
