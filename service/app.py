"""The app factory: builds every part from Settings once, wires them, and renders every error."""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Mount, compile_path
from starlette.types import Scope

from export.bundle import load_bundle
from service.catalog import Catalog, ServedModel
from service.config import Settings
from service.errors import CellgateError, ValidationFailed, from_http_status, render
from service.metrics import Metrics
from service.middleware import ServiceMiddleware
from service.ratelimit import TokenBucketLimiter
from service.routes import health, model, openai, predict, sessions, stream, v2
from service.routes.fast import STEP_TEMPLATE, FastSteps
from service.runner import Runner
from service.scheduler import Scheduler
from service.sessions import SessionManager
from service.store.base import SessionStore, StoreEvents
from service.store.memory import MemoryStore

log = logging.getLogger("cellgate")
STATIC = Path(__file__).parent / "static"


def package_version() -> str:
    try:
        return version("cellgate")
    except PackageNotFoundError:
        return "0+unknown"


def build_store(settings: Settings, metrics: Metrics) -> SessionStore:
    events = StoreEvents(ended=lambda reason: metrics.sessions_ended.labels(reason).inc())
    if settings.session_store == "memory":
        return MemoryStore(settings.session_ttl_seconds, settings.max_sessions, events)
    if settings.session_store.startswith(("redis://", "rediss://", "unix://")):
        from service.store.redis import RedisStore

        return RedisStore(settings, events)
    if settings.session_store.startswith("lmdb://"):
        from service.store.lmdb import LmdbStore, path_of

        return LmdbStore(
            path_of(settings.session_store),
            settings.session_ttl_seconds,
            settings.max_sessions,
            settings.lmdb_map_size_bytes,
            events,
        )
    raise ValueError(
        "CELLGATE_SESSION_STORE must be 'memory', a redis:// URL or an lmdb:///directory, "
        f"got {settings.session_store!r}"
    )


