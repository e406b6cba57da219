"""Sampling profiles of a live server under benchmark load, as text: py-spy on the server's pid.

py-spy samples from outside the process (no code in the server changes, no profiler in its GIL), so
the profile is of the server exactly as benchmarked. `record --format raw` writes collapsed stacks,
one line per distinct stack with its sample count; `summarize` turns them into the per-thread shares
and the top functions by inclusive and by self time, which is what a reader of docs/benchmarks.md
needs to see where a request's time goes.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def executable() -> str | None:
    """py-spy next to this interpreter (an unactivated venv) or on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


@contextmanager
def recording(pid: int, out: Path, rate: int = 200, native: bool = True) -> Iterator[None]:
    """Sample `pid` (all threads, native frames too) while the body runs; collapsed stacks land in `out`."""
    binary = executable()
    if binary is None:
        raise RuntimeError("py-spy is not installed (pip install py-spy)")
    command = [binary, "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw", "--threads"]
    command += ["--output", str(out)]
    # Native frames show where ONNX Runtime spends its time, at the price of pausing the server for each
    # sample (py-spy cannot unwind native stacks without stopping the threads): only ever a separate run.
    command.append("--native" if native else "--nonblocking")
    spy = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        yield
    finally:
        spy.send_signal(2)  # SIGINT: py-spy writes what it has and exits
        _, err = spy.communicate(timeout=60)
        if not out.exists():
            raise RuntimeError(f"py-spy wrote no profile: {err.strip()}")


def _frames(line: str) -> tuple[list[str], int]:
    stack, _, count = line.rstrip("\n").rpartition(" ")
    return stack.split(";"), int(count)


class _Node:
    __slots__ = ("children", "count")

    def __init__(self) -> None:
        self.count = 0
        self.children: dict[str, _Node] = {}


def _tree_lines(root: _Node, total: int, threshold: float) -> list[str]:
    """The call tree, top-down, keeping nodes with >= threshold of all samples; a chain of frames that
    each pass their parent's every sample to one child is shown by its last frame only."""
    lines: list[str] = []

    def walk(name: str, node: _Node, depth: int, parent_count: int) -> None:
        kept = [(n, c) for n, c in node.children.items() if c.count >= threshold * total]
        passthrough = node.count == parent_count and len(kept) == 1 and depth > 0
        if not passthrough:
            lines.append(f"  {100 * node.count / total:5.1f} %  {'  ' * depth}{name}")
            depth += 1
        for child_name, child in sorted(kept, key=lambda item: -item[1].count):
            walk(child_name, child, depth, node.count)

    for name, child in sorted(root.children.items(), key=lambda item: -item[1].count):
        if child.count >= threshold * total:
            walk(name, child, 0, -1)
    return lines


def summarize(raw: Path, top: int = 25, threshold: float = 0.015) -> str:
    """Per-thread sample shares, the call tree above `threshold`, then the top functions by inclusive and
    self samples, as plain text."""
    threads: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    root = _Node()
    total = 0
    for line in raw.read_text().splitlines():
        if not line.strip():
            continue
        frames, count = _frames(line)
        total += count
        node = root
        for frame in frames:
            node = node.children.setdefault(frame, _Node())
            node.count += count
        threads[frames[0]] += count  # --threads puts the thread at the root of every stack
        for frame in set(frames[1:]):
            inclusive[frame] += count
        own[frames[-1]] += count
    if not total:
        return "no samples\n"

    def table(title: str, counts: Counter[str], limit: int) -> list[str]:
        rows = [f"{title} ({total} samples)"]
        rows += [f"  {100 * n / total:5.1f} %  {name}" for name, n in counts.most_common(limit)]
        return rows

    lines = table("threads", threads, 10)
    lines += [f"call tree, nodes >= {100 * threshold:g} % ({total} samples)", *_tree_lines(root, total, threshold)]
    lines += table("inclusive", inclusive, top)
    lines += table("self", own, top)
    return "\n".join(lines) + "\n"
