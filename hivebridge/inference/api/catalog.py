"""What the API serves: every local model by name, and personas as ``persona:<name>``.

A persona model runs on the persona's own local model with its system prompt
put first, the same text the bridge's replies start with, so the engine's
pinned prefix of that persona serves API requests too. Personas come from a
callable the app provides (the inference layer knows nothing of the
database); a persona on a remote model is not served here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from hivebridge.inference.local.models import LoadState, LocalModels
from hivebridge.inference.types import ChatMessage

PERSONA_PREFIX = "persona:"


@dataclass(frozen=True, slots=True)
class PersonaModel:
    """A persona as the API sees it: its system prompt and the local model it runs on
    (None: a remote model, not served by this API)."""

    name: str
    system_prompt: str
    model: str | None
    profile: str | None = None


@dataclass(frozen=True, slots=True)
class Target:
    """Where one request runs: a local model (and profile), maybe behind a persona."""

    id: str  # the model id the client asked for
    model: str
    profile: str | None = None
    system_prompt: str | None = None

    def messages(self, given: tuple[ChatMessage, ...]) -> list[ChatMessage]:
        """The persona's system prompt first (kept byte-stable: its KV prefix is pinned),
        then the client's messages, its own system messages included."""
        if self.system_prompt is None:
            return list(given)
        return [ChatMessage("system", self.system_prompt), *given]


class ApiModels:
    def __init__(
        self,
        local: LocalModels,
        personas: Callable[[], Mapping[str, PersonaModel]] | None = None,
    ) -> None:
        self.local = local
        self._personas = personas or dict

    def target(self, model_id: str) -> Target | None:
        """The target of ``model_id``, or None when no such model is served."""
        if model_id.startswith(PERSONA_PREFIX):
            persona = self._personas().get(model_id.removeprefix(PERSONA_PREFIX))
            if persona is None or persona.model is None or self.local.file(persona.model) is None:
                return None
            return Target(model_id, persona.model, persona.profile, persona.system_prompt)
        if self.local.file(model_id) is None:
            return None
        return Target(model_id, model_id)

    def state(self, target: Target) -> LoadState:
        return self.local.state(target.model)

    def listing(self) -> list[dict[str, object]]:
        """``/v1/models`` entries: local models, then personas on local models."""
        found: list[dict[str, object]] = []
        for f in self.local.files():
            found.append(_entry(f.name, "hivebridge", str(self.local.state(f.name))))
        for name, persona in sorted(self._personas().items()):
            if persona.model is not None and self.local.file(persona.model) is not None:
                entry = _entry(PERSONA_PREFIX + name, "hivebridge-persona", "")
                entry["root"] = persona.model
                entry["state"] = str(self.local.state(persona.model))
                found.append(entry)
        return found


def _entry(model_id: str, owner: str, state: str) -> dict[str, object]:
    return {"id": model_id, "object": "model", "created": 0, "owned_by": owner, "state": state}
