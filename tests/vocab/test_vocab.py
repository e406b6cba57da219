"""The tokenizer rules and the vocabulary file format (vocab.json)."""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import vocab as vocab_module
from vocab import EOS, PAD, SPECIALS, SPLIT_MODES, TOKENIZER_VERSION, UNK, Vocabulary, detokenize, tokenize

PROPERTY = settings(max_examples=40, deadline=None)
ASCII_TEXT = st.text(alphabet=st.characters(max_codepoint=127), max_size=80)


class NotAscii(str):
    """Steers tokenize() onto its NFKC path whatever the text."""

    __slots__ = ()

    def isascii(self) -> bool:
        return False


class TestTokenize:
    def test_words_split_punctuation_and_keep_inner_apostrophes_and_hyphens(self) -> None:
        text = "Hello, World! Don't stop: well-known (x_y) 3.14 rock'n'roll"
        assert tokenize(text) == [
            "hello", ",", "world", "!", "don't", "stop", ":", "well-known",
            "(", "x", "_", "y", ")", "3", ".", "14", "rock'n'roll",
        ]  # fmt: skip

    def test_apostrophes_and_hyphens_only_join_inside_a_word(self) -> None:
        expected = ["'", "quoted", "'", "-", "dash", "-", "a", "-", "-", "b", "it’s"]
        assert tokenize("'quoted' -dash- a--b it’s") == expected

    def test_lowercase_is_optional(self) -> None:
        assert tokenize("The CAT sat.", lowercase=False) == ["The", "CAT", "sat", "."]
        assert tokenize("The CAT sat.", lowercase=True) == ["the", "cat", "sat", "."]
        assert tokenize("The CAT sat.") == tokenize("The CAT sat.", lowercase=True)  # the default

    def test_whitespace_mode_keeps_pre_tokenized_pieces(self) -> None:
        text = "The <unk> sat on b.c , @-@ well\tdone"
        assert tokenize(text, split="whitespace") == ["the", "<unk>", "sat", "on", "b.c", ",", "@-@", "well", "done"]
        # the same text in "words" mode breaks <unk> and b.c apart
        words = tokenize(text, split="words")
        assert "<unk>" not in words
        assert words[1:4] == ["<", "unk", ">"]

    def test_unknown_split_mode(self) -> None:
        assert SPLIT_MODES == ("words", "whitespace")
        with pytest.raises(ValueError, match=r"split must be one of .*'words'.*got 'chars'"):
            tokenize("a b", split="chars")

    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            ("", []),
            ("a b", ["a", "b"]),
            ("a b\n", ["a", "b", EOS]),
            ("a\nb", ["a", EOS, "b"]),
            ("a\r\nb\r\n", ["a", EOS, "b", EOS]),
            ("a\rb\r", ["a", EOS, "b", EOS]),
            ("a\n\nb", ["a", EOS, EOS, "b"]),
            ("\n", [EOS]),
        ],
    )
    @pytest.mark.parametrize("split", SPLIT_MODES)
    def test_line_breaks_become_eos(self, text: str, expected: list[str], split: str) -> None:
        assert tokenize(text, split=split) == expected

    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            ("ﬁne ﬂow", ["fine", "flow"]),  # ligatures
            ("ＡＢＣ １２３！", ["abc", "123", "!"]),  # full-width forms
            ("cafe\u0301", ["café"]),  # combining accent composes
            ("x² H₂O", ["x2", "h2o"]),  # super/subscripts
            ("Ⅻ", ["xii"]),  # roman numeral compatibility character
            ("a\u00a0b", ["a", "b"]),  # no-break space is a space
        ],
    )
    def test_non_ascii_is_nfkc_normalised(self, text: str, expected: list[str]) -> None:
        assert tokenize(text) == expected

    def test_ascii_skips_the_normalisation_pass(self, monkeypatch: pytest.MonkeyPatch) -> None:
        calls: list[str] = []

        def spy(form: Literal["NFKC"], text: str) -> str:
            calls.append(text)
            return unicodedata.normalize(form, text)

        monkeypatch.setattr(vocab_module, "unicodedata", SimpleNamespace(normalize=spy))
        assert tokenize("Plain ASCII, only.") == ["plain", "ascii", ",", "only", "."]
        assert calls == []
        assert tokenize("ﬁne") == ["fine"]
        assert calls == ["ﬁne"]
        assert tokenize(NotAscii("Plain")) == ["plain"]
        assert calls == ["ﬁne", "Plain"]

    @PROPERTY
    @given(text=ASCII_TEXT, lowercase=st.booleans(), split=st.sampled_from(SPLIT_MODES))
    def test_ascii_fast_path_equals_the_nfkc_path(self, text: str, lowercase: bool, split: str) -> None:
        """The same ASCII text, once as is (fast path) and once as a str that claims not to be ASCII (NFKC pass)."""
        assert tokenize(text, lowercase, split) == tokenize(NotAscii(text), lowercase, split)

    @PROPERTY
    @given(text=st.text(max_size=60), lowercase=st.booleans(), split=st.sampled_from(SPLIT_MODES))
    def test_normalised_text_tokenizes_the_same(self, text: str, lowercase: bool, split: str) -> None:
        tokens = tokenize(text, lowercase, split)
        assert tokenize(unicodedata.normalize("NFKC", text), lowercase, split) == tokens
        assert all(t and not any(c.isspace() for c in t) for t in tokens)

    def test_detokenize(self) -> None:
        tokens = tokenize("I don't know (yet), she said.\nThe end!")
        assert detokenize(tokens) == "i don't know (yet), she said.\nthe end!"
        assert detokenize([]) == ""
        assert detokenize(["a", EOS, "(", "b", ")"]) == "a\n(b)"

    @pytest.mark.parametrize("word", ["हिंदी", "İstanbul", "كِتَاب"])
    def test_words_with_combining_marks_stay_one_token(self, word: str) -> None:
        assert len(tokenize(word)) == 1
        assert tokenize(f"{word}, {word}.") == [tokenize(word)[0], ",", tokenize(word)[0], "."]

    def test_a_version_1_vocabulary_keeps_the_version_1_rules(self, tmp_path: Path) -> None:
        # A model trained with the old rules must keep serving text exactly as it was trained.
        path = tmp_path / "vocab.json"
        path.write_text(json.dumps({"tokenizer_version": 1, "lowercase": True, "words": [*SPECIALS, "a"]}), "utf-8")
        old = Vocabulary.load(path)
        assert old.tokenizer_version == 1
        assert old.tokenize("हिंदी") == ["ह", "ि", "ं", "द", "ी"]
        assert old.tokenize("a\x0c") == ["a"]
        assert Vocabulary.from_dict(old.to_dict()).tokenizer_version == 1
        assert Vocabulary.build(["a"]).tokenize("हिंदी") == ["हिंदी"]

    def test_decode_refuses_ids_outside_the_vocabulary(self) -> None:
        vocab = Vocabulary.build(["a"])
        assert vocab.decode([3]) == ["a"]
        for bad in (-1, len(vocab)):
            with pytest.raises(ValueError, match="outside the vocabulary"):
                vocab.decode([bad])

    @pytest.mark.parametrize("brk", ["\x0b", "\x0c", "\x1c", "\x85", "\u2028", "\u2029"])
    def test_a_final_line_break_is_an_eos_like_an_inner_one(self, brk: str) -> None:
        assert tokenize("a" + brk + "b") == ["a", EOS, "b"]
        assert tokenize("a" + brk) == ["a", EOS]


