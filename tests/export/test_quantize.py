"""`--quantize int8`: agreement bars, one int8 copy of the tied matrix, batching unchanged, served on CPU."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import numpy_helper

from cellgate.cli import main
from export import quantize
from export.build import export_checkpoint
from export.bundle import (
    CELL_OUT,
    EXPLAIN_GRAPH,
    HIDDEN_OUT,
    LOG_PROBS,
    STEP_GRAPH,
    STEP_OUTPUTS,
    load_bundle,
    run_graph,
    step_feed,
)
from export.onnx import Weights, build_step_graph
from export.parity import check_parity
from export.quantize import QuantizationError, op_providers, quantize_bundle_graph, quantize_step_model
from model.checkpoint import Checkpoint, load_checkpoint
from model.config import LSTMConfig
from model.lm import LSTMLanguageModel
from service.config import Settings
from service.runner import Runner
from vocab import Vocabulary


@pytest.fixture(scope="module")
def int8_bundle(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("int8") / "tiny-int8"
    export_checkpoint(tiny_run, out, quantize="int8")
    return out


@pytest.fixture(scope="module")
def report(int8_bundle: Path) -> dict:
    return dict(load_bundle(int8_bundle).manifest["quantization"])


@pytest.fixture(scope="module")
def int8_step(int8_bundle: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(int8_bundle / STEP_GRAPH), providers=["CPUExecutionProvider"])


def test_report_meets_the_agreement_bars(report: dict) -> None:
    assert report["held_out"].startswith("builtin:longrange seed")
    assert report["positions"] >= 4000
    assert report["top1"] >= quantize.TOP1_AGREEMENT == 0.99
    assert report["top5_overlap"] >= quantize.TOP5_OVERLAP == 0.95
    assert report["bars"] == {"top1": 0.99, "top5_overlap": 0.95}


def test_report_records_size_and_latency(report: dict, int8_bundle: Path, tiny_bundle: Path) -> None:
    assert report["int8_bytes"] == (int8_bundle / STEP_GRAPH).stat().st_size
    assert report["fp32_bytes"] == (tiny_bundle / STEP_GRAPH).stat().st_size
    assert report["size_ratio"] == pytest.approx(report["int8_bytes"] / report["fp32_bytes"])
    assert report["size_ratio"] < 0.5
    assert report["fp32_step_seconds"] > 0
    assert report["latency_ratio"] == pytest.approx(report["int8_step_seconds"] / report["fp32_step_seconds"])


def test_bundle_is_marked_and_verifies(int8_bundle: Path, tiny_bundle: Path) -> None:
    bundle = load_bundle(int8_bundle)
    assert bundle.quantized == "int8"
    assert bundle.model_version != load_bundle(tiny_bundle).model_version
    assert bundle.manifest["parity"]["ok"] is True  # parity of the fp32 graphs, run before quantizing


def test_explain_graph_stays_fp32(int8_bundle: Path, tiny_bundle: Path) -> None:
    files, fp32_files = load_bundle(int8_bundle).manifest["files"], load_bundle(tiny_bundle).manifest["files"]
    assert files[EXPLAIN_GRAPH] == fp32_files[EXPLAIN_GRAPH]
    assert files[STEP_GRAPH] != fp32_files[STEP_GRAPH]


def test_tied_matrix_stored_once_in_int8(int8_bundle: Path) -> None:
    config = load_bundle(int8_bundle).config
    vocab, embed = config["vocab_size"], config["embed_size"]
    graph = onnx.load(int8_bundle / STEP_GRAPH).graph
    assert not any(
        sorted(t.dims) == sorted([vocab, embed]) for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT
    )  # no float copy, in either layout
    word_matrices = [t for t in graph.initializer if t.dims and t.dims[0] == vocab and len(t.dims) == 2]
    assert [(t.data_type, list(t.dims)) for t in word_matrices] == [(onnx.TensorProto.INT8, [vocab, embed])]
    consumers = sorted(n.op_type for n in graph.node if word_matrices[0].name in n.input)
    assert consumers == ["Gather", "Transpose"]  # the embedding, and the decoder through a folded Transpose


def test_every_weight_matrix_is_int8(int8_bundle: Path, tiny_bundle: Path) -> None:
    fp32 = {t.name: t for t in onnx.load(tiny_bundle / STEP_GRAPH).graph.initializer}
    int8 = {t.name: t for t in onnx.load(int8_bundle / STEP_GRAPH).graph.initializer}
    matrices = [name for name, t in fp32.items() if len(t.dims) >= 2 and np.prod(t.dims) >= 1024]
    assert sorted(matrices) == ["R_0", "R_1", "W_0", "W_1", "embedding"]
    for name in matrices:
        assert name not in int8
        assert int8[f"{name}_q8"].data_type == onnx.TensorProto.INT8
        assert list(int8[f"{name}_q8"].dims) == list(fp32[name].dims)


def test_int8_graph_is_plain_onnx(int8_bundle: Path) -> None:
    model = onnx.load(int8_bundle / STEP_GRAPH)
    assert {o.domain for o in model.opset_import} <= {"", "ai.onnx"}
    onnx.checker.check_model(model, full_check=True)


def test_int8_graph_cannot_pass_fp32_parity(int8_bundle: Path, tiny_run: Path) -> None:
    """Why the export checks parity before quantizing: int8 differs from PyTorch by more than 1e-5."""
    result = check_parity(load_checkpoint(tiny_run).build_model(), int8_bundle / STEP_GRAPH, None)
    assert not result.ok
    assert result.max_diff["log_probs"] < 0.1  # close, just not float-close


def test_quantized_ops_run_on_cpu(int8_bundle: Path) -> None:
    config = load_bundle(int8_bundle).config
    ran = op_providers(int8_bundle / STEP_GRAPH, config["num_layers"], config["hidden_size"])
    assert ran["MatMulInteger"] == {"CPUExecutionProvider"}
    assert ran["LSTM"] == {"CPUExecutionProvider"}
    assert "Gemm" not in ran
    assert set().union(*ran.values()) == {"CPUExecutionProvider"}


def test_dynamic_lstm_variant_runs_on_cpu(tiny_bundle: Path, tmp_path: Path) -> None:
    config = load_bundle(tiny_bundle).config
    path = tmp_path / "dynamic.onnx"
    onnx.save(quantize_step_model(onnx.load(tiny_bundle / STEP_GRAPH), lstm="dynamic"), path)
    ran = op_providers(path, config["num_layers"], config["hidden_size"])
    assert ran["DynamicQuantizeLSTM"] == {"CPUExecutionProvider"}
    assert "LSTM" not in ran


def _feed(tokens: np.ndarray, lengths: np.ndarray, h: np.ndarray, c: np.ndarray) -> dict[str, np.ndarray]:
    return step_feed(tokens, h, c, k=5, lengths=lengths)


@settings(max_examples=25, deadline=None)
@given(lengths=st.lists(st.integers(0, 10), min_size=2, max_size=8), seed=st.integers(0, 2**31 - 1))
def test_int8_padded_batch_equals_rows_alone(
    int8_step: ort.InferenceSession, int8_bundle: Path, lengths: list[int], seed: int
) -> None:
    """h is quantized per row and the LSTM runs in float, so batching still cannot change a row's result."""
    config = load_bundle(int8_bundle).config
    layers, hidden, vocab = config["num_layers"], config["hidden_size"], config["vocab_size"]
    rng = np.random.default_rng(seed)
    batch, width = len(lengths), max(1, max(lengths))
    tokens = rng.integers(0, vocab, (batch, width)).astype(np.int64)
    h = rng.uniform(-1, 1, (layers, batch, hidden)).astype(np.float32)
    c = rng.standard_normal((layers, batch, hidden)).astype(np.float32)
    together = run_graph(int8_step, _feed(tokens, np.array(lengths), h, c), STEP_OUTPUTS)
    for row, n in enumerate(lengths):
        feed = _feed(tokens[row : row + 1, : max(n, 1)], np.array([n]), h[:, row : row + 1], c[:, row : row + 1])
        alone = run_graph(int8_step, feed, STEP_OUTPUTS)
        np.testing.assert_allclose(together[LOG_PROBS][row : row + 1], alone[LOG_PROBS], atol=1e-5, rtol=0)
        np.testing.assert_allclose(together[HIDDEN_OUT][:, row : row + 1], alone[HIDDEN_OUT], atol=1e-5, rtol=0)
        np.testing.assert_allclose(together[CELL_OUT][:, row : row + 1], alone[CELL_OUT], atol=1e-5, rtol=0)


