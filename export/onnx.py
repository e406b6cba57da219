"""ONNX graphs for a trained checkpoint, written directly with onnx.helper.

Why by hand rather than torch.onnx: with torch 2.13 the dynamo exporter froze the time axis of an
LSTM to the example's length and the TorchScript exporter stored a tied embedding/decoder twice.
Writing the graph ourselves keeps batch and time dynamic, stores every weight once, and names each
input and output after what it means.

The graphs' file, input and output names are export/bundle.py's (its docstring has their shapes and
dtypes); this module writes graphs with exactly those names.

Step graph (`lm.onnx`), what the service runs: each layer is one ONNX `LSTM` operator with
`sequence_lens` (the `lengths` input), so padded positions never touch the state: a batch of
different lengths gives each row exactly what it would get alone.

Explain graph (`explain.onnx`): the explicit cell (MatMul, Sigmoid, Tanh) inside a `Scan` over
time, returning every gate per token and layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from export.bundle import (
    CELL,
    CELL_OUT,
    GATE_OUTPUTS,
    HIDDEN,
    HIDDEN_OUT,
    LENGTHS,
    LOG_PROBS,
    TOKENS,
    TOP_IDS,
    TOP_LOG_PROBS,
    K,
)
from model.cell import GATE_ORDER
from model.checkpoint import Checkpoint

OPSET = 17
# Masked words get this log-probability before TopK so they are never suggested.
_MASKED = -1e30


@dataclass(frozen=True)
class Weights:
    """Float32 numpy views of a checkpoint, gates in this project's order (i, f, C̃, o)."""

    embedding: np.ndarray  # (V, E)
    decoder: np.ndarray  # (V, H); the same array object as embedding when tied
    decoder_bias: np.ndarray  # (V,)
    layer_weight: list[np.ndarray]  # (4H, H + I) acting on [h, x]
    layer_bias: list[np.ndarray]  # (4H,)
    tied: bool
    temperature: float = 1.0  # the decoder's logits are divided by it (calibration)

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint) -> Weights:
        sd = {k: v.detach().cpu().numpy().astype(np.float32) for k, v in ckpt.state_dict.items()}
        embedding = sd["embedding.weight"]
        tied = ckpt.config.tie_weights
        layers = range(ckpt.config.num_layers)
        return cls(
            embedding=embedding,
            decoder=embedding if tied else sd["decoder_weight"],
            decoder_bias=sd["decoder_bias"],
            layer_weight=[sd[f"layers.{i}.weight"] for i in layers],
            layer_bias=[sd[f"layers.{i}.bias"] for i in layers],
            tied=tied,
            temperature=ckpt.config.temperature,
        )


def _gate_blocks(matrix: np.ndarray, hidden: int) -> dict[str, np.ndarray]:
    return {name: matrix[i * hidden : (i + 1) * hidden] for i, name in enumerate(GATE_ORDER)}


def _onnx_lstm_order(matrix: np.ndarray, hidden: int) -> np.ndarray:
    """Reorder gate row blocks from (i, f, C̃, o) to ONNX's (i, o, f, c)."""
    g = _gate_blocks(matrix, hidden)
    return np.concatenate([g["input_gate"], g["output_gate"], g["forget_gate"], g["candidate"]], axis=0)


def _decoder_initializers(w: Weights, vocab_mask: np.ndarray) -> list[onnx.TensorProto]:
    # (W h + b) / T = W (h / T) + b / T: the bias is stored divided, h is scaled in the graph.
    scale = np.float32(1.0 / w.temperature)
    inits = [
        numpy_helper.from_array(w.embedding, "embedding"),
        numpy_helper.from_array((w.decoder_bias * scale).astype(np.float32), "decoder_bias"),
        numpy_helper.from_array(vocab_mask.astype(np.float32), "suggestion_mask"),
    ]
    if w.temperature != 1.0:
        inits.append(numpy_helper.from_array(np.array(scale, dtype=np.float32), "logit_scale"))
    if not w.tied:
        inits.append(numpy_helper.from_array(w.decoder, "decoder_weight"))
    return inits


