"""The Open Inference Protocol v2 (KServe / Triton) REST wire format: request and response bodies, the binary
tensor data extension, sequence parameters and the error shape. Knows no FastAPI: routes/v2.py is the HTTP side.

Binary tensor data: with the header `Inference-Header-Content-Length: N` the first N bytes of a body are the
JSON header and the rest is the raw data of the tensors whose `parameters.binary_data_size` is set, in the
order they are listed; BYTES elements are each a 4-byte little-endian length and the bytes. Outputs come back
the same way when a requested output has `binary_data: true` or the request has `binary_data_output: true`.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from service.errors import Unsupported, ValidationFailed
from service.schemas import NonNegativeJsonInt

HEADER_LENGTH = "Inference-Header-Content-Length"
# Datatypes by their v2 names; BYTES is handled on its own (variable-length elements).
NUMPY_TYPES = {
    "BOOL": "?",
    "UINT8": "<u1",
    "UINT16": "<u2",
    "UINT32": "<u4",
    "UINT64": "<u8",
    "INT8": "<i1",
    "INT16": "<i2",
    "INT32": "<i4",
    "INT64": "<i8",
    "FP16": "<f2",
    "FP32": "<f4",
    "FP64": "<f8",
}
INTEGER_TYPES = tuple(t for t in NUMPY_TYPES if "INT" in t)
MAX_SEQUENCE_ID_CHARS = 256


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TensorIn(_Strict):
    name: str
    shape: list[NonNegativeJsonInt] = Field(max_length=8)
    datatype: str
    parameters: dict[str, Any] = Field(default_factory=dict, description="binary_data_size for binary data")
    data: list[Any] | None = Field(None, description="Row-major, flat or nested; absent with binary data.")


class OutputIn(_Strict):
    name: str
    parameters: dict[str, Any] = Field(default_factory=dict, description="binary_data: true for raw bytes")


class InferRequest(_Strict):
    id: str | None = None
    parameters: dict[str, Any] = Field(
        default_factory=dict,
        description="sequence_id (uint64 or string), sequence_start, sequence_end, binary_data_output, "
        "and cellgate's if_step (apply only if the sequence is at this step: exactly-once retries)",
    )
    inputs: list[TensorIn]
    outputs: list[OutputIn] | None = None


class TensorOut(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class InferResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    outputs: list[TensorOut]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class V2Error(BaseModel):
    error: str


@dataclass(frozen=True)
class Tensor:
    name: str
    datatype: str
    shape: tuple[int, ...]
    values: np.ndarray | list[bytes]  # numeric: flat array; BYTES: the elements


@dataclass(frozen=True)
class Sequence:
    key: str  # typed, so that the uint64 42 and the string "42" are different sequences, as in Triton
    label: str  # as the client wrote it, for messages
    start: bool
    end: bool


def inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """model's JSON schema with its $defs written in place (an OpenAPI requestBody given by hand has no
    components to point into)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return resolve(defs[ref.removeprefix("#/$defs/")])
            return {key: resolve(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(value) for value in node]
        return node

    resolved: dict[str, Any] = resolve(schema)
    return resolved


def _fail(message: str) -> ValidationFailed:
    return ValidationFailed(message)


def parse_request(body: bytes, header_length: str | None) -> tuple[InferRequest, list[Tensor]]:
    """The request's JSON header and its input tensors, binary data attached; raises ValidationFailed."""
    if header_length is None:
        header, binary = body, b""
    else:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise _fail(f"{HEADER_LENGTH} is {header_length!r}; the body has {len(body)} bytes")
        header, binary = body[: int(header_length)], body[int(header_length) :]
    try:
        request = InferRequest.model_validate_json(header)
    except ValidationError as exc:
        where = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors())
        raise _fail(f"invalid inference request: {where}") from None
    tensors, offset = [], 0
    for item in request.inputs:
        if any(key.startswith("shared_memory") for key in item.parameters):
            raise Unsupported(f"input '{item.name}': shared-memory tensors are not supported; send the data")
        size = item.parameters.get("binary_data_size")
        if size is not None:
            if type(size) is not int or size < 0 or offset + size > len(binary):
                raise _fail(f"input '{item.name}': binary_data_size {size!r} exceeds the binary data sent")
            if item.data is not None:
                raise _fail(f"input '{item.name}' has both data and binary_data_size")
            tensors.append(_from_binary(item, binary[offset : offset + size]))
            offset += size
        elif item.data is None:
            raise _fail(f"input '{item.name}' has no data")
        else:
            tensors.append(_from_json(item, item.data))
    if offset != len(binary):
        raise _fail(
            f"{len(binary) - offset} bytes of binary data follow the inputs; binary_data_size accounts for {offset}"
        )
    return request, tensors


def _elements(shape: list[int]) -> int:
    return math.prod(shape)