class DemoMount(Mount):
    """The demo page at "/": GET and HEAD outside the APIs only. A catch-all mount would answer every other
    method on an API path itself (405 with `Allow: GET, HEAD`) instead of the route's own 405."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        if scope["type"] != "http" or scope["method"] not in ("GET", "HEAD"):
            return Match.NONE, {}
        if scope["path"].startswith(("/v1/", "/v2/")) or scope["path"] == "/v2":
            return Match.NONE, {}
        return super().matches(scope)


def _allowed_methods(app: FastAPI, path: str) -> list[str]:
    """Every documented method of the paths matching `path` (read from the OpenAPI schema, which is cached)."""
    methods: set[str] = set()
    for template, operations in app.openapi().get("paths", {}).items():
        if compile_path(template)[0].match(path):
            methods |= {method.upper() for method in operations}
    return sorted(methods)


def _openapi_with_limits(app: FastAPI, settings: Settings) -> dict[str, Any]:
    """The generated schema with this deployment's limits as maxima, so that valid requests are accepted."""
    if app.openapi_schema is None:
        schema = FastAPI.openapi(app)
        limits = {
            "k": settings.max_k,
            "max_words": settings.max_generate_words,
            "max_tokens": settings.max_generate_words,
            "logprobs": settings.max_k,
        }
        for component in schema.get("components", {}).get("schemas", {}).values():
            for name, limit in limits.items():
                prop = component.get("properties", {}).get(name, {})
                for branch in (prop, *prop.get("anyOf", ())):  # `int | None` is an anyOf
                    if branch.get("type") == "integer":
                        branch["maximum"] = limit
        app.openapi_schema = schema
    return app.openapi_schema


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for error in exc.errors():
        location = ".".join(str(p) for p in error.get("loc", ()) if p != "body") or "body"
        parts.append(f"{location}: {error.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def create_app(settings: Settings | None = None, metrics: Metrics | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = metrics or Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        bundle = load_bundle(settings.bundle)
        runner = Runner(bundle, settings)
        runner.warm_up()
        store = build_store(settings, metrics)
        await store.start()
        scheduler = Scheduler(runner, settings, metrics)
        await scheduler.start()
        app.state.runner = runner
        app.state.manager = SessionManager(store, scheduler, runner, settings, metrics)
        app.state.catalog = Catalog([ServedModel.of(bundle, app.state.manager)])
        metrics.model_info.labels(bundle.model_version, ",".join(runner.providers), bundle.quantized or "none").set(1)
        metrics.build_info.labels(package_version()).set(1)
        # What exists now (modules, the model, the app) lives as long as the process: freezing it keeps the
        # collector's full passes to what requests and sessions create (with service/server.py's thresholds,
        # p99 at full load 100 -> 52 ms on the 2x256 model; docs/benchmarks.md, "Serving").
        gc.collect()
        gc.freeze()
        app.state.ready = True
        metrics.ready.set(1)
        if not settings.api_keys:
            log.warning("no API keys configured: every client may use every session; bind to loopback only")
        log.info(
            "serving model %s on %s (%d words, %d×%d)",
            bundle.model_version,
            ",".join(runner.providers),
            runner.vocab_size,
            runner.layers,
            runner.hidden_size,
        )
        try:
            yield
        finally:
            app.state.ready = False
            app.state.draining = True
            metrics.ready.set(0)
            await scheduler.stop()
            await store.close()

    app = FastAPI(
        title="cellgate",
        version=package_version(),
        summary="Stateful next-word prediction on a gated LSTM: sessions carry (h, C) between requests.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.ready = False
    app.state.draining = False
    app.state.websockets = set()
    app.state.rate_limiter = (
        TokenBucketLimiter(settings.rate_limit_per_second, settings.rate_limit_burst)
        if settings.rate_limit_per_second > 0
        else None
    )

    def answer(request: Request, exc: BaseException) -> Response:
        rendered = render(exc, metrics, request.url.path)
        return Response(rendered.body, rendered.status, rendered.headers, media_type="application/json")

    @app.exception_handler(CellgateError)
    async def on_domain_error(request: Request, exc: CellgateError) -> Response:
        return answer(request, exc)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> Response:
        error = ValidationFailed(_validation_message(exc))
        where = [str(p) for p in (exc.errors()[0].get("loc", ()) if exc.errors() else ()) if p != "body"]
        if where:  # the first field at fault (OpenAI's `param`)
            error.extra["field"] = ".".join(where)
        return answer(request, error)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> Response:
        headers = dict(exc.headers or {})
        if exc.status_code == 405 and (allowed := _allowed_methods(app, request.url.path)):
            # Starlette names the methods of the first route that matched the path; a path can have several.
            headers["Allow"] = ", ".join(allowed)
        return answer(request, from_http_status(exc.status_code, str(exc.detail), headers))

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception) -> Response:
        return answer(request, exc)

    # Hot routes first: Starlette tries routes in order.
    for router in (
        sessions.router,
        stream.router,
        predict.router,
        v2.router,
        openai.router,
        health.router,
        model.router,
    ):
        app.include_router(router)
    if STATIC.is_dir() and (STATIC / "index.html").exists():
        from fastapi.staticfiles import StaticFiles

        app.router.routes.append(DemoMount("/", app=StaticFiles(directory=STATIC, html=True), name="demo"))
    app.openapi = lambda: _openapi_with_limits(app, settings)  # type: ignore[method-assign]

    step_route = next(r for r in sessions.router.routes if getattr(r, "path", None) == STEP_TEMPLATE)
    app.add_middleware(FastSteps, state=app.state, route=step_route)  # innermost: just before the router
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "X-API-Key", "Content-Type", "X-Request-ID"],
        )
    draining: Any = lambda: app.state.draining  # noqa: E731
    app.add_middleware(ServiceMiddleware, metrics=metrics, max_body_bytes=settings.max_body_bytes, draining=draining)
    return app
