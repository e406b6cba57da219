"""cellgate against a real NVIDIA Triton 2.51 (sequence batcher), the same load, alternating, in one run.

    python -m bench.peer [--model demo|realistic] [--rounds 2] [--seconds 10] [--connections 256,64]
                         [--workers 1] [--triton preferred=64,delay=500,instances=1,http_threads=8]
                         [--tune] [--out bench/results/peer.json]        (also: cellgate bench peer)

Both servers run the same bundle's step graph through the same Runner (bench/triton_lm.py is cellgate's
Runner inside Triton's python backend), one word per request, k=5, and are driven by the same wrk
driver (bench/wrk.py) with the same number of keep-alive connections and the same number of stateful
sequences: cellgate through `POST /v1/sessions/{id}/steps` (or, with `--cellgate-api v2`, its own Open
Inference v2 endpoint with the same sequence parameters), Triton through its v2 HTTP infer with
`parameters.sequence_id`. Both stay up for the whole run and are measured in turn (the order swaps
every round), so that the shared machine's background load falls on both alike; the ratio is taken
per round. `--tune` first runs a short sweep of Triton's knobs and keeps its best for the comparison.
Triton is installed on first use (bench/triton_server.py). Docs: docs/serving_peers.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx

from bench import triton_server, wrk
from bench.models import ensure_demo, ensure_realistic
from bench.procs import ServerProcess, start_process, tree_cpu_seconds
from bench.triton_server import TritonProcess, TritonTuning, parse_tuning
from export.bundle import load_bundle

PRIME = "i stay in india ."
WORD = "the"
STEP_BODY = json.dumps({"text": WORD, "k": 5})
# A short sweep around Triton's documented starting points: batch as large as cellgate's, a smaller
# preferred size (forms batches sooner), a longer queue delay (fuller batches), two instances (two stub
# processes: the only way its python backend uses both cores), fewer/more HTTP threads.
SWEEP = (
    "",
    "preferred=16/32/64",
    "delay=2000",
    "delay=100",
    "instances=2",
    "instances=2,preferred=16/32/64",
    "http_threads=2",
    "http_threads=16",
)


def _triton_body(sequence_id: int, text: str, start: bool = False, k: int | None = None) -> str:
    """A v2 infer request of one sequence; with k, cellgate's own inputs (TEXT [1] and K) instead of the peer's."""
    inputs: list[dict[str, Any]] = [{"name": "TEXT", "shape": [1, 1], "datatype": "BYTES", "data": [text]}]
    if k is not None:
        inputs = [
            {"name": "TEXT", "shape": [1], "datatype": "BYTES", "data": [text]},
            {"name": "K", "shape": [1], "datatype": "INT32", "data": [k]},
        ]
    parameters = {"sequence_id": sequence_id, "sequence_start": start, "sequence_end": False}
    return json.dumps({"parameters": parameters, "inputs": inputs})


async def _each(url: str, calls: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """POST each (path, body) with bounded concurrency; raises on any non-2xx."""
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        sem = asyncio.Semaphore(32)

        async def one(path: str, body: str) -> dict[str, Any]:
            async with sem:
                response = await client.post(path, content=body, headers={"Content-Type": "application/json"})
                if response.status_code >= 300:
                    raise RuntimeError(f"{path}: {response.status_code} {response.text[:300]}")
                data: dict[str, Any] = response.json()
                return data

        return list(await asyncio.gather(*(one(p, b) for p, b in calls)))


def cellgate_requests(url: str, count: int, api: str, model: str) -> list[tuple[str, str]]:
    """`count` sessions primed with PRIME; one step request per session: /v1 session steps, or cellgate's own
    Open Inference v2 endpoint with Triton's sequence parameters (the very body Triton gets, plus K)."""
    if api == "v2":
        path = f"/v2/models/{model}/infer"
        ids = range(1, count + 1)
        asyncio.run(_each(url, [(path, _triton_body(i, PRIME, start=True, k=5)) for i in ids]))
        return [(path, _triton_body(i, WORD, k=5)) for i in ids]
    created = asyncio.run(_each(url, [("/v1/sessions", json.dumps({"text": PRIME}))] * count))
    return [(f"/v1/sessions/{c['session_id']}/steps", STEP_BODY) for c in created]


def triton_requests(url: str, count: int, first_id: int) -> list[tuple[str, str]]:
    """`count` Triton sequences started with PRIME; one infer request per sequence."""
    ids = range(first_id, first_id + count)
    asyncio.run(_each(url, [("/v2/models/lm/infer", _triton_body(i, PRIME, start=True)) for i in ids]))
    return [("/v2/models/lm/infer", _triton_body(i, WORD)) for i in ids]


