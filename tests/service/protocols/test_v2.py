"""The v2 wire format without a server: binary framing both ways (responses read back by tritonclient's own
InferResult), JSON tensors flat or nested, and the sequence parameters."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from tritonclient.http import InferResult

from service.errors import ValidationFailed
from service.protocols.v2 import HEADER_LENGTH, Tensor, encode_response, parse_request, sequence_of


def bytes_element(*values: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(v)) + v for v in values)


def test_responses_read_back_with_tritonclient() -> None:
    outputs = [
        Tensor("TOP_IDS", "INT64", (1, 3), np.array([7, 3, 9], dtype=np.int64)),
        Tensor("TOP_WORDS", "BYTES", (1, 3), [b"hindi", "ñ".encode(), b""]),
        Tensor("TOP_LOG_PROBS", "FP32", (1, 3), np.array([-0.5, -1.25, -3.0], dtype=np.float32)),
    ]
    for binary in (set(), {"TOP_WORDS"}, {"TOP_IDS", "TOP_WORDS", "TOP_LOG_PROBS"}):
        body, length = encode_response({"model_name": "m"}, outputs, binary)
        assert (length is None) == (not binary)
        result = InferResult.from_response_body(body, header_length=length)
        assert result.as_numpy("TOP_IDS").tolist() == [[7, 3, 9]]
        words = [w if isinstance(w, bytes) else w.encode() for w in result.as_numpy("TOP_WORDS").ravel().tolist()]
        assert words == [b"hindi", "ñ".encode(), b""]
        assert result.as_numpy("TOP_LOG_PROBS").tolist() == [[-0.5, -1.25, -3.0]]
        assert result.get_response()["model_name"] == "m"


def request(inputs: list[dict[str, object]], binary: bytes = b"") -> tuple[bytes, str | None]:
    header = json.dumps({"inputs": inputs}).encode()
    return header + binary, (str(len(header)) if binary else None)


def test_binary_and_json_inputs() -> None:
    raw = bytes_element(b"i stay", "in ñ".encode())
    body, length = request(
        [
            {"name": "TEXT", "shape": [2], "datatype": "BYTES", "parameters": {"binary_data_size": len(raw)}},
            {"name": "TOKENS", "shape": [2, 2], "datatype": "INT32", "data": [[1, 2], [3, 4]]},
            {"name": "K", "shape": [1], "datatype": "UINT8", "parameters": {"binary_data_size": 1}},
        ],
        raw + b"\x07",
    )
    _, tensors = parse_request(body, length)
    assert tensors[0].values == [b"i stay", "in ñ".encode()]
    assert isinstance(tensors[1].values, np.ndarray)
    assert tensors[1].values.tolist() == [1, 2, 3, 4]
    assert isinstance(tensors[2].values, np.ndarray)
    assert tensors[2].values.tolist() == [7]


@pytest.mark.parametrize(
    ("inputs", "binary", "says"),
    [
        (
            [{"name": "TEXT", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 6}}],
            b"\x05\x00\x00\x00ab",
            "runs past",
        ),
        (
            [{"name": "TEXT", "shape": [2], "datatype": "BYTES", "parameters": {"binary_data_size": 5}}],
            bytes_element(b"a"),
            "needs 2",
        ),
        (
            [{"name": "TEXT", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 2}}],
            b"\x01\x00",
            "cut off",
        ),
        (
            [{"name": "X", "shape": [1], "datatype": "INT64", "parameters": {"binary_data_size": 4}}],
            b"\x00" * 4,
            "needs 8",
        ),
        (
            [{"name": "X", "shape": [1], "datatype": "COMPLEX", "parameters": {"binary_data_size": 1}}],
            b"\x00",
            "unknown datatype",
        ),
        ([{"name": "X", "shape": [1], "datatype": "INT8", "data": [300]}], b"", "does not fit"),
        ([{"name": "X", "shape": [1], "datatype": "UINT8", "data": [-1]}], b"", "does not fit"),
        ([{"name": "X", "shape": [1], "datatype": "INT64", "data": [True]}], b"", "numbers"),
        ([{"name": "X", "shape": [1], "datatype": "INT64"}], b"", "no data"),
        (
            [{"name": "X", "shape": [1], "datatype": "INT64", "data": [1], "parameters": {"binary_data_size": 8}}],
            b"\x00" * 8,
            "both",
        ),
        (
            [{"name": "X", "shape": [1], "datatype": "INT64", "parameters": {"shared_memory_region": "r"}}],
            b"",
            "shared-memory",
        ),
    ],
)
def test_malformed_tensors_are_refused(inputs: list[dict[str, object]], binary: bytes, says: str) -> None:
    header = json.dumps({"inputs": inputs}).encode()
    with pytest.raises(Exception, match=says):
        parse_request(header + binary, str(len(header)) if binary else None)


def test_the_header_length_must_fit_the_body() -> None:
    body, _ = request([{"name": "X", "shape": [0], "datatype": "INT64", "data": []}])
    assert parse_request(body, str(len(body)))[1][0].values.tolist() == []  # type: ignore[union-attr]
    for bad in (str(len(body) + 1), "-1", "ten"):
        with pytest.raises(ValidationFailed, match=HEADER_LENGTH):
            parse_request(body, bad)


def test_sequence_parameters() -> None:
    assert sequence_of({}) is None
    assert sequence_of({"sequence_id": 0}) is None
    assert sequence_of({"sequence_id": ""}) is None
    top = sequence_of({"sequence_id": 2**64 - 1, "sequence_start": True})
    assert top is not None
    assert (top.label, top.start, top.end) == (str(2**64 - 1), True, False)
    number, text = sequence_of({"sequence_id": 42}), sequence_of({"sequence_id": "42", "sequence_end": True})
    assert number is not None
    assert text is not None
    assert number.key != text.key  # Triton keeps uint64 and string ids apart
    assert text.end
    for bad in (
        {"sequence_id": 2**64},
        {"sequence_id": 1.5},
        {"sequence_id": True},
        {"sequence_id": "x" * 257},
        {"sequence_id": 1, "sequence_start": 1},
        {"sequence_end": True},
    ):
        with pytest.raises(ValidationFailed):
            sequence_of(bad)
