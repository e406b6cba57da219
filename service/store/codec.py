"""The one place that turns (h, C) into bytes and back, and records into Redis hash fields or one blob."""

from __future__ import annotations

import struct

import numpy as np

from service.store.base import SessionRecord, Snapshot


def encode_state(hidden: np.ndarray, cell: np.ndarray) -> bytes:
    """h then C, each (L, H), as raw little-endian float32: exact, no rounding."""
    return np.ascontiguousarray(hidden, dtype="<f4").tobytes() + np.ascontiguousarray(cell, dtype="<f4").tobytes()


def decode_state(data: bytes, layers: int, hidden_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(h, C) each (L, H) from encode_state's bytes; raises ValueError on a wrong size."""
    expected = 2 * layers * hidden_size * 4
    if len(data) != expected:
        raise ValueError(f"state has {len(data)} bytes, this model needs {expected}")
    flat = np.frombuffer(data, dtype="<f4").reshape(2, layers, hidden_size)
    return flat[0], flat[1]


def encode_history(history: tuple[Snapshot, ...]) -> tuple[bytes, bytes]:
    """(steps as int64 bytes, states concatenated)."""
    steps = np.array([s.step for s in history], dtype="<i8").tobytes()
    return steps, b"".join(s.state for s in history)


def decode_history(steps: bytes, states: bytes) -> tuple[Snapshot, ...]:
    step_values = np.frombuffer(steps, dtype="<i8")
    if len(step_values) == 0:
        return ()
    size = len(states) // len(step_values)
    return tuple(Snapshot(int(step), states[i * size : (i + 1) * size]) for i, step in enumerate(step_values.tolist()))


def record_to_fields(record: SessionRecord) -> dict[str, bytes]:
    """Hash fields for Redis (all bytes, so binary state survives)."""
    hist_steps, hist_states = encode_history(record.history)
    return {
        "session_id": record.session_id.encode(),
        "owner": record.owner.encode(),
        "model_version": record.model_version.encode(),
        "step": str(record.step).encode(),
        "revision": str(record.revision).encode(),
        "state": record.state,
        "created_at": repr(record.created_at).encode(),
        "last_used_at": repr(record.last_used_at).encode(),
        "last_request": record.last_request.encode(),
        "last_response": record.last_response,
        "history_steps": hist_steps,
        "history_states": hist_states,
        "history_tokens": np.array(record.history_tokens, dtype="<i4").tobytes(),
    }


class RecordFormatError(ValueError):
    """Stored fields that do not decode to a SessionRecord (missing, truncated or foreign)."""


def record_from_fields(fields: dict[bytes, bytes]) -> SessionRecord:
    """The record from record_to_fields' hash; raises RecordFormatError if the fields are not one."""
    try:
        return _record_from_fields(fields)
    except (KeyError, ValueError, UnicodeDecodeError) as exc:
        raise RecordFormatError(f"unreadable session record: {exc!r}") from exc


def _record_from_fields(fields: dict[bytes, bytes]) -> SessionRecord:
    def text(name: str) -> str:
        return fields[name.encode()].decode()

    return SessionRecord(
        session_id=text("session_id"),
        owner=text("owner"),
        model_version=text("model_version"),
        step=int(text("step")),
        revision=int(text("revision")),
        state=fields[b"state"],
        created_at=float(text("created_at")),
        last_used_at=float(text("last_used_at")),
        last_request=text("last_request"),
        last_response=fields[b"last_response"],
        history=decode_history(fields.get(b"history_steps", b""), fields.get(b"history_states", b"")),
        history_tokens=tuple(np.frombuffer(fields.get(b"history_tokens", b""), dtype="<i4").tolist()),
    )


# One blob (service/store/lmdb.py): a fixed header (revision, last_used_at) that a compare-and-set or an
# expiry sweep reads without decoding the rest, then record_to_fields' fields in order, each prefixed by
# its uint32 length.
BLOB_HEADER = struct.Struct("<qd")  # revision, last_used_at
BLOB_FIELDS = (
    "session_id", "owner", "model_version", "step", "revision", "state", "created_at", "last_used_at",
    "last_request", "last_response", "history_steps", "history_states", "history_tokens",
)  # fmt: skip
_LENGTH = struct.Struct("<I")


def record_to_blob(record: SessionRecord) -> bytes:
    """The record as one bytes value: BLOB_HEADER, then each field of record_to_fields length-prefixed."""
    fields = record_to_fields(record)
    parts = [BLOB_HEADER.pack(record.revision, record.last_used_at)]
    for name in BLOB_FIELDS:
        value = fields[name]
        parts += [_LENGTH.pack(len(value)), value]
    return b"".join(parts)


def blob_header(blob: bytes | memoryview) -> tuple[int, float]:
    """(revision, last_used_at) of a blob, from its first bytes alone."""
    revision, last_used_at = BLOB_HEADER.unpack_from(blob)
    return int(revision), float(last_used_at)


def record_from_blob(blob: bytes | memoryview) -> SessionRecord:
    """The record from record_to_blob's bytes (or a view of them); raises RecordFormatError if they are not one."""
    try:
        fields: dict[bytes, bytes] = {}
        offset = BLOB_HEADER.size
        for name in BLOB_FIELDS:
            (length,) = _LENGTH.unpack_from(blob, offset)
            offset += _LENGTH.size
            if offset + length > len(blob):
                raise ValueError(f"field {name} runs past the end")
            fields[name.encode()] = bytes(blob[offset : offset + length])
            offset += length
    except (struct.error, ValueError) as exc:
        raise RecordFormatError(f"unreadable session record: {exc!r}") from exc
    return record_from_fields(fields)
