"""Running the app under uvicorn: JSON logs, graceful drain on SIGTERM; one process, or N (service/workers.py)."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any

import uvicorn
from pythonjsonlogger.json import JsonFormatter

from service.app import create_app
from service.config import Settings
from service.errors import ShuttingDown, render
from service.metrics import Metrics

# The event loop and the inference thread share the GIL. ONNX Runtime releases it while it computes, but
# the thread's own Python (gathering and scattering states) can hold it for CPython's default 5 ms while
# the loop waits with parsed requests in hand. 0.5 ms: 5.4k -> 6.5k req/s on the 2x256 model, 256 sessions.
GIL_SWITCH_INTERVAL_SECONDS = 0.0005
# Each request allocates a few hundred objects, so the default young-generation threshold (700) ran a
# collection every couple of requests; 20,000 keeps that cost (~9 % of the event loop in py-spy) away.
GC_THRESHOLDS = (20_000, 20, 20)


def configure_logging(settings: Settings, worker: int | None = None) -> None:
    handler = logging.StreamHandler(sys.stderr)
    # With --workers N every line names its worker: N processes write to one stream.
    static = {"worker": worker} if worker is not None else None
    handler.setFormatter(
        JsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s", timestamp=False, static_fields=static)
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())
    logging.getLogger("cellgate.access").disabled = not settings.access_log
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.access").disabled = True  # our access log carries the request id


class DrainingServer(uvicorn.Server):
    """On SIGTERM/SIGINT: refuse new requests (503), close WebSockets cleanly, let in-flight work finish."""

    def handle_exit(self, sig: int, frame: Any) -> None:
        app = self.config.loaded_app
        state = getattr(getattr(app, "app", app), "state", None)
        # Find the FastAPI app under the middleware stack uvicorn wrapped around it.
        fastapi_app = self.config.app
        state = getattr(fastapi_app, "state", state)
        if state is not None and not getattr(state, "draining", False):
            state.draining = True
            for ws in list(getattr(state, "websockets", ())):
                asyncio.get_event_loop().create_task(_close(ws, state.metrics))
        super().handle_exit(sig, frame)


async def _close(ws: Any, metrics: Metrics) -> None:
    try:
        await ws.send_text(render(ShuttingDown(), metrics, ws.url.path).body.decode())
        await ws.close(1001)
    except Exception:  # the peer may already be gone
        logging.getLogger("cellgate").debug("websocket already closed during drain")


class WorkerServer(DrainingServer):
    """A worker of `--workers N`: tells the supervisor once it serves (model loaded, socket accepting)."""

    def __init__(self, config: uvicorn.Config, on_started: Callable[[], None]) -> None:
        super().__init__(config)
        self.on_started = on_started

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and not self.should_exit:
            self.on_started()


def _prepare_process(settings: Settings, worker: int | None = None) -> None:
    configure_logging(settings, worker)
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_SECONDS)
    gc.set_threshold(*GC_THRESHOLDS)


def _config(settings: Settings) -> uvicorn.Config:
    return uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        workers=1,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=int(settings.drain_timeout_seconds),
        ws_max_size=settings.max_ws_message_bytes,
        server_header=False,
        proxy_headers=False,
    )


def serve(settings: Settings) -> int:
    """Run the service in the foreground until SIGTERM/SIGINT; returns the exit status."""
    from service.workers import Supervisor, resolve_workers

    workers = resolve_workers(settings)
    if workers > 1:
        configure_logging(settings)
        status: int = Supervisor(settings, workers).run()
        return status
    _prepare_process(settings)
    # uvicorn re-raises the signal once its graceful shutdown is done; with the default handler that kills
    # the process (exit status -15) even though the drain succeeded. Exit 0 instead, as supervisors expect.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    DrainingServer(_config(settings)).run()
    return 0


def serve_socket(settings: Settings, sock: socket.socket, on_started: Callable[[], None], worker: int) -> None:
    """One worker of `--workers N` on the supervisor's listening socket (service/worker.py)."""
    _prepare_process(settings, worker)
    signal.signal(signal.SIGTERM, _exit_cleanly)
    WorkerServer(_config(settings), on_started).run(sockets=[sock])


def _exit_cleanly(sig: int, frame: Any) -> None:
    raise SystemExit(0)
