"""Fixtures shared by the service tests: a real redis-server and two replicas sharing it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.redis_server import RedisServer, replica_env, running_redis
from tests.servers import ServerProcess, running_server


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with running_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="module")
def replicas(tiny_bundle: Path, redis_server: RedisServer) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    """Two service processes on different ports sharing one redis-server."""
    with (
        running_server(tiny_bundle, replica_env(redis_server)) as a,
        running_server(tiny_bundle, replica_env(redis_server)) as b,
    ):
        yield a, b
