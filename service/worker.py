"""One worker of `cellgate serve --workers N` (service/workers.py starts it; not a command for people).

    python -m service.worker LISTEN_FD READY_FD INDEX

Serves the supervisor's listening socket with the supervisor's settings (CELLGATE_WORKER_SETTINGS), writes one
byte to READY_FD once it serves, and drains and exits if the supervisor disappears (the kernel sends
SIGTERM then: service/workers.py sets PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import json
import os
import socket
import sys


def main(argv: list[str]) -> int:
    listen_fd, ready_fd, index = (int(value) for value in argv)
    from service.config import Settings
    from service.server import serve_socket
    from service.workers import WORKER_SETTINGS

    sock = socket.socket(fileno=listen_fd)
    ready = os.fdopen(ready_fd, "wb", buffering=0)

    def started() -> None:
        ready.write(b"1")
        ready.close()

    # Keyword arguments win over the environment: the worker runs exactly the settings the supervisor validated.
    serve_socket(Settings(**json.loads(os.environ[WORKER_SETTINGS])), sock, started, worker=index)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
