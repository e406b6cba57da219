"""The bundle's manifest, and load_bundle refusing anything tampered, truncated, missing or unknown."""

from __future__ import annotations

import json
import re
import shutil
from datetime import datetime
from pathlib import Path

import pytest

from export.build import export_checkpoint
from export.bundle import (
    EXPLAIN_GRAPH,
    FORMAT_VERSION,
    MANIFEST,
    STEP_GRAPH,
    VOCAB_FILE,
    BundleError,
    load_bundle,
    sha256_file,
)
from export.onnx import OPSET

FILES = (STEP_GRAPH, EXPLAIN_GRAPH, VOCAB_FILE)


@pytest.fixture
def bundle(tiny_bundle: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny bundle that a test may damage."""
    return Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))


def _manifest(bundle: Path) -> dict:
    return json.loads((bundle / MANIFEST).read_text())


def _write_manifest(bundle: Path, manifest: dict) -> None:
    (bundle / MANIFEST).write_text(json.dumps(manifest))


def test_manifest_describes_the_bundle(tiny_bundle: Path) -> None:
    loaded = load_bundle(tiny_bundle)
    m = loaded.manifest
    assert m["format_version"] == FORMAT_VERSION
    assert set(m["files"]) == set(FILES)
    for name in FILES:
        assert m["files"][name] == {
            "sha256": sha256_file(tiny_bundle / name),
            "bytes": (tiny_bundle / name).stat().st_size,
        }
    assert m["graphs"] == {"step": STEP_GRAPH, "explain": EXPLAIN_GRAPH}
    assert m["config"]["vocab_size"] > 3
    assert m["config"]["tie_weights"] is True
    assert set(m["versions"]) == {"exporter", "onnx", "onnxruntime", "torch", "opset"}
    assert m["versions"]["opset"] == OPSET
    assert m["parity"]["ok"] is True
    assert m["quantized"] is None
    assert "metrics" in m["training"]
    assert datetime.fromisoformat(m["created_at"]).tzinfo is not None
    assert loaded.model_version.startswith("m-")
    assert loaded.step_graph == tiny_bundle / STEP_GRAPH


def test_same_checkpoint_same_model_version(tiny_run: Path, tiny_bundle: Path, tmp_path: Path) -> None:
    """The id is derived from the bytes: exporting again reproduces it, whatever the clock says."""
    again = export_checkpoint(tiny_run, tmp_path / "again", check=False)
    assert again.manifest["model_version"] == load_bundle(tiny_bundle).model_version
    assert again.manifest["files"] == _manifest(tiny_bundle)["files"]


@pytest.mark.parametrize("name", FILES)
def test_one_flipped_byte_is_refused(bundle: Path, name: str) -> None:
    path = bundle / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=rf"{re.escape(name)} does not match its SHA-256"):
        load_bundle(bundle)


@pytest.mark.parametrize("name", FILES)
def test_truncated_file_is_refused(bundle: Path, name: str) -> None:
    path = bundle / name
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(BundleError, match=rf"{re.escape(name)} has \d+ bytes, the manifest says \d+: truncated"):
        load_bundle(bundle)


@pytest.mark.parametrize("name", FILES)
def test_missing_file_is_refused(bundle: Path, name: str) -> None:
    (bundle / name).unlink()
    with pytest.raises(BundleError, match=rf"{re.escape(name)} is missing"):
        load_bundle(bundle)


def test_missing_manifest_is_refused(bundle: Path) -> None:
    (bundle / MANIFEST).unlink()
    with pytest.raises(BundleError, match=r"manifest\.json is missing: not a cellgate bundle"):
        load_bundle(bundle)


def test_missing_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(tmp_path / "nowhere")


@pytest.mark.parametrize("garbage", [b"{not json", b"\xff\xfe\x00", b""])
def test_garbled_manifest_is_refused(bundle: Path, garbage: bytes) -> None:
    (bundle / MANIFEST).write_bytes(garbage)
    with pytest.raises(BundleError, match=r"manifest\.json is not valid JSON"):
        load_bundle(bundle)


def test_manifest_that_is_not_an_object_is_refused(bundle: Path) -> None:
    (bundle / MANIFEST).write_text("[1, 2]")
    with pytest.raises(BundleError, match="must hold a JSON object"):
        load_bundle(bundle)


@pytest.mark.parametrize("version", [FORMAT_VERSION + 1, 0, "1", None])
def test_unsupported_format_version_is_refused(bundle: Path, version: object) -> None:
    manifest = _manifest(bundle)
    manifest["format_version"] = version
    _write_manifest(bundle, manifest)
    with pytest.raises(BundleError, match=rf"format_version {version!r} is not supported"):
        load_bundle(bundle)


@pytest.mark.parametrize("field", ["model_version", "config", "graphs", "vocab", "files"])
def test_manifest_lacking_a_field_is_refused(bundle: Path, field: str) -> None:
    manifest = _manifest(bundle)
    del manifest[field]
    _write_manifest(bundle, manifest)
    with pytest.raises(BundleError, match=rf"lacks the field '{field}'"):
        load_bundle(bundle)


def test_graph_without_a_hash_is_refused(bundle: Path) -> None:
    manifest = _manifest(bundle)
    del manifest["files"][STEP_GRAPH]
    _write_manifest(bundle, manifest)
    with pytest.raises(BundleError, match=rf"names {STEP_GRAPH} but lists no hash"):
        load_bundle(bundle)


def test_edited_model_version_is_refused(bundle: Path) -> None:
    manifest = _manifest(bundle)
    manifest["model_version"] = "m-0000000000000000"
    _write_manifest(bundle, manifest)
    with pytest.raises(BundleError, match="model_version does not match"):
        load_bundle(bundle)


def test_file_name_outside_the_bundle_is_refused(bundle: Path) -> None:
    manifest = _manifest(bundle)
    manifest["files"]["../vocab.json"] = manifest["files"]["vocab.json"]
    _write_manifest(bundle, manifest)
    with pytest.raises(BundleError, match="not a plain file name"):
        load_bundle(bundle)
