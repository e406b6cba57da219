"""Word-level tokenization and the vocabulary file format (vocab.json).

A package of its own, beneath model/, export/ and service/ alike, and importing no torch: training
builds the vocabulary with it and the service reads a bundle's vocab.json with it, so both sides
split text into tokens by exactly the same rules, and the service needs nothing of model/.

Tokenization rules (version 2):
1. Text is normalised to Unicode NFKC (so "ﬁ" and "fi", full-width and ASCII forms, match).
2. Optionally lowercased (a vocabulary records whether it was).
3. Every line break (each one `str.splitlines` knows: \n, \r, \v, \f, U+2028, ...) becomes the
   `<eos>` token; a final line break is not required.
4. Split mode "words" (default): a token is a run of letters/digits with inner apostrophes or
   hyphens ("don't", "well-known"), or any single other non-space character ("." "," "!").
   Combining marks (Unicode categories M*) belong to the token they touch, so "हिंदी" and
   "İstanbul" stay one word each.
   Split mode "whitespace": tokens are the whitespace-separated pieces, for corpora that are
   already tokenized (WikiText), where a literal `<unk>` in the text stays one token.
5. A token not in the vocabulary becomes `<unk>`.

A vocabulary records the rules' version it was built with and is always read with those rules, so a
model serves text exactly as it was trained. Version 1 differed in two places: combining marks were
tokens of their own, and only a final \n or \r counted as a line break.
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

TOKENIZER_VERSION = 2
READABLE_VERSIONS = (1, 2)
PAD = "<pad>"
UNK = "<unk>"
EOS = "<eos>"
SPECIALS = (PAD, UNK, EOS)  # always ids 0, 1, 2
_TOKEN = re.compile(r"[^\W_]+(?:['’\-][^\W_]+)*|[^\w\s]|_")
_NO_SPACE_BEFORE = {".", ",", "!", "?", ";", ":", ")", "]", "}", "'s", "n't"}
_NO_SPACE_AFTER = {"(", "[", "{"}


SPLIT_MODES = ("words", "whitespace")


# Every separator str.splitlines() splits on.
_LINE_BREAKS = ("\n", "\r", "\v", "\f", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029")


def _is_mark(char: str) -> bool:
    return unicodedata.category(char).startswith("M")


def _words_with_marks(line: str) -> list[str]:
    """_TOKEN's matches, with combining marks joined to the letters they touch (rule 4)."""
    tokens: list[str] = []
    end = -1
    for match in _TOKEN.finditer(line):
        piece = match.group()
        if (
            tokens
            and match.start() == end
            and (_is_mark(piece[0]) or (_is_mark(tokens[-1][-1]) and piece[0].isalnum()))
        ):
            tokens[-1] += piece
        else:
            tokens.append(piece)
        end = match.end()
    return tokens


def normalize(text: str, lowercase: bool = True) -> str:
    """Rules 1 and 2: NFKC, then lowercase if asked (what every token, and a typed prefix, is matched in)."""
    if not text.isascii():  # ASCII is already NFKC-normal: the common case skips the call
        text = unicodedata.normalize("NFKC", text)
    return text.lower() if lowercase else text


def tokenize(text: str, lowercase: bool = True, split: str = "words", version: int = TOKENIZER_VERSION) -> list[str]:
    """Split text into word tokens by the rules in this module's docstring (of the given version)."""
    if split not in SPLIT_MODES:
        raise ValueError(f"split must be one of {SPLIT_MODES}, got {split!r}")
    if version not in READABLE_VERSIONS:
        raise ValueError(f"unsupported tokenizer version {version!r} (this build reads {READABLE_VERSIONS})")
    ascii_only = text.isascii()  # ASCII has no combining marks either (rule 4)
    text = normalize(text, lowercase)
    joins_marks = version >= 2 and not ascii_only
    tokens: list[str] = []
    lines = text.splitlines()
    ends_with_break = text.endswith(_LINE_BREAKS if version >= 2 else ("\n", "\r"))
    for index, line in enumerate(lines):
        if split == "whitespace":
            tokens.extend(line.split())
        else:
            tokens.extend(_words_with_marks(line) if joins_marks else _TOKEN.findall(line))
        if index < len(lines) - 1 or ends_with_break:
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


