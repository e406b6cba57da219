"""`cellgate predict` and `cellgate chat` as subprocesses against a real server."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys

import httpx

from tests.servers import ServerProcess

PRIMER = "i stay in india ."


def cellgate(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cellgate.cli", *args], input=stdin, capture_output=True, text=True, timeout=120
    )


def stateless(server: ServerProcess, text: str, k: int) -> list[dict[str, float | str]]:
    response = httpx.post(f"{server.url}/v1/predict", json={"text": text, "k": k})
    assert response.status_code == 200
    predictions: list[dict[str, float | str]] = response.json()["predictions"]
    return predictions


def steps(stdout: str) -> list[tuple[int, list[str]]]:
    """The chat's answer lines: (step, suggested words)."""
    parsed = []
    for line in stdout.splitlines():
        match = re.fullmatch(r"step (\d+): (.*)", line)
        assert match, f"unexpected output line {line!r}"
        parsed.append((int(match.group(1)), re.findall(r"(\S+) \(\d\.\d{3}\)", match.group(2))))
    return parsed


def test_predict_prints_suggestions(server: ServerProcess) -> None:
    done = cellgate("predict", PRIMER, "--url", server.url, "--k", "3")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [line.split()[1] for line in lines] == [p["word"] for p in stateless(server, PRIMER, 3)]
    assert all(re.fullmatch(r"\d\.\d{4}  \S+", line) for line in lines)


def test_predict_json(server: ServerProcess) -> None:
    done = cellgate("predict", PRIMER, "--url", server.url, "--k", "2", "--json")
    assert done.returncode == 0, done.stderr
    body = json.loads(done.stdout)
    assert body["tokens"] == 5
    assert [p["word"] for p in body["predictions"]] == [p["word"] for p in stateless(server, PRIMER, 2)]


def test_predict_reports_an_unreachable_server() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    done = cellgate("predict", PRIMER, "--url", f"http://127.0.0.1:{port}")
    assert done.returncode == 1
    assert done.stderr.startswith("error: unreachable")


def test_chat_steps_undoes_and_quits(server: ServerProcess) -> None:
    script = "\n".join([PRIMER, "we cooked a song .", "/undo", "", "/nonsense", "i speak", "/quit", "ignored"])
    done = cellgate("chat", "--url", server.url, "--k", "3", stdin=script + "\n")
    assert done.returncode == 0, done.stderr
    answers = steps(done.stdout)
    assert [step for step, _ in answers] == [0, 5, 10, 5, 7]
    assert answers[3] == answers[1]  # /undo gives back exactly the suggestions from before the line
    assert answers[4][1] == [p["word"] for p in stateless(server, f"{PRIMER} i speak", 3)]
    assert "unknown command '/nonsense'" in done.stderr
    # The chat ends its session on the way out.
    session_id = re.search(r"session (\S+),", done.stderr)
    assert session_id, done.stderr
    assert httpx.get(f"{server.url}/v1/sessions/{session_id.group(1)}").status_code == 404


def test_chat_undo_past_the_kept_history_replays(server: ServerProcess) -> None:
    long_line = " ".join(["we cooked a song ."] * 8)  # 40 tokens: more than the server's 32 of history
    script = "\n".join([PRIMER, long_line, "i speak", "/undo", "/undo", "/undo", "/undo"])
    done = cellgate("chat", "--url", server.url, "--k", "3", "--text", "i stay", stdin=script + "\n")
    assert done.returncode == 0, done.stderr
    answers = steps(done.stdout)
    assert [step for step, _ in answers] == [2, 7, 47, 49, 47, 7, 2]
    assert answers[5] == answers[1]  # the second /undo reaches past the history: rebuilt from the lines
    assert answers[6] == answers[0]
    assert "nothing to undo" in done.stderr


def test_bench_dispatches_to_each_benchmark_and_refuses_unknown_ones() -> None:
    for name, flag in (("serve", "--short"), ("export", "--quick"), ("train-quality", "--throughput")):
        result = cellgate("bench", name, "--help")
        assert result.returncode == 0, result.stderr
        assert flag in result.stdout
    unknown = cellgate("bench", "nonsense")
    assert unknown.returncode == 2
    assert "invalid choice" in unknown.stderr
