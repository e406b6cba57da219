"""The serving side never imports torch (the runtime image does not even have it)."""

from __future__ import annotations

import subprocess
import sys


def test_service_modules_do_not_import_torch() -> None:
    code = (
        "import sys\n"
        "import service.app, service.server, service.runner, service.sessions, service.scheduler\n"
        "import service.store.memory, service.store.redis, export.bundle, model.vocab, cellgate.client\n"
        "from service.app import create_app\n"
        "create_app()\n"
        "leaked = sorted(m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'onnx.')) or m == 'onnx')\n"
        "assert not leaked, leaked\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
