"""deploy/nginx: the config passes `nginx -t`, and the scale topology runs without containers: two service
processes sharing one real redis-server behind the real nginx binary, one session stepping across both."""

from __future__ import annotations

import json
import math
import re
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from itertools import pairwise
from pathlib import Path

import httpx
import pytest
from websockets.sync.client import connect

from tests.deploy.tools import DEPLOY, free_port, poll, require, run
from tests.redis_server import replica_env, running_redis
from tests.servers import ServerProcess, running_server

CONFIG = DEPLOY / "nginx" / "nginx.conf"
UPSTREAM = re.compile(r"^(\s*)server cellgate-replica:8000 (.*);$", re.MULTILINE)


def render(directory: Path, replicas: list[str] | None = None, port: int | None = None) -> Path:
    """The shipped config with its runtime paths moved into directory and, optionally, real replicas and port.

    Only these substitutions are made: /tmp (the container's tmpfs) becomes directory, and for the live
    topology the compose service name in the upstream becomes the loopback replicas (same parameters), 8080 a
    free port, and one worker process (round-robin state is per worker, and the test checks the order).
    """
    text = CONFIG.read_text().replace("/tmp/", f"{directory}/")
    if replicas is not None:
        assert UPSTREAM.search(text), "the upstream line the tests rewrite has changed"
        text = UPSTREAM.sub(lambda m: "\n".join(f"{m.group(1)}server {r} {m.group(2)};" for r in replicas), text)
    if port is not None:
        assert "worker_processes auto;" in text
        text = text.replace("worker_processes auto;", "worker_processes 1;")
        assert "    listen 8080;" in text
        text = text.replace("    listen 8080;", f"    listen 127.0.0.1:{port};")
    path = directory / "nginx.conf"
    path.write_text(text)
    return path


def test_nginx_config_passes_its_syntax_check(tmp_path: Path) -> None:
    nginx = require("nginx", "nginx-light")
    config = render(tmp_path)
    # nginx -t resolves upstream names; in compose `cellgate-replica` is Docker's DNS name. A private mount
    # namespace with a hosts file naming it checks the file unchanged; without one, the name is replaced.
    hosts = tmp_path / "hosts"
    hosts.write_text(Path("/etc/hosts").read_text() + "\n127.0.0.1 cellgate-replica\n")
    check = f"mount --bind {hosts} /etc/hosts && exec {nginx} -t -e stderr -p {tmp_path}/ -c {config}"
    result = run(["unshare", "--mount", "sh", "-ec", check])
    if "nginx:" not in result.stderr:  # no mount namespace here (unprivileged): nginx never ran
        config = render(tmp_path, replicas=["127.0.0.1:8000"])
        result = run([nginx, "-t", "-e", "stderr", "-p", f"{tmp_path}/", "-c", str(config)])
    assert result.returncode == 0, result.stderr
    assert "syntax is ok" in result.stderr
    assert "test is successful" in result.stderr


@contextmanager
def running_nginx(config: Path, directory: Path, port: int) -> Iterator[Path]:
    """The real nginx in the foreground on a rendered config; yields the file its access log goes to."""
    log = directory / "access.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [require("nginx", "nginx-light"), "-e", "stderr", "-p", f"{directory}/", "-c", str(config),
             "-g", "daemon off;"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            poll(lambda: httpx.get(f"http://127.0.0.1:{port}/lb-healthz", timeout=2).status_code == 200, 30, "nginx")
            yield log
        finally:
            process.terminate()
            process.wait(20)


def _request_ids(server: ServerProcess) -> set[str]:
    ids = set()
    for line in list(server.log):
        if line.startswith("{") and '"cellgate.access"' in line:
            ids.add(json.loads(line)["request_id"])
    return ids


@pytest.mark.slow
def test_one_session_steps_through_nginx_across_two_replicas_sharing_redis(tiny_bundle: Path, tmp_path: Path) -> None:
    with ExitStack() as stack:
        redis = stack.enter_context(running_redis(tmp_path))
        env = replica_env(redis, CELLGATE_ACCESS_LOG="true")
        replicas = [stack.enter_context(running_server(tiny_bundle, env)) for _ in range(2)]
        addresses = [r.url.removeprefix("http://") for r in replicas]
        port = free_port()
        config = render(tmp_path, addresses, port)
        nginx_log = stack.enter_context(running_nginx(config, tmp_path, port))
        lb = f"http://127.0.0.1:{port}"

        words = "i stay in india . it was cold today . i speak".split()
        created = httpx.post(f"{lb}/v1/sessions", json={"text": words[0]})
        assert created.status_code == 201
        sid, step = created.json()["session_id"], created.json()["step"]
        landed: list[str] = [created.headers["x-upstream"]]
        for n, word in enumerate(words[1:]):
            request_id = f"scale-{n}"
            response = httpx.post(
                f"{lb}/v1/sessions/{sid}/steps",
                json={"text": word, "if_step": step, "k": 3},
                headers={"X-Request-ID": request_id},
            )
            assert response.status_code == 200, response.text
            assert response.headers["x-request-id"] == request_id
            assert response.json()["step"] == step + 1  # each replica continued the state the other one wrote
            step = response.json()["step"]
            landed.append(response.headers["x-upstream"])
            final = response.json()["predictions"]

        # Round robin: both replicas served the session, and it moved to the other one on every request.
        assert set(landed) == set(addresses), landed
        assert all(a != b for a, b in pairwise(landed)), landed
        # Each replica's own access log names exactly the steps nginx says it sent there.
        for replica, address in zip(replicas, addresses, strict=True):
            expected = {f"scale-{n}" for n, where in enumerate(landed[1:]) if where == address}
            poll(lambda r=replica, e=expected: e <= _request_ids(r), 10, f"{address}'s access log")
            assert not ({f"scale-{n}" for n in range(len(words))} - expected) & _request_ids(replica)
        # The state that moved between processes is the real one: same answer as the whole text at once.
        whole = httpx.post(f"{lb}/v1/predict", json={"text": " ".join(words), "k": 3})
        assert whole.status_code == 200
        assert [p["word"] for p in whole.json()["predictions"]] == [p["word"] for p in final]
        for a, b in zip(whole.json()["predictions"], final, strict=True):
            assert math.isclose(a["prob"], b["prob"], rel_tol=1e-4, abs_tol=1e-6)

        # WebSocket upgrade and Server-Sent Events pass through nginx.
        with connect(f"ws://127.0.0.1:{port}/v1/sessions/{sid}/stream", open_timeout=10) as ws:
            ws.send(json.dumps({"text": "hindi", "k": 2, "if_step": step}))
            assert json.loads(ws.recv(timeout=30))["step"] == step + 1
        streamed = httpx.post(f"{lb}/v1/sessions/{sid}/generate", json={"max_words": 3, "seed": 1, "stream": True})
        assert streamed.status_code == 200
        assert streamed.headers["content-type"].startswith("text/event-stream")
        assert streamed.text.count("event: word") == 3
        assert "event: done" in streamed.text

        assert httpx.get(f"{lb}/metrics").status_code == 404  # scraped per replica, never through the LB
        logged = [json.loads(line) for line in nginx_log.read_text().splitlines() if line.startswith("{")]
        assert {entry["request_id"] for entry in logged} >= {f"scale-{n}" for n in range(len(words) - 1)}
