"""A real `redis-server` for tests: a free loopback port, its own temp dir, AOF on; always stopped.

The same RedisServer can be stopped and started again on the same port and dir (the AOF is reloaded),
killed, or paused with SIGSTOP, to play the faults the service must survive.
"""

from __future__ import annotations

import queue
import shutil
import signal
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

from bench.procs import free_port

READY_LINE = "Ready to accept connections"


def _pump(stream: object, lines: queue.Queue[str | None], log: list[str]) -> None:
    for line in stream:  # type: ignore[attr-defined]
        log.append(line)
        lines.put(line)
    lines.put(None)


@dataclass
class RedisServer:
    directory: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[str] | None = None
    log: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 30.0) -> None:
        """Start (or restart) on the same port and dir; returns once it accepts commands (AOF loaded)."""
        executable = shutil.which("redis-server")
        if executable is None:
            pytest.fail("redis-server is not installed (apt-get install redis-server; .ci/run does it)")
        # The same port every time: replicas keep the URL across a restart.
        options = {
            "port": str(self.port),
            "bind": "127.0.0.1",
            "dir": str(self.directory),
            "appendonly": "yes",
            "appendfsync": "everysec",
            "save": "",
            "daemonize": "no",
            "protected-mode": "yes",
            "loglevel": "notice",
        }
        self.process = subprocess.Popen(
            [executable, *(item for name, value in options.items() for item in (f"--{name}", value))],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=_pump, args=(self.process.stdout, lines, self.log), daemon=True).start()
        while True:
            try:
                line = lines.get(timeout=timeout)
            except queue.Empty:
                self.kill()
                raise RuntimeError("redis-server did not start in time:\n" + "".join(self.log)) from None
            if line is None:
                raise RuntimeError(f"redis-server exited with {self.process.wait()}:\n" + "".join(self.log))
            if READY_LINE in line:
                return

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM: Redis flushes and fsyncs the AOF, then exits."""
        if self.process is not None and self.process.poll() is None:
            self.resume()  # a stopped process would never handle SIGTERM
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def pause(self) -> None:
        """SIGSTOP: connections are still accepted by the kernel, but nothing answers."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def client(self) -> redis.Redis:
        """A synchronous client for inspecting and tampering with what the service stored."""
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5, socket_connect_timeout=5)


@contextmanager
def running_redis(directory: Path) -> Iterator[RedisServer]:
    """A started RedisServer, stopped on exit whatever happened."""
    server = RedisServer(directory)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def replica_env(redis: RedisServer, **extra: str) -> dict[str, str]:
    """CELLGATE_* settings for a service replica on this Redis, with short store timeouts for fault tests."""
    return {
        "CELLGATE_SESSION_STORE": redis.url,
        "CELLGATE_REDIS_CONNECT_TIMEOUT_SECONDS": "0.3",
        "CELLGATE_REDIS_SOCKET_TIMEOUT_SECONDS": "0.3",
        "CELLGATE_ACCESS_LOG": "false",
        **extra,
    }
