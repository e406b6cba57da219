"""int8 weights for the step graph, checked for agreement with the fp32 graph on held-out text.

Why by hand rather than `onnxruntime.quantization.quantize_dynamic`: for a tied embedding/decoder that
tool stores the matrix twice (uint8 for the embedding Gather, a transposed int8 copy for the decoder:
6.3 MB instead of 3.8 MB for a 2×256, 10k-word model), and it quantizes activations with one scale per
tensor (`DynamicQuantizeLinear`, `DynamicQuantizeLSTM`), so a row's result, and the state it carries
on, would depend on the other rows of its batch. Here every weight matrix is quantized symmetrically
to int8, one scale per output row, stored once, and each row of a batch gets exactly what it gets alone:

    embedding  Gather of int8 rows · the word's scale
    decoder    h quantized per row (its own scale, two 7-bit parts), MatMulInteger with the same int8
               matrix (a Transpose that ONNX Runtime folds at load), then × row scale × word scale + b:
               exact integer sums, so batching cannot change a row by a single bit
    LSTM       int8 W and R with one scale per gate row, Cast·Mul to float at session load (ONNX Runtime
               folds constants), then the float LSTM operator: int8 on disk, fp32 speed, exact batching
The result is plain ONNX (no contrib ops). `lstm="dynamic"` instead runs the LSTM as ONNX Runtime's
`DynamicQuantizeLSTM` (int8 arithmetic: prefill about 2.5× faster, but batch-dependent); bench/export_speed.py
measures both against quantize_dynamic. The explain graph stays fp32.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from export.bundle import CELL_OUT, HIDDEN_OUT, LOG_PROBS, STEP_OUTPUTS, TOP_IDS, run_graph, step_feed
from export.onnx import OPSET
from model.corpus import longrange_text
from model.lm import LSTMLanguageModel
from vocab import Vocabulary

MS_DOMAIN = "com.microsoft"
TOP1_AGREEMENT = 0.99  # the export fails below these bars
TOP5_OVERLAP = 0.95
HELD_OUT_SEED = 2_000_003  # training uses small seeds; this text was never seen
HELD_OUT_TOKENS = 4096
STREAMS = 8  # held-out text runs as this many parallel streams, one token per call, like the service
LSTMMode = Literal["weights", "dynamic"]


class QuantizationError(ValueError):
    """The int8 graph disagrees with the fp32 graph more than the bars allow."""


# x86 CPUs without VNNI multiply uint8 × int8 pairs with `pmaddubsw`, which saturates the int16 sum of two
# products: 255 · 127 · 2 overflows, so full-range operands give wrong sums on exactly those CPUs (seen on an
# AVX-only EPYC: errors of 23,000 in an int32 result). One operand of every integer product keeps 7 bits:
# the decoder's h (two 7-bit parts, uint8 in [1, 127]), the DynamicQuantizeLSTM weights (ONNX Runtime's
# `reduce_range`).
FULL_RANGE = 127
REDUCED_RANGE = 63


def quantize_rows(matrix: np.ndarray, levels: int = FULL_RANGE) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 over the last axis: q (same shape) and scale (shape[:-1]) with matrix ≈ q * scale[..., None]."""
    peak = np.abs(matrix).max(axis=-1)
    scale = np.where(peak > 0, peak / levels, 1.0).astype(np.float32)
    q = np.clip(np.rint(matrix / scale[..., None]), -levels, levels).astype(np.int8)
    return q, scale


