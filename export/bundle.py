"""The model bundle: a directory of graphs + vocab.json + manifest.json, verified on load.

This module is the one place that knows the bundle format: its file names, the graphs' input and
output names (`step_feed`/`explain_feed` build their inputs, `run_graph` reads outputs by name), the
manifest and the blocklist. It imports neither torch nor onnx, so the service uses it to load and run
a bundle; export/onnx.py writes graphs with these names, and the runner, parity, quantize and the
benchmarks all feed and read them through here.

The graphs (written by export/onnx.py):
    step (lm.onnx), what the service runs:
        inputs   tokens  int64   [batch, time]      word ids, right-padded with <pad>
                 lengths int32   [batch]            real length of each row (0..time; 0 keeps the state)
                 h, c    float32 [layers, batch, hidden]
                 k       int64   [1]                how many top words to return
        outputs  log_probs      float32 [batch, vocab]   next-word log-probabilities after the last real token
                 top_log_probs  float32 [batch, k]       the k best, excluding <pad> and <unk>
                 top_ids        int64   [batch, k]
                 h_out, c_out   float32 [layers, batch, hidden]
    explain (explain.onnx): inputs tokens, h, c, k (no lengths: one unpadded sequence per row); the step
        graph's outputs plus forget_gate, input_gate, candidate, output_gate, cell, hidden, each
        float32 [time, layers, batch, hidden].

manifest.json (format_version 1):
    format_version   int
    model_version    id derived from the SHA-256 of every file: same bytes, same id
    name             optional: what clients call the model (default: the bundle directory's name)
    created_at       ISO-8601 UTC
    config           LSTMConfig as a dict (vocab_size, hidden_size, num_layers, ...)
    graphs           {"step": file, "explain": file}
    vocab            file name of the vocabulary (the vocab package's format)
    blocklist        optional: file name of the words never suggested (service/completion.py format)
    quantized        null or "int8"
    training         metrics recorded in the checkpoint
    versions         exporter, onnx, onnxruntime, torch, opset
    parity           the report of export.parity.check_parity at export time
    files            {name: {"sha256": hex, "bytes": int}} for every other file in the bundle

Blocklist files (a bundle's, or the one CELLGATE_BLOCKLIST names; see `read_blocklist`): UTF-8 text, one
word per line; blank lines and lines starting with `#` are ignored; surrounding whitespace is stripped; an
entry with whitespace inside is refused (the model's tokens are single words). How entries match the
vocabulary is service/completion.py's.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from numpy.typing import ArrayLike

from vocab import Vocabulary

FORMAT_VERSION = 1
# The files of a bundle.
MANIFEST = "manifest.json"
STEP_GRAPH = "lm.onnx"
EXPLAIN_GRAPH = "explain.onnx"
VOCAB_FILE = "vocab.json"
BLOCKLIST_FILE = "blocklist.txt"

# The graphs' inputs and outputs (shapes and dtypes in this module's docstring).
TOKENS, LENGTHS, HIDDEN, CELL, K = "tokens", "lengths", "h", "c", "k"
LOG_PROBS, TOP_LOG_PROBS, TOP_IDS, HIDDEN_OUT, CELL_OUT = "log_probs", "top_log_probs", "top_ids", "h_out", "c_out"
GATE_OUTPUTS = ("forget_gate", "input_gate", "candidate", "output_gate", "cell", "hidden")
STEP_INPUTS = (TOKENS, LENGTHS, HIDDEN, CELL, K)
EXPLAIN_INPUTS = (TOKENS, HIDDEN, CELL, K)
STEP_OUTPUTS = (LOG_PROBS, TOP_LOG_PROBS, TOP_IDS, HIDDEN_OUT, CELL_OUT)
EXPLAIN_OUTPUTS = (*STEP_OUTPUTS, *GATE_OUTPUTS)


class GraphSession(Protocol):
    """What `run_graph` needs of an onnxruntime.InferenceSession."""

    def run(self, output_names: list[str], input_feed: dict[str, Any]) -> list[Any]: ...


def explain_feed(tokens: ArrayLike, hidden: ArrayLike, cell: ArrayLike, k: int = 1) -> dict[str, np.ndarray]:
    """The explain graph's inputs in their exact dtypes: tokens (B, T), h and c (L, B, H)."""
    return {
        TOKENS: np.asarray(tokens, dtype=np.int64),
        HIDDEN: np.asarray(hidden, dtype=np.float32),
        CELL: np.asarray(cell, dtype=np.float32),
        K: np.array([k], dtype=np.int64),
    }


def step_feed(
    tokens: ArrayLike, hidden: ArrayLike, cell: ArrayLike, k: int = 5, lengths: ArrayLike | None = None
) -> dict[str, np.ndarray]:
    """The step graph's inputs in their exact dtypes; `lengths` (B,) defaults to every row's full width."""
    feed = explain_feed(tokens, hidden, cell, k)
    batch, width = feed[TOKENS].shape
    feed[LENGTHS] = np.full(batch, width, dtype=np.int32) if lengths is None else np.asarray(lengths, dtype=np.int32)
    return feed


