"""Shared, expensive fixtures: a tiny trained model and its bundle, built once per test run."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers import ServerProcess, running_server

# httpx logs every request at INFO: under `make soak`'s live INFO log that buried the soak's own figures
# in millions of request lines.
logging.getLogger("httpx").setLevel(logging.WARNING)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small LSTM trained for a few seconds on builtin:longrange with short gaps."""
    from model.train import train
    from tests.training import tiny_train_config

    out = tmp_path_factory.mktemp("tiny_run")
    cfg = tiny_train_config(out, hidden_size=32, batch_size=32, epochs=4, episodes=400, gap_max=12)
    train(cfg)
    return out


@pytest.fixture(scope="session")
def tiny_bundle(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from export.build import export_checkpoint

    out = tmp_path_factory.mktemp("bundles") / "tiny"
    export_checkpoint(tiny_run, out)
    return out


@pytest.fixture(scope="session")
def server(tiny_bundle: Path) -> Iterator[ServerProcess]:
    """One real uvicorn process shared by the API tests (short TTL off; defaults otherwise)."""
    with running_server(tiny_bundle, {"CELLGATE_ACCESS_LOG": "false"}) as proc:
        yield proc
