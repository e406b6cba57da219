"""The thin slice: train → export → serve → predict, each through the real CLI and real HTTP."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import httpx

from model.corpus import COUNTRY_LANGUAGE
from tests.servers import running_server

LANGUAGES = {language for _, language in COUNTRY_LANGUAGE}


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cellgate.cli", *args], capture_output=True, text=True, timeout=300)


def test_train_export_serve_predict(tmp_path: Path) -> None:
    run_dir, bundle = tmp_path / "run", tmp_path / "bundle"
    trained = cli(
        "train", "--corpus", "builtin:longrange", "--out", str(run_dir), "--hidden-size", "32", "--layers", "1",
        "--epochs", "3", "--quiet",
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr
    assert (run_dir / "best.pt").exists()
    assert (run_dir / "last.pt").exists()
    assert len((run_dir / "log.jsonl").read_text().splitlines()) >= 1

    exported = cli("export", str(run_dir), "--out", str(bundle))
    assert exported.returncode == 0, exported.stderr
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["parity"]["ok"] is True

    with running_server(bundle) as server:
        response = httpx.post(
            f"{server.url}/v1/predict", json={"text": "i stay in india . it was cold today . i speak", "k": 5}
        )
        assert response.status_code == 200
        predictions = response.json()["predictions"]
        assert len(predictions) == 5
        probs = [p["prob"] for p in predictions]
        assert all(0.0 < p <= 1.0 for p in probs)
        assert probs == sorted(probs, reverse=True)
        assert sum(probs) <= 1.0 + 1e-6
        # Even a barely trained model knows a language follows "i speak".
        assert predictions[0]["word"] in LANGUAGES
        assert httpx.get(f"{server.url}/healthz").json() == {"status": "ok"}

        predicted = cli("predict", "i stay in", "--url", server.url, "--json")
        assert predicted.returncode == 0, predicted.stderr
        words = [p["word"] for p in json.loads(predicted.stdout)["predictions"]]
        assert words[0] in {country for country, _ in COUNTRY_LANGUAGE}
        assert not math.isnan(json.loads(predicted.stdout)["predictions"][0]["prob"])