class _Rewriter:
    """Replaces the step graph's float weights with int8 ones, each matrix quantized once."""

    def __init__(self, model: onnx.ModelProto, lstm: LSTMMode) -> None:
        self.model = model
        self.lstm_mode = lstm
        self.inits = {t.name: t for t in model.graph.initializer}
        self.new_inits: list[onnx.TensorProto] = []
        self.vocab_matrices: dict[str, tuple[str, str]] = {}  # float name -> (int8 (V, E), scale (V,))

    def array(self, name: str) -> np.ndarray:
        return numpy_helper.to_array(self.inits[name])

    def add(self, array: np.ndarray, name: str) -> str:
        self.new_inits.append(numpy_helper.from_array(array, name))
        return name

    def vocab_matrix(self, name: str) -> tuple[str, str]:
        """A (V, E) float matrix as int8 (V, E) + one scale per word (V,), made once however often it is read."""
        if name not in self.vocab_matrices:
            q, scale = quantize_rows(self.array(name))
            self.vocab_matrices[name] = (self.add(q, f"{name}_q8"), self.add(scale, f"{name}_scale"))
        return self.vocab_matrices[name]

    def gather(self, node: onnx.NodeProto) -> list[onnx.NodeProto]:
        q8, scale = self.vocab_matrix(node.input[0])
        p = node.output[0] + "_q"
        self.add(np.array([-1], np.int64), f"{p}_last")
        return [
            helper.make_node("Gather", [q8, node.input[1]], [f"{p}_int8"]),  # (B, T, E)
            helper.make_node("Cast", [f"{p}_int8"], [f"{p}_int"], to=TensorProto.FLOAT),
            helper.make_node("Gather", [scale, node.input[1]], [f"{p}_scale"]),  # (B, T)
            helper.make_node("Unsqueeze", [f"{p}_scale", f"{p}_last"], [f"{p}_scale_u"]),  # (B, T, 1)
            helper.make_node("Mul", [f"{p}_int", f"{p}_scale_u"], [node.output[0]]),
        ]

    def gemm(self, node: onnx.NodeProto) -> list[onnx.NodeProto]:
        """h · Wᵀ + b with h quantized per row in two 7-bit parts, one MatMulInteger with the int8 matrix.

        h / s = q₁ + q₂ / 126 with s = row peak / 63, q₁ = round(h / s) and q₂ = round(126 · remainder), both
        in [−63, 63] (7 bits, see REDUCED_RANGE): about 13 bits of h for one pass over the weights, which the
        (B, 2, H) product reads once. On the realistic 2×256, 10k-word model a single 7-bit h agreed at top-1
        0.9900, the two parts at 0.9929 (docs/benchmarks.md).
        """
        attrs = self.attrs(node)
        if attrs != {"transB": 1} or len(node.input) != 3:
            raise ValueError(f"unexpected decoder Gemm {attrs}: expected h · Wᵀ + b")
        hidden, bias = node.input[0], node.input[2]
        q8, scale = self.vocab_matrix(node.input[1])
        p = node.output[0] + "_q"
        fine = 2 * REDUCED_RANGE  # the remainder lies in [-0.5, 0.5]
        self.add(np.array(1e-30, np.float32), f"{p}_tiny")
        self.add(np.array(float(REDUCED_RANGE), np.float32), f"{p}_levels")
        self.add(np.array(float(fine), np.float32), f"{p}_fine")
        self.add(np.array(float(REDUCED_RANGE + 1), np.float32), f"{p}_zero")
        self.add(np.array(REDUCED_RANGE + 1, np.uint8), f"{p}_zero_point")
        self.add(np.array([1], np.int64), f"{p}_axis1")
        self.add(np.array([[1.0], [1.0 / fine]], np.float32), f"{p}_parts")  # (2, 1)
        return [
            helper.make_node("Abs", [hidden], [f"{p}_abs"]),
            helper.make_node("ReduceMax", [f"{p}_abs"], [f"{p}_peak0"], axes=[1], keepdims=1),  # (B, 1)
            helper.make_node("Max", [f"{p}_peak0", f"{p}_tiny"], [f"{p}_peak"]),  # an all-zero row divides safely
            helper.make_node("Div", [f"{p}_peak", f"{p}_levels"], [f"{p}_row_scale"]),  # (B, 1)
            helper.make_node("Div", [hidden, f"{p}_row_scale"], [f"{p}_scaled"]),
            helper.make_node("Round", [f"{p}_scaled"], [f"{p}_coarse"]),  # q₁ in [-63, 63]
            helper.make_node("Sub", [f"{p}_scaled", f"{p}_coarse"], [f"{p}_remainder"]),
            helper.make_node("Mul", [f"{p}_remainder", f"{p}_fine"], [f"{p}_remainder_scaled"]),
            helper.make_node("Round", [f"{p}_remainder_scaled"], [f"{p}_fine_q"]),  # q₂ in [-63, 63]
            helper.make_node("Unsqueeze", [f"{p}_coarse", f"{p}_axis1"], [f"{p}_coarse_u"]),
            helper.make_node("Unsqueeze", [f"{p}_fine_q", f"{p}_axis1"], [f"{p}_fine_u"]),
            helper.make_node("Concat", [f"{p}_coarse_u", f"{p}_fine_u"], [f"{p}_parts_q"], axis=1),  # (B, 2, H)
            helper.make_node("Add", [f"{p}_parts_q", f"{p}_zero"], [f"{p}_shifted"]),  # in [1, 127]
            helper.make_node("Cast", [f"{p}_shifted"], [f"{p}_uint8"], to=TensorProto.UINT8),
            # ONNX Runtime folds this Transpose at load: the file keeps one (V, E) copy for both uses.
            helper.make_node("Transpose", [q8], [f"{p}_weight_t"], perm=[1, 0]),  # (H, V) int8
            helper.make_node(
                "MatMulInteger", [f"{p}_uint8", f"{p}_weight_t", f"{p}_zero_point"], [f"{p}_int32"]
            ),  # (B, 2, V), exact integer arithmetic
            helper.make_node("Cast", [f"{p}_int32"], [f"{p}_int"], to=TensorProto.FLOAT),
            helper.make_node("Mul", [f"{p}_int", f"{p}_parts"], [f"{p}_weighted"]),
            helper.make_node("ReduceSum", [f"{p}_weighted", f"{p}_axis1"], [f"{p}_sum"], keepdims=0),  # (B, V)
            helper.make_node("Mul", [f"{p}_sum", f"{p}_row_scale"], [f"{p}_rows"]),
            helper.make_node("Mul", [f"{p}_rows", scale], [f"{p}_unbiased"]),
            helper.make_node("Add", [f"{p}_unbiased", bias], list(node.output)),
        ]

    def lstm_weights(self, node: onnx.NodeProto) -> list[onnx.NodeProto]:
        inputs, nodes = list(node.input), []
        for i in (1, 2):
            name = node.input[i]
            q, scale = quantize_rows(self.array(name))  # (1, 4H, I): one scale per gate row
            self.add(q, f"{name}_q8")
            self.add(scale[..., None], f"{name}_scale")  # (1, 4H, 1)
            # Cast and Mul, not DequantizeLinear: ONNX Runtime folds these at load, so steps run in float.
            nodes += [
                helper.make_node("Cast", [f"{name}_q8"], [f"{name}_int"], to=TensorProto.FLOAT),
                helper.make_node("Mul", [f"{name}_int", f"{name}_scale"], [f"{name}_float"]),
            ]
            inputs[i] = f"{name}_float"
        return [*nodes, helper.make_node("LSTM", inputs, list(node.output), name=node.name, **self.attrs(node))]

    def lstm_dynamic(self, node: onnx.NodeProto) -> list[onnx.NodeProto]:
        # DynamicQuantizeLSTM wants W (1, I, 4H) and R (1, H, 4H): ONNX LSTM's weights transposed.
        quantized: list[str] = []
        for name in node.input[1:3]:
            # 7-bit weights: ONNX Runtime quantizes the activations to full-range uint8 itself.
            q, scale = quantize_rows(self.array(name), REDUCED_RANGE)  # (1, 4H, I) in ONNX gate order i, o, f, c
            quantized += [
                self.add(np.ascontiguousarray(q.transpose(0, 2, 1)), f"{name}_q8_t"),
                self.add(scale, f"{name}_scale"),  # (1, 4H)
                self.add(np.zeros_like(scale, dtype=np.int8), f"{name}_zero_point"),
            ]
        inputs = [node.input[0], quantized[0], quantized[3], *node.input[3:], *[""] * (8 - len(node.input))]
        inputs += [quantized[1], quantized[2], quantized[4], quantized[5]]
        return [
            helper.make_node("DynamicQuantizeLSTM", inputs, list(node.output), domain=MS_DOMAIN, **self.attrs(node))
        ]

    @staticmethod
    def attrs(node: onnx.NodeProto) -> dict[str, Any]:
        return {a.name: helper.get_attribute_value(a) for a in node.attribute}

    def rewrite(self) -> onnx.ModelProto:
        graph = self.model.graph
        nodes: list[onnx.NodeProto] = []
        for node in graph.node:
            if node.op_type == "Gather" and len(self.inits.get(node.input[0], TensorProto()).dims) == 2:
                nodes += self.gather(node)
            elif node.op_type == "Gemm":
                nodes += self.gemm(node)
            elif node.op_type == "LSTM":
                nodes += self.lstm_weights(node) if self.lstm_mode == "weights" else self.lstm_dynamic(node)
            else:
                nodes.append(node)
        used = {name for node in nodes for name in node.input}
        inits = [t for t in graph.initializer if t.name in used] + self.new_inits
        out = helper.make_graph(nodes, graph.name + "_int8", list(graph.input), list(graph.output), initializer=inits)
        opsets = [helper.make_opsetid("", OPSET)]
        if any(node.domain == MS_DOMAIN for node in nodes):
            opsets.append(helper.make_opsetid(MS_DOMAIN, 1))
        model = helper.make_model(out, opset_imports=opsets, producer_name="cellgate")
        model.ir_version = self.model.ir_version
        onnx.checker.check_model(model, full_check=True)
        return model