class TestVocabulary:
    def test_specials_come_first(self) -> None:
        assert SPECIALS == (PAD, UNK, EOS) == ("<pad>", "<unk>", "<eos>")
        vocab = Vocabulary.build(["b", "a"])
        assert vocab.words[:3] == list(SPECIALS)
        assert (vocab.pad_id, vocab.unk_id, vocab.eos_id) == (0, 1, 2)
        assert [vocab.index[w] for w in SPECIALS] == [0, 1, 2]

    def test_unknown_words_map_to_unk(self) -> None:
        vocab = Vocabulary.build(tokenize("the cat sat on the mat"))
        ids, unknown = vocab.encode("The dog sat on the log, the dog\n")
        assert vocab.decode(ids) == ["the", UNK, "sat", "on", "the", UNK, UNK, "the", UNK, EOS]
        assert unknown == ["dog", "log", ","]  # distinct, in order of first appearance
        assert vocab.encode_tokens(["cat", "zebra", EOS, PAD]) == [vocab.index["cat"], 1, 2, 0]

    def test_encode_uses_the_vocabulary_tokenizer_settings(self) -> None:
        cased = Vocabulary.build(["The", "the", "<unk>"], lowercase=False, split="whitespace")
        assert cased.tokenize("The <unk>") == ["The", "<unk>"]
        ids, unknown = cased.encode("The the THE")
        assert cased.decode(ids) == ["The", "the", UNK]
        assert unknown == ["THE"]

    def test_build_orders_by_frequency_then_alphabetically(self) -> None:
        tokens = "c b a c b c d e e".split()
        vocab = Vocabulary.build(tokens)
        assert vocab.words == [*SPECIALS, "c", "b", "e", "a", "d"]
        assert Vocabulary.build(list(reversed(tokens))).words == vocab.words  # input order does not matter
        assert len(vocab) == 8

    def test_build_does_not_count_specials_twice(self) -> None:
        vocab = Vocabulary.build(["x", EOS, EOS, UNK, PAD, "x"])
        assert vocab.words == [*SPECIALS, "x"]

    def test_min_freq_and_max_size(self) -> None:
        tokens = "a a a b b c d d d d".split()
        assert Vocabulary.build(tokens, min_freq=2).words == [*SPECIALS, "d", "a", "b"]
        assert Vocabulary.build(tokens, min_freq=5).words == list(SPECIALS)
        assert Vocabulary.build(tokens, max_size=5).words == [*SPECIALS, "d", "a"]  # max_size counts the specials
        assert Vocabulary.build(tokens, min_freq=3, max_size=100).words == [*SPECIALS, "d", "a"]
        assert Vocabulary.build(tokens, max_size=1).words == list(SPECIALS)  # never drops a special

    @PROPERTY
    @given(
        tokens=st.lists(st.sampled_from("abcdefghij"), max_size=50),
        min_freq=st.integers(1, 4),
        max_size=st.none() | st.integers(0, 12),
    )
    def test_build_invariants(self, tokens: list[str], min_freq: int, max_size: int | None) -> None:
        vocab = Vocabulary.build(tokens, min_freq=min_freq, max_size=max_size)
        counts = {w: tokens.count(w) for w in set(tokens)}
        kept = vocab.words[3:]
        assert all(counts[w] >= min_freq for w in kept)
        assert [counts[w] for w in kept] == sorted((counts[w] for w in kept), reverse=True)
        if max_size is not None:
            assert len(vocab) <= max(max_size, len(SPECIALS))
        else:
            assert set(kept) == {w for w, n in counts.items() if n >= min_freq}
        assert vocab.decode(vocab.encode_tokens(kept)) == kept

    def test_constructor_validates(self) -> None:
        with pytest.raises(ValueError, match="must start with"):
            Vocabulary(["a", "b", "c"])
        with pytest.raises(ValueError, match="must start with"):
            Vocabulary([UNK, PAD, EOS, "a"])
        with pytest.raises(ValueError, match="duplicate words"):
            Vocabulary([*SPECIALS, "a", "b", "a"])
        with pytest.raises(ValueError, match="split must be one of"):
            Vocabulary(list(SPECIALS), split="chars")


