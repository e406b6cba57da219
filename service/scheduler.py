"""Cross-session dynamic batching: steps that arrive together run as one ONNX Runtime call.

Requests wait in a bounded queue. One loop takes everything queued (up to max_batch), waiting at
most max_wait for company when it finds a lone request, splits the batch into groups of similar
length (padding a 1-word step to a 2,000-word prefill would waste the call), gathers each group's
(h, C) into one tensor, runs it on a single inference thread so the event loop never blocks, and
scatters the rows back to their futures. While one call runs, the next batch fills up. A step that
asks for its gates also runs the explain graph, on the same thread, right after its batch.

If the loop ever ends (a bug, or a cancel), `alive` turns False (/readyz answers 503) and every
request it holds or that arrives later is refused with not_ready instead of waiting forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import numpy as np

from service.config import Settings
from service.errors import NotReady, Overloaded
from service.metrics import Metrics
from service.runner import Runner

log = logging.getLogger("cellgate.scheduler")


@dataclass(frozen=True)
class StepOutput:
    """One sequence's share of a batch result."""

    top_ids: np.ndarray  # (k,)
    top_log_probs: np.ndarray  # (k,)
    hidden: np.ndarray  # (L, H)
    cell: np.ndarray  # (L, H)
    log_probs: np.ndarray | None  # (V,)
    gates: dict[str, np.ndarray] | None = None  # name -> (T, L, H), for the tokens just run, when asked for


@dataclass
class _Job:
    tokens: Sequence[int]
    hidden: np.ndarray  # (L, H)
    cell: np.ndarray  # (L, H)
    k: int
    want_log_probs: bool
    explain: bool
    future: asyncio.Future[StepOutput]
    enqueued_at: float = field(default_factory=time.perf_counter)


def partition_by_length(jobs: list[_Job]) -> list[list[_Job]]:
    """Groups whose longest row is at most twice the shortest (plus slack for one-word steps)."""
    ordered = sorted(jobs, key=lambda j: len(j.tokens))
    groups: list[list[_Job]] = []
    for job in ordered:
        if groups and len(job.tokens) <= 2 * len(groups[-1][0].tokens) + 4:
            groups[-1].append(job)
        else:
            groups.append([job])
    return groups


class Scheduler:
    """The batcher between the SessionManager and the Runner."""

    def __init__(self, runner: Runner, settings: Settings, metrics: Metrics) -> None:
        self.runner = runner
        self.max_batch = settings.max_batch
        self.max_wait = settings.max_wait_us / 1e6
        self.queue_timeout = settings.queue_timeout_seconds
        self.metrics = metrics
        self._queue: asyncio.Queue[_Job] = asyncio.Queue(maxsize=settings.queue_size)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        self._task: asyncio.Task[None] | None = None
        self._taken: list[_Job] = []  # the jobs the loop holds outside the queue
        metrics.queue_capacity.set(settings.queue_size)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="batch-scheduler")
        self._task.add_done_callback(self._ended)

    @property
    def alive(self) -> bool:
        """Whether the batching loop is running (False once it has ended, for whatever reason)."""
        return self._task is not None and not self._task.done()

    def _ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("the batching loop died; refusing inference from now on", exc_info=task.exception())
        stranded, self._taken = self._taken, []
        while not self._queue.empty():
            stranded.append(self._queue.get_nowait())
        for job in stranded:
            if not job.future.done():
                job.future.set_exception(NotReady("the batching task has stopped"))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._executor.shutdown(wait=True)

    async def submit(
        self,
        tokens: Sequence[int],
        hidden: np.ndarray,
        cell: np.ndarray,
        k: int,
        want_log_probs: bool = False,
        explain: bool = False,
    ) -> StepOutput:
        """Run one sequence from (h, C) (each (L, H)); raises Overloaded when the queue is full and NotReady
        once the loop has ended (before start() the job waits for it). With explain, the output carries the gates
        for these tokens."""
        if self._task is not None and self._task.done():
            raise NotReady("the batching task has stopped")
        future: asyncio.Future[StepOutput] = asyncio.get_running_loop().create_future()
        job = _Job(tokens, hidden, cell, k, want_log_probs, explain, future)
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            self.metrics.overloaded.inc()
            raise Overloaded() from None
        self.metrics.queue_depth.set(self._queue.qsize())
        return await future

    async def _collect(self) -> list[_Job]:
        jobs = self._taken = [await self._queue.get()]
        deadline = time.perf_counter() + self.max_wait
        while len(jobs) < self.max_batch:
            try:
                jobs.append(self._queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                break
            try:
                jobs.append(await asyncio.wait_for(self._queue.get(), remaining))
            except TimeoutError:
                break
        self.metrics.queue_depth.set(self._queue.qsize())
        return jobs

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = await self._collect()
            now = time.perf_counter()
            live = []
            for job in jobs:
                if job.future.done():  # the caller went away (cancelled)
                    continue
                waited = now - job.enqueued_at
                if waited > self.queue_timeout:
                    self.metrics.overloaded.inc()
                    job.future.set_exception(Overloaded(f"waited {waited:.1f}s in the queue; retry shortly"))
                    continue
                self.metrics.queue_wait.observe(waited)
                live.append(job)
            for group in partition_by_length(live):
                try:
                    outputs = await loop.run_in_executor(self._executor, self._run_group, group)
                except Exception as exc:  # a failed call fails its requests, never the loop
                    for job in group:
                        if not job.future.done():
                            job.future.set_exception(exc)
                    continue
                for job, output in zip(group, outputs, strict=True):
                    if job.future.done():
                        continue
                    if isinstance(output, Exception):
                        job.future.set_exception(output)
                    else:
                        job.future.set_result(output)
            self._taken = []

    def _run_group(self, group: list[_Job]) -> list[StepOutput | Exception]:
        """Gather (h, C) rows, run once, scatter (runs on the inference thread). A row's failed explain fails
        that row only."""
        hidden = np.stack([j.hidden for j in group], axis=1)  # (L, B, H)
        cell = np.stack([j.cell for j in group], axis=1)
        k = max(j.k for j in group)
        want = any(j.want_log_probs for j in group)
        started = time.perf_counter()
        result = self.runner.run([j.tokens for j in group], hidden, cell, k, want_log_probs=want)
        self.metrics.inference_duration.labels("step").observe(time.perf_counter() - started)
        self.metrics.batch_size.observe(len(group))
        outputs: list[StepOutput | Exception] = []
        for row, job in enumerate(group):
            output = StepOutput(
                top_ids=result.top_ids[row, : job.k],
                top_log_probs=result.top_log_probs[row, : job.k],
                hidden=result.hidden[:, row].copy(),
                cell=result.cell[:, row].copy(),
                log_probs=result.log_probs[row].copy() if job.want_log_probs and result.log_probs is not None else None,
            )
            if job.explain:
                try:
                    output = replace(output, gates=self._explain(job))
                except Exception as exc:
                    outputs.append(exc)
                    continue
            outputs.append(output)
        return outputs

    def _explain(self, job: _Job) -> dict[str, np.ndarray]:
        started = time.perf_counter()
        gates = self.runner.explain(job.tokens, job.hidden[:, None, :], job.cell[:, None, :])  # (L, 1, H) in
        self.metrics.inference_duration.labels("explain").observe(time.perf_counter() - started)
        return gates
