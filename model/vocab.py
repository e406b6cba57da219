"""Word-level tokenization and the vocabulary file format (vocab.json).

This module imports no torch: the service reads vocab.json with it, so the training and the
serving side split text into tokens by exactly the same rules.

Tokenization rules (version 1):
1. Text is normalised to Unicode NFKC (so "ﬁ" and "fi", full-width and ASCII forms, match).
2. Optionally lowercased (a vocabulary records whether it was).
3. Every line break becomes the `<eos>` token; a final line break is not required.
4. Split mode "words" (default): a token is a run of letters/digits with inner apostrophes or
   hyphens ("don't", "well-known"), or any single other non-space character ("." "," "!").
   Split mode "whitespace": tokens are the whitespace-separated pieces, for corpora that are
   already tokenized (WikiText), where a literal `<unk>` in the text stays one token.
5. A token not in the vocabulary becomes `<unk>`.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TOKENIZER_VERSION = 1
PAD = "<pad>"
UNK = "<unk>"
EOS = "<eos>"
SPECIALS = (PAD, UNK, EOS)  # always ids 0, 1, 2
_TOKEN = re.compile(r"[^\W_]+(?:['’\-][^\W_]+)*|[^\w\s]|_")
_NO_SPACE_BEFORE = {".", ",", "!", "?", ";", ":", ")", "]", "}", "'s", "n't"}
_NO_SPACE_AFTER = {"(", "[", "{"}


SPLIT_MODES = ("words", "whitespace")


def tokenize(text: str, lowercase: bool = True, split: str = "words") -> list[str]:
    """Split text into word tokens by the rules in this module's docstring."""
    if split not in SPLIT_MODES:
        raise ValueError(f"split must be one of {SPLIT_MODES}, got {split!r}")
    if not text.isascii():  # ASCII is already NFKC-normal; skip the costly pass for the common case
        text = unicodedata.normalize("NFKC", text)
    if lowercase:
        text = text.lower()
    tokens: list[str] = []
    lines = text.splitlines()
    for index, line in enumerate(lines):
        tokens.extend(line.split() if split == "whitespace" else _TOKEN.findall(line))
        if index < len(lines) - 1 or text.endswith(("\n", "\r")):
            tokens.append(EOS)
    return tokens


def detokenize(tokens: Iterable[str]) -> str:
    """Join tokens back into readable text (`<eos>` becomes a line break)."""
    out: list[str] = []
    glue = True  # no space before the first token or after a line break / opening bracket
    for token in tokens:
        if token == EOS:
            out.append("\n")
            glue = True
            continue
        if not glue and token not in _NO_SPACE_BEFORE:
            out.append(" ")
        out.append(token)
        glue = token in _NO_SPACE_AFTER
    return "".join(out)


@dataclass
class Vocabulary:
    """Bidirectional word <-> id map; ids 0..2 are the specials `<pad>`, `<unk>`, `<eos>`."""

    words: list[str]
    lowercase: bool = True
    split: str = "words"
    index: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if tuple(self.words[: len(SPECIALS)]) != SPECIALS:
            raise ValueError(f"a vocabulary must start with {SPECIALS}")
        self.index = {w: i for i, w in enumerate(self.words)}
        if len(self.index) != len(self.words):
            raise ValueError("a vocabulary must not contain duplicate words")
        if self.split not in SPLIT_MODES:
            raise ValueError(f"split must be one of {SPLIT_MODES}, got {self.split!r}")

    @property
    def pad_id(self) -> int:
        return 0

    @property
    def unk_id(self) -> int:
        return 1

    @property
    def eos_id(self) -> int:
        return 2

    def __len__(self) -> int:
        return len(self.words)

    def encode_tokens(self, tokens: Sequence[str]) -> list[int]:
        unk = self.unk_id
        return [self.index.get(t, unk) for t in tokens]

    def tokenize(self, text: str) -> list[str]:
        return tokenize(text, self.lowercase, self.split)

    def encode(self, text: str) -> tuple[list[int], list[str]]:
        """Token ids for text, and the distinct words that were not in the vocabulary."""
        tokens = self.tokenize(text)
        ids = self.encode_tokens(tokens)
        unknown = list(dict.fromkeys(t for t, i in zip(tokens, ids, strict=True) if i == self.unk_id))
        return ids, unknown

    def decode(self, ids: Iterable[int]) -> list[str]:
        return [self.words[i] for i in ids]

    @classmethod
    def build(
        cls,
        tokens: Iterable[str],
        min_freq: int = 1,
        max_size: int | None = None,
        lowercase: bool = True,
        split: str = "words",
    ) -> Vocabulary:
        """Most frequent words first (ties broken alphabetically, so builds are deterministic)."""
        counts = Counter(t for t in tokens if t not in SPECIALS)
        ranked = sorted((w for w, n in counts.items() if n >= min_freq), key=lambda w: (-counts[w], w))
        if max_size is not None:
            ranked = ranked[: max(0, max_size - len(SPECIALS))]
        return cls(list(SPECIALS) + ranked, lowercase=lowercase, split=split)

    def to_dict(self) -> dict[str, Any]:
        return {
            "tokenizer_version": TOKENIZER_VERSION,
            "lowercase": self.lowercase,
            "split": self.split,
            "words": self.words,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Vocabulary:
        version = data.get("tokenizer_version")
        if version != TOKENIZER_VERSION:
            raise ValueError(f"unsupported tokenizer_version {version!r} (this build reads {TOKENIZER_VERSION})")
        return cls(list(data["words"]), lowercase=bool(data["lowercase"]), split=str(data.get("split", "words")))

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), ensure_ascii=False), encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> Vocabulary:
        return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))
