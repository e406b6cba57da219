"""Helpers for the deploy tests: repository paths, required binaries, free ports, polling with a deadline."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
T = TypeVar("T")


def require(binary: str, package: str) -> str:
    """The path of a binary the deploy checks need; a clear failure (not a skip) when it is missing."""
    path = shutil.which(binary)
    if path is None:
        pytest.fail(f"{binary} is not installed (apt-get install {package}; `make test` installs it)")
    return path


def run(command: Sequence[str], timeout: float = 120, **kwargs: object) -> subprocess.CompletedProcess[str]:
    """Run a command to completion and capture its output as text."""
    return subprocess.run(list(command), capture_output=True, text=True, timeout=timeout, check=False, **kwargs)  # type: ignore[call-overload, no-any-return]


def free_port() -> int:
    """A loopback port that was free a moment ago (for binaries that cannot bind port 0 and report it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def poll(check: Callable[[], T | None], timeout: float, what: str, interval: float = 0.2) -> T:
    """Call check until it returns something truthy (not None, False, 0 or empty); fail with `what` at the deadline."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            result = check()
            if result:
                return result
        except Exception as exc:  # the thing polled may not be up yet
            last_error = exc
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what} (last error: {last_error!r})")
        time.sleep(interval)
