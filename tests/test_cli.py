"""`cellgate train`'s configuration and output, and `cellgate predict` and `chat` as subprocesses against a real
server (train's runs, eval and calibrate: tests/model/test_train.py and test_calibration.py)."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from cellgate.cli import build_parser, train_config
from model.checkpoint import LAST, load_checkpoint
from model.corpus import LONGRANGE, longrange_text
from model.recipe import LONGRANGE_RECIPE, TrainConfig, recipe
from tests.servers import ServerProcess

PRIMER = "i stay in india ."


def cellgate(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    # A training run on a shared two-core machine under other jobs' load has taken minutes; a chat, seconds.
    timeout = 600 if args[0] == "train" else 120
    return subprocess.run(
        [sys.executable, "-m", "cellgate.cli", *args], input=stdin, capture_output=True, text=True, timeout=timeout
    )


def parsed_train_config(*flags: str) -> TrainConfig:
    return train_config(build_parser().parse_args(["train", *flags]))


def test_train_with_no_flags_runs_the_corpus_recipe() -> None:
    """No flag: the text recipe (TrainConfig's defaults, BEST) or, for builtin:longrange, the demo's."""
    assert parsed_train_config("--corpus", "t.txt", "--out", "o") == recipe("t.txt", "o")
    assert parsed_train_config("--corpus", "t.txt", "--out", "o") == TrainConfig(corpus="t.txt", out="o")
    demo = parsed_train_config("--corpus", LONGRANGE, "--out", "o")
    assert demo == recipe(LONGRANGE, "o")
    assert demo.hidden_size == LONGRANGE_RECIPE["hidden_size"]


def test_train_flags_change_only_what_they_name() -> None:
    flags = ["--corpus", "t.txt", "--out", "o", "--valid", "v.txt", "--hidden-size", "128", "--layers", "1"]
    flags += ["--precision", "fp32", "--seed", "3", "--threads", "1", "--max-vocab", "5000", "--split", "whitespace"]
    flags += ["--no-lowercase", "--max-minutes", "2", "--quiet", "--set", "dropout=0.4", "--set", "softmax=full"]
    chosen = {"valid": "v.txt", "hidden_size": 128, "num_layers": 1, "precision": "fp32", "seed": 3, "threads": 1}
    chosen |= {"max_vocab": 5000, "split": "whitespace", "lowercase": False, "max_minutes": 2.0, "progress": False}
    assert parsed_train_config(*flags) == recipe("t.txt", "o", **chosen, dropout=0.4, softmax="full")
    # --epochs alone is the budget the schedule decays over; with --max-minutes, whichever ends first.
    assert parsed_train_config("--corpus", "t.txt", "--out", "o", "--epochs", "3").max_minutes is None
    both = parsed_train_config("--corpus", "t.txt", "--out", "o", "--epochs", "3", "--max-minutes", "1")
    assert (both.epochs, both.max_minutes) == (3, 1.0)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("text") / "tiny.txt"
    path.write_text(longrange_text(seed=3, episodes=200, gap_min=0, gap_max=12), encoding="utf-8")
    return path


def test_train_writes_one_line_per_epoch_to_a_pipe(text_file: Path, tmp_path: Path) -> None:
    """stderr is a pipe here: no progress bar's carriage-return updates, one line per epoch, the flags in last.pt."""
    done = cellgate(
        "train", "--corpus", str(text_file), "--out", str(tmp_path), "--epochs", "2", "--hidden-size", "16",
        "--precision", "fp32", "--threads", "1", "--set", "batch_size=4",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "\r" not in done.stderr
    lines = done.stderr.splitlines()
    assert [line.split("  ")[0] for line in lines] == ["epoch 1", "epoch 2"]
    assert "valid ppl" in lines[1]  # the last epoch always validates
    assert json.loads(done.stdout)["epochs"] == 2
    config = load_checkpoint(tmp_path / LAST).train_config
    assert (config["hidden_size"], config["batch_size"], config["epochs"], config["max_minutes"]) == (16, 4, 2, None)
    assert (config["split"], config["lowercase"]) == ("words", True)  # "auto", decided for this text
    quiet = cellgate(
        "train",
        "--corpus",
        str(text_file),
        "--out",
        str(tmp_path / "q"),
        "--epochs",
        "1",
        "--hidden-size",
        "16",
        "--quiet",
    )
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stderr == ""


def test_train_refuses_a_configuration_no_step_could_run_with(text_file: Path, tmp_path: Path) -> None:
    """A one-line error and exit 2, not a traceback, and no checkpoint."""
    out = tmp_path / "refused"
    for flags, message in (
        (["--set", "validate_from=2"], "validate_from must be in [0, 1]"),
        (["--set", "schedule=plateau"], "plateau schedule"),  # the recipe validates only its last 20 %
        (["--set", "rare_word_unk=-1"], "rare_word_unk must be >= 0"),
        (["--set", "batch_size=100000"], "too few for batch size"),
        (["--set", "average_from=0.5"], "TrainConfig field"),
    ):
        done = cellgate("train", "--corpus", str(text_file), "--out", str(out), "--quiet", "--epochs", "1", *flags)
        assert done.returncode == 2, (flags, done.stderr)
        assert done.stderr.startswith("error: "), flags
        assert message in done.stderr, (flags, done.stderr)
        assert "Traceback" not in done.stderr
    assert not (out / LAST).exists()


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
