"""Real server processes for tests: `cellgate serve` on a free loopback port, always torn down."""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from bench.procs import ServerProcess, start_process

__all__ = ["ServerProcess", "running_server", "start_server"]


def start_server(bundle: Path, env: Mapping[str, str] | None = None, timeout: float = 90.0) -> ServerProcess:
    """`cellgate serve` on port 0; waits for uvicorn's own "running on" line, which names the port."""
    full_env = {"CELLGATE_BUNDLE": str(bundle), "CELLGATE_PORT": "0", **(env or {})}
    return start_process([sys.executable, "-m", "cellgate.cli", "serve"], full_env, timeout)


@contextmanager
def running_server(bundle: Path, env: Mapping[str, str] | None = None) -> Iterator[ServerProcess]:
    server = start_server(bundle, env)
    try:
        yield server
    finally:
        server.stop()
