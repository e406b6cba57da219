"""`python -m bench.serve --workers 1,2 [--models realistic]`: cellgate and the framework floor at 1, 2, … N
worker processes on this machine, alternating, with the cost of the shared session store.

For each worker count the same wrk load (bench/serve.py's: N sessions, one word per request, k=5) runs
against `cellgate serve --workers N` and against the floor app under `uvicorn --workers N` — the floor
run the same way. Two further configurations, one worker on the LMDB store that `--workers N > 1` uses
and one on a Redis store, isolate what sharing sessions costs per step. Every configuration runs once per
round and the order swaps each round, so the shared machine's background load falls on all alike. CPU is
read per process from /proc: the supervisor, each worker, the store.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.procs import ServerProcess, cpu_seconds, descendants, start_process
from bench.redis_local import LocalRedis


def _store_means(url: str) -> dict[str, float]:
    """Mean store operation latency (µs) by operation, from cellgate_store_operation_duration_seconds."""
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        for suffix, into in (("_sum{", sums), ("_count{", counts)):
            if line.startswith("cellgate_store_operation_duration_seconds" + suffix):
                operation = line.split('operation="')[1].split('"')[0]
                into[operation] = float(line.rsplit(" ", 1)[1])
    return {op: 1e6 * sums[op] / counts[op] for op in sums if counts.get(op)}


def _per_process_cpu(server: ServerProcess) -> dict[int, float]:
    pids = [server.pid, *descendants(server.pid)]
    out = {}
    for pid in pids:
        try:
            out[pid] = cpu_seconds(pid)
        except OSError:
            continue
    return out


def measure(server: ServerProcess, ids: list[str], sessions: int, seconds: float) -> dict[str, Any]:
    from bench.serve import _wrk

    before = _per_process_cpu(server)
    result = _wrk(server.url, ids, sessions, seconds)
    after = _per_process_cpu(server)
    per_process = {pid: (after[pid] - before.get(pid, 0.0)) / result["seconds"] for pid in after}
    result["server_cpu_cores"] = sum(per_process.values())
    # The busiest processes first: with workers, the workers; then the store and the idle supervisor.
    result["cpu_cores_by_process"] = sorted(per_process.values(), reverse=True)
    result["cpu_us_per_request"] = 1e6 * result["server_cpu_cores"] / max(result["req_per_second"], 1e-9)
    return result


def _cellgate(bundle: Path, workers: int, store: str | None) -> ServerProcess:
    env = {
        "CELLGATE_BUNDLE": str(bundle),
        "CELLGATE_PORT": "0",
        "CELLGATE_MAX_SESSIONS": "200000",
        "CELLGATE_WORKERS": str(workers),
    }
    if store is not None:
        env["CELLGATE_SESSION_STORE"] = store
    return start_process([sys.executable, "-m", "cellgate.cli", "serve"], env)


def _floor(workers: int, timeout: float = 60.0) -> ServerProcess:
    """The floor under `uvicorn --workers N`, once it answers (its "running on" line comes before its workers)."""
    command = [sys.executable, "-m", "uvicorn", "bench.floor_app:app", "--host", "127.0.0.1", "--port", "0"]
    server = start_process([*command, "--no-access-log", "--workers", str(workers)])
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.post(f"{server.url}/v1/sessions", timeout=5).status_code == 201:
                return server
        except httpx.TransportError:
            if time.monotonic() > deadline:
                server.stop()
                raise
        time.sleep(0.1)


def run(bundle: Path, workers: list[int], sessions: int, seconds: float, rounds: int) -> dict[str, Any]:
    """Every configuration once per round (order swapped each round); medians and per-round ratios."""
    from bench.serve import _sessions, _wrk

    configs = [(f"cellgate x{n}", "cellgate", n) for n in workers]
    configs += [("cellgate x1 lmdb", "cellgate-lmdb", 1), ("cellgate x1 redis", "cellgate-redis", 1)]
    configs += [(f"floor x{n}", "floor", n) for n in workers]
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="cellgate-bench-") as scratch:
        redis = LocalRedis(Path(scratch) / "store", "redis-server")
        redis.start()
        try:
            for round_index in range(rounds):
                order = configs if round_index % 2 == 0 else configs[::-1]
                for label, kind, count in order:
                    if kind == "floor":
                        server = _floor(count)
                    else:
                        stores = {"cellgate-redis": redis.url, "cellgate-lmdb": f"lmdb://{scratch}/lmdb-{round_index}"}
                        server = _cellgate(bundle, count, stores.get(kind))
                    try:
                        ids = _sessions(server.url, sessions)
                        _wrk(server.url, ids, sessions, min(3.0, seconds))  # warm-up (and the floor's workers)
                        result = measure(server, ids, sessions, seconds)
                        if kind != "floor":
                            result["store_us"] = _store_means(server.url)
                    finally:
                        server.stop()
                    result.update(label=label, kind=kind, workers=count, round=round_index)
                    runs.append(result)
                    print(
                        f"  round {round_index} {label:<18} {result['req_per_second']:7.0f} req/s  "
                        f"p50 {result['p50_ms']:6.1f}  p99 {result['p99_ms']:6.1f} ms  "
                        f"cpu {result['server_cpu_cores']:.2f} ({result['cpu_us_per_request']:.0f} µs/req; "
                        f"{', '.join(f'{c:.2f}' for c in result['cpu_cores_by_process'][:4])})  "
                        f"wrk {result['loadgen_cpu_cores']:.2f}",
                        flush=True,
                    )
        finally:
            redis.stop()
    return {"runs": runs, "summary": summarize(runs, [c[0] for c in configs])}


def summarize(runs: list[dict[str, Any]], labels: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for label in labels:
        mine = [r for r in runs if r["label"] == label]
        out[label] = {
            key: statistics.median(r[key] for r in mine)
            for key in ("req_per_second", "p50_ms", "p99_ms", "server_cpu_cores", "cpu_us_per_request")
        }
        out[label]["cpu_cores_by_process"] = mine[0]["cpu_cores_by_process"]
        if "store_us" in mine[0]:
            out[label]["store_us"] = mine[0]["store_us"]
    base = {r["round"]: r["req_per_second"] for r in runs if r["label"] == labels[0]}
    for label in labels:
        out[label]["vs_first_per_round"] = [
            r["req_per_second"] / base[r["round"]] for r in runs if r["label"] == label and r["round"] in base
        ]
    return out


def markdown(model: str, summary: dict[str, Any]) -> str:
    rows = [
        f"Scaling, {model} model (medians over rounds; ratio to cellgate x1 per round)",
        "",
        "| configuration | req/s | vs cellgate x1 | p50 / p99 ms | CPU cores (µs/req) | busiest processes, cores "
        "| store get / replace µs |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, entry in summary.items():
        ratios = ", ".join(f"{r:.2f}" for r in entry["vs_first_per_round"])
        store = entry.get("store_us", {})
        store_text = f"{store.get('get', 0):.0f} / {store.get('replace', 0):.0f}" if store else "–"
        rows.append(
            f"| {label} | {entry['req_per_second']:.0f} | {ratios} | {entry['p50_ms']:.1f} / {entry['p99_ms']:.1f} "
            f"| {entry['server_cpu_cores']:.2f} ({entry['cpu_us_per_request']:.0f}) "
            f"| {', '.join(f'{c:.2f}' for c in entry['cpu_cores_by_process'][:4])} | {store_text} |"
        )
    return "\n".join(rows) + "\n"
