"""Session stores: the in-memory default and Redis for several replicas, behind one interface."""

from service.store.base import SessionRecord, SessionStore

__all__ = ["SessionRecord", "SessionStore"]
