"""The exported graphs themselves: valid ONNX, dynamic shapes, each weight stored once, runnable on CPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from export.bundle import (
    EXPLAIN_GRAPH,
    EXPLAIN_INPUTS,
    EXPLAIN_OUTPUTS,
    GATE_OUTPUTS,
    STEP_GRAPH,
    STEP_INPUTS,
    STEP_OUTPUTS,
    explain_feed,
    load_bundle,
    run_graph,
    step_feed,
)
from export.onnx import OPSET

GRAPHS = (STEP_GRAPH, EXPLAIN_GRAPH)


@pytest.fixture(scope="module")
def config(tiny_bundle: Path) -> dict[str, int]:
    return {k: int(v) for k, v in load_bundle(tiny_bundle).config.items() if k.endswith(("_size", "_layers"))}


@pytest.mark.parametrize("name", GRAPHS)
def test_full_check_passes(tiny_bundle: Path, name: str) -> None:
    onnx.checker.check_model(onnx.load(tiny_bundle / name), full_check=True)


@pytest.mark.parametrize("name", GRAPHS)
def test_opset_at_least_17(tiny_bundle: Path, name: str) -> None:
    model = onnx.load(tiny_bundle / name)
    default = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    assert default == [OPSET]
    assert OPSET >= 17


def _dims(value: onnx.ValueInfoProto) -> list[str | int]:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


_ONNX_DTYPES = {onnx.TensorProto.INT64: np.int64, onnx.TensorProto.INT32: np.int32, onnx.TensorProto.FLOAT: np.float32}


@pytest.mark.parametrize(
    ("name", "inputs", "outputs", "feed"),
    [
        (STEP_GRAPH, STEP_INPUTS, STEP_OUTPUTS, step_feed([[3, 4]], [[[0.0]]], [[[0.0]]])),
        (EXPLAIN_GRAPH, EXPLAIN_INPUTS, EXPLAIN_OUTPUTS, explain_feed([[3, 4]], [[[0.0]]], [[[0.0]]])),
    ],
)
def test_graphs_have_the_bundle_modules_interface(
    tiny_bundle: Path, name: str, inputs: tuple[str, ...], outputs: tuple[str, ...], feed: dict[str, np.ndarray]
) -> None:
    """export/bundle.py names every input and output, and its feed builders give each input its graph's dtype."""
    graph = onnx.load(tiny_bundle / name).graph
    assert tuple(v.name for v in graph.input) == inputs
    assert tuple(v.name for v in graph.output) == outputs
    assert set(feed) == set(inputs)
    for value in graph.input:
        assert feed[value.name].dtype == _ONNX_DTYPES[value.type.tensor_type.elem_type], value.name


@pytest.mark.parametrize("name", GRAPHS)
def test_batch_and_time_are_dynamic(tiny_bundle: Path, name: str) -> None:
    """Symbolic dims only: no example's batch or length is baked into any input or output."""
    graph = onnx.load(tiny_bundle / name).graph
    inputs = {v.name: _dims(v) for v in graph.input}
    assert inputs["tokens"] == ["batch", "time"]
    assert inputs["h"] == inputs["c"] == ["layers", "batch", "hidden"]
    outputs = {v.name: _dims(v) for v in graph.output}
    assert outputs["log_probs"] == ["batch", "vocab"]
    assert outputs["h_out"] == outputs["c_out"] == ["layers", "batch", "hidden"]
    if name == STEP_GRAPH:
        assert inputs["lengths"] == ["batch"]
    else:
        assert all(outputs[gate] == ["time", "layers", "batch", "hidden"] for gate in GATE_OUTPUTS)


@pytest.mark.parametrize("name", GRAPHS)
def test_tied_weight_stored_once(tiny_bundle: Path, name: str, config: dict[str, int]) -> None:
    graph = onnx.load(tiny_bundle / name).graph
    assert load_bundle(tiny_bundle).config["tie_weights"] is True
    shape = [config["vocab_size"], config["embed_size"]]
    assert sum(list(t.dims) == shape for t in graph.initializer) == 1
    assert not any(node.op_type == "Constant" for node in graph.node)  # no second copy hidden in a node


def test_step_graph_has_no_unused_weight(tiny_bundle: Path) -> None:
    graph = onnx.load(tiny_bundle / STEP_GRAPH).graph
    used = {name for node in graph.node for name in node.input}
    assert [t.name for t in graph.initializer if t.name not in used] == []


@pytest.mark.parametrize(("batch", "time"), [(1, 1), (3, 17), (64, 2), (2, 300)])
def test_cpu_provider_runs_any_shape(tiny_bundle: Path, config: dict[str, int], batch: int, time: int) -> None:
    session = ort.InferenceSession(str(tiny_bundle / STEP_GRAPH), providers=["CPUExecutionProvider"])
    assert session.get_providers() == ["CPUExecutionProvider"]
    layers, hidden, vocab = config["num_layers"], config["hidden_size"], config["vocab_size"]
    rng = np.random.default_rng(batch * 1000 + time)
    state = (layers, batch, hidden)
    feed = step_feed(rng.integers(0, vocab, (batch, time)), rng.standard_normal(state), rng.standard_normal(state), k=3)
    out = run_graph(session, feed, STEP_OUTPUTS)
    log_probs, top_lp, top_ids, h_out, c_out = (out[name] for name in STEP_OUTPUTS)
    assert log_probs.shape == (batch, vocab)
    assert h_out.shape == c_out.shape == state
    assert top_ids.shape == top_lp.shape == (batch, 3)
    np.testing.assert_allclose(np.exp(log_probs).sum(axis=1), 1.0, rtol=1e-5)
    assert not np.isin(top_ids, [0, 1]).any()  # <pad> and <unk> are never suggested
    np.testing.assert_array_equal(np.take_along_axis(log_probs, top_ids, axis=1), top_lp)