def _head_nodes(top_hidden: str, w: Weights) -> list[onnx.NodeProto]:
    """top_hidden [B, H] -> log_probs, top_log_probs, top_ids."""
    scaled: list[onnx.NodeProto] = []
    if w.temperature != 1.0:
        # Scaling h rather than the (B, V) logits: H multiplies instead of V, and the Gemm stays h · Wᵀ + b.
        scaled = [helper.make_node("Mul", [top_hidden, "logit_scale"], [f"{top_hidden}_scaled"])]
        top_hidden = f"{top_hidden}_scaled"
    return [
        *scaled,
        helper.make_node(
            "Gemm", [top_hidden, "embedding" if w.tied else "decoder_weight", "decoder_bias"], ["logits"], transB=1
        ),
        helper.make_node("LogSoftmax", ["logits"], [LOG_PROBS], axis=-1),
        helper.make_node("Add", [LOG_PROBS, "suggestion_mask"], ["suggestable"]),
        helper.make_node("TopK", ["suggestable", K], [TOP_LOG_PROBS, TOP_IDS], axis=-1, largest=1, sorted=1),
    ]


def _state_value_infos(name: str) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["layers", "batch", "hidden"])


def suggestion_mask(vocab_size: int, excluded_ids: list[int]) -> np.ndarray:
    mask = np.zeros(vocab_size, dtype=np.float32)
    mask[excluded_ids] = _MASKED
    return mask


def build_step_graph(w: Weights, excluded_ids: list[int]) -> onnx.ModelProto:
    """The serving graph: embedding → one ONNX LSTM per layer (with sequence_lens) → decoder → top-k."""
    layers = len(w.layer_weight)
    hidden = w.layer_bias[0].shape[0] // 4
    nodes: list[onnx.NodeProto] = [
        helper.make_node("Gather", ["embedding", TOKENS], ["embedded"]),  # (B, T, E)
        helper.make_node("Transpose", ["embedded"], ["x_0"], perm=[1, 0, 2]),  # (T, B, E)
    ]
    inits = _decoder_initializers(w, suggestion_mask(w.embedding.shape[0], excluded_ids))
    inits.append(numpy_helper.from_array(np.array([0], dtype=np.int64), "axis0"))
    inits.append(numpy_helper.from_array(np.array([0, 2], dtype=np.int64), "axes02"))
    inits.append(numpy_helper.from_array(np.array(0, dtype=np.int32), "zero_i32"))
    nodes += [
        helper.make_node("Greater", [LENGTHS, "zero_i32"], ["nonempty"]),  # (B,)
        helper.make_node("Unsqueeze", ["nonempty", "axes02"], ["has_tokens"]),  # (1, B, 1)
    ]
    for layer in range(layers):
        weight, bias = w.layer_weight[layer], w.layer_bias[layer]
        recurrent, inputs = weight[:, :hidden], weight[:, hidden:]
        inits += [
            numpy_helper.from_array(_onnx_lstm_order(inputs, hidden)[None], f"W_{layer}"),  # (1, 4H, I)
            numpy_helper.from_array(_onnx_lstm_order(recurrent, hidden)[None], f"R_{layer}"),  # (1, 4H, H)
            numpy_helper.from_array(
                np.concatenate([_onnx_lstm_order(bias, hidden), np.zeros(4 * hidden, np.float32)])[None], f"B_{layer}"
            ),  # (1, 8H): input bias then recurrent bias
            numpy_helper.from_array(np.array([layer], dtype=np.int64), f"start_{layer}"),
            numpy_helper.from_array(np.array([layer + 1], dtype=np.int64), f"end_{layer}"),
        ]
        nodes += [
            helper.make_node("Slice", [HIDDEN, f"start_{layer}", f"end_{layer}", "axis0"], [f"h_in_{layer}"]),
            helper.make_node("Slice", [CELL, f"start_{layer}", f"end_{layer}", "axis0"], [f"c_in_{layer}"]),
            helper.make_node(
                "LSTM",
                [f"x_{layer}", f"W_{layer}", f"R_{layer}", f"B_{layer}", LENGTHS, f"h_in_{layer}", f"c_in_{layer}"],
                [f"y_{layer}", f"h_lstm_{layer}", f"c_lstm_{layer}"],
                hidden_size=hidden,
            ),  # y: (T, 1, B, H); h/c: (1, B, H)
            # A row of length 0 keeps its state (the LSTM operator would zero it).
            helper.make_node("Where", ["has_tokens", f"h_lstm_{layer}", f"h_in_{layer}"], [f"h_out_{layer}"]),
            helper.make_node("Where", ["has_tokens", f"c_lstm_{layer}", f"c_in_{layer}"], [f"c_out_{layer}"]),
            helper.make_node("Squeeze", [f"y_{layer}", "one"], [f"x_{layer + 1}"]),  # (T, B, H)
        ]
    inits.append(numpy_helper.from_array(np.array([1], dtype=np.int64), "one"))
    nodes += [
        helper.make_node("Concat", [f"h_out_{i}" for i in range(layers)], [HIDDEN_OUT], axis=0),
        helper.make_node("Concat", [f"c_out_{i}" for i in range(layers)], [CELL_OUT], axis=0),
        helper.make_node("Squeeze", [f"h_out_{layers - 1}", "axis0"], ["top_hidden"]),  # (B, H)
        *_head_nodes("top_hidden", w),
    ]
    graph = helper.make_graph(
        nodes,
        "cellgate_step",
        inputs=[
            helper.make_tensor_value_info(TOKENS, TensorProto.INT64, ["batch", "time"]),
            helper.make_tensor_value_info(LENGTHS, TensorProto.INT32, ["batch"]),
            _state_value_infos(HIDDEN),
            _state_value_infos(CELL),
            helper.make_tensor_value_info(K, TensorProto.INT64, [1]),
        ],
        outputs=[
            helper.make_tensor_value_info(LOG_PROBS, TensorProto.FLOAT, ["batch", "vocab"]),
            helper.make_tensor_value_info(TOP_LOG_PROBS, TensorProto.FLOAT, ["batch", "k"]),
            helper.make_tensor_value_info(TOP_IDS, TensorProto.INT64, ["batch", "k"]),
            _state_value_infos(HIDDEN_OUT),
            _state_value_infos(CELL_OUT),
        ],
        initializer=inits,
    )
    return _finish(graph)


