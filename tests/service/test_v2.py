"""Open Inference Protocol v2 with the real, unmodified `tritonclient[http]` (sync and asyncio) against a live
server: metadata, binary and JSON tensors, Triton-style sequences against /v1 sessions, and the errors."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import tritonclient.http as triton
import tritonclient.http.aio as triton_aio
from tritonclient.utils import InferenceServerException

from tests.redis_server import RedisServer, replica_env
from tests.servers import ServerProcess, running_server
from tests.service.conftest import API_KEYS

OUTPUTS = ("TOP_IDS", "TOP_WORDS", "TOP_LOG_PROBS", "STEP")
START_FLAG = "must specify the START flag on the first request of the sequence"
CHUNKS_A = ["i stay in", "india .", "we cooked a song .", "i speak"]
CHUNKS_B = ["i stay in japan .", "it was cold", "today . i", "speak"]


@pytest.fixture(scope="module")
def model(tiny_bundle: Path) -> str:
    return tiny_bundle.name  # the bundle has no name in its manifest: its directory's name


def client_of(server: ServerProcess) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(server.url.removeprefix("http://"))


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[triton.InferenceServerClient]:
    with client_of(server) as c:
        yield c


def inputs(
    text: str | None = None, binary: bool = True, tokens: list[int] | None = None, k: int | None = None
) -> list[Any]:
    built = []
    if text is not None:
        words = triton.InferInput("TEXT", [1], "BYTES")
        built.append(words.set_data_from_numpy(np.array([text], dtype=object), binary_data=binary))
    if tokens is not None:
        ids = triton.InferInput("TOKENS", [len(tokens)], "INT64")
        built.append(ids.set_data_from_numpy(np.array(tokens, dtype=np.int64), binary_data=binary))
    if k is not None:
        built.append(triton.InferInput("K", [1], "INT32").set_data_from_numpy(np.array([k], np.int32), binary))
    return built


def outputs(binary: bool) -> list[triton.InferRequestedOutput]:
    return [triton.InferRequestedOutput(name, binary_data=binary) for name in OUTPUTS]


def answer(result: Any) -> dict[str, Any]:
    """A result as plain values: words decoded, whichever way the tensors came."""
    words = [w.decode() if isinstance(w, bytes) else str(w) for w in result.as_numpy("TOP_WORDS").tolist()]
    return {
        "ids": result.as_numpy("TOP_IDS").tolist(),
        "words": words,
        "log_probs": result.as_numpy("TOP_LOG_PROBS").tolist(),
        "step": int(result.as_numpy("STEP")[0]),
    }


def infer(
    client: triton.InferenceServerClient, model: str, text: str, binary: bool = True, **kw: Any
) -> dict[str, Any]:
    return answer(client.infer(model, inputs(text, binary), outputs=outputs(binary), **kw))


def same_as_v1(got: dict[str, Any], v1: dict[str, Any]) -> None:
    """The v2 answer carries what /v1 said: the same words, log-probabilities of the same probabilities."""
    assert got["words"] == [p["word"] for p in v1["predictions"]]
    assert got["log_probs"] == pytest.approx([math.log(p["prob"]) for p in v1["predictions"]], rel=1e-6, abs=1e-6)
    assert got["step"] == v1.get("step", v1.get("tokens"))


def failure(call: Any) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as caught:
        call()
    return caught.value


def test_server_and_model_metadata(client: triton.InferenceServerClient, server: ServerProcess, model: str) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready(model)
    version = httpx.get(f"{server.url}/v1/model").json()["version"]
    assert client.is_model_ready(model, version)
    assert not client.is_model_ready("no-such-model")
    server_meta = client.get_server_metadata()
    assert server_meta["name"] == "cellgate"
    assert {"sequence", "binary_tensor_data"} <= set(server_meta["extensions"])
    meta = client.get_model_metadata(model)
    assert meta["versions"] == [version]
    assert [t["name"] for t in meta["inputs"]] == ["TEXT", "TOKENS", "K"]
    assert [t["name"] for t in meta["outputs"]] == list(OUTPUTS)
    assert client.get_model_metadata(model, version) == meta
    config = client.get_model_config(model)
    assert config["sequence_batching"]["max_sequence_idle_microseconds"] == 1800 * 1_000_000
    missing = failure(lambda: client.get_model_metadata(model, "m-0000000000000000"))
    assert missing.status() == "404"
    assert "m-0000000000000000" in missing.message()


@pytest.mark.parametrize("binary", [True, False])
def test_stateless_infer_is_predict(
    client: triton.InferenceServerClient, server: ServerProcess, model: str, binary: bool
) -> None:
    text = "i stay in india . i speak"
    got = infer(client, model, text, binary)
    same_as_v1(got, httpx.post(f"{server.url}/v1/predict", json={"text": text}).json())
    # Token ids in (TOKENS) give what their words in (TEXT) give; K sets how many come back.
    words = got["words"][:3]
    by_ids = answer(client.infer(model, inputs(tokens=got["ids"][:3], binary=binary, k=7)))
    by_text = answer(client.infer(model, inputs(" ".join(words), binary, k=7)))
    assert by_ids == by_text
    assert len(by_ids["words"]) == 7
    assert by_ids["step"] == 3
    # Without requested outputs the client asks for all of them as binary data; all four come back.
    plain = client.infer(model, inputs(text, binary))
    assert answer(plain) == got


def test_two_interleaved_sequences_are_two_sessions(
    client: triton.InferenceServerClient, server: ServerProcess, model: str
) -> None:
    """A uint64 id over binary tensors and a string id over JSON, interleaved, each against its own /v1 session."""
    sequences: list[tuple[int | str, bool, list[str]]] = [(2**64 - 5, True, CHUNKS_A), ("sequence-b", False, CHUNKS_B)]
    sessions: dict[int | str, str] = {}
    for i in range(len(CHUNKS_A)):
        for sequence_id, binary, chunks in sequences:
            first, last = i == 0, i == len(chunks) - 1
            got = infer(
                client, model, chunks[i], binary, sequence_id=sequence_id, sequence_start=first, sequence_end=last
            )
            if first:
                v1 = httpx.post(f"{server.url}/v1/sessions", json={"text": chunks[i]}).json()
                sessions[sequence_id] = v1["session_id"]
            else:
                v1 = httpx.post(
                    f"{server.url}/v1/sessions/{sessions[sequence_id]}/steps", json={"text": chunks[i]}
                ).json()
            same_as_v1(got, v1)
    # Both ended: their state is gone, so continuing either is Triton's missing-START error.
    for sequence_id, binary, _ in sequences:
        error = failure(lambda sid=sequence_id, b=binary: infer(client, model, "i", b, sequence_id=sid))
        assert error.status() == "400"
        assert error.message() == f"inference request for sequence {sequence_id} to model '{model}' {START_FLAG}"


def test_the_asyncio_client_keeps_concurrent_sequences_apart(
    client: triton.InferenceServerClient, server: ServerProcess, model: str
) -> None:
    reference = {}
    for name, chunks in (("a", CHUNKS_A), ("b", CHUNKS_B)):
        reference[name] = [
            infer(client, model, chunk, sequence_id=f"ref-{name}", sequence_start=i == 0)
            for i, chunk in enumerate(chunks)
        ]

    async def run_sequence(
        aio: triton_aio.InferenceServerClient, sequence_id: int, chunks: list[str]
    ) -> list[dict[str, Any]]:
        answers = []
        for i, chunk in enumerate(chunks):
            result = await aio.infer(
                model,
                inputs(chunk, binary=i % 2 == 0),
                sequence_id=sequence_id,
                sequence_start=i == 0,
                sequence_end=i == len(chunks) - 1,
            )
            answers.append(answer(result))
        return answers

    async def main() -> list[list[dict[str, Any]]]:
        async with triton_aio.InferenceServerClient(server.url.removeprefix("http://")) as aio:
            assert await aio.is_model_ready(model)
            return list(await asyncio.gather(run_sequence(aio, 11, CHUNKS_A), run_sequence(aio, 12, CHUNKS_B)))

    a, b = asyncio.run(main())
    assert a == reference["a"]
    assert b == reference["b"]


def test_sequence_flags(client: triton.InferenceServerClient, model: str) -> None:
    fresh = failure(lambda: infer(client, model, "i", sequence_id=987654))
    assert fresh.status() == "400"
    assert fresh.message() == f"inference request for sequence 987654 to model '{model}' {START_FLAG}"
    assert "expired" not in fresh.message()
    started = infer(client, model, "i stay in", sequence_id=77, sequence_start=True)
    assert started["step"] == 3
    assert infer(client, model, "india .", sequence_id=77)["step"] == 5
    # START on a sequence in progress begins it again from a zero state, as Triton does.
    assert infer(client, model, "i stay in", sequence_id=77, sequence_start=True) == started
    # The same number as a string is another sequence.
    assert failure(lambda: infer(client, model, "i", sequence_id="77")).status() == "400"
    # START and END together: one stateless request, and nothing kept (the old sequence 77 ends too).
    whole = infer(client, model, "i stay in", sequence_id=77, sequence_start=True, sequence_end=True)
    assert whole == started
    assert START_FLAG in failure(lambda: infer(client, model, "i", sequence_id=77)).message()
    # Exactly-once, as /v1's if_step: a retried request at the step it was sent at is answered again, unapplied.
    infer(client, model, "i stay in", sequence_id=78, sequence_start=True)
    once = infer(client, model, "japan .", sequence_id=78, parameters={"if_step": 3})
    assert infer(client, model, "japan .", sequence_id=78, parameters={"if_step": 3}) == once
    conflict = failure(lambda: infer(client, model, "spain .", sequence_id=78, parameters={"if_step": 3}))
    assert conflict.status() == "409"
    assert infer(client, model, "", sequence_id=78, sequence_end=True)["step"] == 5


def raw_infer(
    server: ServerProcess, model: str, body: bytes | dict[str, Any], headers: dict[str, str] | None = None
) -> httpx.Response:
    url = f"{server.url}/v2/models/{model}/infer"
    if isinstance(body, dict):
        return httpx.post(url, json=body, headers=headers, timeout=30)
    return httpx.post(url, content=body, headers=headers, timeout=30)


def text_tensor(data: Any, shape: list[int] | None = None, datatype: str = "BYTES") -> dict[str, Any]:
    return {"name": "TEXT", "shape": shape or [len(data)], "datatype": datatype, "data": data}


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({"inputs": [text_tensor(["i"], [2])]}, "needs 2"),
        ({"inputs": [text_tensor([1], datatype="INT64")]}, "TEXT' must be BYTES"),
        (
            {"inputs": [text_tensor(["i"]), {"name": "TOKENS", "shape": [1], "datatype": "INT64", "data": [4]}]},
            "exactly one",
        ),
        ({"inputs": [{"name": "WORDS", "shape": [1], "datatype": "BYTES", "data": ["i"]}]}, "WORDS"),
        (
            {"inputs": [{"name": "TOKENS", "shape": [1], "datatype": "INT64", "data": [10**6]}]},
            "outside the vocabulary",
        ),
        ({"inputs": [{"name": "TOKENS", "shape": [1], "datatype": "INT64", "data": [1.5]}]}, "numbers"),
        ({"inputs": [text_tensor(["i"]), {"name": "K", "shape": [1], "datatype": "INT32", "data": [51]}]}, "51"),
        ({"inputs": [text_tensor(["i"])], "outputs": [{"name": "LOGITS"}]}, "LOGITS"),
        ({"inputs": [text_tensor(["a\u0000b"])]}, "control character"),
        ({"inputs": [text_tensor(["i"])], "parameters": {"sequence_start": True}}, "non-zero or non-empty"),
        ({"inputs": [text_tensor(["i"])], "parameters": {"sequence_id": -1}}, "uint64"),
        ({"inputs": [text_tensor(["i"])], "parameters": {"sequence_id": 3, "sequence_end": "yes"}}, "boolean"),
        ({"inputs": [text_tensor(["i"], [1, 1, 1])]}, "shape [n] or [1, n]"),
        ({"inputs": "TEXT"}, "inputs"),
    ],
)
def test_bad_requests_are_400_in_the_v2_shape(
    server: ServerProcess, model: str, body: dict[str, Any], says: str
) -> None:
    response = raw_infer(server, model, body)
    assert response.status_code == 400, response.text
    error = response.json()
    assert set(error) == {"error"}
    assert says in error["error"]


def test_binary_framing_errors(server: ServerProcess, model: str) -> None:
    header = b'{"inputs":[{"name":"TOKENS","shape":[2],"datatype":"INT64","parameters":{"binary_data_size":16}}]}'
    data = np.array([4, 5], dtype="<i8").tobytes()
    good = raw_infer(server, model, header + data, {"Inference-Header-Content-Length": str(len(header))})
    assert good.status_code == 200, good.text
    for length, body in (
        (str(len(header) + 100), header + data),
        ("x", header + data),
        (str(len(header)), header + data[:8]),
        (str(len(header)), header + data + b"extra"),
    ):
        response = raw_infer(server, model, body, {"Inference-Header-Content-Length": length})
        assert response.status_code == 400, (length, response.text)
        assert isinstance(response.json()["error"], str)


def test_compressed_requests(client: triton.InferenceServerClient, model: str) -> None:
    plain = infer(client, model, "i stay in india .")
    for algorithm in ("gzip", "deflate"):
        got = client.infer(
            model, inputs("i stay in india ."), outputs=outputs(True), request_compression_algorithm=algorithm
        )
        assert answer(got) == plain


def test_protocol_errors_and_metrics(server: ServerProcess, client: triton.InferenceServerClient, model: str) -> None:
    unknown = failure(lambda: infer(client, model.upper() + "-x", "i"))
    assert unknown.status() == "404"
    put = httpx.put(f"{server.url}/v2/models/{model}/infer")
    assert put.status_code == 405
    assert set(put.json()) == {"error"}
    assert httpx.get(f"{server.url}/v2/nothing").json() == {"error": "Not Found"}
    infer(client, model, "i", sequence_id="sequence-ids-are-no-labels", sequence_start=True)
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'route="/v2/models/{model_name}/infer"' in metrics
    assert "sequence-ids-are-no-labels" not in metrics
    assert 'cellgate_errors_total{code="sequence_not_started"}' in metrics


def test_auth_and_keys_keep_sequences_apart(keyed_server: ServerProcess, model: str) -> None:
    with client_of(keyed_server) as c:
        assert c.is_server_live()  # health needs no key, as /healthz
        refused = failure(lambda: c.get_model_metadata(model))
        assert refused.status() == "401"
        one, two = ({"Authorization": f"Bearer {key}"} for key in API_KEYS)
        started = infer(c, model, "i stay in", sequence_id=5, sequence_start=True, headers=one)
        assert started["step"] == 3
        # Another key's sequence 5 is another sequence: it was never started.
        other = failure(lambda: infer(c, model, "india .", sequence_id=5, headers=two))
        assert START_FLAG in other.message()
        assert infer(c, model, "india .", sequence_id=5, headers={"X-API-Key": API_KEYS[0]})["step"] == 5


def test_expired_sequences_say_so(tiny_bundle: Path, redis_server: RedisServer, model: str) -> None:
    """State lost to idle expiry is named as such, not only as a missing START (a Redis TTL, shortened to 1 ms)."""
    redis = redis_server.client()
    redis.flushdb()
    with running_server(tiny_bundle, replica_env(redis_server)) as server, client_of(server) as c:
        infer(c, model, "i stay in", sequence_id=31, sequence_start=True)
        (key,) = redis.keys("cellgate:session:*")
        assert redis.pexpire(key, 1)
        deadline = time.monotonic() + 10
        while redis.exists(key):  # EXISTS expires the key itself once its time has passed
            assert time.monotonic() < deadline, "the key never expired"
        expired = failure(lambda: infer(c, model, "india .", sequence_id=31))
        assert expired.status() == "400"
        message = expired.message()
        assert message.startswith("sequence 31 expired: no request for 1800 s (CELLGATE_SESSION_TTL_SECONDS)")
        assert f"inference request for sequence 31 to model '{model}' {START_FLAG}" in message
        never = failure(lambda: infer(c, model, "india .", sequence_id=32))
        assert "expired" not in never.message()
        assert infer(c, model, "i stay in", sequence_id=31, sequence_start=True)["step"] == 3  # START begins again
        assert 'cellgate_errors_total{code="sequence_expired"} 1.0' in httpx.get(f"{server.url}/metrics").text


def test_one_request_is_one_token_of_the_shared_rate_limit(tiny_bundle: Path, model: str) -> None:
    """Both protocols draw on the caller's bucket once per request, and refuse in their own shapes."""
    env = {"CELLGATE_RATE_LIMIT_PER_SECOND": "0.001", "CELLGATE_RATE_LIMIT_BURST": "3"}
    with running_server(tiny_bundle, env) as server, client_of(server) as c:
        for _ in range(3):
            infer(c, model, "i stay in")
        refused = raw_infer(server, model, {"inputs": [text_tensor(["i"])]})
        assert refused.status_code == 429
        assert refused.headers["retry-after"] == "1"
        assert set(refused.json()) == {"error"}
        oai = openai.OpenAI(base_url=f"{server.url}/v1", api_key="-", max_retries=0)
        with oai, pytest.raises(openai.RateLimitError) as caught:
            oai.completions.create(model=model, prompt="i")
        assert caught.value.code == "rate_limited"
