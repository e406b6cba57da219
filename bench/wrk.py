"""wrk (a compiled HTTP load generator) driven by a Lua script that cycles through prepared requests.

Every serving benchmark uses this one driver, so that cellgate, the framework floor and a peer server
see the same load: N keep-alive connections, each sending its next request as soon as the previous
answer arrived (or after an exponential think time for paced runs), requests taken round-robin from
a list — one per session or sequence.
"""

from __future__ import annotations

import json
import resource
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

LUA = """
local paths = {%(paths)s}
local bodies = {%(bodies)s}
local counter = 0
local headers = {["Content-Type"] = "application/json"}
request = function()
  counter = counter + 1
  local i = (counter %% #paths) + 1
  return wrk.format("POST", paths[i], headers, bodies[i])
end
%(delay)s
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('RESULT {"requests": %%d, "duration_us": %%d, "socket_errors": %%d, "non_2xx": %%d, ' ..
    '"p50_ms": %%.3f, "p95_ms": %%.3f, "p99_ms": %%.3f, "mean_ms": %%.3f}\\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50) / 1000, latency:percentile(95) / 1000, latency:percentile(99) / 1000, latency.mean / 1000))
end
"""


def _lua_string(text: str) -> str:
    """A Lua string literal (JSON's escapes are a subset of Lua's for the ASCII bodies used here)."""
    return json.dumps(text)


def run(
    url: str,
    requests: Sequence[tuple[str, str]],
    connections: int,
    seconds: float,
    delay_ms: float | None = None,
) -> dict[str, Any]:
    """One wrk run of POST (path, JSON body) pairs, round-robin; its summary plus the load generator's CPU."""
    # Think time drawn from an exponential distribution (Poisson-like arrivals from independent clients):
    # a constant delay keeps every connection in phase, so the "half load" arrives as bursts of
    # `connections` requests at once and measures the burst, not the load.
    delay = (
        f"math.randomseed(1)\ndelay = function() return -{delay_ms:.3f} * math.log(1 - math.random()) end"
        if delay_ms
        else ""
    )
    script = LUA % {
        "paths": ",".join(_lua_string(path) for path, _ in requests),
        "bodies": ",".join(_lua_string(body) for _, body in requests),
        "delay": delay,
    }
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as fh:
        fh.write(script)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        command = ["wrk", "-t", "1", "-c", str(connections), "-d", f"{max(1, round(seconds))}s", "--timeout", "10s"]
        out = subprocess.run(
            [*command, "-s", fh.name, url], capture_output=True, text=True, timeout=seconds + 60, check=True
        ).stdout
    finally:
        Path(fh.name).unlink()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    result: dict[str, Any] = json.loads(next(line[7:] for line in out.splitlines() if line.startswith("RESULT ")))
    result["connections"] = connections
    result["seconds"] = result["duration_us"] / 1e6
    result["req_per_second"] = result["requests"] / result["seconds"]
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    result["loadgen_cpu_cores"] = cpu / result["seconds"]
    return result