def build_explain_graph(w: Weights, excluded_ids: list[int]) -> onnx.ModelProto:
    """The explicit cell in a Scan over time, emitting every gate (the introspection graph)."""
    layers = len(w.layer_weight)
    hidden = w.layer_bias[0].shape[0] // 4
    f32 = TensorProto.FLOAT
    # Scan body: state (h, c) [L, B, H], one time step of token ids [B] -> new state + gates [L, B, H].
    body_nodes: list[onnx.NodeProto] = [helper.make_node("Gather", ["embedding", "token_t"], ["x_0"])]  # (B, E)
    per_gate: dict[str, list[str]] = {name: [] for name in GATE_OUTPUTS}
    inits = _decoder_initializers(w, suggestion_mask(w.embedding.shape[0], excluded_ids))
    for layer in range(layers):
        blocks = _gate_blocks(w.layer_weight[layer], hidden)
        biases = _gate_blocks(w.layer_bias[layer], hidden)
        p = f"l{layer}_"
        body_nodes += [
            helper.make_node("Gather", ["h_prev", f"{p}index"], [f"{p}h"], axis=0),  # (B, H)
            helper.make_node("Gather", ["c_prev", f"{p}index"], [f"{p}c"], axis=0),
            helper.make_node("Concat", [f"{p}h", f"x_{layer}"], [f"{p}hx"], axis=-1),  # [h_{t-1}, x_t]
        ]
        inits.append(numpy_helper.from_array(np.array(layer, dtype=np.int64), f"{p}index"))
        activation = {"input_gate": "Sigmoid", "forget_gate": "Sigmoid", "candidate": "Tanh", "output_gate": "Sigmoid"}
        for gate, op in activation.items():
            inits += [
                numpy_helper.from_array(np.ascontiguousarray(blocks[gate].T), f"{p}W_{gate}"),  # (H + I, H)
                numpy_helper.from_array(biases[gate], f"{p}b_{gate}"),
            ]
            body_nodes += [
                helper.make_node("MatMul", [f"{p}hx", f"{p}W_{gate}"], [f"{p}{gate}_z0"]),
                helper.make_node("Add", [f"{p}{gate}_z0", f"{p}b_{gate}"], [f"{p}{gate}_z"]),
                helper.make_node(op, [f"{p}{gate}_z"], [f"{p}{gate}"]),
            ]
        body_nodes += [
            helper.make_node("Mul", [f"{p}forget_gate", f"{p}c"], [f"{p}kept"]),  # f ⊙ C_{t-1}
            helper.make_node("Mul", [f"{p}input_gate", f"{p}candidate"], [f"{p}written"]),  # i ⊙ C̃
            helper.make_node("Add", [f"{p}kept", f"{p}written"], [f"{p}cell"]),
            helper.make_node("Tanh", [f"{p}cell"], [f"{p}cell_tanh"]),
            helper.make_node("Mul", [f"{p}output_gate", f"{p}cell_tanh"], [f"{p}hidden"]),  # o ⊙ tanh(C)
            helper.make_node("Identity", [f"{p}hidden"], [f"x_{layer + 1}"]),
        ]
        for name in GATE_OUTPUTS:
            body_nodes.append(helper.make_node("Unsqueeze", [f"{p}{name}", "axis0"], [f"{p}{name}_u"]))
            per_gate[name].append(f"{p}{name}_u")
    inits.append(numpy_helper.from_array(np.array([0], dtype=np.int64), "axis0"))
    for name in GATE_OUTPUTS:
        body_nodes.append(helper.make_node("Concat", per_gate[name], [f"{name}_t"], axis=0))  # (L, B, H)
    body_nodes += [
        helper.make_node("Identity", ["hidden_t"], ["h_next"]),
        helper.make_node("Identity", ["cell_t"], ["c_next"]),
    ]
    gate_out_names = [f"{name}_out" for name in GATE_OUTPUTS]
    body_nodes += [
        helper.make_node("Identity", [f"{n}_t"], [o]) for n, o in zip(GATE_OUTPUTS, gate_out_names, strict=True)
    ]
    body = helper.make_graph(
        body_nodes,
        "explicit_cell_step",
        inputs=[
            helper.make_tensor_value_info("h_prev", f32, None),
            helper.make_tensor_value_info("c_prev", f32, None),
            helper.make_tensor_value_info("token_t", TensorProto.INT64, None),
        ],
        outputs=[
            helper.make_tensor_value_info("h_next", f32, None),
            helper.make_tensor_value_info("c_next", f32, None),
            *[helper.make_tensor_value_info(o, f32, None) for o in gate_out_names],
        ],
    )
    scan_outputs = [f"{name}" for name in GATE_OUTPUTS]
    nodes = [
        helper.make_node(
            "Scan",
            [HIDDEN, CELL, TOKENS],
            [HIDDEN_OUT, CELL_OUT, *scan_outputs],
            body=body,
            num_scan_inputs=1,
            scan_input_axes=[1],  # tokens are (B, T): step over T
        ),  # gate outputs: (T, L, B, H)
        helper.make_node("Gather", [HIDDEN_OUT, "last_layer"], ["top_hidden"], axis=0),  # (B, H)
        *_head_nodes("top_hidden", w),
    ]
    inits.append(numpy_helper.from_array(np.array(layers - 1, dtype=np.int64), "last_layer"))
    # Scan bodies see the outer graph's initializers, so the body's weights live there once.
    graph = helper.make_graph(
        nodes,
        "cellgate_explain",
        inputs=[
            helper.make_tensor_value_info(TOKENS, TensorProto.INT64, ["batch", "time"]),
            _state_value_infos(HIDDEN),
            _state_value_infos(CELL),
            helper.make_tensor_value_info(K, TensorProto.INT64, [1]),
        ],
        outputs=[
            helper.make_tensor_value_info(LOG_PROBS, f32, ["batch", "vocab"]),
            helper.make_tensor_value_info(TOP_LOG_PROBS, f32, ["batch", "k"]),
            helper.make_tensor_value_info(TOP_IDS, TensorProto.INT64, ["batch", "k"]),
            _state_value_infos(HIDDEN_OUT),
            _state_value_infos(CELL_OUT),
            *[helper.make_tensor_value_info(name, f32, ["time", "layers", "batch", "hidden"]) for name in GATE_OUTPUTS],
        ],
        initializer=inits,
    )
    return _finish(graph)


def _finish(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="cellgate")
    model.ir_version = 8  # readable by every onnxruntime >= 1.14
    onnx.checker.check_model(model, full_check=True)
    return model
