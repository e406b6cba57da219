"""`cellgate serve --workers N`: N serving processes on one port, sharing their sessions through one store.

The supervisor (this process) binds the listening socket once and hands it to N worker processes
(`python -m service.worker`), each a complete single-process service — its own ONNX Runtime session,
batcher and event loop — accepting connections from the same socket. Sessions live in one store every
worker reads and writes with compare-and-set, so any session can be stepped through any worker with the
guarantees of one process: exactly-once `if_step`, ordering, rewind, fork, expiry, `model_mismatch`.
Without a store URL that store is an LMDB environment in a private directory on /dev/shm
(service/store/lmdb.py: no server, no persistence, like the in-memory store), removed at exit; with
CELLGATE_SESSION_STORE=redis://... the workers share that Redis (and with other replicas).

Life cycle: the "Uvicorn running on ..." line is logged once every worker has finished its start-up
(model loaded and warmed), so whoever waits for it gets a fully ready service. A worker that dies
after that is replaced (and logged); one that fails during start-up stops everything, because its
replacement would fail the same way. SIGTERM/SIGINT drain every worker (each refuses new requests and
closes its WebSockets cleanly, as one process does), then the store is removed, and the exit status is 0.

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
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from service.config import Settings

log = logging.getLogger("cellgate.workers")

# How long a worker may take from spawn to serving (loading and warming the model) before start-up fails.
STARTUP_TIMEOUT_SECONDS = 120.0
POLL_SECONDS = 0.5
RUNTIME_PREFIX = "cellgate-workers-"  # then the supervisor's pid: a directory whose pid is gone is stale
PR_SET_PDEATHSIG = 1  # linux/prctl.h
WORKER_SETTINGS = "CELLGATE_WORKER_SETTINGS"  # how a worker gets the supervisor's settings (service/worker.py)


class StartupFailed(RuntimeError):
    """The socket could not be bound or a worker could not start; the message says why."""


def _child_setup() -> None:
    """In each worker before exec: SIGTERM when the supervisor dies (even by SIGKILL), so that no worker
    outlives it and keeps serving the port. Workers run in their own session (start_new_session), so a
    Ctrl-C or a process-group signal reaches only the supervisor, which then drains them in order."""
    libc = ctypes.util.find_library("c")
    if libc:
        ctypes.CDLL(libc, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Worker:
    index: int
    process: subprocess.Popen[bytes]
    ready_pipe: IO[bytes]  # the worker writes one byte when it serves, and the pipe closes when it exits


def _remove_stale_runtimes() -> None:
    """Directories left by supervisors that died without cleaning up (SIGKILL): their store is memory."""
    for base in (Path("/dev/shm"), Path(tempfile.gettempdir())):
        for directory in base.glob(f"{RUNTIME_PREFIX}*"):
            pid = directory.name.removeprefix(RUNTIME_PREFIX).split("-")[0]
            if pid.isdigit() and not Path(f"/proc/{pid}").exists():
                shutil.rmtree(directory, ignore_errors=True)


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
        _remove_stale_runtimes()
        shm = Path("/dev/shm")
        # /dev/shm is memory: the store's pages are never written back to a disk.
        base = shm if shm.is_dir() and os.access(shm, os.W_OK) else None
        self.runtime = Path(tempfile.mkdtemp(prefix=f"{RUNTIME_PREFIX}{os.getpid()}-", dir=base))
        self.metrics_dir = self.runtime / "metrics"
        self.metrics_dir.mkdir(mode=0o700)
        self.store_url: str | None = None
        self.env: dict[str, str] = {}
        self.sock: socket.socket | None = None

    def _environment(self) -> dict[str, str]:
        """What the workers read: these settings exactly (JSON; a worker is a single-process service on the
        shared store), and the metrics directory."""
        changes: dict[str, object] = {"workers": 1}
        if self.store_url is not None:
            changes["session_store"] = self.store_url
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
            self.store_url = f"lmdb://{self.runtime / 'sessions'}"
            log.info("sessions are shared through %s", self.store_url)
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
        shutil.rmtree(self.runtime, ignore_errors=True)