def quantize_step_model(model: onnx.ModelProto, lstm: LSTMMode = "weights") -> onnx.ModelProto:
    """The step graph with int8 decoder, embedding and LSTM weights; inputs and outputs unchanged."""
    return _Rewriter(model, lstm).rewrite()


def _session(source: Path | bytes, threads: int = 1) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads  # how the service runs it
    options.inter_op_num_threads = 1
    data = str(source) if isinstance(source, Path) else source
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def held_out_tokens(
    vocab: Vocabulary, reference: ort.InferenceSession, layers: int, hidden: int, count: int = HELD_OUT_TOKENS
) -> tuple[list[int], str]:
    """Held-out token ids and where they came from: text the model was never trained on."""
    # builtin:longrange under an unseen seed when the vocabulary covers it; otherwise text sampled at
    # temperature 1 from the fp32 graph (already parity-checked against PyTorch), for any corpus.
    ids, _ = vocab.encode(longrange_text(seed=HELD_OUT_SEED, episodes=max(1, count // 10)))
    if ids.count(vocab.unk_id) <= 0.01 * len(ids) and len(ids) >= count:
        return ids[:count], f"builtin:longrange seed {HELD_OUT_SEED}"
    rng = np.random.default_rng(HELD_OUT_SEED)
    steps = -(-count // STREAMS)
    tokens = np.full((STREAMS, 1), vocab.eos_id, dtype=np.int64)
    h = c = np.zeros((layers, STREAMS, hidden), np.float32)
    sampled = np.zeros((STREAMS, steps), dtype=np.int64)
    for t in range(steps):
        out = run_graph(reference, step_feed(tokens, h, c), STEP_OUTPUTS)
        h, c = out[HIDDEN_OUT], out[CELL_OUT]
        probs = np.exp(out[LOG_PROBS].astype(np.float64))
        probs[:, [vocab.pad_id, vocab.unk_id]] = 0.0
        probs /= probs.sum(axis=1, keepdims=True)
        cumulative = probs.cumsum(axis=1)
        tokens = (cumulative < rng.random((STREAMS, 1))).sum(axis=1, keepdims=True).clip(0, probs.shape[1] - 1)
        sampled[:, t] = tokens[:, 0]
    return sampled.reshape(-1)[:count].tolist(), f"sampled from the fp32 graph, seed {HELD_OUT_SEED}"


def agreement(
    reference: ort.InferenceSession, candidate: ort.InferenceSession, tokens: list[int], layers: int, hidden: int
) -> dict[str, float]:
    """Top-1 agreement and top-5 overlap after every token, each graph carrying its own (h, C)."""
    steps = len(tokens) // STREAMS
    streams = np.array(tokens[: steps * STREAMS], dtype=np.int64).reshape(STREAMS, steps)
    zero = np.zeros((layers, STREAMS, hidden), np.float32)
    states = [(zero, zero), (zero, zero)]
    top1 = overlap = 0.0
    worst = 0.0
    for t in range(steps):
        results = []
        for i, session in enumerate((reference, candidate)):
            out = run_graph(session, step_feed(streams[:, t : t + 1], *states[i]), STEP_OUTPUTS)
            states[i] = (out[HIDDEN_OUT], out[CELL_OUT])
            results.append((out[LOG_PROBS], out[TOP_IDS]))
        (ref_lp, ref_ids), (got_lp, got_ids) = results
        top1 += float((ref_ids[:, 0] == got_ids[:, 0]).sum())
        overlap += sum(len(set(a) & set(b)) / 5 for a, b in zip(ref_ids.tolist(), got_ids.tolist(), strict=True))
        worst = max(worst, float(np.abs(np.exp(ref_lp) - np.exp(got_lp)).max()))
    positions = steps * STREAMS
    return {
        "positions": positions,
        "top1": top1 / positions,
        "top5_overlap": overlap / positions,
        "max_prob_diff": worst,
    }


def batch_effect(session: ort.InferenceSession, tokens: list[int], layers: int, hidden: int) -> float:
    """Largest |Δ log-prob| for a row run inside a padded batch of 8 versus alone (0 for the fp32 graph)."""
    lengths = np.array([5, 1, 9, 3, 7, 2, 9, 4], dtype=np.int32)
    batch = np.zeros((len(lengths), int(lengths.max())), dtype=np.int64)
    for row, n in enumerate(lengths):
        batch[row, :n] = tokens[row * 9 : row * 9 + n]
    zero = np.zeros((layers, len(lengths), hidden), np.float32)
    together = run_graph(session, step_feed(batch, zero, zero, lengths=lengths), [LOG_PROBS])[LOG_PROBS]
    worst = 0.0
    for row, n in enumerate(lengths):
        z1 = np.zeros((layers, 1, hidden), np.float32)
        alone = run_graph(session, step_feed(batch[row : row + 1, :n], z1, z1), [LOG_PROBS])[LOG_PROBS]
        worst = max(worst, float(np.abs(alone[0] - together[row]).max()))
    return worst


def step_latency(sessions: list[ort.InferenceSession], layers: int, hidden: int, rounds: int = 20) -> list[float]:
    """Median single-step (batch 1, one token) latency of each session in seconds.

    The sessions take turns in blocks of 20 calls, so both see the same machine load, yet each block
    runs with its own weights in cache, as a service calling one model over and over does.
    """
    zero = np.zeros((layers, 1, hidden), np.float32)
    feed = step_feed(np.array([[3]], dtype=np.int64), zero, zero)
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(rounds):
        for i, session in enumerate(sessions):
            for call in range(21):
                start = time.perf_counter()
                session.run(None, feed)
                if call:  # the first call of a block refills the cache
                    times[i].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def op_providers(path: Path, layers: int, hidden: int) -> dict[str, set[str]]:
    """op type -> execution providers that ran it, read from an ONNX Runtime profile of one step."""
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(tempfile.gettempdir()) / "cellgate-ort-profile")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    zero = np.zeros((layers, 1, hidden), np.float32)
    session.run(None, step_feed(np.array([[3, 4]], dtype=np.int64), zero, zero))
    profile = Path(session.end_profiling())
    try:
        events = json.loads(profile.read_text())
    finally:
        profile.unlink(missing_ok=True)
    found: dict[str, set[str]] = {}
    for event in events:
        args = event.get("args", {})
        if event.get("cat") == "Node" and "provider" in args:
            found.setdefault(args["op_name"], set()).add(args["provider"])
    return found


def quantize_bundle_graph(
    step_graph: Path, vocab: Vocabulary, model: LSTMLanguageModel, lstm: LSTMMode = "weights"
) -> dict[str, Any]:
    """Replace the fp32 step graph in place by its int8 form; report agreement, size and latency ratios.

    Raises QuantizationError, leaving the fp32 graph as it was, when agreement is below the bars.
    """
    cfg = model.config
    fp32_bytes = step_graph.read_bytes()
    quantized = quantize_step_model(onnx.load_from_string(fp32_bytes), lstm)
    tmp = step_graph.with_name(step_graph.name + ".int8.tmp")
    try:
        onnx.save(quantized, tmp)
        reference, candidate = _session(fp32_bytes), _session(tmp)
        tokens, source = held_out_tokens(vocab, reference, cfg.num_layers, cfg.hidden_size)
        agree = agreement(reference, candidate, tokens, cfg.num_layers, cfg.hidden_size)
        fp32_s, int8_s = step_latency([reference, candidate], cfg.num_layers, cfg.hidden_size)
        report: dict[str, Any] = {
            "method": "int8 symmetric weights, one scale per row, each matrix stored once; decoder MatMulInteger "
            "on per-row quantized h; LSTM "
            + ("weights int8 on disk, float at load" if lstm == "weights" else "DynamicQuantizeLSTM"),
            "lstm": lstm,
            "held_out": source,
            "streams": STREAMS,
            **agree,
            "bars": {"top1": TOP1_AGREEMENT, "top5_overlap": TOP5_OVERLAP},
            "batch_effect_max_log_prob_diff": batch_effect(candidate, tokens, cfg.num_layers, cfg.hidden_size),
            "fp32_bytes": len(fp32_bytes),
            "int8_bytes": tmp.stat().st_size,
            "size_ratio": tmp.stat().st_size / len(fp32_bytes),
            "fp32_step_seconds": fp32_s,
            "int8_step_seconds": int8_s,
            "latency_ratio": int8_s / fp32_s,
        }
        if agree["top1"] < TOP1_AGREEMENT or agree["top5_overlap"] < TOP5_OVERLAP:
            raise QuantizationError(
                f"int8 graph agrees too little with fp32 on {agree['positions']} held-out positions: "
                f"top-1 {agree['top1']:.4f} (bar {TOP1_AGREEMENT}), top-5 overlap {agree['top5_overlap']:.4f} "
                f"(bar {TOP5_OVERLAP})"
            )
        os.replace(tmp, step_graph)
    finally:
        tmp.unlink(missing_ok=True)
    return report
