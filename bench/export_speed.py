"""Export speed: ONNX Runtime against PyTorch eager, the two graph forms, batch sizes, prefill, int8.

    python -m bench.export_speed [--out bench/results/export_speed.json] [--quick]

For (a) the demo model (runs/demo + bundles/demo; without them random weights in the demo's shape,
2×64 on the builtin:longrange vocabulary), (a') a random 2×200 model on that vocabulary and (b) a
random 2×256 model with 10,000 words, each exported with export_checkpoint, it measures on one
thread each (ORT intra_op_num_threads=1, torch.set_num_threads(1), as the service runs ORT):
  - single step (batch 1, one token): ORT step graph vs PyTorch eager (forward + log_softmax + top-5)
  - per-sequence cost at batch 1, 8, 32, 128 (one token each), fp32 and int8
  - prefill of a 1,000-token context
  - graph form: lm.onnx (ONNX LSTM operator) vs explain.onnx (explicit MatMul/Sigmoid/Tanh in a Scan)
  - int8 (export/quantize.py, both LSTM modes, and ONNX Runtime's quantize_dynamic) vs fp32: latency, size
and, for trained checkpoints that exist (runs/demo, runs/realistic), int8 agreement on held-out text.
Compared variants take turns in blocks (A×20, B×20, A×20, ...) so all see the same machine load while
each block runs with its own weights in cache; figures are medians.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnxruntime.quantization import QuantType, quantize_dynamic

from bench.models import DEMO_BUNDLE, DEMO_RUN, REALISTIC_RUN
from export.build import export_checkpoint
from export.bundle import CELL, EXPLAIN_GRAPH, HIDDEN, MANIFEST, STEP_GRAPH, explain_feed, step_feed
from export.onnx import Weights, build_step_graph
from export.quantize import agreement, batch_effect, held_out_tokens, quantize_step_model
from model.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from model.config import LSTMConfig
from model.corpus import LONGRANGE, longrange_text
from model.lm import LSTMLanguageModel, LSTMState
from model.recipe import recipe
from service.runner import STEP_FETCH
from vocab import Vocabulary, tokenize

BATCHES = (1, 8, 32, 128)
PREFILL_TOKENS = 1000
PREFILL_TARGET_S = 0.025
SPEEDUP_TARGET = 10.0
# int8 variants: ours (exact batching), ours with DynamicQuantizeLSTM, ONNX Runtime's quantize_dynamic.
QUANTIZED = ("int8", "int8_dynamic", "ort_quantize_dynamic")


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown"
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def interleaved(
    variants: dict[str, Callable[[], object]], repeats: int, block: int = 20, warmup: int = 5
) -> dict[str, dict[str, float]]:
    """Median and p90 seconds per call of each variant, run in alternating blocks (A×block, B×block, A×block...).

    Blocks, not single calls: every variant has its own weights (up to 15 MB), and alternating call by
    call would evict them from the cache before each call, which the service (one model, called over
    and over) never sees. The first call of each block is dropped for the same reason.
    """
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(max(1, repeats // block)):
        for name, fn in variants.items():
            for i in range(block + 1):
                start = time.perf_counter()
                fn()
                if i:
                    times[name].append(time.perf_counter() - start)
    return {name: {"median_s": statistics.median(t), "p90_s": float(np.percentile(t, 90))} for name, t in times.items()}


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def zero_feed(cfg: LSTMConfig, tokens: np.ndarray, with_lengths: bool = True) -> dict[str, np.ndarray]:
    """A graph's inputs for tokens from a zero state: the step graph's, or without lengths the explain graph's."""
    zero = np.zeros((cfg.num_layers, tokens.shape[0], cfg.hidden_size), np.float32)
    return step_feed(tokens, zero, zero) if with_lengths else explain_feed(tokens, zero, zero, k=5)


def runner(sess: ort.InferenceSession, feed: dict[str, np.ndarray]) -> Callable[[], object]:
    """One service-shaped call of sess on feed: what service/runner.py fetches per step."""
    return lambda: sess.run(list(STEP_FETCH), feed)