def check_same_answer(cellgate: ServerProcess, triton: TritonProcess) -> dict[str, Any]:
    """Both servers, primed alike and stepped once, must name the same top words: the same work is done."""
    created = asyncio.run(_each(cellgate.url, [("/v1/sessions", json.dumps({"text": PRIME}))]))[0]
    step = asyncio.run(_each(cellgate.url, [(f"/v1/sessions/{created['session_id']}/steps", STEP_BODY)]))[0]
    sequence = 10_000_000
    asyncio.run(_each(triton.url, [("/v2/models/lm/infer", _triton_body(sequence, PRIME, start=True))]))
    reply = asyncio.run(_each(triton.url, [("/v2/models/lm/infer", _triton_body(sequence, WORD))]))[0]
    words = next(o["data"] for o in reply["outputs"] if o["name"] == "WORDS")
    ours = [p["word"] for p in step["predictions"]]
    if words != ours:
        raise RuntimeError(f"the servers disagree: cellgate {ours}, Triton {words}")
    return {"cellgate": ours, "triton": words}


def measure(url: str, pid: int, requests: list[tuple[str, str]], connections: int, seconds: float) -> dict[str, Any]:
    """One wrk run with the server's CPU (its whole process tree) over the same interval."""
    cpu0 = tree_cpu_seconds(pid)
    result = wrk.run(url, requests[:connections], connections, seconds)
    result["server_cpu_cores"] = (tree_cpu_seconds(pid) - cpu0) / result["seconds"]
    result["cpu_us_per_request"] = 1e6 * result["server_cpu_cores"] / max(result["req_per_second"], 1e-9)
    return result


def _load() -> list[float]:
    return list(os.getloadavg())


def tune(bundle: Path, connections: int, seconds: float, candidates: tuple[str, ...]) -> list[dict[str, Any]]:
    """Each Triton setting in turn at `connections`: req/s and latency, best first."""
    results = []
    for text in candidates:
        tuning = parse_tuning(text)
        server = triton_server.start(bundle, tuning)
        try:
            requests = triton_requests(server.url, connections, 1)
            wrk.run(server.url, requests, connections, 2.0)  # warm-up
            result = measure(server.url, server.pid, requests, connections, seconds)
        finally:
            server.stop()
        result["tuning"] = asdict(tuning)
        result["label"] = tuning.label()
        results.append(result)
        print(
            f"  triton {tuning.label():<80} {result['req_per_second']:7.0f} req/s  p50 {result['p50_ms']:6.1f}  "
            f"p99 {result['p99_ms']:6.1f} ms  cpu {result['server_cpu_cores']:.2f}",
            flush=True,
        )
    return sorted(results, key=lambda r: -r["req_per_second"])


def compare(
    bundle: Path,
    tuning: TritonTuning,
    workers: int,
    rounds: int,
    seconds: float,
    connections: list[int],
    api: str = "v1",
) -> dict[str, Any]:
    env = {"CELLGATE_BUNDLE": str(bundle), "CELLGATE_PORT": "0", "CELLGATE_WORKERS": str(workers)}
    cellgate = start_process([sys.executable, "-m", "cellgate.cli", "serve"], env)
    triton: TritonProcess | None = None
    try:
        triton = triton_server.start(bundle, tuning)
        agreement = check_same_answer(cellgate, triton)
        most = max(connections)
        ours = cellgate_requests(cellgate.url, most, api, load_bundle(bundle).name)
        theirs = triton_requests(triton.url, most, 1)
        for url, requests in ((cellgate.url, ours), (triton.url, theirs)):
            wrk.run(url, requests, most, 2.0)  # warm-up: lazy initialisation, allocator, caches
        runs: list[dict[str, Any]] = []
        for round_index in range(rounds):
            for count in connections:
                order = ["cellgate", "triton"] if round_index % 2 == 0 else ["triton", "cellgate"]
                for name in order:
                    load_before = _load()
                    if name == "cellgate":
                        result = measure(cellgate.url, cellgate.pid, ours, count, seconds)
                    else:
                        result = measure(triton.url, triton.pid, theirs, count, seconds)
                    result.update(server=name, round=round_index, load_before=load_before, load_after=_load())
                    runs.append(result)
                    print(
                        f"  round {round_index} {name:<8} c={count:<4} {result['req_per_second']:7.0f} req/s  "
                        f"p50 {result['p50_ms']:6.1f}  p99 {result['p99_ms']:6.1f} ms  "
                        f"cpu {result['server_cpu_cores']:.2f} ({result['cpu_us_per_request']:.0f} µs/req)  "
                        f"errors {result['socket_errors'] + result['non_2xx']}  load {load_before[0]:.1f}",
                        flush=True,
                    )
    finally:
        cellgate.stop()
        if triton is not None:
            triton.stop()
    return {"agreement": agreement, "runs": runs, "summary": summarize(runs, connections)}