def _from_binary(item: TensorIn, raw: bytes) -> Tensor:
    count = _elements(item.shape)
    if item.datatype == "BYTES":
        values, at = [], 0
        while at < len(raw):
            if at + 4 > len(raw):
                raise _fail(f"input '{item.name}': a BYTES element length is cut off")
            (length,) = struct.unpack_from("<I", raw, at)
            if at + 4 + length > len(raw):
                raise _fail(f"input '{item.name}': a BYTES element runs past the data")
            values.append(raw[at + 4 : at + 4 + length])
            at += 4 + length
        if len(values) != count:
            raise _fail(f"input '{item.name}' has {len(values)} BYTES elements; its shape {item.shape} needs {count}")
        return Tensor(item.name, item.datatype, tuple(item.shape), values)
    dtype = _numpy_type(item)
    if len(raw) != count * dtype.itemsize:
        raise _fail(
            f"input '{item.name}' has {len(raw)} bytes; shape {item.shape} of {item.datatype} needs "
            f"{count * dtype.itemsize}"
        )
    return Tensor(item.name, item.datatype, tuple(item.shape), np.frombuffer(raw, dtype=dtype))


def _flatten(data: list[Any]) -> list[Any]:
    flat: list[Any] = []
    stack = [iter(data)]
    while stack:
        for value in stack[-1]:
            if isinstance(value, list):
                stack.append(iter(value))
                break
            flat.append(value)
        else:
            stack.pop()
    return flat


def _from_json(item: TensorIn, data: list[Any]) -> Tensor:
    flat, count = _flatten(data), _elements(item.shape)
    if len(flat) != count:
        raise _fail(f"input '{item.name}' has {len(flat)} elements; its shape {item.shape} needs {count}")
    if item.datatype == "BYTES":
        if not all(isinstance(v, str) for v in flat):
            raise _fail(f"input '{item.name}': BYTES data in JSON must be strings")
        return Tensor(item.name, item.datatype, tuple(item.shape), [v.encode() for v in flat])
    dtype = _numpy_type(item)
    want = bool if dtype.kind == "b" else (float, int) if dtype.kind == "f" else int
    if not all(isinstance(v, want) and (dtype.kind == "b" or not isinstance(v, bool)) for v in flat):
        raise _fail(
            f"input '{item.name}': {item.datatype} data must be JSON {'booleans' if want is bool else 'numbers'}"
        )
    try:
        values = np.array(flat, dtype=dtype)
    except OverflowError:
        raise _fail(f"input '{item.name}': a value does not fit {item.datatype}") from None
    if dtype.kind in "iu" and values.tolist() != flat:
        raise _fail(f"input '{item.name}': a value does not fit {item.datatype}")
    return Tensor(item.name, item.datatype, tuple(item.shape), values)


def _numpy_type(item: TensorIn) -> np.dtype[Any]:
    name = NUMPY_TYPES.get(item.datatype)
    if name is None:
        raise _fail(f"input '{item.name}': unknown datatype {item.datatype!r} (one of BYTES, {', '.join(NUMPY_TYPES)})")
    return np.dtype(name)


def sequence_of(parameters: dict[str, Any]) -> Sequence | None:
    """The request's sequence, or None for a stateless request; raises ValidationFailed."""
    flags = {}
    for name in ("sequence_start", "sequence_end"):
        value = parameters.get(name, False)
        if type(value) is not bool:
            raise _fail(f"parameter {name} must be a boolean, got {value!r}")
        flags[name] = value
    value = parameters.get("sequence_id", 0)
    if type(value) is int:
        if not 0 <= value < 2**64:
            raise _fail(f"sequence_id {value} is not a uint64")
        key, label = f"u:{value}", str(value)
        none = value == 0
    elif isinstance(value, str):
        if len(value) > MAX_SEQUENCE_ID_CHARS:
            raise _fail(f"a string sequence_id may have at most {MAX_SEQUENCE_ID_CHARS} characters")
        key, label, none = f"s:{value}", value, value == ""
    else:
        raise _fail(f"sequence_id must be a uint64 or a string, got {value!r}")
    if none:
        if flags["sequence_start"] or flags["sequence_end"]:
            raise _fail("sequence_start and sequence_end need a non-zero or non-empty sequence_id")
        return None
    return Sequence(key, label, flags["sequence_start"], flags["sequence_end"])


def encode_response(header: dict[str, Any], outputs: list[Tensor], binary: set[str]) -> tuple[bytes, int | None]:
    """The response body, and the JSON header's length when binary data follows it (else None)."""
    described, chunks = [], []
    for tensor in outputs:
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        if tensor.name in binary:
            raw = _to_binary(tensor)
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        elif isinstance(tensor.values, list):
            entry["data"] = [v.decode() for v in tensor.values]
        else:
            entry["data"] = tensor.values.tolist()
        described.append(entry)
    head = json.dumps({**header, "outputs": described}).encode()
    if not chunks:
        return head, None
    return head + b"".join(chunks), len(head)


def _to_binary(tensor: Tensor) -> bytes:
    if isinstance(tensor.values, list):
        return b"".join(struct.pack("<I", len(v)) + v for v in tensor.values)
    return np.ascontiguousarray(tensor.values, dtype=NUMPY_TYPES[tensor.datatype]).tobytes()