def random_checkpoint(vocab: Vocabulary, config: LSTMConfig) -> Checkpoint:
    """A model with random weights: speed does not depend on what the weights are."""
    torch.manual_seed(0)
    return Checkpoint(config=config, vocab=vocab, state_dict=LSTMLanguageModel(config).state_dict(), seed=0)


def export_random(work: Path, name: str, vocab: Vocabulary, config: LSTMConfig) -> tuple[Path, Path]:
    """Save a random checkpoint and export it exactly as `cellgate export` would (parity checked)."""
    run, bundle = work / f"{name}-run", work / f"{name}-bundle"
    save_checkpoint(run / "best.pt", random_checkpoint(vocab, config))
    export_checkpoint(run, bundle)
    return run, bundle


def prepare(work: Path) -> dict[str, tuple[str, Path, Path]]:
    """name -> (description, checkpoint dir, fp32 bundle dir) for each benchmark model."""
    models: dict[str, tuple[str, Path, Path]] = {}
    longrange = Vocabulary.build(tokenize(longrange_text(seed=0)))
    if (DEMO_RUN / "best.pt").exists() and (DEMO_BUNDLE / MANIFEST).exists():
        models["demo"] = ("the demo model (runs/demo, bundles/demo)", DEMO_RUN, DEMO_BUNDLE)
    else:
        # No trained demo: its shape with random weights, from the recipe `make demo` trains with.
        config = recipe(LONGRANGE, "").model_config(len(longrange))
        shape = f"{config.num_layers}×{config.hidden_size}"
        desc = f"no runs/demo: random {shape}, the demo's shape (builtin:longrange vocabulary, {len(longrange)} words)"
        models["demo"] = (desc, *export_random(work, "demo", longrange, config))
    # PyTorch's word-language-model example shape (2 x 200, tied), between the demo and "large".
    mid = LSTMConfig(vocab_size=len(longrange), embed_size=200, hidden_size=200, num_layers=2)
    models["mid"] = (
        f"random {mid.num_layers}×{mid.hidden_size} on the builtin:longrange vocabulary ({len(longrange)} words)",
        *export_random(work, "mid", longrange, mid),
    )
    words = Vocabulary(["<pad>", "<unk>", "<eos>", *[f"w{i}" for i in range(10_000 - 3)]])
    large = LSTMConfig(vocab_size=len(words), embed_size=256, hidden_size=256, num_layers=2)
    models["large"] = ("random 2×256, 10,000 words", *export_random(work, "large", words, large))
    return models


def quantized_graphs(fp32_path: Path, work: Path, name: str) -> dict[str, Path]:
    """variant -> int8 step graph: ours with either LSTM mode, and ONNX Runtime's quantize_dynamic as a baseline."""
    paths = {variant: work / f"{name}-{variant}.onnx" for variant in QUANTIZED}
    onnx.save(quantize_step_model(onnx.load(fp32_path), lstm="weights"), paths["int8"])
    onnx.save(quantize_step_model(onnx.load(fp32_path), lstm="dynamic"), paths["int8_dynamic"])
    logging.getLogger().setLevel(logging.ERROR)  # quantize_dynamic logs advice on every call
    quantize_dynamic(fp32_path, paths["ort_quantize_dynamic"], per_channel=True, weight_type=QuantType.QInt8)
    return paths


