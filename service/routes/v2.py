"""Open Inference Protocol v2 (KServe / Triton) over REST, with Triton's stateful sequences.

The wire format is translated into the same SessionManager calls as /v1: a request without a sequence is
`predict`; `sequence_start` is `create` (with an id derived from the caller's key, the model name and the
sequence id, so a START restarts that sequence as Triton does), later requests `step` the same (h, C), and
`sequence_end` deletes it after answering. Model inputs: TEXT (BYTES, words) or TOKENS (INT64, word ids), and
K (how many predictions); outputs: TOP_IDS, TOP_WORDS, TOP_LOG_PROBS (best first) and STEP (tokens consumed).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import math
import zlib
from typing import Any

import numpy as np
from fastapi import APIRouter, Request, Response

from service.catalog import ServedModel
from service.deps import Caller, caller, catalog
from service.errors import (
    BadRequest,
    CellgateError,
    PayloadTooLarge,
    SequenceEvicted,
    SequenceExpired,
    SequenceNotStarted,
    SessionNotFound,
    ValidationFailed,
)
from service.protocols import v2
from service.routes.health import readiness
from service.schemas import check_text
from service.sessions import Reply, Text

router = APIRouter(prefix="/v2", tags=["open inference v2"])

INPUTS = [
    v2.TensorMetadata(name="TEXT", datatype="BYTES", shape=[-1]),
    v2.TensorMetadata(name="TOKENS", datatype="INT64", shape=[-1]),
    v2.TensorMetadata(name="K", datatype="INT32", shape=[1]),
]
OUTPUTS = [
    v2.TensorMetadata(name="TOP_IDS", datatype="INT64", shape=[-1]),
    v2.TensorMetadata(name="TOP_WORDS", datatype="BYTES", shape=[-1]),
    v2.TensorMetadata(name="TOP_LOG_PROBS", datatype="FP32", shape=[-1]),
    v2.TensorMetadata(name="STEP", datatype="INT64", shape=[1]),
]
OUTPUT_NAMES = [o.name for o in OUTPUTS]
EXTENSIONS = ["binary_tensor_data", "sequence", "model_configuration", "parameters"]
# exp(-745) underflows a double to 0: the floor a log-probability is reported with when its probability did.
LOG_PROB_FLOOR = -745.0
ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": v2.V2Error, "description": "Invalid request, or a sequence without state (Triton's message)"},
    401: {"model": v2.V2Error, "description": "Missing or wrong API key"},
    404: {"model": v2.V2Error, "description": "Unknown model or version"},
    413: {"model": v2.V2Error, "description": "Body or text too long"},
    429: {"model": v2.V2Error, "description": "Rate limited"},
    503: {"model": v2.V2Error, "description": "Not ready, overloaded or store unavailable; see Retry-After"},
}
INFER_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": v2.inline_schema(v2.InferRequest)},
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary"},
                "description": "Binary tensor data: the JSON header, then raw tensor data; the header's length "
                "is in the Inference-Header-Content-Length request header",
            },
        },
    }
}
INFER_RESPONSES: dict[int | str, dict[str, Any]] = {
    **ERRORS,
    200: {
        "description": "JSON, or with binary outputs the JSON header (Inference-Header-Content-Length) and data",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    },
}


@router.get("", response_model=v2.ServerMetadata, responses=ERRORS, summary="Server metadata")
async def server_metadata(request: Request) -> v2.ServerMetadata:
    caller(request)
    return v2.ServerMetadata(name="cellgate", version=request.app.version, extensions=EXTENSIONS)


@router.get("/health/live", summary="Liveness: 200 while the process lives")
async def live() -> dict[str, bool]:
    return {"live": True}


@router.get("/health/ready", responses={503: {"model": v2.V2Error}}, summary="Readiness, as GET /readyz")
async def ready(request: Request) -> dict[str, bool]:
    problem = await readiness(request.app.state)
    if problem is not None:
        raise problem
    return {"ready": True}


def _model(request: Request, name: str, version: str | None = None) -> tuple[Caller, ServedModel]:
    """The caller (authenticated and rate-limited once per request) and the model it names."""
    ctx = caller(request)
    return ctx, catalog(request).get(name, version)


def _metadata(model: ServedModel) -> v2.ModelMetadata:
    return v2.ModelMetadata(
        name=model.name, versions=[model.version], platform="cellgate", inputs=INPUTS, outputs=OUTPUTS
    )


@router.get("/models/{model_name}", response_model=v2.ModelMetadata, responses=ERRORS, summary="Model metadata")
async def model_metadata(request: Request, model_name: str) -> v2.ModelMetadata:
    return _metadata(_model(request, model_name)[1])


@router.get("/models/{model_name}/versions/{model_version}", response_model=v2.ModelMetadata, responses=ERRORS)
async def version_metadata(request: Request, model_name: str, model_version: str) -> v2.ModelMetadata:
    return _metadata(_model(request, model_name, model_version)[1])


async def _model_ready(request: Request, model: ServedModel) -> dict[str, Any]:
    problem = await readiness(request.app.state)
    if problem is not None:
        raise problem
    return {"name": model.name, "ready": True}


@router.get("/models/{model_name}/ready", responses=ERRORS, summary="Model readiness")
async def model_ready(request: Request, model_name: str) -> dict[str, Any]:
    return await _model_ready(request, _model(request, model_name)[1])


@router.get("/models/{model_name}/versions/{model_version}/ready", responses=ERRORS)
async def version_ready(request: Request, model_name: str, model_version: str) -> dict[str, Any]:
    return await _model_ready(request, _model(request, model_name, model_version)[1])


def _config(request: Request, model: ServedModel) -> dict[str, Any]:
    """Triton's model configuration (tritonclient's get_model_config): sequence idle time included."""
    types = {"BYTES": "TYPE_STRING", "INT64": "TYPE_INT64", "INT32": "TYPE_INT32", "FP32": "TYPE_FP32"}
    settings = request.app.state.settings
    return {
        "name": model.name,
        "platform": "cellgate",
        "max_batch_size": 0,
        "input": [{"name": t.name, "data_type": types[t.datatype], "dims": t.shape, "optional": True} for t in INPUTS],
        "output": [{"name": t.name, "data_type": types[t.datatype], "dims": t.shape} for t in OUTPUTS],
        "sequence_batching": {"max_sequence_idle_microseconds": int(settings.session_ttl_seconds * 1_000_000)},
    }


@router.get("/models/{model_name}/config", responses=ERRORS, summary="Model configuration (Triton)")
async def model_config(request: Request, model_name: str) -> dict[str, Any]:
    return _config(request, _model(request, model_name)[1])


@router.get("/models/{model_name}/versions/{model_version}/config", responses=ERRORS)
async def version_config(request: Request, model_name: str, model_version: str) -> dict[str, Any]:
    return _config(request, _model(request, model_name, model_version)[1])


@router.post(
    "/models/{model_name}/infer",
    response_model=v2.InferResponse,
    responses=INFER_RESPONSES,
    openapi_extra=INFER_BODY,
    summary="Inference; parameters.sequence_id/sequence_start/sequence_end for a stateful sequence",
)
async def infer(request: Request, model_name: str) -> Response:
    return await _infer(request, *_model(request, model_name))


@router.post(
    "/models/{model_name}/versions/{model_version}/infer",
    response_model=v2.InferResponse,
    responses=INFER_RESPONSES,
    openapi_extra=INFER_BODY,
)
async def version_infer(request: Request, model_name: str, model_version: str) -> Response:
    return await _infer(request, *_model(request, model_name, model_version))


async def _infer(request: Request, ctx: Caller, model: ServedModel) -> Response:
    body = _decoded(await request.body(), request.headers.get("content-encoding"), ctx.settings.max_body_bytes)
    parsed, tensors = v2.parse_request(body, request.headers.get(v2.HEADER_LENGTH))
    feed, k, batched = _inputs(tensors)
    ctx.check_k(k)
    names, binary = _wanted(parsed)
    sequence = v2.sequence_of(parsed.parameters)
    reply = await _run(ctx, model, sequence, feed, k, parsed.parameters.get("if_step"))
    outputs = _outputs(model, reply, batched)
    header: dict[str, Any] = {"model_name": model.name, "model_version": model.version}
    if parsed.id is not None:
        header["id"] = parsed.id
    content, length = v2.encode_response(header, [o for o in outputs if o.name in names], binary)
    if length is None:
        return Response(content, media_type="application/json")
    return Response(content, media_type="application/octet-stream", headers={v2.HEADER_LENGTH: str(length)})


def _decoded(body: bytes, encoding: str | None, limit: int) -> bytes:
    """The body without its Content-Encoding (gzip or deflate, as tritonclient may send), at most limit bytes."""
    if encoding is None or encoding == "identity":
        return body
    if encoding not in ("gzip", "deflate"):
        raise BadRequest(f"Content-Encoding {encoding!r} is not supported (gzip, deflate)")
    inflater = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        data = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise BadRequest(f"the body is not valid {encoding} data: {exc}") from None
    if len(data) > limit:
        raise PayloadTooLarge(f"the decompressed body exceeds {limit} bytes", limit=limit)
    if not inflater.eof:
        raise BadRequest(f"the {encoding} body is truncated")
    return data


def _inputs(tensors: list[v2.Tensor]) -> tuple[Text, int, bool]:
    """(words or ids to feed, k, whether the tensors carry a leading batch dimension of 1)."""
    by_name = {t.name: t for t in tensors}
    unknown = sorted(set(by_name) - {"TEXT", "TOKENS", "K"})
    if unknown or len(by_name) != len(tensors):
        raise ValidationFailed(
            f"unexpected or repeated inputs {unknown or [t.name for t in tensors]}; "
            "the model takes TEXT or TOKENS, and K"
        )
    if ("TEXT" in by_name) == ("TOKENS" in by_name):
        raise ValidationFailed("send exactly one of the inputs TEXT (BYTES words) and TOKENS (INT64 word ids)")
    given = by_name.get("TEXT") or by_name["TOKENS"]
    if len(given.shape) not in (1, 2) or (len(given.shape) == 2 and given.shape[0] != 1):
        raise ValidationFailed(f"input '{given.name}' must have shape [n] or [1, n], got {list(given.shape)}")
    feed: Text
    if given.name == "TEXT":
        if given.datatype != "BYTES" or not isinstance(given.values, list):
            raise ValidationFailed(f"input 'TEXT' must be BYTES, got {given.datatype}")
        try:
            feed = check_text(" ".join(v.decode() for v in given.values))
        except (UnicodeDecodeError, ValueError) as exc:
            raise ValidationFailed(f"input 'TEXT': {exc}") from None
    else:
        if given.datatype not in v2.INTEGER_TYPES or isinstance(given.values, list):
            raise ValidationFailed(f"input 'TOKENS' must be an integer type (INT64), got {given.datatype}")
        feed = given.values.astype(np.int64).tolist() if given.values.size else []
    k = 5
    if "K" in by_name:
        k_tensor = by_name["K"]
        if k_tensor.datatype not in v2.INTEGER_TYPES or isinstance(k_tensor.values, list) or k_tensor.values.size != 1:
            raise ValidationFailed("input 'K' must be one integer (INT32 or INT64, shape [1])")
        k = int(k_tensor.values[0])
        if k < 1:
            raise ValidationFailed(f"input 'K' is {k}; it must be at least 1")
    return feed, k, len(given.shape) == 2


def _wanted(parsed: v2.InferRequest) -> tuple[set[str], set[str]]:
    """(the outputs to send, those of them to send as binary data)."""
    everything_binary = parsed.parameters.get("binary_data_output", False) is True
    if parsed.outputs is None:
        return set(OUTPUT_NAMES), set(OUTPUT_NAMES) if everything_binary else set()
    names, binary = set(), set()
    for output in parsed.outputs:
        if output.name not in OUTPUT_NAMES:
            raise ValidationFailed(f"unexpected inference output '{output.name}'; the outputs are {OUTPUT_NAMES}")
        names.add(output.name)
        if output.parameters.get("binary_data", everything_binary) is True:
            binary.add(output.name)
    return names, binary


def _session_id(owner: str, model: ServedModel, sequence: v2.Sequence) -> str:
    """The cellgate session id of a sequence: a digest, so other keys' and other models' sequences never meet."""
    digest = hashlib.sha256(f"v2\0{owner}\0{model.name}\0{sequence.key}".encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


async def _run(
    ctx: Caller, model: ServedModel, sequence: v2.Sequence | None, feed: Text, k: int, if_step: Any
) -> Reply:
    manager, owner = model.manager, ctx.owner
    if if_step is not None and (type(if_step) is not int or if_step < 0):
        raise ValidationFailed(f"parameter if_step must be a non-negative integer, got {if_step!r}")
    if sequence is None:
        return await manager.predict(feed, k)
    session_id = _session_id(owner, model, sequence)
    if sequence.start and sequence.end:  # a whole sequence in one request: nothing to keep
        reply = await manager.predict(feed, k)
    elif sequence.start:
        return await manager.create(feed, k, owner, session_id=session_id)
    else:
        try:
            reply = await manager.step(session_id, feed, k, if_step, owner)
        except SessionNotFound as exc:
            raise _no_state(ctx, model, sequence, exc) from None
    if sequence.end:
        with contextlib.suppress(SessionNotFound):
            await manager.delete(session_id, owner)
    return reply


def _no_state(ctx: Caller, model: ServedModel, sequence: v2.Sequence, exc: SessionNotFound) -> CellgateError:
    triton = (
        f"inference request for sequence {sequence.label} to model '{model.name}' must specify the START flag "
        "on the first request of the sequence"
    )
    if exc.reason is None:
        return SequenceNotStarted(triton)
    settings = ctx.settings
    if exc.reason == "expired":
        why = (
            f"sequence {sequence.label} expired: no request for {settings.session_ttl_seconds:g} s "
            "(CELLGATE_SESSION_TTL_SECONDS), so its state was dropped"
        )
    else:
        why = (
            f"sequence {sequence.label} was evicted: the server holds at most {settings.max_sessions} sequences "
            "and sessions (CELLGATE_MAX_SESSIONS) and it was the least recently used"
        )
    lost = SequenceExpired if exc.reason == "expired" else SequenceEvicted
    return lost(f"{why}; {triton}")


def _outputs(model: ServedModel, reply: Reply, batched: bool) -> list[v2.Tensor]:
    predictions = reply["predictions"]
    index = model.manager.vocab.index
    ids = np.array([index[p["word"]] for p in predictions], dtype=np.int64)
    log_probs = np.array(
        [math.log(p["prob"]) if p["prob"] > 0 else LOG_PROB_FLOOR for p in predictions], dtype=np.float32
    )
    step = reply["step"] if "step" in reply else reply["tokens"]
    lead = (1,) if batched else ()
    return [
        v2.Tensor("TOP_IDS", "INT64", (*lead, len(ids)), ids),
        v2.Tensor("TOP_WORDS", "BYTES", (*lead, len(ids)), [p["word"].encode() for p in predictions]),
        v2.Tensor("TOP_LOG_PROBS", "FP32", (*lead, len(ids)), log_probs),
        v2.Tensor("STEP", "INT64", (*lead, 1), np.array([step], dtype=np.int64)),
    ]
