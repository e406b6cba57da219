"""OpenAI-style streaming without a server: a choice's words are sent only once no stop sequence can still
swallow them, and what is sent joins up to exactly the final text."""

from __future__ import annotations

import pytest

from service.protocols.openai import ChoiceText
from service.sampling import SampledWord, first_stop


def words(*texts: str) -> list[SampledWord]:
    return [SampledWord(t.strip(), t, -1.0, ()) for t in texts]


def stream(pieces: list[str], stops: tuple[str, ...]) -> tuple[list[list[str]], str]:
    """What each arriving word releases, and the final text (cut before the first stop, as the sampler does)."""
    choice, released, text = ChoiceText(stops), [], ""
    for word in words(*pieces):
        released.append([t for _, t, _ in choice.add(word)])
        text += word.text
        if first_stop(text, stops) is not None:
            break
    final = text[: first_stop(text, stops)] if first_stop(text, stops) is not None else text
    released.append([t for _, t, _ in choice.finish(final)])
    return released, final


def test_without_stops_every_word_goes_at_once() -> None:
    released, final = stream(["i", " stay", " in"], ())
    assert released == [["i"], [" stay"], [" in"], []]
    assert final == "i stay in"


@pytest.mark.parametrize(
    ("pieces", "stops", "expected", "final"),
    [
        # " in" could begin " india": held until " japan" shows it does not.
        (
            ["i", " stay", " in", " japan"],
            (" india",),
            [["i"], [" stay"], [], [" in", " japan"], []],
            "i stay in japan",
        ),
        # A two-word stop: " stay" is held, then the stop completes and nothing of it is sent.
        (["i", " stay", " in", " x"], (" stay in",), [["i"], [], [], []], "i"),
        # A stop inside a word: the word is cut where the stop begins.
        (["i", " stay", ".", " x"], ("ay.",), [["i"], [], [], [" st"]], "i st"),
    ],
)
def test_stop_sequences_hold_back_and_cut(
    pieces: list[str], stops: tuple[str, ...], expected: list[list[str]], final: str
) -> None:
    released, text = stream(pieces, stops)
    assert released == expected
    assert text == final
    assert "".join(t for batch in released for t in batch) == final
