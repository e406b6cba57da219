"""A small typed client for the cellgate HTTP API."""

from __future__ import annotations

from types import TracebackType
from typing import Any

import httpx


class CellgateAPIError(Exception):
    """An error answer from the server, or no answer at all."""

    def __init__(self, status: int, code: str, message: str, body: dict[str, Any] | None = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.body = body or {}


class Client:
    def __init__(self, url: str = "http://127.0.0.1:8000", api_key: str | None = None, timeout: float = 10.0) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=url, headers=headers, timeout=timeout)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise CellgateAPIError(0, "unreachable", f"{self._http.base_url}: {exc}") from exc
        if response.status_code >= 400:
            try:
                body = response.json()
                error = body["error"]
                raise CellgateAPIError(response.status_code, error["code"], error["message"], body)
            except (ValueError, KeyError, TypeError):
                raise CellgateAPIError(response.status_code, "http_error", response.text[:200]) from None
        return response.json() if response.content else None

    def predict(self, text: str, k: int = 5) -> dict[str, Any]:
        result: dict[str, Any] = self._call("POST", "/v1/predict", json={"text": text, "k": k})
        return result
