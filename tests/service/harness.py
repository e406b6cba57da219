"""An in-process service core (real Runner, Scheduler, Store and SessionManager; no HTTP) for tests
that need to see the stored (h, C), which the HTTP API deliberately does not expose."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np

from export.bundle import load_bundle
from service.config import Settings
from service.metrics import Metrics
from service.runner import Runner
from service.scheduler import Scheduler
from service.sessions import SessionManager
from service.store.codec import decode_state
from service.store.memory import MemoryStore


@asynccontextmanager
async def service_core(bundle: Path, **overrides: Any) -> AsyncIterator[SessionManager]:
    settings = Settings(bundle=bundle, **overrides)
    metrics = Metrics()
    runner = Runner(load_bundle(bundle), settings)
    store = MemoryStore(settings.session_ttl_seconds, settings.max_sessions)
    scheduler = Scheduler(runner, settings, metrics)
    await scheduler.start()
    try:
        yield SessionManager(store, scheduler, runner, settings, metrics)
    finally:
        await scheduler.stop()


async def stored_state(manager: SessionManager, session_id: str) -> tuple[np.ndarray, np.ndarray]:
    record = await manager.store.get(session_id)
    assert record is not None
    return decode_state(record.state, manager.runner.layers, manager.runner.hidden_size)
