"""Server processes for benchmarks and tests: start on port 0, learn the port from uvicorn's log line."""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

_LISTENING = re.compile(r"Uvicorn running on http://([\d.]+):(\d+)")


@dataclass
class ServerProcess:
    process: subprocess.Popen[str]
    url: str
    log: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.process.pid

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
        if len(log) < 10_000:  # keep the start of the log; a long benchmark must not grow memory
            log.append(line)
        lines.put(line)
    lines.put(None)


def start_process(command: Sequence[str], env: Mapping[str, str] | None = None, timeout: float = 90.0) -> ServerProcess:
    """Run a uvicorn-based server (bound to port 0) and wait for the line that names its port."""
    process = subprocess.Popen(
        list(command),
        env={**os.environ, **(env or {})},
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


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a live process, from /proc."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def descendants(pid: int) -> list[int]:
    """The live children, grandchildren, ... of pid (from /proc), not pid itself."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):  # the process went away while we looked
            continue
        children.setdefault(ppid, []).append(int(entry))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU of pid and its live descendants (worker processes, a supervised redis-server)."""
    total = 0.0
    for member in (pid, *descendants(pid)):
        try:
            total += cpu_seconds(member)
        except (OSError, IndexError, ValueError):
            continue
    return total


def free_port() -> int:
    """A loopback port that was free a moment ago (for servers that cannot bind port 0 and report it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
