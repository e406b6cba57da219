"""Dynamic batching: rows batched with strangers of other lengths get what they would get alone."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from export.bundle import load_bundle
from service.config import Settings
from service.errors import NotReady, Overloaded
from service.metrics import Metrics
from service.runner import Runner
from service.scheduler import Scheduler, partition_by_length
from tests.service.harness import service_core

Sequence = tuple[list[int], np.ndarray, np.ndarray]


@st.composite
def requests(draw: st.DrawFn, vocab: int = 60, layers: int = 2, hidden: int = 32) -> list[Sequence]:
    count = draw(st.integers(2, 24))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        length = draw(st.sampled_from([0, 1, 1, 1, 2, 3, 7, 20, 64]))
        tokens = rng.integers(3, vocab, size=length).tolist()
        h = rng.uniform(-1, 1, (layers, hidden)).astype(np.float32)
        c = rng.normal(0, 2, (layers, hidden)).astype(np.float32)
        out.append((tokens, h, c))
    return out


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=requests())
def test_batched_rows_equal_rows_run_alone(tiny_bundle: Path, batch: list[Sequence]) -> None:
    bundle = load_bundle(tiny_bundle)
    cfg = Settings(bundle=tiny_bundle, max_batch=64, max_wait_us=20_000)
    runner = Runner(bundle, cfg)
    metrics = Metrics()

    async def together() -> list[object]:
        scheduler = Scheduler(runner, cfg, metrics)
        await scheduler.start()
        try:
            return list(await asyncio.gather(*(scheduler.submit(t, h, c, 5) for t, h, c in batch)))
        finally:
            await scheduler.stop()

    outputs = asyncio.run(together())
    for (tokens, h, c), out in zip(batch, outputs, strict=True):
        alone = runner.run([tokens], h[:, None], c[:, None], 5)
        np.testing.assert_allclose(out.hidden, alone.hidden[:, 0], atol=1e-5)  # type: ignore[attr-defined]
        np.testing.assert_allclose(out.cell, alone.cell[:, 0], atol=1e-5, rtol=1e-5)  # type: ignore[attr-defined]
        np.testing.assert_allclose(out.top_log_probs, alone.top_log_probs[0], atol=1e-5)  # type: ignore[attr-defined]
        assert out.top_ids.tolist() == alone.top_ids[0].tolist()  # type: ignore[attr-defined]
        if not tokens:  # an empty row keeps its state exactly
            assert out.hidden.tobytes() == h.tobytes()  # type: ignore[attr-defined]
    # They really were batched: one ONNX Runtime call per group of similar lengths, not per request.
    sizes = metrics.batch_size.collect()[0].samples
    calls = next(s.value for s in sizes if s.name == "cellgate_batch_size_count")
    assert calls == len(partition_by_length([_Job(t) for t, _, _ in batch]))  # type: ignore[arg-type]


class _Job:
    def __init__(self, tokens: list[int]) -> None:
        self.tokens = tokens


def test_partition_keeps_similar_lengths_together() -> None:
    groups = partition_by_length([_Job([0] * n) for n in (1, 1, 2, 500, 3, 1, 600, 40)])  # type: ignore[arg-type]
    lengths = [[len(j.tokens) for j in g] for g in groups]
    assert lengths == [[1, 1, 1, 2, 3], [40], [500, 600]]


def test_full_queue_refuses_with_overloaded(tiny_bundle: Path) -> None:
    bundle = load_bundle(tiny_bundle)
    cfg = Settings(bundle=tiny_bundle, queue_size=2)
    runner = Runner(bundle, cfg)
    h, c = runner.zero_state(1)

    async def scenario() -> list[object]:
        scheduler = Scheduler(runner, cfg, Metrics())  # not started: nothing drains the queue
        first = asyncio.ensure_future(scheduler.submit([3], h[:, 0], c[:, 0], 5))
        second = asyncio.ensure_future(scheduler.submit([3], h[:, 0], c[:, 0], 5))
        await asyncio.sleep(0)  # let both enqueue (scheduling, not timing)
        with pytest.raises(Overloaded) as refused:
            await scheduler.submit([3], h[:, 0], c[:, 0], 5)
        assert refused.value.headers["Retry-After"] == "1"
        await scheduler.start()
        try:
            return list(await asyncio.gather(first, second))
        finally:
            await scheduler.stop()

    assert len(asyncio.run(scenario())) == 2


def _batching_task() -> asyncio.Task[object]:
    """The scheduler's loop, found the way an operator's debugger would: by its task name."""
    return next(t for t in asyncio.all_tasks() if t.get_name() == "batch-scheduler")


def test_a_dead_loop_refuses_queued_and_new_work(tiny_bundle: Path) -> None:
    cfg = Settings(bundle=tiny_bundle)
    runner = Runner(load_bundle(tiny_bundle), cfg)
    h, c = runner.zero_state(1)

    async def scenario() -> None:
        scheduler = Scheduler(runner, cfg, Metrics())
        await scheduler.start()
        try:
            assert scheduler.alive
            queued = asyncio.ensure_future(scheduler.submit([3], h[:, 0], c[:, 0], 5))
            await asyncio.sleep(0)  # the job is in the queue; the loop has not taken it yet
            task = _batching_task()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert not scheduler.alive
            with pytest.raises(NotReady):
                await queued  # stranded in the queue: refused, not left waiting forever
            with pytest.raises(NotReady):
                await scheduler.submit([3], h[:, 0], c[:, 0], 5)
        finally:
            await scheduler.stop()

    asyncio.run(scenario())


def test_explain_runs_on_the_inference_thread(tiny_bundle: Path) -> None:
    """A step with explain=true runs the explain graph inside the scheduler, off the event loop."""
    threads: list[str] = []

    async def scenario() -> tuple[dict[str, object], float | None]:
        async with service_core(tiny_bundle) as manager:
            explain = manager.runner.explain

            def recorded(*args: Any) -> dict[str, np.ndarray]:
                threads.append(threading.current_thread().name)
                return explain(*args)

            manager.runner.explain = recorded  # type: ignore[method-assign]
            created = await manager.create("i stay in", 3, "")
            reply = await manager.step(created["session_id"], "india .", 3, 3, "", explain=True)
            count = manager.metrics.registry.get_sample_value(
                "cellgate_inference_duration_seconds_count", {"graph": "explain"}
            )
            return reply, count

    reply, count = asyncio.run(scenario())
    assert len(threads) == 1
    assert threads[0].startswith("inference")  # the scheduler's single inference thread, not the event loop's
    assert count == 1.0
    explained = reply["explain"]
    assert isinstance(explained, dict)
    assert explained["words"] == ["india", "."]
    assert np.asarray(explained["forget_gate"]).shape[:2] == (2, explained["layers"])  # (T, L, H)
