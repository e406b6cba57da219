"""Fixtures of the deploy tests: a real Prometheus server scraping the shared live service."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.deploy.tools import DEPLOY, free_port, poll, require, run
from tests.servers import ServerProcess

PROMETHEUS = DEPLOY / "prometheus"
ALERTS = PROMETHEUS / "alerts.yml"


class Prometheus:
    """A real Prometheus server on loopback with its own config and TSDB in a temp dir."""

    def __init__(self, config: dict[str, Any], directory: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        (directory / "prometheus.yml").write_text(yaml.safe_dump(config))
        checked = run([require("promtool", "prometheus"), "check", "config", str(directory / "prometheus.yml")])
        assert checked.returncode == 0, checked.stdout + checked.stderr
        self.log = (directory / "prometheus.log").open("w")
        self.process = subprocess.Popen(
            [
                require("prometheus", "prometheus"),
                f"--config.file={directory / 'prometheus.yml'}",
                f"--storage.tsdb.path={directory / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def query(self, expr: str) -> list[dict[str, Any]]:
        response = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        body = response.json()
        assert response.status_code == 200, (expr, body)
        assert body["status"] == "success", (expr, body)
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def scalar(self, expr: str) -> float | None:
        """The value of a one-series result, or None while the result is empty."""
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


@pytest.fixture(scope="session")
def prometheus(server: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    """Prometheus scraping the shared service every second and evaluating the repo's alert rules."""
    directory = tmp_path_factory.mktemp("prometheus")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [{"job_name": "cellgate", "static_configs": [{"targets": [server.url.split("//")[1]]}]}],
    }
    instance = Prometheus(config, directory)
    try:
        poll(lambda: httpx.get(f"{instance.url}/-/ready", timeout=2).status_code == 200, 60, "Prometheus ready")
        yield instance
    finally:
        instance.stop()
