"""`cellgate serve --workers N`: N serving processes on one port, sharing their sessions through one store.

The supervisor (this process) binds the listening socket once and hands it to N worker processes
(`python -m service.worker`), each a complete single-process service — its own ONNX Runtime session,
batcher and event loop — accepting connections from the same socket. Sessions live in one store every
worker reads and writes with compare-and-set (service/store/redis.py), so any session can be stepped
through any worker with the guarantees of one process: exactly-once `if_step`, ordering, rewind, fork,
expiry, `model_mismatch`. Without a store URL the supervisor starts a private redis-server on a Unix
socket (no TCP port, no persistence, like the in-memory store) and restarts it if it dies.

Life cycle: the "Uvicorn running on ..." line is logged once every worker has finished its start-up
(model loaded and warmed), so whoever waits for it gets a fully ready service. A worker that dies
after that is replaced (and logged); one that fails during start-up stops everything, because its
replacement would fail the same way. SIGTERM/SIGINT drain every worker (each refuses new requests and
closes its WebSockets cleanly, as one process does), then the store is stopped, and the exit status is 0.

Metrics: Prometheus client multiprocess mode in a private directory (see service/metrics.py).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import redis

from service.config import Settings

log = logging.getLogger("cellgate.workers")

# How long a worker may take from spawn to serving (loading and warming the model) before start-up fails.
STARTUP_TIMEOUT_SECONDS = 120.0
POLL_SECONDS = 0.5
PR_SET_PDEATHSIG = 1  # linux/prctl.h
WORKER_SETTINGS = "CELLGATE_WORKER_SETTINGS"  # how a worker gets the supervisor's settings (service/worker.py)


class StartupFailed(RuntimeError):
    """A worker or the local store could not start; the message says why."""


def _child_setup() -> None:
    """In each child before exec: SIGTERM when the supervisor dies (even by SIGKILL), so that neither a
    worker nor the store outlives it. Children run in their own session (start_new_session), so a Ctrl-C
    or a process-group signal reaches only the supervisor, which drains the workers before the store."""
    libc = ctypes.util.find_library("c")
    if libc:
        ctypes.CDLL(libc, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class LocalRedis:
    """A private redis-server on a Unix socket in `directory`: no TCP port, no persistence, supervised."""

    directory: Path
    executable: str
    max_memory: str = "0"
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0

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
        self.process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_child_setup
        )
        client = redis.Redis(unix_socket_path=str(self.socket_path), socket_timeout=1, socket_connect_timeout=1)
        deadline = time.monotonic() + timeout
        try:
            while True:
                if self.process.poll() is not None:
                    raise StartupFailed(
                        f"redis-server exited with {self.process.returncode} at start-up: {self.log_tail()}"
                    )
                try:
                    if client.ping():
                        return
                except (redis.ConnectionError, redis.TimeoutError, FileNotFoundError):
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise StartupFailed(f"redis-server did not answer on {self.socket_path} in {timeout:.0f} s")
                time.sleep(0.05)
        finally:
            client.close()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def restart_if_dead(self) -> None:
        """A dead store is replaced at once on the same socket; its sessions are gone (as on a restart)."""
        if self.process is not None and not self.alive():
            self.restarts += 1
            log.error(
                "the local session store (redis-server) exited with %s (%s); restarting it: its sessions are lost",
                self.process.returncode,
                self.log_tail(),
            )
            self.start()

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@dataclass
class Worker:
    index: int
    process: subprocess.Popen[bytes]
    ready_pipe: IO[bytes]  # the worker writes one byte when it serves, and the pipe closes when it exits
    started: bool = False
    started_at: float = field(default_factory=time.monotonic)


def resolve_workers(settings: Settings) -> int:
    """workers=0: one per core this process may run on, up to max_auto_workers; otherwise as asked."""
    if settings.workers > 0:
        return settings.workers
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, settings.max_auto_workers))


def bind(host: str, port: int) -> socket.socket:
    """The one listening socket all workers accept from (inheritable, so the workers get its descriptor)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise StartupFailed(f"cannot bind {host}:{port}: {exc.strerror}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class Supervisor:
    """Runs the workers and the local store until SIGTERM/SIGINT; see the module docstring."""

    def __init__(self, settings: Settings, workers: int) -> None:
        self.settings = settings
        self.count = workers
        self.workers: list[Worker] = []
        self.stopping = threading.Event()
        self.runtime = Path(tempfile.mkdtemp(prefix="cellgate-"))
        self.metrics_dir = self.runtime / "metrics"
        self.metrics_dir.mkdir(mode=0o700)
        self.store: LocalRedis | None = None
        self.env: dict[str, str] = {}
        self.sock: socket.socket | None = None

    def _environment(self) -> dict[str, str]:
        """What the workers read: these settings exactly (JSON; a worker is a single-process service on the
        shared store), and the metrics directory."""
        changes: dict[str, object] = {"workers": 1}
        if self.store is not None:
            changes["session_store"] = self.store.url
        worker_settings = self.settings.model_copy(update=changes)
        return {
            **os.environ,
            WORKER_SETTINGS: worker_settings.model_dump_json(),
            "PROMETHEUS_MULTIPROC_DIR": str(self.metrics_dir),
        }

    def _spawn(self, index: int) -> Worker:
        assert self.sock is not None
        read_fd, write_fd = os.pipe()
        command = [sys.executable, "-m", "service.worker", str(self.sock.fileno()), str(write_fd), str(index)]
        process = subprocess.Popen(
            command,
            env=self.env,
            pass_fds=(self.sock.fileno(), write_fd),
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_child_setup,
        )
        os.close(write_fd)
        return Worker(index, process, os.fdopen(read_fd, "rb", buffering=0))

    def _wait_started(self) -> None:
        """Block until every worker wrote its byte; raise StartupFailed if one exits or takes too long."""
        selector = selectors.DefaultSelector()
        for worker in self.workers:
            selector.register(worker.ready_pipe, selectors.EVENT_READ, worker)
        deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
        pending = len(self.workers)
        while pending:
            if self.stopping.is_set():
                raise StartupFailed("stopped during start-up")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise StartupFailed(f"a worker did not start in {STARTUP_TIMEOUT_SECONDS:.0f} s")
            for key, _ in selector.select(min(remaining, POLL_SECONDS)):
                ready: Worker = key.data
                if not ready.ready_pipe.read(1):
                    raise StartupFailed(f"worker {ready.index} exited during start-up ({ready.process.wait()})")
                ready.started = True
                selector.unregister(ready.ready_pipe)
                pending -= 1
        selector.close()

    def _replace_dead(self) -> None:
        from prometheus_client import multiprocess

        for position, worker in enumerate(self.workers):
            code = worker.process.poll()
            if code is None:
                continue
            worker.ready_pipe.close()
            multiprocess.mark_process_dead(worker.process.pid, str(self.metrics_dir))  # type: ignore[no-untyped-call]
            log.error("worker %d (pid %d) exited with %s; starting a new one", worker.index, worker.process.pid, code)
            self.workers[position] = self._spawn(worker.index)

    def _on_signal(self, signum: int, frame: object) -> None:
        self.stopping.set()

    def run(self) -> int:
        """Serve until a signal; returns the exit status."""
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            self._start()
            while not self.stopping.wait(POLL_SECONDS):
                self._replace_dead()
                if self.store is not None:
                    self.store.restart_if_dead()
            log.info("draining %d workers", len(self.workers))
            return 0
        except StartupFailed as exc:
            log.error("cellgate serve --workers %d: %s", self.count, exc)
            return 1
        finally:
            self._stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _start(self) -> None:
        settings = self.settings
        if settings.session_store == "memory":
            executable = shutil.which(settings.local_store_executable)
            if executable is None:
                raise StartupFailed(
                    f"--workers {self.count} shares sessions through a store: install redis-server "
                    f"({settings.local_store_executable!r} is not on PATH) or set CELLGATE_SESSION_STORE=redis://..."
                )
            self.store = LocalRedis(self.runtime / "store", executable, settings.local_store_max_memory)
            self.store.start()
            log.info("sessions are shared through a private redis-server on %s", self.store.socket_path)
        self.env = self._environment()
        self.sock = bind(settings.host, settings.port)
        self.workers = [self._spawn(index) for index in range(self.count)]
        self._wait_started()
        host, port = self.sock.getsockname()[:2]
        # The same line a single process logs (tools and tests wait for it), once every worker serves.
        log.info("Uvicorn running on http://%s:%d (%d workers; press CTRL+C to quit)", host, port, self.count)

    def _stop(self) -> None:
        for worker in self.workers:
            if worker.process.poll() is None:
                worker.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.settings.drain_timeout_seconds + 5.0
        for worker in self.workers:
            try:
                worker.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("worker %d did not drain in time; killing it", worker.index)
                worker.process.kill()
                worker.process.wait()
            worker.ready_pipe.close()
        if self.sock is not None:
            self.sock.close()
        if self.store is not None:
            self.store.stop()
        shutil.rmtree(self.runtime, ignore_errors=True)
