"""Prefix completion and blocked words through the HTTP API and the WebSocket, against real uvicorn processes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.sync.client import connect

from tests.servers import ServerProcess, running_server

INDIA = "i stay in india . i speak"


def post(server: ServerProcess, path: str, body: Any) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=30)


def ok(response: httpx.Response, status: int = 200) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    return body


def vocabulary(bundle: Path) -> list[str]:
    words: list[str] = json.loads((bundle / "vocab.json").read_text(encoding="utf-8"))["words"]
    return words


def session(server: ServerProcess, text: str) -> dict[str, Any]:
    return ok(post(server, "/v1/sessions", {"text": text}), 201)


def info(server: ServerProcess, sid: str) -> dict[str, Any]:
    return ok(httpx.get(f"{server.url}/v1/sessions/{sid}"))


def words_of(body: dict[str, Any]) -> list[str]:
    return [p["word"] for p in body["predictions"]]


def test_a_prefix_gives_the_most_probable_matching_words_renormalised(server: ServerProcess, tiny_bundle: Path) -> None:
    vocab = vocabulary(tiny_bundle)
    plain = ok(post(server, "/v1/predict", {"text": INDIA, "k": 50}))
    assert "completion" not in plain
    plain_probs = {p["word"]: p["prob"] for p in plain["predictions"]}
    body = ok(post(server, "/v1/predict", {"text": INDIA, "k": 50, "prefix": "s"}))
    expected = [w for w in vocab[3:] if w.startswith("s")]
    assert len(expected) >= 5
    completion = body["completion"]
    assert completion["prefix"] == "s"
    assert completion["matches"] == len(expected)
    assert completion["renormalised"] is True
    assert sorted(words_of(body)) == sorted(expected)  # k covers them all: every matching word, nothing else
    probs = [p["prob"] for p in body["predictions"]]
    assert probs == sorted(probs, reverse=True)
    assert sum(probs) == pytest.approx(1.0, abs=1e-6)
    # The same distribution, renormalised: p_completion(w) * mass is the plain p(w) for every word both list.
    shared = [p for p in body["predictions"] if p["word"] in plain_probs]
    assert shared
    for p in shared:
        assert p["prob"] * completion["mass"] == pytest.approx(plain_probs[p["word"]], rel=1e-4, abs=1e-7)
    top3 = ok(post(server, "/v1/predict", {"text": INDIA, "k": 3, "prefix": "s"}))
    assert words_of(top3) == words_of(body)[:3]
    assert top3["completion"]["matches"] == len(expected)


def test_prefix_matching_is_normalised_like_tokenisation(server: ServerProcess) -> None:
    reference = ok(post(server, "/v1/predict", {"text": INDIA, "k": 5, "prefix": "hi"}))
    assert reference["predictions"]
    for typed in ("HI", "Hi", "ＨＩ"):  # case and full-width forms, as the tokeniser reads them
        body = ok(post(server, "/v1/predict", {"text": INDIA, "k": 5, "prefix": typed}))
        assert body["completion"]["prefix"] == "hi"
        assert body["predictions"] == reference["predictions"]


def test_a_prefix_nothing_starts_with_is_an_empty_answer(server: ServerProcess) -> None:
    body = ok(post(server, "/v1/predict", {"text": INDIA, "prefix": "zqx"}))
    assert body["predictions"] == []
    assert body["completion"] == {"prefix": "zqx", "matches": 0, "mass": 0.0, "renormalised": True}
    alone = ok(post(server, "/v1/predict", {"prefix": "i"}))  # a prefix alone: the first word of a text
    assert alone["tokens"] == 0
    assert all(w.startswith("i") for w in words_of(alone))


@pytest.mark.parametrize("prefix", ["a b", "a\tb", "x" * 65, "a\u0000", "\u00a0", 5, True])
def test_a_bad_prefix_is_refused_and_changes_nothing(server: ServerProcess, prefix: Any) -> None:
    for path in ("/v1/predict", "/v1/sessions"):
        response = post(server, path, {"text": "i", "prefix": prefix})
        assert response.status_code == 422, response.text
        assert response.json()["error"]["code"] == "validation_error"
    sid = session(server, INDIA)["session_id"]
    before = info(server, sid)
    response = post(server, f"/v1/sessions/{sid}/steps", {"text": "hindi", "prefix": prefix})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "validation_error"
    assert info(server, sid) == before


def test_text_or_a_prefix_is_required(server: ServerProcess) -> None:
    for body in ({}, {"prefix": None}, {"k": 3}):
        response = post(server, "/v1/predict", body)
        assert response.status_code == 422, body
        assert response.json()["error"]["code"] == "validation_error"


def test_a_prefix_only_step_changes_nothing(server: ServerProcess) -> None:
    created = session(server, INDIA)
    sid, step = created["session_id"], created["step"]
    before = info(server, sid)
    completed = ok(post(server, f"/v1/sessions/{sid}/steps", {"prefix": "hi", "k": 3, "if_step": step}))
    assert completed["step"] == step
    assert completed["expires_at"] == created["expires_at"]  # not even the idle timer moved
    assert completed["completion"]["prefix"] == "hi"
    assert all(w.startswith("hi") for w in words_of(completed))
    with_empty_text = ok(post(server, f"/v1/sessions/{sid}/steps", {"text": "", "prefix": "hi", "k": 3}))
    assert with_empty_text["predictions"] == completed["predictions"]
    assert info(server, sid) == before  # step, last use, history: the record was not written
    # The state is the one creation left: the next-word answer from it is unchanged.
    again = ok(post(server, f"/v1/sessions/{sid}/fork", None), 201)
    assert again["predictions"] == ok(post(server, "/v1/sessions", {"text": INDIA}), 201)["predictions"]


def test_a_prefix_only_step_leaves_exactly_once_retries_intact(server: ServerProcess) -> None:
    sid = session(server, INDIA)["session_id"]
    step = info(server, sid)["step"]
    first = post(server, f"/v1/sessions/{sid}/steps", {"text": "hindi .", "if_step": step})
    assert first.status_code == 200
    ok(post(server, f"/v1/sessions/{sid}/steps", {"prefix": "i"}))
    retry = post(server, f"/v1/sessions/{sid}/steps", {"text": "hindi .", "if_step": step})
    assert retry.status_code == 200
    assert retry.content == first.content  # still answered from the stored response
    stale = post(server, f"/v1/sessions/{sid}/steps", {"prefix": "i", "if_step": step})
    assert stale.status_code == 409
    assert stale.json()["error"] == {
        "code": "step_conflict",
        "message": f"if_step is {step} but the session is at step {step + 2}",
        "current_step": step + 2,
    }
    assert info(server, sid)["step"] == step + 2


def test_a_step_with_text_and_prefix_advances_through_the_text_only(server: ServerProcess) -> None:
    sid = session(server, "i stay in india .")["session_id"]
    step = info(server, sid)["step"]
    body = {"text": "i speak", "prefix": "h", "k": 3, "if_step": step}
    answer = ok(post(server, f"/v1/sessions/{sid}/steps", body))
    assert answer["step"] == step + 2
    assert answer["completion"]["prefix"] == "h"
    assert all(w.startswith("h") for w in words_of(answer))
    stateless = ok(post(server, "/v1/predict", {"text": INDIA, "prefix": "h", "k": 3}))
    for got, want in zip(answer["predictions"], stateless["predictions"], strict=True):
        assert got["word"] == want["word"]
        assert got["prob"] == pytest.approx(want["prob"], abs=1e-5)
    assert post(server, f"/v1/sessions/{sid}/steps", body).json() == answer  # a retry replays it
    changed = post(server, f"/v1/sessions/{sid}/steps", {**body, "prefix": "x"})
    assert changed.status_code == 409  # the prefix is part of the request a retry must repeat
    assert info(server, sid)["step"] == step + 2


def test_the_websocket_completes_without_advancing(server: ServerProcess) -> None:
    sid = session(server, INDIA)["session_id"]
    step = info(server, sid)["step"]
    url = server.url.replace("http://", "ws://") + f"/v1/sessions/{sid}/stream"
    with connect(url) as ws:
        ws.send(json.dumps({"prefix": "Hi", "k": 3, "if_step": step}))
        completed = json.loads(ws.recv(timeout=30))
        assert completed["step"] == step
        assert completed["completion"]["prefix"] == "hi"
        ws.send(json.dumps({"prefix": "a b"}))
        assert json.loads(ws.recv(timeout=30))["error"]["code"] == "validation_error"
        ws.send(json.dumps({"text": completed["predictions"][0]["word"], "k": 3}))
        assert json.loads(ws.recv(timeout=30))["step"] == step + 1
    assert info(server, sid)["step"] == step + 1


# ----- blocked words -----------------------------------------------------------------------------------------


def top_word(server: ServerProcess, text: str, exclude: set[str]) -> str:
    """The unblocked model's most probable next word after text, skipping `exclude`."""
    words = words_of(ok(post(server, "/v1/predict", {"text": text, "k": 10})))
    return next(w for w in words if not w.startswith("<") and w not in exclude)


