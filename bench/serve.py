"""Serving benchmark: cellgate vs the framework floor vs a naive PyTorch server, on loopback.

    python -m bench.serve [--short] [--out bench/results/serve.json]   (also: cellgate bench serve)

For each model (the demo model and a realistic 2×256, 10k-word one) it starts each server as a
subprocess, drives it with wrk (a compiled load generator) for a bounded time with N concurrent
sessions, then stops everything. It reports req/s, p50/p95/p99 latency, the batch-size
distribution, WebSocket words/s, RSS per idle session (fresh, and with a full rewind history), and the
load generator's own CPU share.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from bench import profile, wrk
from bench.models import DEMO_RUN, REALISTIC_RUN, ensure_demo, ensure_realistic
from bench.procs import ServerProcess, cpu_seconds, rss_bytes, start_process, tree_cpu_seconds
from export.bundle import MANIFEST
from service.config import Settings

STEP_BODY = '{"text": "the", "k": 5}'


def _wrk(url: str, ids: list[str], connections: int, seconds: float, delay_ms: float | None = None) -> dict[str, Any]:
    """One wrk run of one-word steps over the sessions `ids`, round-robin."""
    return wrk.run(url, [(f"/v1/sessions/{sid}/steps", STEP_BODY) for sid in ids], connections, seconds, delay_ms)


def _sessions(url: str, count: int, text: str = "i stay in india .") -> list[str]:
    async def make() -> list[str]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            sem = asyncio.Semaphore(32)

            async def one() -> str:
                async with sem:
                    response = await client.post("/v1/sessions", json={"text": text})
                    response.raise_for_status()
                    sid: str = response.json()["session_id"]
                    return sid

            return list(await asyncio.gather(*(one() for _ in range(count))))

    return asyncio.run(make())


def _step_each(url: str, ids: list[str], steps: int) -> None:
    """Step every session `steps` times, one word per request (the keyboard pattern that fills rewind history)."""

    async def run() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            sem = asyncio.Semaphore(32)

            async def one(sid: str) -> None:
                async with sem:
                    for _ in range(steps):
                        response = await client.post(f"/v1/sessions/{sid}/steps", json=json.loads(STEP_BODY))
                        response.raise_for_status()

            await asyncio.gather(*(one(sid) for sid in ids))

    asyncio.run(run())


def _batch_histogram(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics").text
    buckets: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("cellgate_batch_size_bucket"):
            le = line.split('le="')[1].split('"')[0]
            buckets[le] = float(line.rsplit(" ", 1)[1])
    return buckets


def _distribution(before: dict[str, float], after: dict[str, float]) -> dict[str, int]:
    """Per-bucket counts of ONNX Runtime calls by batch size ("<=N")."""
    cumulative = {le: after[le] - before.get(le, 0.0) for le in after}
    out: dict[str, int] = {}
    previous = 0.0
    for le in sorted(cumulative, key=lambda x: float("inf") if x == "+Inf" else float(x)):
        out[f"<={le}"] = int(cumulative[le] - previous)
        previous = cumulative[le]
    return {k: v for k, v in out.items() if v}


def _measure_http(server: ServerProcess, sessions: int, seconds: float, batching: bool) -> dict[str, Any]:
    ids = _sessions(server.url, sessions)
    _wrk(server.url, ids, sessions, min(2.0, seconds))  # warm-up
    hist = _batch_histogram(server.url) if batching else {}
    cpu0 = tree_cpu_seconds(server.pid)
    result = _wrk(server.url, ids, sessions, seconds)
    result["server_cpu_cores"] = (tree_cpu_seconds(server.pid) - cpu0) / result["seconds"]
    if batching:
        result["batch_sizes"] = _distribution(hist, _batch_histogram(server.url))
    return result


def _cellgate(bundle: Path, extra_env: dict[str, str] | None = None) -> ServerProcess:
    env = {"CELLGATE_BUNDLE": str(bundle), "CELLGATE_PORT": "0", "CELLGATE_MAX_SESSIONS": "200000", **(extra_env or {})}
    return start_process([sys.executable, "-m", "cellgate.cli", "serve"], env)


def _uvicorn(app: str, env: dict[str, str] | None = None) -> ServerProcess:
    command = [sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", "0", "--no-access-log"]
    return start_process(command, env)


def _profile(server: ServerProcess, load: Callable[[], object], out: Path) -> str:
    """The server under py-spy while `load` runs: a separate run, since sampling perturbs the timing."""
    raw = out.with_suffix(".raw")
    with profile.recording(server.pid, raw):
        load()
    text = profile.summarize(raw)
    out.write_text(text)
    return text


def bench_model(
    name: str,
    bundle: Path,
    checkpoint: Path,
    sessions: int,
    seconds: float,
    idle: int,
    with_history: int,
    profile_dir: Path | None = None,
) -> dict[str, Any]:
    report: dict[str, Any] = {"model": name, "bundle": str(bundle), "sessions": sessions}
    manifest = json.loads((bundle / MANIFEST).read_text())
    report["config"] = {k: manifest["config"][k] for k in ("vocab_size", "hidden_size", "num_layers")}

    server = _cellgate(bundle)
    try:
        report["cellgate_http"] = _measure_http(server, sessions, seconds, batching=True)
        peak = report["cellgate_http"]["req_per_second"]
        # Half of the maximum throughput, paced by wrk's per-connection delay.
        connections = min(64, sessions)
        ids = _sessions(server.url, connections)
        half = _wrk(server.url, ids, connections, seconds, delay_ms=1000 * connections / (peak / 2))
        report["cellgate_http_half_load"] = half
        command = [sys.executable, "-m", "bench.ws_load", "--url", server.url, "--sessions", str(sessions)]
        ws_command = [*command, "--seconds", str(seconds)]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu0 = cpu_seconds(server.pid)
        ws = subprocess.run(ws_command, capture_output=True, text=True, timeout=seconds + 180, check=True)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        ws_report = json.loads(ws.stdout.strip().splitlines()[-1])
        # Both over the client's whole life (session set-up included), so a share of the wall time it ran.
        loadgen = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
        ws_report["loadgen_cpu_seconds"] = loadgen
        ws_report["server_cpu_seconds"] = cpu_seconds(server.pid) - cpu0
        report["cellgate_websocket"] = ws_report
        if profile_dir is not None:
            profile_dir.mkdir(parents=True, exist_ok=True)
            ids = _sessions(server.url, sessions)
            report["profile"] = _profile(
                server, lambda: _wrk(server.url, ids, sessions, seconds), profile_dir / f"serve_{name}.txt"
            )
            report["profile_websocket"] = _profile(
                server,
                lambda: subprocess.run(ws_command, capture_output=True, timeout=seconds + 180, check=True),
                profile_dir / f"serve_{name}_ws.txt",
            )
    finally:
        server.stop()

    server = _uvicorn("bench.floor_app:app")
    try:
        report["floor_http"] = _measure_http(server, sessions, seconds, batching=False)
        floor_ws = [sys.executable, "-m", "bench.ws_load", "--url", server.url, "--sessions", str(sessions)]
        ws = subprocess.run(
            [*floor_ws, "--seconds", str(seconds)], capture_output=True, text=True, timeout=seconds + 180, check=True
        )
        report["floor_websocket"] = json.loads(ws.stdout.strip().splitlines()[-1])
    finally:
        server.stop()

    if checkpoint.exists():
        server = _uvicorn("bench.naive_app:app", {"NAIVE_CHECKPOINT": str(checkpoint)})
        try:
            report["naive_http"] = _measure_http(server, sessions, seconds, batching=False)
        finally:
            server.stop()

    server = _cellgate(bundle)
    try:
        base = rss_bytes(server.pid)
        _sessions(server.url, idle, text="the")
        grown = rss_bytes(server.pid)
        report["idle_sessions"] = {
            "sessions": idle,
            "rss_before_bytes": base,
            "rss_after_bytes": grown,
            "bytes_per_session": (grown - base) / idle,
            "state_bytes": 2 * report["config"]["num_layers"] * report["config"]["hidden_size"] * 4,
        }
        # Rewind history (CELLGATE_SESSION_HISTORY, default 32 tokens): its worst case is one snapshot per
        # one-word step, so these sessions are stepped word by word past the window, then left idle.
        history = int(Settings.model_fields["session_history"].default)  # the server runs with the defaults
        rss_before = rss_bytes(server.pid)
        ids = _sessions(server.url, with_history, text="the")
        _step_each(server.url, ids, history + 1)
        rss_after = rss_bytes(server.pid)
        report["history_sessions"] = {
            "sessions": with_history,
            "one_word_steps_each": history + 1,
            "bytes_per_session": (rss_after - rss_before) / with_history,
        }
    finally:
        server.stop()

    http = report["cellgate_http"]["req_per_second"]
    report["ratios"] = {
        "vs_floor": http / report["floor_http"]["req_per_second"],
        "websocket_vs_floor": report["cellgate_websocket"]["words_per_second"]
        / report["floor_websocket"]["words_per_second"],
        "vs_naive": http / report["naive_http"]["req_per_second"] if "naive_http" in report else None,
    }
    return report


def markdown(results: list[dict[str, Any]]) -> str:
    rows = [
        "| model | cellgate req/s | floor req/s | naive req/s | vs floor | vs naive | p50 / p95 / p99 ms (max load) "
        "| p99 ms at half load | WS words/s (of the echo floor) | bytes / idle session "
        "| bytes / session, full history | wrk CPU |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        h = r["cellgate_http"]
        naive = r.get("naive_http", {}).get("req_per_second", float("nan"))
        vs_naive = r["ratios"]["vs_naive"] or float("nan")
        cfg = r["config"]
        half = r["cellgate_http_half_load"]
        rows.append(
            f"| {r['model']} ({cfg['num_layers']}×{cfg['hidden_size']}, {cfg['vocab_size']} words) "
            f"| {h['req_per_second']:.0f} | {r['floor_http']['req_per_second']:.0f} | {naive:.0f} "
            f"| {r['ratios']['vs_floor']:.0%} | {vs_naive:.1f}× "
            f"| {h['p50_ms']:.1f} / {h['p95_ms']:.1f} / {h['p99_ms']:.1f} "
            f"| {half['p99_ms']:.1f} ({half['req_per_second']:.0f} req/s) "
            f"| {r['cellgate_websocket']['words_per_second']:.0f} "
            f"({r['ratios']['websocket_vs_floor']:.0%} of {r['floor_websocket']['words_per_second']:.0f}) "
            f"| {r['idle_sessions']['bytes_per_session']:.0f} "
            f"| {r['history_sessions']['bytes_per_session']:.0f} "
            f"| {h['loadgen_cpu_cores']:.2f} cores |"
        )
    batches = [f"- {r['model']}: batch sizes at max load {r['cellgate_http'].get('batch_sizes')}" for r in results]
    return "\n".join([*rows, "", *batches]) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cellgate bench serve", description=__doc__)
    parser.add_argument("--short", action="store_true", help="demo model only, short runs (< 60 s)")
    parser.add_argument("--sessions", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--idle-sessions", type=int, default=100_000)
    parser.add_argument("--history-sessions", type=int, default=1_000, help="sessions stepped word by word")
    parser.add_argument("--models", default="demo,realistic")
    parser.add_argument("--out", default="bench/results/serve.json")
    parser.add_argument(
        "--profile", type=Path, metavar="DIR", help="also profile the server under max load with py-spy into DIR"
    )
    parser.add_argument(
        "--workers",
        metavar="N,M,...",
        help="instead: scaling over `cellgate serve --workers N` and the floor at N workers (bench/scaling.py)",
    )
    parser.add_argument("--rounds", type=int, default=2, help="with --workers: alternating rounds")
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        print("wrk is needed (apt-get install wrk)", file=sys.stderr)
        return 2
    if args.profile is not None and profile.executable() is None:
        print("--profile needs py-spy (pip install py-spy)", file=sys.stderr)
        return 2
    models = ["demo"] if args.short else args.models.split(",")
    seconds = 3.0 if args.short else args.seconds
    idle = 5_000 if args.short else args.idle_sessions
    with_history = 100 if args.short else args.history_sessions
    started = time.perf_counter()
    if args.workers:
        return _scaling(args, models, seconds, started)
    results = []
    for name in models:
        bundle, checkpoint = (ensure_demo(), DEMO_RUN) if name == "demo" else (ensure_realistic(), REALISTIC_RUN)
        results.append(bench_model(name, bundle, checkpoint, args.sessions, seconds, idle, with_history, args.profile))
    table = markdown(results)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"results": results, "machine": _machine(), "wall_seconds": time.perf_counter() - started}
    out.write_text(json.dumps(payload, indent=2))
    out.with_suffix(".md").write_text(table)
    print(f"wrote {out} and {out.with_suffix('.md')} in {payload['wall_seconds']:.0f} s")
    return 0


def _scaling(args: argparse.Namespace, models: list[str], seconds: float, started: float) -> int:
    from bench import scaling

    workers = [int(n) for n in args.workers.split(",")]
    payload: dict[str, Any] = {"machine": _machine(), "load_at_start": os.getloadavg(), "models": {}}
    tables = []
    for name in models:
        bundle = ensure_demo() if name == "demo" else ensure_realistic()
        result = scaling.run(bundle, workers, args.sessions, seconds, args.rounds)
        payload["models"][name] = result
        tables.append(scaling.markdown(name, result["summary"]))
    payload["load_at_end"] = os.getloadavg()
    payload["wall_seconds"] = time.perf_counter() - started
    table = "\n".join(tables)
    print(table)
    out = Path(args.out).with_name(Path(args.out).stem + "_scaling.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2))
    out.with_suffix(".md").write_text(table)
    print(f"wrote {out} and {out.with_suffix('.md')} in {payload['wall_seconds']:.0f} s")
    return 0


def _machine() -> dict[str, Any]:
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}


if __name__ == "__main__":
    sys.exit(main())
