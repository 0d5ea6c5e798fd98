"""The model catalogue: every model name, local or remote, with a stable id and aliases.

A persona's model (or ``!ask``'s) may be written as an id (``3``), an alias
(``fast``) or a name (``smollm2``); :meth:`ModelCatalogue.resolve` turns any of them
into the name the :class:`~hivebridge.inference.router.InferenceRouter` routes by.
Ids and aliases live in the database (``models``, ``aliases``) so they mean the same
model after a restart; which endpoint serves a model is the router's live knowledge,
which local files exist and which are loaded is the local models manager's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .db.catalogue import CatalogueStore
from .inference.local.models import LocalModels, ModelFile
from .inference.router import InferenceRouter
from .inference.types import Backend, GenerationStats

ALIAS_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.:-]{0,63}$")


@dataclass(frozen=True, slots=True)
class ModelEntry:
    """One line of ``!models``."""

    id: int
    name: str
    local: ModelFile | None  # the GGUF file, when the model is local
    endpoints: tuple[str, ...]  # endpoints that list it now
    loaded: bool  # local: in memory; remote: a healthy endpoint serves it
    aliases: tuple[str, ...]
    state: str = ""  # local: loaded, loading, unloading, not loaded
    offloaded_layers: int = 0  # local and loaded: layers on a GPU

    @property
    def local_file(self) -> str | None:
        return self.local.path.name if self.local is not None else None


class ModelCatalogue:
    def __init__(self, store: CatalogueStore, router: InferenceRouter, local: LocalModels) -> None:
        self.store = store
        self.router = router
        self.local = local
        self._ids: dict[str, int] = {}
        self._names: dict[int, str] = {}
        self._aliases: dict[str, int] = {}

    # --- loading and discovery -------------------------------------------------------

    async def load(self) -> None:
        """Read ids and aliases, route the scanned local models, number every known model."""
        for row in await self.store.models():
            self._remember(row.name, row.id)
        self._route_local()
        await self.sync()
        for alias in await self.store.aliases():
            self._aliases[alias.alias] = alias.model_id
            target = self._names.get(alias.model_id)
            if target is not None:
                self.router.set_alias(alias.alias, target)

    def _route_local(self) -> None:
        """Every local file answers its name through the router (loaded on first use)."""
        files = {f.name for f in self.local.files()}
        for name in list(self.router.local_models()):
            if name not in files:
                self.router.remove_local(name)
        for name in files:
            self.router.set_local(name, self.local.backend(name))

    async def discover(self) -> dict[str, str | None]:
        """Rescan local files and ask every endpoint for its models; name -> error or None."""
        await self.local.rescan()
        self._route_local()
        errors = await self.router.refresh()
        await self.sync()
        return errors

    async def sync(self) -> None:
        """Give an id to every model name the router or the local scan knows of."""
        names = [f.name for f in self.local.files()]
        for info in self.router.endpoints():
            names.extend(info.models)
        for name in names:
            if name not in self._ids:
                self._remember(name, await self.store.ensure_model(name))

    def _remember(self, name: str, model_id: int) -> None:
        self._ids[name] = model_id
        self._names[model_id] = name

    # --- lookups ------------------------------------------------------------------------

    def id_of(self, name: str) -> int | None:
        return self._ids.get(name)

    def resolve(self, ref: str) -> str | None:
        """Model name for an id, an alias or a name; None when nothing matches."""
        ref = ref.strip()
        if ref.isdigit():
            return self._names.get(int(ref))
        if ref in self._aliases:
            return self._names.get(self._aliases[ref])
        if ref in self._ids:
            return ref
        lowered = ref.lower()
        matches = {n for n in self._ids if n.lower() == lowered}
        matches |= {
            name
            for a, i in self._aliases.items()
            if a.lower() == lowered and (name := self._names.get(i)) is not None
        }
        return matches.pop() if len(matches) == 1 else None

    def model_of(self, stats: GenerationStats, default: str) -> str:
        """Catalogue name of the model that answered (a local backend has its own names)."""
        if stats.backend.startswith("local:"):
            name = stats.backend.removeprefix("local:")
            if self.local.file(name) is not None:
                return name
        return stats.model or default

    def backend_for(self, ref: str, profile: str | None = None) -> Backend:
        """A backend for a persona's model; an unknown ref still routes (to the fallback).

        A local model on a profile with an engine of its own is served by that engine.
        """
        name = self.resolve(ref) or ref
        local = None
        if profile and self.local.file(name) is not None and self.local.engine_profile(profile):
            local = self.local.backend(name, profile)
        return self.router.for_model(name, local=local)

    def entries(self) -> list[ModelEntry]:
        serving: dict[str, list[str]] = {}
        healthy: set[str] = set()
        for info in self.router.endpoints():
            for model in info.models:
                serving.setdefault(model, []).append(info.name)
                if info.healthy:
                    healthy.add(model)
        aliases: dict[int, list[str]] = {}
        for alias, model_id in sorted(self._aliases.items()):
            aliases.setdefault(model_id, []).append(alias)
        engines = self.local.engines()
        out = []
        for model_id, name in sorted(self._names.items()):
            file = self.local.file(name)
            state = str(self.local.state(name)) if file is not None else ""
            engine = engines.get(name)
            out.append(
                ModelEntry(
                    id=model_id,
                    name=name,
                    local=file,
                    endpoints=tuple(serving.get(name, ())),
                    loaded=state == "loaded" or name in healthy,
                    aliases=tuple(aliases.get(model_id, ())),
                    state=state,
                    offloaded_layers=engine.offloaded_layers if engine is not None else 0,
                )
            )
        return out

    def aliases(self) -> list[tuple[str, int, str]]:
        """(alias, model id, model name), sorted by alias."""
        return [
            (alias, model_id, self._names.get(model_id, "?"))
            for alias, model_id in sorted(self._aliases.items())
        ]

    # --- aliases ------------------------------------------------------------------------

    async def set_alias(self, alias: str, ref: str, created_by: str | None) -> tuple[int, str]:
        """Point ``alias`` at the model ``ref`` names; returns (id, name).

        Raises ValueError with a message fit for the room.
        """
        if not ALIAS_RE.match(alias):
            raise ValueError(
                "An alias starts with a letter and uses only letters, digits and _ . : - "
                "(at most 64)."
            )
        if alias in self._ids:
            raise ValueError(f"{alias!r} is already a model name.")
        name = self.resolve(ref)
        if name is None:
            raise ValueError(f"No model {ref[:60]!r}.")
        model_id = self._ids[name]
        await self.store.set_alias(alias, model_id, created_by)
        self._aliases[alias] = model_id
        self.router.set_alias(alias, name)
        return model_id, name

    async def remove_alias(self, alias: str) -> bool:
        if alias not in self._aliases:
            return False
        await self.store.remove_alias(alias)
        del self._aliases[alias]
        self.router.remove_alias(alias)
        return True