@pytest.fixture(scope="module")
def blocked(server: ServerProcess, tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A server on a bundle shipping a blocklist, plus one from CELLGATE_BLOCKLIST: each blocks a word the
    unblocked model ranks first, so every path below would show it without the blocklists."""
    from export.build import export_checkpoint

    bundle_word = top_word(server, INDIA, set())
    assert words_of(ok(post(server, "/v1/predict", {"text": INDIA})))[0] == bundle_word  # greedy's first choice
    settings_word = top_word(server, "i stay in", {bundle_word})
    work = tmp_path_factory.mktemp("blocked")
    (work / "bundle-blocklist.txt").write_text(f"# shipped with the model\n{bundle_word.upper()}\n", encoding="utf-8")
    (work / "extra-blocklist.txt").write_text(f"{settings_word}\nnot-a-word-of-the-model\n", encoding="utf-8")
    bundle = work / "bundle"
    export_checkpoint(tiny_run, bundle, blocklist=work / "bundle-blocklist.txt")
    env = {"CELLGATE_BLOCKLIST": str(work / "extra-blocklist.txt")}
    with running_server(bundle, env) as proc:
        yield proc, {bundle_word, settings_word}


def metric(server: ServerProcess, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(httpx.get(f"{server.url}/metrics").text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def test_no_word_is_blocked_by_default(server: ServerProcess) -> None:
    assert metric(server, "cellgate_blocked_words") == 0


def test_blocked_words_are_never_suggested(blocked: Any) -> None:
    proc, words = blocked
    assert metric(proc, "cellgate_blocked_words") == 2
    withheld = metric(proc, "cellgate_blocked_suggestions_total", where="predictions")
    for text in (INDIA, "i stay in"):
        predicted = ok(post(proc, "/v1/predict", {"text": text, "k": 50}))
        assert len(predicted["predictions"]) == 50  # k survive the filter
        assert not set(words_of(predicted)) & words
        created = ok(post(proc, "/v1/sessions", {"text": text, "k": 50}), 201)
        assert not set(words_of(created)) & words
    assert metric(proc, "cellgate_blocked_suggestions_total", where="predictions") >= withheld + 4
    for word in words:
        for prefix in (word[:1], word, word.upper()):
            completed = ok(post(proc, "/v1/predict", {"text": INDIA, "prefix": prefix, "k": 50}))
            assert word not in words_of(completed)
    assert metric(proc, "cellgate_blocked_suggestions_total", where="completion") >= 1


def test_blocked_words_are_never_streamed_or_generated(blocked: Any) -> None:
    proc, words = blocked
    sid = ok(post(proc, "/v1/sessions", {"text": "i stay in"}), 201)["session_id"]
    url = proc.url.replace("http://", "ws://") + f"/v1/sessions/{sid}/stream"
    with connect(url) as ws:
        for message in ({"text": "india . i speak", "k": 50}, {"prefix": "", "k": 50}, {"rewind_to": 3, "k": 50}):
            ws.send(json.dumps(message))
            answer = json.loads(ws.recv(timeout=30))
            assert answer["predictions"]
            assert not set(words_of(answer)) & words
    before = metric(proc, "cellgate_blocked_suggestions_total", where="generation")
    for seed in range(4):
        fresh = ok(post(proc, "/v1/sessions", {"text": INDIA}), 201)["session_id"]
        greedy = {"max_words": 30, "temperature": 0.0} if seed == 0 else {"max_words": 30, "temperature": 1.5}
        generated = ok(post(proc, f"/v1/sessions/{fresh}/generate", {**greedy, "seed": seed}))
        assert not set(generated["words"]) & words
    assert metric(proc, "cellgate_blocked_suggestions_total", where="generation") > before  # greedy hit one first
    streamed = httpx.post(
        f"{proc.url}/v1/sessions/{sid}/generate", json={"max_words": 20, "stream": True, "seed": 7}, timeout=30
    )
    events = [json.loads(line[5:]) for line in streamed.text.splitlines() if line.startswith("data:")]
    assert len(events) == 21  # 20 words, then done
    assert not {e.get("word") for e in events} & words


def test_blocked_words_stay_out_of_the_other_protocols(blocked: Any) -> None:
    """OpenAI-style completions neither sample nor list (logprobs) a blocked word; v2's TOP_WORDS leave them out."""
    proc, words = blocked
    for seed in range(3):
        body = {"model": "bundle", "prompt": INDIA, "max_tokens": 10, "logprobs": 5, "seed": seed}
        if seed == 0:
            body["temperature"] = 0.0
        choice = ok(post(proc, "/v1/completions", body))["choices"][0]
        shown = {t.strip() for t in choice["logprobs"]["tokens"]}
        shown |= {t.strip() for top in choice["logprobs"]["top_logprobs"] for t in top}
        assert len(choice["logprobs"]["tokens"]) == 10
        assert all(len(top) == 5 for top in choice["logprobs"]["top_logprobs"])
        assert not shown & words
    tensors = [{"name": "TEXT", "shape": [1], "datatype": "BYTES", "data": [INDIA]}]
    top = ok(post(proc, "/v2/models/bundle/infer", {"inputs": tensors}))["outputs"][1]
    assert top["name"] == "TOP_WORDS"
    assert len(top["data"]) == 5
    assert not set(top["data"]) & words
