"""The per-word hot path, `POST /v1/sessions/{id}/steps`, answered without FastAPI's per-request machinery.

Why: a keyboard sends one step per word, so this route is most of the traffic. Profiling it under
load showed FastAPI's routing, dependency solving and response validation costing more than the
session logic and the model together. This ASGI layer sits inside the service middleware (request
id, metrics, access log, body limit and draining still apply) and in front of FastAPI's router. It
answers a well-formed JSON step itself with the very same request model, SessionManager call and
error rendering; anything else — a body that fails validation, another content type, a chunked
body — goes on to the FastAPI route unchanged, which owns the OpenAPI description and renders
validation errors exactly as every other route does.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import ValidationError
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from service.asgi import read_body, replay, send_error, send_json
from service.deps import caller_for
from service.schemas import StepRequest

STEP_TEMPLATE = "/v1/sessions/{session_id}/steps"
_STEP_PATH = re.compile(r"^/v1/sessions/([A-Za-z0-9_\-]{16,64})/steps$")


class FastSteps:
    def __init__(self, app: ASGIApp, state: Any, route: Any) -> None:
        self.app = app
        self.state = state  # the FastAPI app's state: settings, manager, metrics
        self.route = route  # the FastAPI route object, reported to the middleware as the matched route

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        match = _STEP_PATH.match(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if match is None:
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        if headers.get("content-type", "").split(";")[0].strip() != "application/json" or not headers.get(
            "content-length"
        ):
            await self.app(scope, receive, send)
            return
        body = await read_body(receive)  # no limit here: the middleware already refused a long Content-Length
        try:
            request = StepRequest.model_validate_json(body)
        except ValidationError:
            await self.app(scope, replay(body, receive), send)
            return
        scope["route"] = self.route
        try:
            ctx = caller_for(self.state, headers)
            ctx.check_k(request.k)
            reply = await ctx.manager.step(
                match.group(1), request.text, request.k, request.if_step, ctx.owner, request.explain, request.prefix
            )
        except Exception as exc:
            await send_error(send, exc, self.state.metrics, scope["path"])
            return
        await send_json(send, 200, reply.body)
