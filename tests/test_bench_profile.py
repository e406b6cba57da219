"""The profile summary that docs/benchmarks.md quotes: shares computed from py-spy's collapsed stacks."""

from pathlib import Path

from bench.profile import summarize

RAW = """\
thread (0x1);main (server.py:1);run (scheduler.py:140);OrtRun (libonnxruntime.so) 6
thread (0x1);main (server.py:1);encode (schemas.py:9) 2
thread (0x2);worker (scheduler.py:150);OrtRun (libonnxruntime.so) 2
"""


def test_summary_counts_threads_inclusive_and_self(tmp_path: Path) -> None:
    raw = tmp_path / "serve.raw"
    raw.write_text(RAW)
    lines = summarize(raw, top=3).splitlines()
    assert lines[0] == "threads (10 samples)"
    assert lines[1].split() == ["80.0", "%", "thread", "(0x1)"]
    inclusive = lines[lines.index("inclusive (10 samples)") + 1 :][:3]
    assert [row.split("%")[0].strip() for row in inclusive] == ["80.0", "80.0", "60.0"]
    own = lines[lines.index("self (10 samples)") + 1 :]
    assert own[0].split() == ["80.0", "%", "OrtRun", "(libonnxruntime.so)"]
    assert own[1].split()[0] == "20.0"


def test_empty_profile_says_so(tmp_path: Path) -> None:
    raw = tmp_path / "empty.raw"
    raw.write_text("\n")
    assert summarize(raw) == "no samples\n"