def run_graph(session: GraphSession, feed: dict[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
    """One call of a graph: the asked-for outputs, by name."""
    return dict(zip(outputs, session.run(list(outputs), feed), strict=True))


class BundleError(ValueError):
    """A bundle that is missing, incomplete, tampered with or of an unknown format."""


class BlocklistError(ValueError):
    """A blocklist file that cannot be read, or that holds an entry that is not one word."""


def read_blocklist(path: Path) -> list[str]:
    """The entries of a blocklist file (format in this module's docstring)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BlocklistError(f"blocklist {path} cannot be read as UTF-8 text: {exc}") from exc
    entries = []
    for number, line in enumerate(text.splitlines(), start=1):
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        if any(ch.isspace() for ch in entry):
            raise BlocklistError(f"{path}:{number}: {entry!r} is not one word (a blocklist holds one word per line)")
        entries.append(entry)
    return entries


@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: dict[str, Any]

    @property
    def name(self) -> str:
        """What clients call the model: the manifest's `name` if it has one, else the bundle directory's name."""
        return str(self.manifest.get("name") or self.path.resolve().name)

    @property
    def model_version(self) -> str:
        return str(self.manifest["model_version"])

    @property
    def config(self) -> dict[str, Any]:
        return dict(self.manifest["config"])

    @property
    def step_graph(self) -> Path:
        return self.path / str(self.manifest["graphs"]["step"])

    @property
    def explain_graph(self) -> Path | None:
        name = self.manifest["graphs"].get("explain")
        return self.path / name if name else None

    @property
    def vocab_path(self) -> Path:
        return self.path / str(self.manifest["vocab"])

    def vocabulary(self) -> Vocabulary:
        """The bundle's vocabulary, read with the tokenizer rules it was built with."""
        return Vocabulary.load(self.vocab_path)

    @property
    def blocklist_path(self) -> Path | None:
        name = self.manifest.get("blocklist")
        return self.path / str(name) if name else None

    @property
    def quantized(self) -> str | None:
        value = self.manifest.get("quantized")
        return str(value) if value else None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_version_id(files: dict[str, dict[str, Any]]) -> str:
    """A short id over the sorted (name, hash) pairs: any change of any file changes it."""
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(f"{name}\0{files[name]['sha256']}\n".encode())
    return "m-" + digest.hexdigest()[:16]


def write_manifest(directory: Path, fields: dict[str, Any]) -> dict[str, Any]:
    """Hash every file already in directory and write manifest.json beside them."""
    files = {
        p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        for p in sorted(directory.iterdir())
        if p.is_file() and p.name != MANIFEST
    }
    manifest = {
        "format_version": FORMAT_VERSION,
        "model_version": model_version_id(files),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        **fields,
        "files": files,
    }
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True), encoding="utf-8")
    os.replace(tmp, directory / MANIFEST)
    return manifest


def load_bundle(path: Path | str) -> Bundle:
    """Read and verify a bundle; raise BundleError naming the first file that is wrong."""
    directory = Path(path)
    manifest_path = directory / MANIFEST
    if not directory.is_dir():
        raise BundleError(f"bundle directory {directory} does not exist")
    if not manifest_path.is_file():
        raise BundleError(f"{manifest_path} is missing: not a cellgate bundle")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{manifest_path} is not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict):
        raise BundleError(f"{manifest_path} must hold a JSON object")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(f"{manifest_path}: format_version {version!r} is not supported (expected {FORMAT_VERSION})")
    for key in ("model_version", "config", "graphs", "vocab", "files"):
        if key not in manifest:
            raise BundleError(f"{manifest_path} lacks the field {key!r}")
    files: dict[str, dict[str, Any]] = manifest["files"]
    needed = {manifest["vocab"], *[name for name in manifest["graphs"].values() if name]}
    if manifest.get("blocklist"):
        needed.add(manifest["blocklist"])
    for name in sorted(needed - set(files)):
        raise BundleError(f"{manifest_path} names {name} but lists no hash for it")
    for name, meta in sorted(files.items()):
        file = directory / name
        if Path(name).name != name:
            raise BundleError(f"{manifest_path} lists {name!r}, which is not a plain file name")
        if not file.is_file():
            raise BundleError(f"{file} is missing from the bundle")
        size = file.stat().st_size
        if size != meta["bytes"]:
            raise BundleError(f"{file} has {size} bytes, the manifest says {meta['bytes']}: truncated or replaced")
        if sha256_file(file) != meta["sha256"]:
            raise BundleError(f"{file} does not match its SHA-256 in the manifest: the file was modified")
    if model_version_id(files) != manifest["model_version"]:
        raise BundleError(f"{manifest_path}: model_version does not match the file hashes")
    return Bundle(directory, manifest)
