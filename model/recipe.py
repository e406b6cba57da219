"""The training recipe: every choice a run makes, its default, and why; one place for `cellgate train` and the bench.

TrainConfig's defaults are the recipe for a text corpus: the best found for a 5-minute budget on the
WikiText-2 quality protocol (docs/benchmarks.md: test perplexity 139.2, seeds 0-5 mean 139.4 on a 2-core
AVX2 CPU), so `cellgate train --corpus FILE` with no other flag trains it. The reasons cite the runs of
docs/experiments.md by their names (b13, c2, g11, j1, ...). The built-in long-range corpus has its own recipe
(LONGRANGE_RECIPE, the demo's); `recipe()` picks by corpus. What depends on the corpus's text is settled
when training reads it: the tokenization (`tokenization`) and, for a small vocabulary, the full softmax
(`uses_sampled_softmax`); the precision follows the CPU (`model.cpu.resolve_precision`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, fields, replace
from typing import Any

from model.config import LSTMConfig
from model.corpus import LONGRANGE

MODES = ("stream", "lines")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("budget", "plateau", "none")
PRECISIONS = ("auto", "fp32", "bf16", "bf16-all")
SOFTMAXES = ("sampled", "full")
SPLITS = ("auto", "words", "whitespace")


@dataclass
class TrainConfig:
    """One training run: what it reads, where it writes, and the recipe (the defaults: the best for text)."""

    corpus: str  # a UTF-8 text file, a directory of .txt files, or builtin:longrange
    out: str  # the run directory: best.pt, last.pt and log.jsonl
    valid: str | None = None  # held-out text; without it the last `valid_fraction` of the corpus's lines
    valid_fraction: float = 0.05  # a slice big enough to rank checkpoints, small enough to leave the text to training

    # Vocabulary. "auto": a corpus that comes tokenized (its punctuation stands apart, as in WikiText and the Penn
    # Treebank) is split at whitespace and keeps its case, so its own `<unk>` stays one token; other text is split
    # into words and punctuation and lowercased, fewer types for a small corpus (see tokenization()).
    lowercase: bool | None = None  # None: decided with `split`, as above
    split: str = "auto"  # "words", "whitespace" or "auto"
    min_freq: int = 1  # train words seen fewer times become <unk>; 1 keeps every word (the protocol's vocabulary)
    max_vocab: int | None = None  # the most frequent words kept: a large corpus's decoder is V × H

    # Model: 2 × 256, tied (always: the decoder reuses the embedding, fewer weights and a better perplexity).
    hidden_size: int = 256  # on a 2-core CPU 2 × 400 gets 6 epochs in 5 minutes, 2 × 300 11, 2 × 256 13-15 (b4-b6, c2)
    num_layers: int = 2  # one layer of 350 over-fits and three of 200 learn slower, at the same cost (c10, c13)
    dropout: float = 0.3  # locked dropout on the input, between layers and on the output; 0.4 is 2.7 worse (c4)
    embed_dropout: float = 0.05  # drops whole word types from the embedding (b4)
    recurrent_dropout: float = 0.15  # DropConnect on the recurrent weights (b4); lighter bought nothing (b16, c6)

    # Optimisation.
    optimizer: str = "sgd"  # AdamW 3e-3 on the same budget: 197; SGD lr 20 (and two other changes): 157 (r2, r3)
    lr: float = 20.0  # 30 left one seed in three at the unigram (b9), 12 is worse throughout (g6)
    clip: float = 0.25  # the total gradient norm; with lr it sets the step length (0.5 was worse, d5)
    # "budget": per batch, straight down to zero at the end of max_minutes (of `epochs` without it): 1.5-2 better
    # than a cosine (g11). "plateau": the lr divided by `anneal` after an epoch without improvement (the PyTorch
    # example's, the bench's reference). "none": constant (the long-range curriculum, which a decay would stall).
    schedule: str = "budget"
    anneal: float = 4.0  # "plateau" only: the example's divisor
    # "auto": bf16 autocast for the recurrence and the decoder where the CPU has native bfloat16 (+14 % tokens/s,
    # r4), fp32 where bfloat16 is emulated (22× slower there); "fp32", "bf16" (the decoder only), "bf16-all".
    precision: str = "auto"
    # "sampled": the training loss scores each target against `samples` negatives drawn from the unigram
    # (+40 % tokens/s, r6; negatives from count^0.75 were no better, g10-g12). A vocabulary under 4 × samples
    # trains with the full softmax: the negatives would be a large share of its rows anyway (a rule of thumb, not
    # measured). Evaluation always uses the full softmax.
    softmax: str = "sampled"
    samples: int = 1024  # 2,048 bought nothing (c5, j3)
    # α: each train occurrence of a word seen c times becomes <unk> with probability α/(α+c), drawn afresh every
    # epoch; held-out text meets unknown words the train text never shows (−11.3, b7). Stream mode only.
    rare_word_unk: float = 1.0
    # Once training ends, best.pt gets the temperature and unigram-prior weight that minimise the validation
    # perplexity (model.calibration; −3.5 to −4.7 at 5 minutes). Stream mode and the LSTM only.
    calibrate: bool = True
    batch_size: int = 10  # five minutes are short of updates more than of tokens: batch 20 is 6.4 worse (b11, b13)
    bptt: int = 35  # 25 buys updates at a cost in tokens/s and is worse (g7)
    epochs: int = 1000  # an upper bound: the time budget ends training first (without one, `epochs` is the budget)
    # Epochs ending before this fraction of training are neither validated nor candidates for best.pt: under the
    # budget schedule the best epoch is one of the last, and validation is time off training (−1 to −3, j1-j5).
    # Must be 0 with the plateau schedule and the mastery curriculum, which act on every epoch's validation.
    validate_from: float = 0.8
    max_minutes: float | None = 5.0  # the time budget; None: `epochs` alone ends training
    # "stream": the corpus is one token stream in `batch_size` parallel streams, trained in windows of `bptt` tokens
    # with (h, C) carried across them; "lines": each line is one sequence from a zero state, so the gradient spans
    # the whole line (the long-range episodes).
    mode: str = "stream"
    seed: int = 0  # weights, dropout masks, batch order and rare-word draws all follow it
    threads: int | None = None  # torch intra-op threads; None: torch's default (one per core)
    progress: bool = True  # a progress bar per epoch, only when stderr is a terminal

    # builtin:longrange only: the corpus is drawn afresh each epoch (model.corpus.longrange_text).
    episodes: int = 2000  # episodes per epoch
    gap_min: int = 0  # the fewest filler words between the country and "i speak"
    gap_max: int = 100  # the most; the probe's buckets go up to 100
    # The mastery curriculum: the largest gap starts at curriculum_start and grows by curriculum_step once every
    # probe bucket below it reaches curriculum_mastery, so a hard gap is never shown before the easier ones are
    # learnt. None: every epoch draws gaps up to gap_max.
    curriculum_mastery: float | None = None
    curriculum_start: int = 10
    curriculum_step: int = 10
    target_accuracy: float | None = None  # stop once every probe bucket below 60 words reaches it

    def __post_init__(self) -> None:
        """Refuse a configuration no training step could run with, before anything is read or written."""
        for name, allowed in (
            ("mode", MODES),
            ("optimizer", OPTIMIZERS),
            ("schedule", SCHEDULES),
            ("precision", PRECISIONS),
            ("softmax", SOFTMAXES),
            ("split", SPLITS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        stream_only = [
            name
            for name, on in (
                ("rare_word_unk", self.rare_word_unk != 0),
                ("calibrate", self.calibrate),
                ("softmax 'sampled'", self.softmax == "sampled"),
            )
            if on
        ]
        if self.mode != "stream" and stream_only:
            raise ValueError(f"{', '.join(stream_only)}: stream mode only, and mode is {self.mode!r}")
        if self.rare_word_unk < 0:
            raise ValueError(f"rare_word_unk must be >= 0, got {self.rare_word_unk}")
        if not 0 <= self.validate_from <= 1 or (
            self.validate_from > 0 and (self.schedule == "plateau" or self.curriculum_mastery is not None)
        ):
            raise ValueError(
                f"validate_from must be in [0, 1], and 0 with the plateau schedule or a mastery curriculum (both "
                f"are driven by each epoch's validation), got {self.validate_from}"
            )
        if self.batch_size < 1 or self.bptt < 1 or self.epochs < 1 or self.samples < 1:
            raise ValueError("batch_size, bptt, epochs and samples must be positive")

    def model_config(self, vocab_size: int) -> LSTMConfig:
        return LSTMConfig(
            vocab_size=vocab_size,
            embed_size=self.hidden_size,
            hidden_size=self.hidden_size,
            num_layers=self.num_layers,
            dropout=self.dropout,
            embed_dropout=self.embed_dropout,
            tie_weights=True,
        )

    def uses_sampled_softmax(self, vocab_size: int) -> bool:
        """Whether training scores a sampled softmax: asked for, and over a vocabulary large enough to gain by it."""
        return self.softmax == "sampled" and vocab_size >= 4 * self.samples


# The demo's recipe for builtin:longrange, on top of TrainConfig's defaults: it teaches a 2 × 64 LSTM to carry a
# country across 60+ filler words in about 2 minutes (docs/long_range.md). Kept beside the text recipe so that a
# change to the corpus and to its recipe is made in one place.
LONGRANGE_RECIPE: dict[str, Any] = {
    "mode": "lines",  # one episode per sequence from a zero state: the gradient crosses the whole gap
    "lowercase": True,  # the service reads what people type: words and punctuation, lowercased
    "split": "words",
    "hidden_size": 64,  # ~100k tokens/s on one idle CPU thread; 128 clicked no more reliably
    "num_layers": 2,  # the demo page shows two layers of gates
    "dropout": 0.0,  # the task is noise-free and fresh episodes every epoch already prevent memorising
    "embed_dropout": 0.0,
    "recurrent_dropout": 0.0,
    "optimizer": "adamw",
    "lr": 1e-2,  # the country→language link clicks only after a plateau; at 3e-3 it had not after 60 epochs
    "clip": 1.0,
    "schedule": "none",  # a decaying rate would stall the curriculum's later steps
    "precision": "fp32",  # what docs/long_range.md measured; bfloat16 is untried on matrices this small
    "softmax": "full",  # a 50-word vocabulary: nothing to sample
    "rare_word_unk": 0.0,  # every word of the grammar is frequent
    "calibrate": False,  # lines mode; the probe scores the arg-max, which a temperature does not move
    "validate_from": 0.0,  # the curriculum acts on every epoch's probe
    "batch_size": 16,  # with 32 the plateau's length varied far more from seed to seed
    "epochs": 2000,  # an upper bound; target_accuracy or max_minutes end training first
    # Fresh episodes per epoch. An epoch ends in a validation pass, a 500-episode probe and two checkpoints,
    # about as costly as 1,000 short first-step episodes; 3,000 keep that overhead small.
    "episodes": 3000,
    "curriculum_start": 5,  # a country, at most one filler sentence, then "i speak"
    "curriculum_mastery": 0.95,  # lengthen the gap only once the current one is remembered
    "curriculum_step": 10,
    "target_accuracy": 0.98,
    # Matrices this small gain nothing from a second intra-op thread, and on a busy two-core machine its
    # spin-waiting cut training from ~30-100k to 3-8k tokens/s; one thread is the robust choice.
    "threads": 1,
}


def recipe(corpus: str, out: str, **chosen: Any) -> TrainConfig:
    """The recipe for `corpus` (the long-range one for builtin:longrange, TrainConfig's defaults otherwise), with
    the `chosen` fields on top."""
    base = LONGRANGE_RECIPE if corpus == LONGRANGE else {}
    return TrainConfig(corpus=corpus, out=out, **{**base, **chosen})


def looks_tokenized(text: str) -> bool:
    """Whether text comes tokenized already: its , ; : ! ? stand apart from the words before them.

    In running text most of them touch a word ("Citizen:", "further,"); in a tokenized corpus (WikiText,
    the Penn Treebank) none does. Text with too few of them to tell is taken as running text.
    """
    sample = text[:2_000_000]
    marks = len(re.findall(r"[,;:!?]", sample))
    attached = len(re.findall(r"[^\W\d_][,;:!?]", sample))
    return marks >= 20 and attached <= 0.01 * marks


def tokenization(cfg: TrainConfig, train_text: str) -> TrainConfig:
    """cfg with `lowercase` and `split` decided for this training text where they are left to it ("auto")."""
    if cfg.split != "auto" and cfg.lowercase is not None:
        return cfg
    tokenized = looks_tokenized(train_text)
    split = cfg.split if cfg.split != "auto" else "whitespace" if tokenized else "words"
    lowercase = cfg.lowercase if cfg.lowercase is not None else not tokenized
    return replace(cfg, split=split, lowercase=lowercase)


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`KEY=VALUE` pairs for TrainConfig fields; values are JSON when they parse, strings otherwise."""
    known = {f.name for f in fields(TrainConfig)}
    overrides: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or key not in known:
            raise ValueError(f"--set wants KEY=VALUE with KEY a TrainConfig field (model/recipe.py), got {pair!r}")
        try:
            overrides[key] = json.loads(raw)
        except json.JSONDecodeError:
            overrides[key] = raw
    return overrides
