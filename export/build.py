"""Checkpoint → verified bundle: write the graphs and the vocabulary, check parity, hash everything."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort
import torch

from export.bundle import (
    BLOCKLIST_FILE,
    EXPLAIN_GRAPH,
    MANIFEST,
    STEP_GRAPH,
    VOCAB_FILE,
    load_bundle,
    read_blocklist,
    write_manifest,
)
from export.onnx import OPSET, Weights, build_explain_graph, build_step_graph
from export.parity import ParityReport, check_parity
from model.checkpoint import load_checkpoint

EXPORTER_VERSION = "cellgate-export/1"


class ParityError(RuntimeError):
    """The exported graphs disagree with the PyTorch model beyond tolerance."""


@dataclass(frozen=True)
class ExportResult:
    manifest: dict[str, Any]
    parity: ParityReport


def export_checkpoint(
    checkpoint: Path,
    out: Path,
    quantize: str | None = None,
    check: bool = True,
    force: bool = False,
    blocklist: Path | None = None,
) -> ExportResult:
    """Write a bundle for checkpoint into out (a new directory, swapped in atomically at the end).

    blocklist: a file of words the service must never suggest or sample, shipped in the bundle (none by default).
    """
    if blocklist is not None:
        read_blocklist(blocklist)  # refuse a malformed file before any work, as the service would at load
    ckpt = load_checkpoint(checkpoint)
    model = ckpt.build_model()
    vocab = ckpt.vocab
    if out.exists() and not force and any(out.iterdir()):
        raise FileExistsError(f"{out} already exists and is not empty (use --force to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".export-", dir=out.parent))
    try:
        weights = Weights.from_checkpoint(ckpt)
        excluded = [vocab.pad_id, vocab.unk_id]
        onnx.save(build_step_graph(weights, excluded), staging / STEP_GRAPH)
        onnx.save(build_explain_graph(weights, excluded), staging / EXPLAIN_GRAPH)
        vocab.save(staging / VOCAB_FILE)
        if blocklist is not None:
            shutil.copyfile(blocklist, staging / BLOCKLIST_FILE)
        report = check_parity(model, staging / STEP_GRAPH, staging / EXPLAIN_GRAPH) if check else ParityReport()
        if check and not report.ok:
            raise ParityError("ONNX parity check failed: " + "; ".join(report.failures))
        quant_report: dict[str, Any] | None = None
        if quantize is not None:
            from export.quantize import quantize_bundle_graph

            quant_report = quantize_bundle_graph(staging / STEP_GRAPH, vocab, model)
        manifest = write_manifest(
            staging,
            {
                "config": ckpt.config.to_dict(),
                "graphs": {"step": STEP_GRAPH, "explain": EXPLAIN_GRAPH},
                "vocab": VOCAB_FILE,
                **({"blocklist": BLOCKLIST_FILE} if blocklist is not None else {}),
                "quantized": quantize,
                "quantization": quant_report,
                "training": {"metrics": ckpt.metrics, "epoch": ckpt.epoch, "seed": ckpt.seed},
                "versions": {
                    "exporter": EXPORTER_VERSION,
                    "onnx": onnx.__version__,
                    "onnxruntime": ort.__version__,
                    "torch": torch.__version__,
                    "opset": OPSET,
                },
                "parity": report.to_dict(),
            },
        )
        load_bundle(staging)  # the bundle we hand over must pass the same checks as the service's
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    assert (out / MANIFEST).exists()
    return ExportResult(manifest, report)
