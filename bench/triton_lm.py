"""The Triton peer's model: cellgate's own Runner inside Triton's python backend, under its sequence batcher.

Loaded by bench/triton/lm/1/lm.py in Triton's python-backend stub process (bench/peer.py puts this
repository and the project's virtual environment on its PYTHONPATH). Each `execute` receives one batch the
sequence batcher formed (oldest strategy: at most one request per sequence), runs it as ONE ONNX Runtime
call through the same Runner, feed and top-k as cellgate, and keeps (h, C) per correlation id in this
process — Triton pins a sequence to one model instance for its life, so the state is always here.

Inputs per request: TEXT (BYTES, [1]) and the sequence batcher's START / END / CORRID controls.
Outputs: WORDS (BYTES, [K]) and PROBS (FP32, [K]) — the same top-5 a cellgate step returns.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils  # provided by the stub; exists only inside Triton

from export.bundle import load_bundle
from service.config import Settings
from service.runner import Runner

K = 5


class TritonPythonModel:
    """Triton's python-backend model interface: initialize, execute(requests) -> responses, finalize."""

    def initialize(self, args: dict[str, Any]) -> None:
        config = json.loads(args["model_config"])
        bundle = Path(os.environ["CELLGATE_BUNDLE"])
        # One intra-op thread as in cellgate (its default): Triton's instance count is the parallelism knob.
        self.runner = Runner(load_bundle(bundle), Settings(bundle=bundle, intra_op_threads=1, inter_op_threads=1))
        self.runner.warm_up()
        self.words = np.array(self.runner.vocab.words, dtype=object)
        zero_h, zero_c = self.runner.zero_state(1)
        self.zero = (zero_h[:, 0], zero_c[:, 0])
        self.states: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # correlation id -> (h, C), each (L, H)
        self.name = config["name"]

    def execute(self, requests: list[Any]) -> list[Any]:
        rows: list[int] = []  # index into requests of each request that runs
        sequences: list[list[int]] = []
        hidden: list[np.ndarray] = []
        cell: list[np.ndarray] = []
        corrids: list[int] = []
        ends: list[bool] = []
        responses: list[Any] = [None] * len(requests)
        for index, request in enumerate(requests):
            start = bool(pb_utils.get_input_tensor_by_name(request, "START").as_numpy().item())
            end = bool(pb_utils.get_input_tensor_by_name(request, "END").as_numpy().item())
            corrid = int(pb_utils.get_input_tensor_by_name(request, "CORRID").as_numpy().item())
            text = pb_utils.get_input_tensor_by_name(request, "TEXT").as_numpy().reshape(-1)[0]
            state = self.zero if start else self.states.get(corrid)
            if state is None:
                error = pb_utils.TritonError(f"sequence {corrid} has no state in this instance (missing START?)")
                responses[index] = pb_utils.InferenceResponse(error=error)
                continue
            ids, _unknown = self.runner.vocab.encode(text.decode() if isinstance(text, bytes) else str(text))
            rows.append(index)
            sequences.append(ids)
            hidden.append(state[0])
            cell.append(state[1])
            corrids.append(corrid)
            ends.append(end)
        if rows:
            result = self.runner.run(sequences, np.stack(hidden, axis=1), np.stack(cell, axis=1), K)  # (L, B, H)
            probs = np.exp(result.top_log_probs).astype(np.float32)  # (B, K)
            for row, index in enumerate(rows):
                if ends[row]:
                    self.states.pop(corrids[row], None)
                else:
                    self.states[corrids[row]] = (result.hidden[:, row].copy(), result.cell[:, row].copy())
                words = pb_utils.Tensor("WORDS", self.words[result.top_ids[row]].astype(np.bytes_).reshape(1, K))
                responses[index] = pb_utils.InferenceResponse([words, pb_utils.Tensor("PROBS", probs[row : row + 1])])
        return responses

    def finalize(self) -> None:
        self.states.clear()
