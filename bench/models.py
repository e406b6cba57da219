"""The two models every serving figure is taken on: the demo model and a realistic 2×256, 10k-word one."""

from __future__ import annotations

from pathlib import Path

from export.bundle import MANIFEST

# /work/shared beside the main checkout, or two levels up from a worktree under /work/wt/NAME.
_DATA = [root / "shared" / "data" / "wikitext-2" / "valid.txt" for root in Path(__file__).resolve().parents[1].parents]
WIKITEXT = next((path for path in _DATA[:3] if path.exists()), _DATA[0])
DEMO_RUN = Path("runs/demo")
DEMO_BUNDLE = Path("bundles/demo")
REALISTIC_RUN = Path("runs/realistic")
REALISTIC_BUNDLE = Path("bundles/realistic")


def ensure_realistic(run: Path = REALISTIC_RUN, bundle: Path = REALISTIC_BUNDLE, corpus: Path = WIKITEXT) -> Path:
    """Train briefly (its quality does not matter, its size does) and export, unless already there."""
    if (bundle / MANIFEST).exists():
        return bundle
    from export.build import export_checkpoint
    from model.recipe import recipe
    from model.train import train

    if not (run / "best.pt").exists():
        if not corpus.exists():
            raise FileNotFoundError(f"{corpus} is missing: pass another text with --corpus")
        # The text recipe's 2 x 256 for one minute; uncalibrated, so its graphs are the plain step graph.
        cfg = recipe(
            str(corpus),
            str(run),
            split="whitespace",
            lowercase=False,
            max_vocab=10_000,
            epochs=1,
            max_minutes=1.0,
            calibrate=False,
            progress=False,
        )
        train(cfg)
    export_checkpoint(run, bundle, force=True)
    return bundle


def ensure_demo() -> Path:
    if not (DEMO_BUNDLE / MANIFEST).exists():
        raise FileNotFoundError("bundles/demo is missing: run `make demo` first")
    return DEMO_BUNDLE
