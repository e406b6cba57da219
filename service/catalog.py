"""Which models this server serves, by name and version: the one place a route turns a model name into the
SessionManager that serves it.

Today that is one model, the loaded bundle. A registry of several models and versions slots in behind
`Catalog` (more entries; the first entry of a name is its default version): routes ask the catalog for an
entry and use that entry's manager, never a global one, so they need not change.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from export.bundle import Bundle
from service.errors import ModelNotFound
from service.sessions import SessionManager


@dataclass(frozen=True)
class ServedModel:
    name: str
    version: str
    created: int  # Unix seconds: when the bundle was exported
    manager: SessionManager

    @classmethod
    def of(cls, bundle: Bundle, manager: SessionManager) -> ServedModel:
        try:
            created = int(datetime.fromisoformat(str(bundle.manifest["created_at"])).timestamp())
        except (KeyError, ValueError):
            created = int(bundle.path.stat().st_mtime)
        return cls(bundle.name, bundle.model_version, created, manager)


class Catalog:
    def __init__(self, models: Sequence[ServedModel]) -> None:
        self._models = list(models)

    def models(self) -> list[ServedModel]:
        """Every served model, defaults first."""
        return list(self._models)

    def get(self, name: str, version: str | None = None) -> ServedModel:
        """The entry for name (its default version when version is None or ""); raises ModelNotFound."""
        for model in self._models:
            if model.name == name and (not version or model.version == version):
                return model
        served = ", ".join(f"{m.name} (version {m.version})" for m in self._models)
        which = f"model {name!r}" + (f" version {version!r}" if version else "")
        raise ModelNotFound(f"unknown {which}; this server serves {served}")

    def resolve(self, model_id: str) -> ServedModel:
        """An entry by id: "name" (its default version) or "name@version"."""
        name, _, version = model_id.partition("@")
        return self.get(name, version or None)
