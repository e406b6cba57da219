"""OpenAI-style /v1/models and /v1/completions with the real, unmodified `openai` client (sync and asyncio)
against a live server: the /generate sampler, streaming to [DONE], logprobs, stop, sessions and errors."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.servers import ServerProcess
from tests.service.conftest import API_KEYS

PROMPT = "i stay in india . we cooked a song . i"


@pytest.fixture(scope="module")
def model(tiny_bundle: Path) -> str:
    return tiny_bundle.name


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0) as c:
        yield c


def words_of(completion: Any) -> list[str]:
    return [token.strip() for token in completion.choices[0].logprobs.tokens]


def test_models(client: openai.OpenAI, server: ServerProcess, model: str) -> None:
    listed = client.models.list()
    assert [m.id for m in listed.data] == [model]
    assert listed.data[0].owned_by == "cellgate"
    version = httpx.get(f"{server.url}/v1/model").json()["version"]
    assert client.models.retrieve(f"{model}@{version}").id == model
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("no-such-model")
    assert caught.value.code == "model_not_found"


def test_completions_sample_as_generate_does(client: openai.OpenAI, server: ServerProcess, model: str) -> None:
    """Same prompt, options and seed: the words /v1/sessions/{id}/generate samples from a session primed with it."""
    options = {"temperature": 0.8, "top_p": 0.9, "seed": 7}
    session = httpx.post(f"{server.url}/v1/sessions", json={"text": PROMPT}).json()
    generated = httpx.post(
        f"{server.url}/v1/sessions/{session['session_id']}/generate", json={"max_words": 6, **options}
    ).json()
    completion = client.completions.create(model=model, prompt=PROMPT, max_tokens=6, logprobs=0, **options)
    assert completion.object == "text_completion"
    assert completion.model == model
    assert words_of(completion) == generated["words"]
    choice = completion.choices[0]
    assert choice.finish_reason == "length"
    assert choice.text == "".join(choice.logprobs.tokens)
    assert choice.text.strip() == generated["text"]
    assert completion.usage.prompt_tokens == session["step"]
    assert completion.usage.completion_tokens == 6
    assert completion.usage.total_tokens == session["step"] + 6


def test_greedy_logprobs(client: openai.OpenAI, model: str) -> None:
    completion = client.completions.create(model=model, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=3)
    logprobs = completion.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 5
    offset = 0
    for token, logprob, top, at in zip(
        logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs, logprobs.text_offset, strict=True
    ):
        assert len(top) == 3
        best = max(top, key=top.__getitem__)
        assert best == token  # greedy takes the most likely word
        assert top[best] == pytest.approx(logprob)
        assert logprob <= 0
        assert at == offset
        offset += len(token)
    assert offset == len(completion.choices[0].text)
    plain = client.completions.create(model=model, prompt=PROMPT, max_tokens=5, temperature=0)
    assert plain.choices[0].logprobs is None
    assert plain.choices[0].text == completion.choices[0].text


def test_streaming_matches_the_whole_answer(client: openai.OpenAI, server: ServerProcess, model: str) -> None:
    request = {"model": model, "prompt": PROMPT, "max_tokens": 8, "seed": 3, "logprobs": 1}
    whole = client.completions.create(**request)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **request))
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(texts) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 8
    streamed_tokens = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert streamed_tokens == whole.choices[0].logprobs.tokens
    # On the wire: Server-Sent Events whose last data line is [DONE].
    with httpx.stream("POST", f"{server.url}/v1/completions", json={**request, "stream": True}, timeout=30) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        data = [line for line in response.iter_lines() if line.startswith("data:")]
    assert data[-1] == "data: [DONE]"


def test_stop_sequences_cut_the_text(client: openai.OpenAI, model: str) -> None:
    request = {"model": model, "prompt": PROMPT, "max_tokens": 8, "seed": 5, "logprobs": 0}
    whole = client.completions.create(**request).choices[0]
    tokens = whole.logprobs.tokens
    for stop in (tokens[2], tokens[2] + tokens[3], tokens[3][:2]):  # a word, two words, part of one
        cut = whole.text[: whole.text.find(stop)]
        stopped = client.completions.create(stop=[stop, "never appears"], **request).choices[0]
        assert stopped.text == cut, stop
        assert stopped.finish_reason == "stop"
        assert "".join(stopped.logprobs.tokens) == cut
        streamed = list(client.completions.create(stop=stop, stream=True, **request))
        assert "".join(c.choices[0].text for c in streamed) == cut


def test_several_prompts_give_one_choice_each(client: openai.OpenAI, model: str) -> None:
    prompts = ["i stay in", "we cooked"]
    both = client.completions.create(model=model, prompt=prompts, max_tokens=3, temperature=0)
    assert [c.index for c in both.choices] == [0, 1]
    for prompt, choice in zip(prompts, both.choices, strict=True):
        alone = client.completions.create(model=model, prompt=prompt, max_tokens=3, temperature=0)
        assert choice.text == alone.choices[0].text


def test_a_session_continues(client: openai.OpenAI, server: ServerProcess, model: str) -> None:
    session = httpx.post(f"{server.url}/v1/sessions", json={"text": "i stay in india ."}).json()
    sid = session["session_id"]
    twin = httpx.post(f"{server.url}/v1/sessions/{sid}/fork").json()["session_id"]
    completion = client.completions.create(
        model=model, prompt="i", max_tokens=3, seed=11, logprobs=0, extra_body={"session_id": sid}
    )
    assert completion.model_extra["session_id"] == sid
    assert completion.model_extra["step"] == session["step"] + 1 + 3
    assert httpx.get(f"{server.url}/v1/sessions/{sid}").json()["step"] == session["step"] + 4
    # The twin fed the same word and sampled with the same seed: the same words, the same state after.
    httpx.post(f"{server.url}/v1/sessions/{twin}/steps", json={"text": "i"})
    generated = httpx.post(f"{server.url}/v1/sessions/{twin}/generate", json={"max_words": 3, "seed": 11}).json()
    assert words_of(completion) == generated["words"]
    after = httpx.post(f"{server.url}/v1/sessions/{sid}/steps", json={"text": ""}).json()
    assert (
        after["predictions"]
        == httpx.post(f"{server.url}/v1/sessions/{twin}/steps", json={"text": ""}).json()["predictions"]
    )


@pytest.mark.parametrize(
    ("request_", "error", "param", "code"),
    [
        ({"model": "no-such-model", "prompt": "i"}, openai.NotFoundError, None, "model_not_found"),
        ({"prompt": "i", "n": 2}, openai.BadRequestError, "n", "validation_error"),
        ({"prompt": "i", "max_tokens": 10_000}, openai.BadRequestError, "max_tokens", "validation_error"),
        ({"prompt": "i", "logprobs": 51}, openai.BadRequestError, "logprobs", "validation_error"),
        ({"prompt": "i", "echo": True}, openai.BadRequestError, "echo", "validation_error"),
        ({"prompt": "the " * 2049}, openai.BadRequestError, None, "input_too_long"),
        ({"prompt": "i", "extra_body": {"session_id": "x" * 32}}, openai.NotFoundError, None, "session_not_found"),
    ],
)
def test_errors_raise_the_right_exception(
    client: openai.OpenAI,
    model: str,
    request_: dict[str, Any],
    error: type[openai.APIStatusError],
    param: str | None,
    code: str,
) -> None:
    with pytest.raises(error) as caught:
        client.completions.create(**{"model": model, **request_})
    assert caught.value.code == code
    assert caught.value.param == param
    assert caught.value.type == "invalid_request_error"
    assert caught.value.message


def test_errors_tell_the_client_not_to_retry(server: ServerProcess, model: str) -> None:
    for body in ({"model": "nope", "prompt": "i"}, {"model": model, "prompt": 3}):
        response = httpx.post(f"{server.url}/v1/completions", json=body)
        assert response.status_code in (400, 404)
        assert response.headers["x-should-retry"] == "false"
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}

    # A retrying client sends a refused request once: the metrics count one 404 for one call.
    def not_found() -> float:
        for line in httpx.get(f"{server.url}/metrics").text.splitlines():
            if line.startswith('cellgate_http_requests_total{method="POST",route="/v1/completions",status="404"}'):
                return float(line.split()[-1])
        return 0.0

    before = not_found()
    retrying = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=3)
    with retrying, pytest.raises(openai.NotFoundError):
        retrying.completions.create(model="nope", prompt="i")
    assert not_found() == before + 1


def test_the_asyncio_client_streams(server: ServerProcess, model: str, client: openai.OpenAI) -> None:
    whole = client.completions.create(model=model, prompt=PROMPT, max_tokens=6, seed=9)

    async def main() -> str:
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0) as aio:
            stream = await aio.completions.create(model=model, prompt=PROMPT, max_tokens=6, seed=9, stream=True)
            return "".join([chunk.choices[0].text async for chunk in stream if chunk.choices])

    assert asyncio.run(main()) == whole.choices[0].text


def test_auth(keyed_server: ServerProcess, model: str) -> None:
    with openai.OpenAI(base_url=f"{keyed_server.url}/v1", api_key="wrong", max_retries=0) as wrong:
        with pytest.raises(openai.AuthenticationError) as caught:
            wrong.models.list()
        assert caught.value.type == "authentication_error"
    with openai.OpenAI(base_url=f"{keyed_server.url}/v1", api_key=API_KEYS[1], max_retries=0) as right:
        assert right.completions.create(model=model, prompt="i", max_tokens=2).usage.completion_tokens == 2
