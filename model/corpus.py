"""Corpora: a UTF-8 text file, a directory of .txt files, or the built-in long-range generator.

`builtin:longrange` writes episodes that only a model with long-term memory can finish:

    i stay in india . <filler sentences that never name a place or a language> i speak hindi .

The filler is drawn from a small grammar whose words never overlap the country/language words,
so the language can only be predicted by remembering the country across the gap.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

BUILTIN_PREFIX = "builtin:"
LONGRANGE = "builtin:longrange"

COUNTRY_LANGUAGE = (
    ("india", "hindi"),
    ("france", "french"),
    ("germany", "german"),
    ("spain", "spanish"),
    ("italy", "italian"),
    ("japan", "japanese"),
    ("china", "chinese"),
    ("russia", "russian"),
    ("brazil", "portuguese"),
    ("greece", "greek"),
    ("turkey", "turkish"),
    ("sweden", "swedish"),
    ("poland", "polish"),
    ("egypt", "arabic"),
    ("korea", "korean"),
    ("netherlands", "dutch"),
)

_SUBJECTS = ("we", "they", "my friend", "my sister", "the neighbour", "the teacher", "our team", "he", "she")
_VERBS = ("cooked", "painted", "found", "cleaned", "sold", "carried", "opened", "fixed", "watched", "bought")
_ADJECTIVES = ("old", "small", "green", "quiet", "heavy", "bright", "cold", "warm", "tall", "simple")
_NOUNS = ("table", "garden", "letter", "window", "bicycle", "river", "kitchen", "book", "bridge", "song")
_TIMES = ("today", "yesterday", "in the morning", "last week", "at night", "after lunch", "on sunday")
_TEMPLATES = (
    "{s} {v} the {a} {n} {t} .",
    "{s} {v} a {n} .",
    "the {n} was {a} {t} .",
    "{s} liked the {a} {n} .",
    "it was {a} {t} .",
    "{s} {v} the {n} and the {n2} .",
)


class CorpusError(ValueError):
    """A corpus that cannot be read: missing, empty, binary or not UTF-8."""


@dataclass(frozen=True)
class Episode:
    text: str  # the whole episode, one line
    country: str
    language: str
    gap: int  # filler words between the country sentence and "i speak"


def _filler_sentence(rng: random.Random) -> str:
    nouns = rng.sample(_NOUNS, 2)
    return rng.choice(_TEMPLATES).format(
        s=rng.choice(_SUBJECTS),
        v=rng.choice(_VERBS),
        a=rng.choice(_ADJECTIVES),
        n=nouns[0],
        n2=nouns[1],
        t=rng.choice(_TIMES),
    )


def longrange_episode(rng: random.Random, gap_min: int, gap_max: int) -> Episode:
    """One episode whose filler has at least a gap drawn uniformly from [gap_min, gap_max] words."""
    country, language = rng.choice(COUNTRY_LANGUAGE)
    target = rng.randint(gap_min, gap_max)
    filler: list[str] = []
    words = 0
    while words < target:
        sentence = _filler_sentence(rng)
        filler.append(sentence)
        words += len(sentence.split())
    parts = [f"i stay in {country} .", *filler, f"i speak {language} ."]
    return Episode(" ".join(parts), country, language, words)


def longrange_episodes(seed: int, count: int, gap_min: int = 0, gap_max: int = 100) -> Iterator[Episode]:
    """A deterministic stream of episodes for a seed."""
    if not 0 <= gap_min <= gap_max:
        raise CorpusError(f"need 0 <= gap_min <= gap_max, got {gap_min} and {gap_max}")
    rng = random.Random(seed)
    for _ in range(count):
        yield longrange_episode(rng, gap_min, gap_max)


def longrange_text(seed: int = 0, episodes: int = 2000, gap_min: int = 0, gap_max: int = 100) -> str:
    """The built-in corpus as text: one episode per line."""
    return "\n".join(e.text for e in longrange_episodes(seed, episodes, gap_min, gap_max)) + "\n"


def _read_utf8(path: Path) -> str:
    data = path.read_bytes()
    if b"\x00" in data[:65536]:
        raise CorpusError(f"{path} looks binary (it contains NUL bytes); a corpus must be UTF-8 text")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CorpusError(f"{path} is not valid UTF-8 (byte {exc.start}): {exc.reason}") from exc


def load_corpus(spec: str, seed: int = 0, episodes: int = 2000, gap_min: int = 0, gap_max: int = 100) -> str:
    """Text of a corpus given as a file path, a directory of .txt files, or `builtin:longrange`."""
    if spec.startswith(BUILTIN_PREFIX):
        if spec != LONGRANGE:
            raise CorpusError(f"unknown built-in corpus {spec!r}; available: {LONGRANGE}")
        if episodes < 1:
            raise CorpusError(f"{LONGRANGE} needs at least one episode, got episodes={episodes}")
        return longrange_text(seed, episodes, gap_min, gap_max)
    path = Path(spec)
    if not path.exists():
        raise CorpusError(f"corpus {spec!r} does not exist")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise CorpusError(f"directory {spec!r} holds no .txt files")
        text = "\n".join(_read_utf8(p) for p in files)
    else:
        text = _read_utf8(path)
    if not text.strip():
        raise CorpusError(f"corpus {spec!r} is empty")
    return text
