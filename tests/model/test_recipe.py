"""The recipe: one TrainConfig per corpus, the tokenization a text implies, and `--set`'s KEY=VALUE pairs."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest

from model.corpus import LONGRANGE
from model.data import TrainingData
from model.recipe import LONGRANGE_RECIPE, TrainConfig, looks_tokenized, parse_overrides, recipe, tokenization
from tests.training import PLAIN

# WikiText's own form: punctuation spaced apart, `<unk>` and `@-@` as tokens of their own, case kept.
TOKENIZED = (
    " = Valkyria Chronicles III = \n"
    " Senjō no Valkyria 3 : <unk> Chronicles ( Japanese : 戦場のヴァルキュリア3 , lit . Valkyria of the Battlefield ) ,"
    " commonly referred to as Valkyria Chronicles III outside Japan , is a tactical role @-@ playing video game .\n"
) * 20
RUNNING = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"
    "First Citizen:\nYou are all resolved rather to die than to famish?\n"
) * 20


def test_looks_tokenized_tells_a_tokenized_corpus_from_running_text() -> None:
    assert looks_tokenized(TOKENIZED)
    assert not looks_tokenized(RUNNING)
    assert not looks_tokenized("i stay in india . i speak hindi .\n" * 50)  # no , ; : ! ? to tell by: running text


def test_auto_tokenization_follows_the_text_and_an_explicit_choice_is_kept() -> None:
    cfg = TrainConfig(corpus="x", out="o")
    assert (cfg.split, cfg.lowercase) == ("auto", None)
    tokenized = tokenization(cfg, TOKENIZED)
    assert (tokenized.split, tokenized.lowercase) == ("whitespace", False)
    running = tokenization(cfg, RUNNING)
    assert (running.split, running.lowercase) == ("words", True)
    mixed = tokenization(TrainConfig(corpus="x", out="o", lowercase=True), TOKENIZED)
    assert (mixed.split, mixed.lowercase) == ("whitespace", True)
    explicit = TrainConfig(corpus="x", out="o", split="words", lowercase=False)
    assert tokenization(explicit, TOKENIZED) is explicit


def test_a_tokenized_corpus_keeps_its_unk_and_its_case(tmp_path: Path) -> None:
    path = tmp_path / "wiki.txt"
    path.write_text(TOKENIZED, encoding="utf-8")
    data = TrainingData(TrainConfig(corpus=str(path), out=str(tmp_path), **{**PLAIN, "mode": "stream"}), None)
    assert (data.cfg.split, data.cfg.lowercase) == ("whitespace", False)
    assert (data.vocab.split, data.vocab.lowercase) == ("whitespace", False)
    assert {"<unk>", "@-@", "Valkyria", "Japanese"} <= set(data.vocab.index)
    assert "unk" not in data.vocab.index  # "<unk>" is not cut into "<", "unk", ">"


def test_recipe_picks_by_corpus_and_puts_the_choices_on_top() -> None:
    text = recipe("train.txt", "runs/x")
    assert text == TrainConfig(corpus="train.txt", out="runs/x")  # a text corpus: TrainConfig's defaults
    longrange = recipe(LONGRANGE, "runs/x", hidden_size=32)
    assert longrange.hidden_size == 32
    assert {k: getattr(longrange, k) for k in LONGRANGE_RECIPE if k != "hidden_size"} == {
        k: v for k, v in LONGRANGE_RECIPE.items() if k != "hidden_size"
    }
    assert set(LONGRANGE_RECIPE) <= {f.name for f in fields(TrainConfig)}


def test_parse_overrides_reads_json_values_and_refuses_unknown_fields() -> None:
    assert parse_overrides(["dropout=0.4", "softmax=full", "max_minutes=null", "calibrate=false"]) == {
        "dropout": 0.4,
        "softmax": "full",
        "max_minutes": None,
        "calibrate": False,
    }
    with pytest.raises(ValueError, match="TrainConfig field"):
        parse_overrides(["average_from=0.5"])  # removed with the other levers that bought nothing
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_overrides(["dropout"])