def test_service_runner_serves_the_int8_bundle(int8_bundle: Path, tiny_bundle: Path) -> None:
    settings_ = Settings(bundle=int8_bundle)
    runners = [Runner(load_bundle(path), settings_) for path in (int8_bundle, tiny_bundle)]
    assert runners[0].providers == ["CPUExecutionProvider"]
    vocab = runners[0].vocab
    primer, _ = vocab.encode("i stay in india . we cooked a song . i speak")
    results = []
    for runner in runners:
        h, c = runner.zero_state(2)
        results.append(runner.run([primer, primer[:3]], h, c, k=5, want_log_probs=True))
    int8, fp32 = results
    assert int8.top_ids.shape == (2, 5)
    assert int8.log_probs is not None
    assert int8.log_probs.shape == (2, len(vocab))
    assert not np.isin(int8.top_ids, [vocab.pad_id, vocab.unk_id]).any()
    assert vocab.decode(int8.top_ids[:, 0]) == vocab.decode(fp32.top_ids[:, 0])
    np.testing.assert_allclose(int8.hidden, fp32.hidden, atol=0.05)
    gates = runners[0].explain(primer, *runners[0].zero_state(1))  # the fp32 explain graph, unchanged
    assert gates["forget_gate"].shape == (len(primer), runners[0].layers, runners[0].hidden_size)


