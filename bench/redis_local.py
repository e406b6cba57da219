"""A private redis-server on a Unix socket for benchmarks: the Redis store's cost per step, measured beside the
LMDB one that `--workers N` uses (bench/scaling.py). Tests have their own, on TCP (tests/redis_server.py)."""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import redis


@dataclass
class LocalRedis:
    """redis-server on a Unix socket in `directory`: no TCP port, no persistence."""

    directory: Path
    executable: str
    max_memory: str = "0"
    process: subprocess.Popen[bytes] | None = None

    @property
    def socket_path(self) -> Path:
        return self.directory / "redis.sock"

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}"

    @property
    def log_path(self) -> Path:
        return self.directory / "redis.log"

    def log_tail(self, lines: int = 5) -> str:
        try:
            return " | ".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def start(self, timeout: float = 20.0) -> None:
        """Start and wait until it answers PING."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        options = {
            "port": "0",  # Unix socket only
            "unixsocket": str(self.socket_path),
            "unixsocketperm": "700",
            "dir": str(self.directory),
            "save": "",
            "appendonly": "no",
            "daemonize": "no",
            "loglevel": "warning",
            "logfile": str(self.log_path),  # its start-up banner is noise; the tail is logged if it dies
            "maxmemory": self.max_memory,
            # Over max_memory, drop the least recently used session, as the in-memory store does.
            "maxmemory-policy": "allkeys-lru",
        }
        command = [self.executable, *(item for name, value in options.items() for item in (f"--{name}", value))]
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL)
        client = redis.Redis(unix_socket_path=str(self.socket_path), socket_timeout=1, socket_connect_timeout=1)
        deadline = time.monotonic() + timeout
        try:
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(
                        f"redis-server exited with {self.process.returncode} at start-up: {self.log_tail()}"
                    )
                try:
                    if client.ping():
                        return
                except (redis.ConnectionError, redis.TimeoutError, FileNotFoundError):
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"redis-server did not answer on {self.socket_path} in {timeout:.0f} s")
                time.sleep(0.05)
        finally:
            client.close()

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