def summarize(runs: list[dict[str, Any]], connections: list[int]) -> dict[str, Any]:
    """Per connection count: medians of each server and the per-round cellgate/Triton ratios."""
    out: dict[str, Any] = {}
    for count in connections:
        mine = [r for r in runs if r["connections"] == count]
        by_round: dict[int, dict[str, dict[str, Any]]] = {}
        for r in mine:
            by_round.setdefault(r["round"], {})[r["server"]] = r
        ratios = [
            pair["cellgate"]["req_per_second"] / pair["triton"]["req_per_second"]
            for pair in by_round.values()
            if {"cellgate", "triton"} <= pair.keys()
        ]
        entry: dict[str, Any] = {"ratios": ratios, "ratio_median": statistics.median(ratios) if ratios else None}
        for name in ("cellgate", "triton"):
            values = [r for r in mine if r["server"] == name]
            entry[name] = {
                key: statistics.median(r[key] for r in values)
                for key in ("req_per_second", "p50_ms", "p99_ms", "server_cpu_cores", "cpu_us_per_request")
            }
        out[str(count)] = entry
    return out


def markdown(summary: dict[str, Any], workers: int, tuning: TritonTuning) -> str:
    rows = [
        f"cellgate --workers {workers} vs Triton ({tuning.label()}), medians over rounds",
        "",
        "| connections | cellgate req/s | Triton req/s | ratio (per round) | cellgate p50 / p99 ms "
        "| Triton p50 / p99 ms | cellgate CPU cores (µs/req) | Triton CPU cores (µs/req) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for count, entry in summary.items():
        ours, theirs = entry["cellgate"], entry["triton"]
        ratios = ", ".join(f"{r:.2f}" for r in entry["ratios"])
        rows.append(
            f"| {count} | {ours['req_per_second']:.0f} | {theirs['req_per_second']:.0f} "
            f"| **{entry['ratio_median']:.2f}×** ({ratios}) "
            f"| {ours['p50_ms']:.1f} / {ours['p99_ms']:.1f} | {theirs['p50_ms']:.1f} / {theirs['p99_ms']:.1f} "
            f"| {ours['server_cpu_cores']:.2f} ({ours['cpu_us_per_request']:.0f}) "
            f"| {theirs['server_cpu_cores']:.2f} ({theirs['cpu_us_per_request']:.0f}) |"
        )
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cellgate bench peer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["demo", "realistic"], default="demo")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds (the order swaps each round)")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each measured wrk run")
    parser.add_argument("--connections", default="256,64", help="comma-separated; one sequence per connection")
    parser.add_argument("--workers", type=int, default=1, help="cellgate serve --workers")
    parser.add_argument(
        "--cellgate-api", choices=["v1", "v2"], default="v1", help="cellgate's session steps, or its v2 infer"
    )
    parser.add_argument("--triton", default="", help="Triton settings, e.g. preferred=16/32/64,instances=2")
    parser.add_argument("--tune", action="store_true", help="sweep Triton's settings first and use its best")
    parser.add_argument("--out", default="bench/results/peer.json")
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        print("wrk is needed (apt-get install wrk)", file=sys.stderr)
        return 2
    connections = [int(c) for c in args.connections.split(",")]
    bundle = ensure_demo() if args.model == "demo" else ensure_realistic()
    started = time.perf_counter()
    payload: dict[str, Any] = {
        "model": args.model,
        "bundle": str(bundle),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "load_at_start": _load(),
        "triton_version": triton_server.PYTRITON,
    }
    tuning = parse_tuning(args.triton)
    if args.tune:
        print(f"tuning Triton at {max(connections)} connections:", flush=True)
        sweep = tune(bundle, max(connections), min(args.seconds, 6.0), SWEEP)
        payload["sweep"] = sweep
        tuning = TritonTuning(
            **{**sweep[0]["tuning"], "preferred_batch_sizes": tuple(sweep[0]["tuning"]["preferred_batch_sizes"])}
        )
        print(f"Triton's best: {tuning.label()}", flush=True)
    payload["triton_tuning"] = asdict(tuning)
    payload["workers"] = args.workers
    payload["cellgate_api"] = args.cellgate_api
    payload.update(compare(bundle, tuning, args.workers, args.rounds, args.seconds, connections, args.cellgate_api))
    payload["wall_seconds"] = time.perf_counter() - started
    table = markdown(payload["summary"], args.workers, tuning)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2))
    out.with_suffix(".md").write_text(table)
    print(f"wrote {out} and {out.with_suffix('.md')} in {payload['wall_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