def _drop_sign(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A broken quantizer (loses every weight's sign): its graph must be refused."""
    q, scale = _real_quantize_rows(matrix)
    return np.abs(q), scale


_real_quantize_rows = quantize.quantize_rows


def test_agreement_below_the_bar_is_refused(
    tiny_bundle: Path, tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt = load_checkpoint(tiny_run)
    step = Path(shutil.copy(tiny_bundle / STEP_GRAPH, tmp_path / STEP_GRAPH))
    before = step.read_bytes()
    monkeypatch.setattr(quantize, "quantize_rows", _drop_sign)
    with pytest.raises(QuantizationError, match=r"top-1 0\.\d+ \(bar 0\.99\)"):
        quantize_bundle_graph(step, ckpt.vocab, ckpt.build_model())
    assert step.read_bytes() == before  # the fp32 graph is left as it was
    assert [p.name for p in tmp_path.iterdir()] == [STEP_GRAPH]  # no temporary file left behind


def test_cli_export_fails_when_quantization_disagrees(
    tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(quantize, "quantize_rows", _drop_sign)
    out = tmp_path / "bundle"
    assert main(["export", str(tiny_run), "--out", str(out), "--quantize", "int8"]) == 1
    assert "agrees too little" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("lstm", ["weights", "dynamic"])
def test_untied_model(tmp_path: Path, lstm: quantize.LSTMMode) -> None:
    """Untied embedding and decoder (two int8 matrices of different widths), both LSTM modes."""
    torch.manual_seed(0)
    config = LSTMConfig(vocab_size=60, embed_size=24, hidden_size=40, num_layers=2, tie_weights=False)
    model = LSTMLanguageModel(config).eval()
    vocab = Vocabulary(["<pad>", "<unk>", "<eos>", *[f"w{i}" for i in range(57)]])
    ckpt = Checkpoint(config=config, vocab=vocab, state_dict=model.state_dict())
    fp32 = build_step_graph(Weights.from_checkpoint(ckpt), [0, 1])
    int8 = quantize_step_model(fp32, lstm=lstm)
    matrices = [t for t in int8.graph.initializer if t.data_type == onnx.TensorProto.INT8 and t.dims[0] == 60]
    assert sorted(tuple(t.dims) for t in matrices) == [(60, 24), (60, 40)]  # embedding, decoder
    rng = np.random.default_rng(0)
    feed = _feed(
        rng.integers(0, 60, (3, 6)).astype(np.int64),
        np.array([6, 2, 4]),
        rng.uniform(-1, 1, (2, 3, 40)).astype(np.float32),
        rng.uniform(-1, 1, (2, 3, 40)).astype(np.float32),
    )
    sessions = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]) for m in (fp32, int8)]
    want, got = (run_graph(session, feed, [LOG_PROBS, HIDDEN_OUT]) for session in sessions)
    np.testing.assert_allclose(np.exp(got[LOG_PROBS]), np.exp(want[LOG_PROBS]), atol=0.01)  # probabilities
    np.testing.assert_allclose(got[HIDDEN_OUT], want[HIDDEN_OUT], atol=0.02)


def test_decoder_integer_sums_are_exact(int8_bundle: Path, int8_step: ort.InferenceSession) -> None:
    """The int8 decoder equals numpy's exact integer product of its own operands on this CPU.

    Full-range uint8 × int8 pairs overflow `pmaddubsw` on x86 CPUs without VNNI (ONNX Runtime's kernel there
    saturates silently); the decoder splits h into two 7-bit parts so that no CPU can change the sum.
    """
    config = load_bundle(int8_bundle).config
    layers, hidden, vocab = config["num_layers"], config["hidden_size"], config["vocab_size"]
    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(int8_bundle / STEP_GRAPH).graph.initializer}
    matrix, scale, bias = inits["embedding_q8"], inits["embedding_scale"], inits["decoder_bias"]  # tied
    assert matrix.shape == (vocab, hidden)
    assert matrix.dtype == np.int8
    rng = np.random.default_rng(7)
    batch = 16
    h = rng.uniform(-1, 1, (layers, batch, hidden)).astype(np.float32)
    c = rng.uniform(-3, 3, (layers, batch, hidden)).astype(np.float32)
    tokens = rng.integers(0, vocab, (batch, 1)).astype(np.int64)
    out = run_graph(int8_step, _feed(tokens, np.ones(batch), h, c), [LOG_PROBS, HIDDEN_OUT])
    # The graph's own float32 arithmetic, to the same roundings.
    log_probs, top = out[LOG_PROBS], out[HIDDEN_OUT][-1].astype(np.float32)
    levels = np.float32(quantize.REDUCED_RANGE)
    row_scale = np.maximum(np.abs(top).max(axis=1, keepdims=True), np.float32(1e-30)) / levels
    scaled = top / row_scale
    coarse = np.rint(scaled)
    fine = np.rint((scaled - coarse) * 2 * levels)
    assert np.abs(coarse).max() <= levels
    assert np.abs(fine).max() <= levels
    weights = matrix.astype(np.int64).T
    exact = (coarse.astype(np.int64) @ weights) + (fine.astype(np.int64) @ weights) / (2 * float(levels))
    logits = exact * row_scale * scale + bias
    peak = logits.max(axis=1, keepdims=True)
    want = logits - peak - np.log(np.exp(logits - peak).sum(axis=1, keepdims=True))
    np.testing.assert_allclose(log_probs, want, atol=2e-4, rtol=0)