def measure_model(name: str, description: str, run: Path, bundle: Path, work: Path, reps: int) -> dict[str, Any]:
    ckpt = load_checkpoint(run)
    cfg = ckpt.config
    model = ckpt.build_model()
    fp32_path, explain_path = bundle / STEP_GRAPH, bundle / EXPLAIN_GRAPH
    if json.loads((bundle / MANIFEST).read_text())["quantized"]:
        raise ValueError(f"{bundle} is quantized: the benchmark needs the fp32 export")
    graphs = {"fp32": fp32_path, **quantized_graphs(fp32_path, work, name)}
    sessions = {variant: session(path) for variant, path in graphs.items()}
    explain = session(explain_path)
    result: dict[str, Any] = {"description": description, "config": cfg.to_dict()}

    # Single step, ORT vs PyTorch eager, the same work: next-word log-probs, top-5 and the new state.
    one = np.array([[5]], dtype=np.int64)
    feed1 = zero_feed(cfg, one)
    tokens_t = torch.from_numpy(one)
    state_t = LSTMState(torch.from_numpy(feed1[HIDDEN]), torch.from_numpy(feed1[CELL]))

    def torch_step() -> object:
        with torch.inference_mode():
            logits, state = model(tokens_t, state_t)
            return logits[:, -1].log_softmax(-1).topk(5), state

    single = interleaved(
        {
            "torch_eager": torch_step,
            "explain_scan": runner(explain, zero_feed(cfg, one, with_lengths=False)),
            **{variant: runner(sess, feed1) for variant, sess in sessions.items()},
        },
        repeats=reps,
    )
    result["single_step"] = single
    result["speedup_vs_torch"] = {
        variant: single["torch_eager"]["median_s"] / single[variant]["median_s"] for variant in graphs
    }

    per_batch: dict[str, Any] = {}
    for batch in BATCHES:
        feed = zero_feed(cfg, np.full((batch, 1), 5, dtype=np.int64))
        timed = interleaved({v: runner(sess, feed) for v, sess in sessions.items()}, repeats=max(20, reps // 4))
        per_batch[str(batch)] = {
            v: {"call_s": t["median_s"], "per_sequence_s": t["median_s"] / batch} for v, t in timed.items()
        }
    result["per_batch"] = per_batch

    context = np.random.default_rng(0).integers(3, cfg.vocab_size, (1, PREFILL_TOKENS)).astype(np.int64)
    prefill_feed = zero_feed(cfg, context)
    prefill = interleaved(
        {
            "explain_scan": runner(explain, zero_feed(cfg, context, with_lengths=False)),
            **{variant: runner(sess, prefill_feed) for variant, sess in sessions.items()},
        },
        repeats=max(6, reps // 25),
        block=3,
        warmup=2,
    )
    result["prefill_1000"] = prefill
    result["graph_form"] = {
        "single_step_scan_over_lstm": single["explain_scan"]["median_s"] / single["fp32"]["median_s"],
        "prefill_scan_over_lstm": prefill["explain_scan"]["median_s"] / prefill["fp32"]["median_s"],
    }
    fp32_bytes = fp32_path.stat().st_size
    result["bytes"] = {variant: path.stat().st_size for variant, path in graphs.items()}
    result["vs_fp32"] = {
        variant: {
            "size_ratio": path.stat().st_size / fp32_bytes,
            "single_step_ratio": single[variant]["median_s"] / single["fp32"]["median_s"],
            "prefill_ratio": prefill[variant]["median_s"] / prefill["fp32"]["median_s"],
        }
        for variant, path in graphs.items()
        if variant != "fp32"
    }
    return result


def measure_agreement(run: Path, work: Path) -> dict[str, Any]:
    """int8 vs fp32 top-1 / top-5 agreement of a trained checkpoint on held-out text, for each int8 variant."""
    ckpt = load_checkpoint(run)
    cfg, vocab = ckpt.config, ckpt.vocab
    fp32_path = work / "agreement-fp32.onnx"
    onnx.save(build_step_graph(Weights.from_checkpoint(ckpt), [vocab.pad_id, vocab.unk_id]), fp32_path)
    reference = session(fp32_path)
    tokens, source = held_out_tokens(vocab, reference, cfg.num_layers, cfg.hidden_size)
    out: dict[str, Any] = {"checkpoint": str(run), "held_out": source, "config": cfg.to_dict()}
    for variant, path in quantized_graphs(fp32_path, work, "agreement").items():
        candidate = session(path)
        out[variant] = {
            **agreement(reference, candidate, tokens, cfg.num_layers, cfg.hidden_size),
            "batch_effect_max_log_prob_diff": batch_effect(candidate, tokens, cfg.num_layers, cfg.hidden_size),
        }
    return out


def us(seconds: float) -> str:
    return f"{seconds * 1e6:,.0f} µs" if seconds < 0.01 else f"{seconds * 1e3:,.1f} ms"


def print_report(report: dict[str, Any]) -> None:
    m = report["machine"]
    print(f"machine: {m['cpu']} ({m['cores']} cores), load average {m['load_before']} -> {m['load_after']}")
    variants = ["fp32", *QUANTIZED]
    for name, r in report["models"].items():
        print(f"\n== {name}: {r['description']}")
        s, p = r["single_step"], r["prefill_1000"]
        print(f"{'variant':<24}{'step':>10}{'step p90':>10}{'vs torch':>10}{'prefill':>10}{'bytes':>12}")
        print(f"{'torch_eager':<24}{us(s['torch_eager']['median_s']):>10}{us(s['torch_eager']['p90_s']):>10}")
        for v in ["explain_scan", *variants]:
            speedup = f"{r['speedup_vs_torch'][v]:.1f}x" if v in r["speedup_vs_torch"] else ""
            size = f"{r['bytes'][v]:,}" if v in r["bytes"] else ""
            print(
                f"{v:<24}{us(s[v]['median_s']):>10}{us(s[v]['p90_s']):>10}{speedup:>10}"
                f"{us(p[v]['median_s']):>10}{size:>12}"
            )
        speedup = r["speedup_vs_torch"]["fp32"]
        verdict = "ok" if speedup >= SPEEDUP_TARGET else "BELOW TARGET"
        print(f"ORT fp32 vs PyTorch eager {speedup:.1f}x ({verdict}, target >= {SPEEDUP_TARGET:.0f}x)")
        verdict = "ok" if p["fp32"]["median_s"] <= PREFILL_TARGET_S else "ABOVE TARGET"
        print(f"prefill {PREFILL_TOKENS} tokens fp32 {us(p['fp32']['median_s'])} ({verdict}, target <= 25 ms)")
        g = r["graph_form"]
        print(
            f"graph form: Scan/explicit ÷ LSTM operator = {g['single_step_scan_over_lstm']:.2f} (single step), "
            f"{g['prefill_scan_over_lstm']:.2f} (prefill)"
        )
        print("per sequence (µs) at batch: " + "".join(f"{v:>22}" for v in variants))
        for batch, row in r["per_batch"].items():
            print(f"{batch:>27}: " + "".join(f"{row[v]['per_sequence_s'] * 1e6:>22.1f}" for v in variants))
    for name, a in report["agreement"].items():
        if "skipped" in a:
            print(f"\nagreement {name}: skipped ({a['skipped']})")
            continue
        print(f"\nint8 agreement, {name} ({a['checkpoint']}, held-out: {a['held_out']})")
        for v in QUANTIZED:
            x = a[v]
            print(
                f"  {v:<22} top-1 {x['top1']:.4f}  top-5 overlap {x['top5_overlap']:.4f}  "
                f"max |Δp| {x['max_prob_diff']:.4f}  batch effect {x['batch_effect_max_log_prob_diff']:.1e}"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench/results/export_speed.json"))
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run, noisier figures)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # both sides on one thread, as the service runs ORT
    reps = 100 if args.quick else 500
    report: dict[str, Any] = {
        "command": "python -m bench.export_speed" + (" --quick" if args.quick else ""),
        "machine": {
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "load_before": [round(x, 2) for x in os.getloadavg()],
        },
        "versions": {"onnxruntime": ort.__version__, "torch": torch.__version__, "onnx": onnx.__version__},
        "threads": {"ort_intra_op": 1, "ort_inter_op": 1, "torch": torch.get_num_threads()},
        "models": {},
        "agreement": {},
    }
    with tempfile.TemporaryDirectory(prefix="cellgate-export-bench-") as tmp:
        work = Path(tmp)
        for name, (description, run, bundle) in prepare(work).items():
            report["models"][name] = measure_model(name, description, run, bundle, work, reps)
        for name, run in (("demo", DEMO_RUN), ("realistic", REALISTIC_RUN)):
            if (run / "best.pt").exists():
                report["agreement"][name] = measure_agreement(run, work)
            else:
                report["agreement"][name] = {"skipped": f"{run}/best.pt does not exist"}
    report["machine"]["load_after"] = [round(x, 2) for x in os.getloadavg()]
    print_report(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
