"""Which tools a persona has, and what each step of its reply may do with them."""

from __future__ import annotations

from ...config import ToolsConfig
from ...db.personas import Persona
from ...inference.types import AUTO, NONE, REQUIRED, ToolSpec
from .approvals import Approvals
from .registry import ToolRegistry
from .runner import ToolRunner


class Toolbox:
    """The registry, the runner and the approvals, with the config's defaults."""

    def __init__(self, config: ToolsConfig, registry: ToolRegistry, approvals: Approvals) -> None:
        self.config = config
        self.registry = registry
        self.approvals = approvals
        self.runner = ToolRunner(
            registry,
            approvals,
            timeout_s=config.timeout_s,
            approval_timeout_s=config.approval_timeout_s,
            max_result_chars=config.max_result_chars,
        )

    def names_for(self, persona: Persona) -> list[str]:
        """The persona's tools (its own list, else the config's default) that exist."""
        names = persona.tools if persona.tools is not None else self.config.default
        return [n for n in names if self.registry.get(n) is not None]

    def specs_for(self, persona: Persona) -> tuple[ToolSpec, ...]:
        return self.registry.specs(self.names_for(persona))

    def choice(self, persona: Persona, hop: int, names: list[str]) -> str:
        """``tool_choice`` for step ``hop`` (0 = first) of a reply.

        After ``max_hops`` rounds of calls the persona must answer. A persona
        whose tool_choice is ``required`` or a tool's name must call (that
        tool) first, and then answer: one round of tools, for models too small
        to decide when to call one.
        """
        if hop >= self.config.max_hops or not names:
            return NONE
        forced = persona.tool_choice
        if forced in (None, "", AUTO):
            return AUTO
        if hop > 0:
            return NONE
        if forced == REQUIRED or forced in names:
            return forced
        return AUTO  # a forced tool the persona no longer has
