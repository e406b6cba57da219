"""The long-range experiment: the tanh RNN's interface, the recipe, the curriculum and a tiny end-to-end run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from model.config import LSTMConfig
from model.corpus import LONGRANGE, longrange_episodes
from model.evaluate import BUCKET_WIDTH, bucket_episodes, detach_state
from model.experiments.long_range import (
    BAR_ACCURACY,
    BAR_GAP,
    RNNState,
    TanhRNNLanguageModel,
    bucket_names,
    format_table,
    main,
    passes_bar,
)
from model.lm import LSTMLanguageModel
from model.recipe import LONGRANGE_RECIPE, TrainConfig, recipe
from model.train import as_language_model, train
from tests.training import tiny_train_config

CONFIG = LSTMConfig(vocab_size=23, embed_size=8, hidden_size=8, num_layers=2, dropout=0.0)


class TestTanhRNN:
    def test_shapes_and_state_type(self) -> None:
        model = TanhRNNLanguageModel(CONFIG).eval()
        tokens = torch.randint(0, CONFIG.vocab_size, (3, 5))
        logits, state = model(tokens, model.zero_state(3))
        assert logits.shape == (3, 5, CONFIG.vocab_size)
        assert isinstance(state, RNNState)
        assert state.hidden.shape == (CONFIG.num_layers, 3, CONFIG.hidden_size)
        assert model.zero_state(4).hidden.abs().sum().item() == 0.0

    def test_carried_state_equals_one_pass(self) -> None:
        torch.manual_seed(0)
        model = TanhRNNLanguageModel(CONFIG).eval()
        tokens = torch.randint(0, CONFIG.vocab_size, (2, 9))
        whole, whole_state = model(tokens)
        first, state = model(tokens[:, :4], model.zero_state(2))
        second, split_state = model(tokens[:, 4:], detach_state(state))
        torch.testing.assert_close(torch.cat([first, second], dim=1), whole)
        torch.testing.assert_close(split_state.hidden, whole_state.hidden)

    def test_state_reaches_later_predictions(self) -> None:
        """A recurrent model: changing the first token changes the last logits."""
        torch.manual_seed(0)
        model = TanhRNNLanguageModel(CONFIG).eval()
        tokens = torch.randint(1, CONFIG.vocab_size, (1, 6))
        other = tokens.clone()
        other[0, 0] = 0
        assert not torch.allclose(model(tokens)[0][:, -1], model(other)[0][:, -1])

    def test_same_shape_as_the_lstm_but_no_gates(self) -> None:
        rnn, lstm = TanhRNNLanguageModel(CONFIG), LSTMLanguageModel(CONFIG)
        assert rnn.embedding.weight.shape == lstm.embedding.weight.shape
        recurrent = sum(p.numel() for p in rnn.layers.parameters())
        gated = sum(p.numel() for p in lstm.layers.parameters())
        # One tanh block where the LSTM has four (input, forget, candidate, output); RNN keeps two biases.
        assert recurrent < gated / 3
        as_language_model(rnn)  # the protocol train() and long_range_accuracy() rely on


class TestGenerator:
    def test_same_seed_same_episodes(self) -> None:
        first = list(longrange_episodes(seed=3, count=40))
        assert first == list(longrange_episodes(seed=3, count=40))
        assert first != list(longrange_episodes(seed=4, count=40))

    def test_gaps_respect_the_range(self) -> None:
        for episode in longrange_episodes(seed=1, count=200, gap_min=20, gap_max=30):
            assert episode.gap >= 20
            assert episode.gap < 30 + 10  # at most one filler sentence past the drawn target
            words = episode.text.split()
            assert words[:3] == ["i", "stay", "in"]
            assert words[-3:] == ["speak", episode.language, "."]
            assert len(words) == 5 + episode.gap + 4  # "i stay in X ." + filler + "i speak Y ."

    @pytest.mark.parametrize("low", [0, 50, 90])
    def test_bucket_episodes_are_deterministic_and_in_bucket(self, low: int) -> None:
        episodes = bucket_episodes(seed=7, low=low, count=15)
        assert episodes == bucket_episodes(seed=7, low=low, count=15)
        assert all(low <= e.gap < low + BUCKET_WIDTH for e in episodes)


def test_demo_recipe() -> None:
    cfg = recipe(LONGRANGE, "runs/x", seed=1)
    assert {key: getattr(cfg, key) for key in LONGRANGE_RECIPE} == LONGRANGE_RECIPE
    assert (cfg.corpus, cfg.out, cfg.seed, cfg.mode) == (LONGRANGE, "runs/x", 1, "lines")
    assert cfg.num_layers == 2
    assert cfg.curriculum_mastery is not None
    assert cfg.curriculum_start < 10 <= cfg.gap_max
    assert cfg.target_accuracy is not None
    assert cfg.target_accuracy >= BAR_ACCURACY


def test_passes_bar_looks_only_below_the_bar_gap() -> None:
    good = {name: 1.0 for name in bucket_names()} | {f"{BAR_GAP}-{BAR_GAP + 10}": 0.0}
    assert passes_bar(good)
    assert not passes_bar(good | {f"{BAR_GAP - 10}-{BAR_GAP}": BAR_ACCURACY - 0.01})


def _tiny(out: Path, mastery: float) -> TrainConfig:
    return tiny_train_config(
        out,
        hidden_size=8,
        num_layers=1,
        episodes=40,
        batch_size=20,
        curriculum_start=5,
        curriculum_step=10,
        curriculum_mastery=mastery,
    )


@pytest.mark.parametrize(("mastery", "expected"), [(1.01, [5, 5, 5]), (0.0, [5, 15, 25])])
def test_accuracy_driven_curriculum(tmp_path: Path, mastery: float, expected: list[int]) -> None:
    """The gap grows by a step after each mastered epoch, and not at all while the probe is below the bar."""
    result = train(_tiny(tmp_path, mastery))
    assert [entry["gap_max"] for entry in result.log] == expected


def test_experiment_writes_json_png_and_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["long-range", "--out", str(tmp_path), "--minutes", "0.01", "--seed", "3", "--per-bucket", "3"]
    assert main([*argv, "--episodes", "64"]) == 0
    report = json.loads((tmp_path / "long_range.json").read_text(encoding="utf-8"))
    assert report["seed"] == 3
    assert report["buckets"] == bucket_names() == [f"{lo}-{lo + 10}" for lo in range(0, 100, 10)]
    assert set(report["models"]) == {"lstm", "rnn"}
    for result in report["models"].values():
        assert list(result["accuracy"]) == report["buckets"]
        assert all(0.0 <= a <= 1.0 for a in result["accuracy"].values())
        assert result["epochs"] >= 1
        assert Path(result["checkpoint"]).is_file()
    assert report["models"]["rnn"]["parameters"] < report["models"]["lstm"]["parameters"]
    png = (tmp_path / "long_range.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(png) > 10_000
    table = capsys.readouterr().out
    assert all(f"| {bucket} |" in table for bucket in report["buckets"])
    assert format_table(report) in table
