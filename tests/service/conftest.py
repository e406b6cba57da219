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


@pytest.fixture(scope="session", params=[1, 2], ids=["1-worker", "2-workers"])
def server(request: pytest.FixtureRequest, tiny_bundle: Path) -> Iterator[ServerProcess]:
    """The API and conformance tests' server, run both ways: one process (in-memory sessions) and
    `--workers 2` (two processes sharing sessions through the redis-server the supervisor starts)."""
    env = {"CELLGATE_ACCESS_LOG": "false", "CELLGATE_WORKERS": str(request.param)}
    with running_server(tiny_bundle, env) as proc:
        yield proc


API_KEYS = ("key-one", "key-two")


@pytest.fixture(scope="session")
def keyed_server(tiny_bundle: Path) -> Iterator[ServerProcess]:
    """A server that demands one of API_KEYS (for the protocols' auth tests)."""
    with running_server(tiny_bundle, {"CELLGATE_API_KEYS": ",".join(API_KEYS)}) as proc:
        yield proc
