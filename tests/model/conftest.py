"""Fixtures shared by the model tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from model.corpus import longrange_text


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny shapes: a second torch thread only adds contention on a shared two-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small generated text (never the shared data): short long-range episodes, one per line."""
    path = tmp_path_factory.mktemp("corpus") / "tiny.txt"
    path.write_text(longrange_text(seed=3, episodes=200, gap_min=0, gap_max=12), encoding="utf-8")
    return path
