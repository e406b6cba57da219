"""Real server processes for tests: started on a free loopback port, always torn down."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

_LISTENING = re.compile(r"Uvicorn running on http://([\d.]+):(\d+)")


@dataclass
class ServerProcess:
    process: subprocess.Popen[str]
    url: str
    log: list[str] = field(default_factory=list)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                return self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                return self.process.wait(timeout)
        return self.process.returncode


def _pump(stream: object, lines: queue.Queue[str | None], log: list[str]) -> None:
    for line in stream:  # type: ignore[attr-defined]
        log.append(line)
        lines.put(line)
    lines.put(None)


def start_server(bundle: Path, env: Mapping[str, str] | None = None, timeout: float = 60.0) -> ServerProcess:
    """`cellgate serve` on port 0; waits for uvicorn's own "running on" line, which names the port."""
    full_env = {**os.environ, "CELLGATE_BUNDLE": str(bundle), "CELLGATE_PORT": "0", **(env or {})}
    process = subprocess.Popen(
        [sys.executable, "-m", "cellgate.cli", "serve"],
        env=full_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue[str | None] = queue.Queue()
    log: list[str] = []
    threading.Thread(target=_pump, args=(process.stderr, lines, log), daemon=True).start()
    while True:
        try:
            line = lines.get(timeout=timeout)
        except queue.Empty:
            process.kill()
            raise RuntimeError("server did not start in time:\n" + "".join(log)) from None
        if line is None:
            raise RuntimeError(f"server exited with {process.wait()}:\n" + "".join(log))
        match = _LISTENING.search(line)
        if match:
            return ServerProcess(process, f"http://{match.group(1)}:{match.group(2)}", log)


@contextmanager
def running_server(bundle: Path, env: Mapping[str, str] | None = None) -> Iterator[ServerProcess]:
    server = start_server(bundle, env)
    try:
        yield server
    finally:
        server.stop()
