"""The training-quality bench on a generated corpus: its protocol split, its report and its precision choice."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest

from bench import train_quality
from cellgate.cli import build_parser, train_config
from model.corpus import longrange_text
from model.cpu import bf16_native


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("quality") / "valid.txt"
    path.write_text(longrange_text(seed=1, episodes=300, gap_min=0, gap_max=4), encoding="utf-8")
    return path


def run_bench(data: Path, out: Path, *extra: str) -> dict:
    small = ["hidden_size=16", "samples=16", "batch_size=4"]
    argv = ["--data", str(data), "--run-dir", str(out / "run"), "--out", str(out / "report.json"), "--quiet"]
    argv += ["--max-minutes", "0.03", *[arg for pair in small for arg in ("--set", pair)], *extra]
    assert train_quality.main(argv) == 0
    return json.loads((out / "report.json").read_text(encoding="utf-8"))


def test_report_follows_the_protocol(data: Path, tmp_path: Path) -> None:
    report = run_bench(data, tmp_path)
    lines = data.read_text(encoding="utf-8").splitlines()
    split = {name: (tmp_path / "run" / "data" / f"{name}.txt").read_text().splitlines() for name in ("train", "test")}
    assert split["train"] == lines[: int(len(lines) * 0.9)]
    assert split["test"] == lines[int(len(lines) * 0.95) :]
    assert report["config"]["lowercase"] is False
    assert report["config"]["split"] == "whitespace"
    assert report["overrides"]["hidden_size"] == 16
    # Scored as 10 parallel streams (the PyTorch example's eval batch): each stream's last token has no target.
    assert report["test"]["tokens"] == 10 * (report["data"]["test_tokens"] // 10 - 1) > 0
    assert 1.0 < report["test"]["perplexity"] < report["data"]["vocab_size"] * 2
    # BEST calibrates: the temperature is fitted on validation, and the report keeps the figures as trained.
    calibration = report["calibration"]
    assert report["config"]["calibrate"] is True
    assert calibration["temperature"] != 1.0
    assert report["valid"]["loss"] <= calibration["valid_uncalibrated"]["loss"]
    assert calibration["test_uncalibrated"]["tokens"] == report["test"]["tokens"]
    assert calibration["test_uncalibrated"]["perplexity"] != report["test"]["perplexity"]


def test_recipe_precision_adapts_to_the_cpu_but_an_explicit_one_is_kept(data: Path, tmp_path: Path) -> None:
    recipe = run_bench(data, tmp_path / "recipe")  # BEST asks for "auto"
    if bf16_native():
        assert recipe["precision_fallback"] in (None, "auto -> bf16: no bfloat16 LSTM kernel on this CPU")
        assert recipe["config"]["precision"] in ("bf16-all", "bf16")
    else:
        assert recipe["precision_fallback"] == "auto -> fp32: this CPU has no native bfloat16"
        assert recipe["config"]["precision"] == "fp32"
    explicit = run_bench(data, tmp_path / "explicit", "--set", "precision=bf16")
    assert explicit["precision_fallback"] is None
    assert explicit["config"]["precision"] == "bf16"


def test_profile_times_the_recipe_step_and_lists_its_ops(data: Path, tmp_path: Path) -> None:
    """`--profile N` times N steps of the recipe and prints torch.profiler's table of its ops."""
    out = tmp_path / "profile.txt"
    argv = ["--data", str(data), "--run-dir", str(tmp_path / "run"), "--out", str(out), "--profile", "3", "--quiet"]
    argv += ["--set", "hidden_size=16", "--set", "samples=16", "--set", "batch_size=4"]
    argv += ["--set", "bptt=5"]  # the generated corpus must hold 20 warm-up + 3 profiled batches
    assert train_quality.main(argv) == 0
    text = out.read_text(encoding="utf-8")
    assert "ms per step of 20 tokens" in text
    assert "Self CPU" in text
    assert "aten::mm" in text
    assert not (tmp_path / "run" / "best.pt").exists()  # a profile trains nothing to keep


def test_best_is_what_cellgate_train_runs_with_no_flags(data: Path, tmp_path: Path) -> None:
    """The bench's BEST and `cellgate train --corpus T --valid V` are one recipe; the bench adds the protocol's split
    and vocabulary (which `cellgate train` infers for WikiText: tests/model/test_recipe.py)."""
    run_dir = tmp_path / "run"
    argv = ["--data", str(data), "--run-dir", str(run_dir), "--quiet", "--seed", "4"]
    bench = asdict(train_quality.setup(train_quality.main_parser().parse_args(argv)).cfg)
    data_dir = run_dir / "data"
    command = ["train", "--corpus", str(data_dir / "train.txt"), "--valid", str(data_dir / "valid.txt")]
    command += ["--out", str(run_dir), "--seed", "4", "--threads", "2", "--quiet"]
    cli = asdict(train_config(build_parser().parse_args(command)))
    protocol = set(train_quality.PROTOCOL)
    assert {k: v for k, v in bench.items() if k not in protocol} == {k: v for k, v in cli.items() if k not in protocol}
    assert bench["max_minutes"] == 5.0