def continuation(previous: str | None, token: str) -> str:
    """The text `token` adds after `previous` (None: at the start of a text), its leading space included:
    joined up, the pieces of a token sequence are exactly its detokenize()."""
    if previous is None:
        return detokenize([token])
    return detokenize([previous, token])[len(detokenize([previous])) :]


@dataclass
class Vocabulary:
    """Bidirectional word <-> id map; ids 0..2 are the specials `<pad>`, `<unk>`, `<eos>`."""

    words: list[str]
    lowercase: bool = True
    split: str = "words"
    tokenizer_version: int = TOKENIZER_VERSION  # the rules this vocabulary was built with, and is read with
    index: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if tuple(self.words[: len(SPECIALS)]) != SPECIALS:
            raise ValueError(f"a vocabulary must start with {SPECIALS}")
        self.index = {w: i for i, w in enumerate(self.words)}
        if len(self.index) != len(self.words):
            raise ValueError("a vocabulary must not contain duplicate words")
        if self.split not in SPLIT_MODES:
            raise ValueError(f"split must be one of {SPLIT_MODES}, got {self.split!r}")
        if type(self.tokenizer_version) is not int or self.tokenizer_version not in READABLE_VERSIONS:
            raise ValueError(
                f"unsupported tokenizer_version {self.tokenizer_version!r} (this build reads {READABLE_VERSIONS})"
            )

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
        return tokenize(text, self.lowercase, self.split, self.tokenizer_version)

    def normalize(self, text: str) -> str:
        """Text as this vocabulary's tokens are spelled (NFKC, lowercased if the vocabulary is)."""
        return normalize(text, self.lowercase)

    def encode(self, text: str) -> tuple[list[int], list[str]]:
        """Token ids for text, and the distinct words that were not in the vocabulary."""
        tokens = self.tokenize(text)
        ids = self.encode_tokens(tokens)
        unknown = list(dict.fromkeys(t for t, i in zip(tokens, ids, strict=True) if i == self.unk_id))
        return ids, unknown

    def decode(self, ids: Iterable[int]) -> list[str]:
        words = self.words
        out = []
        for i in ids:
            if not 0 <= i < len(words):  # a negative id would silently index from the end
                raise ValueError(f"token id {i} is outside the vocabulary (0..{len(words) - 1})")
            out.append(words[i])
        return out

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
            "tokenizer_version": self.tokenizer_version,
            "lowercase": self.lowercase,
            "split": self.split,
            "words": self.words,
        }

    @classmethod
    def from_dict(cls, data: Any) -> Vocabulary:
        """A vocabulary from its JSON form; every malformed field is a ValueError naming it."""
        if not isinstance(data, dict):
            raise ValueError(f"a vocabulary must be a JSON object, got {type(data).__name__}")
        version = data.get("tokenizer_version")
        if type(version) is not int or version not in READABLE_VERSIONS:
            raise ValueError(f"unsupported tokenizer_version {version!r} (this build reads {READABLE_VERSIONS})")
        words, lowercase, split = data.get("words"), data.get("lowercase"), data.get("split", "words")
        if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
            raise ValueError("vocabulary field 'words' must be a list of strings")
        if not isinstance(lowercase, bool):
            raise ValueError(f"vocabulary field 'lowercase' must be true or false, got {lowercase!r}")
        if not isinstance(split, str):
            raise ValueError(f"vocabulary field 'split' must be a string, got {split!r}")
        return cls(words, lowercase=lowercase, split=split, tokenizer_version=version)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), ensure_ascii=False), encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> Vocabulary:
        return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))
