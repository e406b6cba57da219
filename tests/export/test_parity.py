"""ONNX Runtime against PyTorch through check_parity, the function `cellgate export` runs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cellgate.cli import main
from export import build
from export.build import ParityError, export_checkpoint
from export.bundle import (
    CELL_OUT,
    EXPLAIN_GRAPH,
    GATE_OUTPUTS,
    HIDDEN_OUT,
    LOG_PROBS,
    STEP_GRAPH,
    explain_feed,
    run_graph,
    step_feed,
)
from export.onnx import Weights, build_explain_graph, build_step_graph
from export.parity import BATCHES, LOGIT_TOLERANCE, STATE_TOLERANCE, STREAM_TOKENS, TIMES, ParityReport, check_parity
from model.checkpoint import load_checkpoint, save_checkpoint
from model.lm import LSTMLanguageModel, LSTMState

EXPECTED_CHECKS = {
    "log_probs": LOGIT_TOLERANCE,
    "h": STATE_TOLERANCE,
    "c": STATE_TOLERANCE,
    "padded_log_probs": LOGIT_TOLERANCE,
    "padded_state": STATE_TOLERANCE,
    "stream_log_probs": STATE_TOLERANCE,
    "stream_state": STATE_TOLERANCE,
    "explain_log_probs": LOGIT_TOLERANCE,
    "explain_state": STATE_TOLERANCE,
    **{f"explain_{gate}": STATE_TOLERANCE for gate in GATE_OUTPUTS},
}


@pytest.fixture(scope="module")
def model(tiny_run: Path) -> LSTMLanguageModel:
    return load_checkpoint(tiny_run).build_model()


@pytest.fixture(scope="module")
def report(model: LSTMLanguageModel, tiny_bundle: Path) -> ParityReport:
    # A seed other than the one the export used: fresh tokens and states.
    return check_parity(model, tiny_bundle / STEP_GRAPH, tiny_bundle / EXPLAIN_GRAPH, seed=7)


@pytest.fixture(scope="module")
def step(tiny_bundle: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(tiny_bundle / STEP_GRAPH), providers=["CPUExecutionProvider"])


def test_parity_covers_the_required_shapes(report: ParityReport) -> None:
    assert set(BATCHES) == {1, 7, 32}
    assert set(TIMES) == {1, 5, 50}
    assert STREAM_TOKENS == 200
    # 3 records per shape, 3 per padded row (7 rows), 3 for streaming, 1 + 6 gates + 1 for explain.
    assert report.cases == 3 * len(BATCHES) * len(TIMES) + 3 * 7 + 3 + 8


def test_graphs_carry_no_example_shape(tiny_bundle: Path) -> None:
    """Built without an example, so every tested batch and time is as new to the graph as any other."""
    for name in (STEP_GRAPH, EXPLAIN_GRAPH):
        for value in onnx.load(tiny_bundle / name).graph.input:
            assert all(d.dim_value == 0 for d in value.type.tensor_type.shape.dim if value.name != "k"), value


@pytest.mark.parametrize(("check", "tolerance"), sorted(EXPECTED_CHECKS.items()))
def test_each_check_within_tolerance(report: ParityReport, check: str, tolerance: float) -> None:
    assert check in report.max_diff
    assert report.tolerance[check] == tolerance
    assert report.max_diff[check] <= tolerance, report.failures


def test_report_is_ok(report: ParityReport) -> None:
    assert report.ok
    assert report.failures == []
    assert report.to_dict()["ok"] is True


def _run(session: ort.InferenceSession, tokens: np.ndarray, lengths: np.ndarray, h: np.ndarray, c: np.ndarray) -> list:
    out = run_graph(session, step_feed(tokens, h, c, k=4, lengths=lengths), [LOG_PROBS, HIDDEN_OUT, CELL_OUT])
    return [out[LOG_PROBS], out[HIDDEN_OUT], out[CELL_OUT]]


@settings(max_examples=40, deadline=None)
@given(lengths=st.lists(st.integers(0, 12), min_size=1, max_size=9), seed=st.integers(0, 2**31 - 1))
def test_padded_batch_equals_rows_alone(
    step: ort.InferenceSession, model: LSTMLanguageModel, lengths: list[int], seed: int
) -> None:
    """Rows of different lengths (0 included) padded into one batch get exactly what they get alone."""
    cfg = model.config
    rng = np.random.default_rng(seed)
    batch, width = len(lengths), max(1, max(lengths))
    tokens = rng.integers(3, cfg.vocab_size, (batch, width)).astype(np.int64)
    lengths_arr = np.array(lengths)
    tokens[np.arange(width)[None, :] >= lengths_arr[:, None]] = rng.integers(0, cfg.vocab_size)  # any padding id
    h = rng.uniform(-1, 1, (cfg.num_layers, batch, cfg.hidden_size)).astype(np.float32)
    c = (rng.standard_normal((cfg.num_layers, batch, cfg.hidden_size)) * 2).astype(np.float32)
    log_probs, h_out, c_out = _run(step, tokens, lengths_arr, h, c)
    for row, n in enumerate(lengths):
        alone = _run(step, tokens[row : row + 1, : max(n, 1)], np.array([n]), h[:, row : row + 1], c[:, row : row + 1])
        np.testing.assert_allclose(h_out[:, row : row + 1], alone[1], atol=1e-5, rtol=0)
        np.testing.assert_allclose(c_out[:, row : row + 1], alone[2], atol=1e-5, rtol=0)
        if n == 0:  # an empty row keeps its state exactly
            np.testing.assert_array_equal(h_out[:, row], h[:, row])
            np.testing.assert_array_equal(c_out[:, row], c[:, row])
        else:
            np.testing.assert_allclose(log_probs[row : row + 1], alone[0], atol=1e-5, rtol=0)


def test_streaming_equals_one_call(step: ort.InferenceSession, model: LSTMLanguageModel) -> None:
    """200 tokens one at a time, carrying (h, C), end where one 200-token call ends, as in PyTorch."""
    cfg = model.config
    rng = np.random.default_rng(3)
    tokens = rng.integers(3, cfg.vocab_size, (1, 200)).astype(np.int64)
    h0 = rng.uniform(-1, 1, (cfg.num_layers, 1, cfg.hidden_size)).astype(np.float32)
    c0 = rng.standard_normal((cfg.num_layers, 1, cfg.hidden_size)).astype(np.float32)
    whole = _run(step, tokens, np.array([200]), h0, c0)
    h, c = h0, c0
    for t in range(200):
        last, h, c = _run(step, tokens[:, t : t + 1], np.array([1]), h, c)
    for got, want in zip((last, h, c), whole, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    with torch.no_grad():
        logits, state = model(torch.from_numpy(tokens), LSTMState(torch.from_numpy(h0), torch.from_numpy(c0)))
    np.testing.assert_allclose(h, state.hidden.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(last, logits[:, -1].log_softmax(-1).numpy(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("gate", GATE_OUTPUTS)
def test_explain_graph_matches_explicit_cell(tiny_bundle: Path, model: LSTMLanguageModel, gate: str) -> None:
    cfg = model.config
    explain = ort.InferenceSession(str(tiny_bundle / EXPLAIN_GRAPH), providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(11)
    tokens = torch.randint(3, cfg.vocab_size, (2, 23), generator=gen)
    shape = (cfg.num_layers, 2, cfg.hidden_size)
    state = LSTMState(torch.rand(shape, generator=gen) * 2 - 1, torch.randn(shape, generator=gen))
    _, _, trace = model.explain(tokens, state)
    feed = explain_feed(tokens.numpy(), state.hidden.numpy(), state.cell.numpy())
    got = run_graph(explain, feed, [gate])[gate]  # (T, L, B, H)
    want = getattr(trace, gate).numpy().transpose(2, 0, 1, 3)  # (L, B, T, H) -> (T, L, B, H)
    assert got.shape == want.shape == (23, cfg.num_layers, 2, cfg.hidden_size)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def _perturbed(weights: Weights) -> Weights:
    """One recurrent weight of the top layer moved by 0.05: what a gate-order or transpose slip looks like."""
    layer_weight = [w.copy() for w in weights.layer_weight]
    layer_weight[-1][3, 1] += 0.05
    return dataclasses.replace(weights, layer_weight=layer_weight)


def test_check_parity_catches_a_perturbed_graph(tiny_run: Path, model: LSTMLanguageModel, tmp_path: Path) -> None:
    ckpt = load_checkpoint(tiny_run)
    weights = _perturbed(Weights.from_checkpoint(ckpt))
    excluded = [ckpt.vocab.pad_id, ckpt.vocab.unk_id]
    onnx.save(build_step_graph(weights, excluded), tmp_path / STEP_GRAPH)
    onnx.save(build_explain_graph(weights, excluded), tmp_path / EXPLAIN_GRAPH)
    result = check_parity(model, tmp_path / STEP_GRAPH, tmp_path / EXPLAIN_GRAPH)
    assert not result.ok
    failed = {failure.split(":")[0] for failure in result.failures}
    assert {"h", "c", "explain_hidden"} <= failed  # streaming compares ORT with itself, so it cannot see this


@pytest.fixture
def broken_exporter(monkeypatch: pytest.MonkeyPatch) -> None:
    """The step graph builder writes a perturbed weight; parity runs unchanged, at its real tolerances."""
    real = build.build_step_graph
    monkeypatch.setattr(build, "build_step_graph", lambda w, excluded: real(_perturbed(w), excluded))


@pytest.mark.usefixtures("broken_exporter")
def test_export_refuses_a_graph_that_fails_parity(tiny_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    with pytest.raises(ParityError, match="parity check failed"):
        export_checkpoint(tiny_run, out)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # the staging directory is gone too


@pytest.mark.usefixtures("broken_exporter")
def test_cli_export_exits_non_zero_on_mismatch(
    tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bundle"
    assert main(["export", str(tiny_run), "--out", str(out)]) == 1
    assert "parity check failed" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_a_calibrated_temperature_is_exported(tiny_run: Path, tmp_path: Path, quantize: str | None) -> None:
    """The step graph divides the logits by the checkpoint's temperature, as the PyTorch model does."""
    ckpt = load_checkpoint(tiny_run)
    calibrated = tmp_path / "calibrated.pt"
    save_checkpoint(calibrated, dataclasses.replace(ckpt, config=dataclasses.replace(ckpt.config, temperature=1.7)))
    export_checkpoint(calibrated, tmp_path / "bundle", quantize=quantize)  # raises on a parity failure
    tokens = np.array([[3, 4, 5]], dtype=np.int64)
    state = np.zeros((ckpt.config.num_layers, 1, ckpt.config.hidden_size), dtype=np.float32)
    session = ort.InferenceSession(str(tmp_path / "bundle" / STEP_GRAPH), providers=["CPUExecutionProvider"])
    log_probs = _run(session, tokens, np.array([3], dtype=np.int32), state, state)[0]
    with torch.no_grad():
        logits, _ = load_checkpoint(calibrated).build_model()(torch.from_numpy(tokens))
        want = torch.log_softmax(logits[:, -1], dim=-1).numpy()
        plain, _ = ckpt.build_model()(torch.from_numpy(tokens))
        untempered = torch.log_softmax(plain[:, -1], dim=-1).numpy()
    tolerance = 2e-2 if quantize else 1e-4
    np.testing.assert_allclose(log_probs, want, atol=tolerance)
    assert np.abs(log_probs - untempered).max() > 10 * tolerance  # the temperature changed them
