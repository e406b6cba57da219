"""WebSocket load generator: N sessions, each streaming one word per message, for a fixed time.

Run as a separate process so its CPU is measured apart from the server's. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import httpx
from websockets.asyncio.client import connect

WORDS = "the old river was quiet in the morning . we painted a small window".split()


async def run(url: str, sessions: int, seconds: float) -> dict[str, float]:
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        ids = [
            (await http.post("/v1/sessions", json={"text": "i stay in india ."})).json()["session_id"]
            for _ in range(sessions)
        ]
    ws_base = url.replace("http://", "ws://")
    latencies: list[float] = []
    errors = 0
    ready = asyncio.Event()
    start_at = 0.0
    stop_at = 0.0

    async def one(sid: str) -> int:
        nonlocal errors
        count = 0
        async with connect(f"{ws_base}/v1/sessions/{sid}/stream", max_size=None, compression=None) as ws:
            await ready.wait()
            i = 0
            while time.perf_counter() < stop_at:
                sent = time.perf_counter()
                await ws.send(json.dumps({"text": WORDS[i % len(WORDS)], "k": 5}))
                reply = json.loads(await ws.recv())
                if "error" in reply:
                    errors += 1
                else:
                    count += 1
                    latencies.append(time.perf_counter() - sent)
                i += 1
        return count

    tasks = [asyncio.create_task(one(sid)) for sid in ids]
    await asyncio.sleep(0.5)  # let every connection open before the clock starts (set-up, not measurement)
    start_at = time.perf_counter()
    stop_at = start_at + seconds
    ready.set()
    counts = await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - start_at
    latencies.sort()

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000 if latencies else float("nan")

    return {
        "words": sum(counts),
        "seconds": elapsed,
        "words_per_second": sum(counts) / elapsed,
        "errors": errors,
        "p50_ms": pct(0.50),
        "p95_ms": pct(0.95),
        "p99_ms": pct(0.99),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--sessions", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    try:  # the cheaper event loop (installed with uvicorn[standard]): less of the machine for the client
        import uvloop

        result = uvloop.run(run(args.url, args.sessions, args.seconds))
    except ImportError:
        result = asyncio.run(run(args.url, args.sessions, args.seconds))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
