"""Typed dependencies for routes: the SessionManager, the caller's identity, request limits."""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated

from fastapi import Depends, Request

from service.config import Settings
from service.errors import RateLimited, Unauthorized, ValidationFailed
from service.sessions import SessionManager


def get_manager(request: Request) -> SessionManager:
    manager: SessionManager = request.app.state.manager
    return manager


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def _presented_key(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return request.headers.get("x-api-key")


def identify(key: str | None, settings: Settings) -> str:
    """The owner fingerprint for a presented key; raises Unauthorized. "" when keys are off."""
    if not settings.api_keys:
        return ""
    if key:
        # Compare against every key so timing does not reveal which (or whether an early one) matched.
        matched = False
        for candidate in settings.api_keys:
            matched |= hmac.compare_digest(key.encode(), candidate.encode())
        if matched:
            return hashlib.sha256(key.encode()).hexdigest()[:32]
    raise Unauthorized("a valid API key is required (Authorization: Bearer <key> or X-API-Key)")


def get_owner(request: Request) -> str:
    settings = get_settings(request)
    owner = identify(_presented_key(request), settings)
    limiter = request.app.state.rate_limiter
    if limiter is not None and not limiter.allow(owner):
        raise RateLimited("too many requests for this key", headers={"Retry-After": "1"})
    return owner


def check_k(k: int, settings: Settings) -> None:
    if k > settings.max_k:
        raise ValidationFailed(f"k is {k}; the largest allowed is {settings.max_k}", field="k", limit=settings.max_k)


Manager = Annotated[SessionManager, Depends(get_manager)]
Owner = Annotated[str, Depends(get_owner)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
