"""The serving side never imports torch (the runtime image does not even have it), nor anything of model/:
it reads the bundle through export/bundle.py and the vocabulary through the vocab package."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

# Run in a fresh interpreter where torch, onnx and model/ cannot be imported at all: an import of any of
# them anywhere in the service fails the run, whether or not the test looks at sys.modules afterwards.
SERVE_WITHOUT_MODEL = """
import asyncio, sys
for name in ("torch", "onnx", "model"):
    sys.modules[name] = None  # `import name` now raises ImportError
import httpx
from service.app import create_app
from service.config import Settings
import service.server, service.store.redis, cellgate.client

async def main(bundle):
    app = create_app(Settings(bundle=bundle))
    async with app.router.lifespan_context(app), httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://cellgate"
    ) as client:
        created = await client.post("/v1/sessions", json={"text": "i stay in"})
        sid = created.json()["session_id"]
        answers = [
            created,
            await client.post(f"/v1/sessions/{sid}/steps", json={"text": "india .", "explain": True}),
            await client.post(f"/v1/sessions/{sid}/generate", json={"max_words": 3, "seed": 1}),
            await client.post(f"/v1/sessions/{sid}/rewind", json={"to_step": 3}),
            await client.post("/v1/predict", json={"text": "i speak"}),
            await client.get("/v1/model"),
            await client.get("/readyz"),
        ]
    print(" ".join(str(a.status_code) for a in answers))

asyncio.run(main(sys.argv[1]))
leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "onnx", "model") and sys.modules[m] is not None)
assert not leaked, leaked
"""


def test_the_service_runs_without_torch_or_model(tiny_bundle: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", SERVE_WITHOUT_MODEL, str(tiny_bundle)], capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["201", "200", "200", "200", "200", "200", "200"]