class TestVocabularyFile:
    @pytest.mark.parametrize(
        "vocab",
        [
            Vocabulary.build(tokenize("the quick brown fox, the lazy dog")),
            Vocabulary([*SPECIALS, "Über", "naïve", "日本語", "it’s", '"q"'], lowercase=False),
            Vocabulary([*SPECIALS, "@-@", "b.c"], split="whitespace"),
        ],
        ids=["built", "unicode-cased", "whitespace"],
    )
    def test_save_load_roundtrip(self, vocab: Vocabulary, tmp_path: Path) -> None:
        path = tmp_path / "vocab.json"
        vocab.save(path)
        loaded = Vocabulary.load(path)
        assert loaded == vocab
        assert loaded.index == vocab.index
        assert (loaded.lowercase, loaded.split) == (vocab.lowercase, vocab.split)
        data = json.loads(path.read_text(encoding="utf-8"))
        assert data == {
            "tokenizer_version": TOKENIZER_VERSION,
            "lowercase": vocab.lowercase,
            "split": vocab.split,
            "words": vocab.words,
        }
        assert Vocabulary.from_dict(vocab.to_dict()) == vocab

    def test_file_is_utf8_without_escapes(self, tmp_path: Path) -> None:
        path = tmp_path / "vocab.json"
        Vocabulary([*SPECIALS, "日本語"]).save(path)
        assert "日本語" in path.read_text(encoding="utf-8")

    def test_split_defaults_to_words_for_older_files(self, tmp_path: Path) -> None:
        path = tmp_path / "vocab.json"
        path.write_text(json.dumps({"tokenizer_version": 1, "lowercase": True, "words": [*SPECIALS, "a"]}), "utf-8")
        assert Vocabulary.load(path).split == "words"

    def write(self, tmp_path: Path, data: Any) -> Path:
        path = tmp_path / "vocab.json"
        path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
        return path

    @pytest.mark.parametrize("text", ["", "{", '{"words": [', "not json", '{"a": 1,}'])
    def test_corrupt_json(self, tmp_path: Path, text: str) -> None:
        with pytest.raises(json.JSONDecodeError):  # a ValueError
            Vocabulary.load(self.write(tmp_path, text))

    @pytest.mark.parametrize("version", [None, 0, 3, "1", -1, True])
    def test_wrong_tokenizer_version(self, tmp_path: Path, version: Any) -> None:
        data: dict[str, Any] = {"lowercase": True, "words": list(SPECIALS)}
        if version is not None:
            data["tokenizer_version"] = version
        with pytest.raises(
            ValueError, match=rf"unsupported tokenizer_version {version!r} \(this build reads \(1, 2\)\)"
        ):
            Vocabulary.load(self.write(tmp_path, data))

    @pytest.mark.parametrize(
        ("words", "split", "message"),
        [
            ([*SPECIALS, "a", "a"], "words", "duplicate words"),
            ([*SPECIALS, "a", UNK], "words", "duplicate words"),
            (["a", *SPECIALS], "words", "must start with"),
            ([PAD, UNK], "words", "must start with"),
            ([], "words", "must start with"),
            ([*SPECIALS, "a"], "bytes", "split must be one of"),
        ],
    )
    def test_invalid_contents(self, tmp_path: Path, words: list[str], split: str, message: str) -> None:
        data = {"tokenizer_version": 1, "lowercase": True, "split": split, "words": words}
        with pytest.raises(ValueError, match=message):
            Vocabulary.load(self.write(tmp_path, data))

    def test_missing_file(self, tmp_path: Path) -> None:
        with pytest.raises(FileNotFoundError):
            Vocabulary.load(tmp_path / "nope.json")

    @pytest.mark.parametrize(
        "data",
        [
            [1, 2, 3],
            {"tokenizer_version": 1, "words": list(SPECIALS)},
            {"tokenizer_version": 1, "lowercase": True},
            {"tokenizer_version": 1, "lowercase": "false", "words": list(SPECIALS)},
            {"tokenizer_version": 1, "lowercase": True, "words": [*SPECIALS, 7]},
        ],
        ids=["not-an-object", "no-lowercase", "no-words", "lowercase-string", "non-string-word"],
    )
    def test_malformed_files_raise_value_error(self, tmp_path: Path, data: Any) -> None:
        with pytest.raises(ValueError, match=r"vocabulary|tokenizer_version"):
            Vocabulary.load(self.write(tmp_path, data))
