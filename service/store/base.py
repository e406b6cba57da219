"""The session record and the store interface every backend implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field, replace


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A state the session had after `step` tokens, kept for rewind."""

    step: int
    state: bytes  # see service.store.codec


@dataclass(frozen=True, slots=True)
class SessionRecord:
    """One session as stored. Immutable: an update writes a new record with revision + 1."""

    session_id: str
    owner: str  # fingerprint of the API key that created it ("" without keys)
    model_version: str  # states from another model are refused, never mixed
    step: int  # tokens consumed so far
    revision: int  # bumps on every write; the compare-and-set token
    state: bytes  # h then C, raw float32 (codec.encode_state)
    created_at: float  # Unix seconds
    last_used_at: float
    last_request: str = ""  # fingerprint of the last applied request, for exactly-once replays
    last_response: bytes = b""  # its JSON response
    history: tuple[Snapshot, ...] = ()  # oldest first, for rewind
    history_tokens: tuple[int, ...] = ()  # tokens consumed since history[0].step

    def evolve(self, **changes: object) -> SessionRecord:
        return replace(self, revision=self.revision + 1, **changes)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class Lost:
    """Why a session that ended without being deleted is gone."""

    reason: str  # "expired" (idle past the TTL) or "evicted_capacity" (least recently used in a full store)
    owner: str  # the fingerprint of the key that owned it: only its owner may learn how it went


@dataclass
class StoreEvents:
    """Callbacks a store uses to report session ends (wired to metrics by the app)."""

    ended: Callable[[str], None] = field(default=lambda reason: None)


class SessionStore(ABC):
    """Where session records live. All methods may raise StoreUnavailable."""

    ttl_seconds: float

    @abstractmethod
    async def get(self, session_id: str) -> SessionRecord | None:
        """The record, or None if unknown or expired."""

    @abstractmethod
    async def create(self, record: SessionRecord) -> None:
        """Store a new record, replacing any record with the same id (ids are fresh from `secrets`, or
        chosen by a caller that means to restart that session)."""

    @abstractmethod
    async def replace(self, record: SessionRecord, expected_revision: int) -> bool:
        """Write record only if the stored revision is still expected_revision; False otherwise."""

    @abstractmethod
    async def delete(self, session_id: str) -> bool:
        """Remove a session; False if it did not exist."""

    @abstractmethod
    async def ping(self) -> None:
        """Raise StoreUnavailable if the store cannot answer."""

    @abstractmethod
    async def count(self) -> int:
        """Sessions currently held (approximate for shared stores)."""

    async def lost(self, session_id: str) -> Lost | None:
        """How a session that get() no longer finds went, if it expired or was evicted within the last
        ttl_seconds; None if it never existed, was deleted, or went longer ago (or the store cannot tell)."""
        return None

    async def start(self) -> None:
        """Open connections / start background work (nothing by default)."""
        return None

    async def close(self) -> None:
        """Release connections / stop background work (nothing by default)."""
        return None
