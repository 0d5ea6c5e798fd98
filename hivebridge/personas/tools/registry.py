"""The tool registry: each tool a name, a description, an argument schema and a coroutine.

A tool is data plus one async function; what it may touch it gets from its
closure (a store, an HTTP session, config), what the call is about from its
:class:`ToolContext` (the asking room, never another). It returns text for
the model; a refusal or failure it can explain is a :class:`ToolError`, whose
text the model sees. Anything else it raises is caught by the runner.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ...inference.types import AUTO, NONE, REQUIRED, ToolSpec

_NAME = re.compile(r"^[a-z][a-z0-9_]{0,47}$")
#: Words of tool_choice that no tool may be called.
RESERVED = frozenset({AUTO, NONE, REQUIRED, "default"})


class ToolError(Exception):
    """A tool's refusal or failure, phrased for the model that called it."""


@dataclass(frozen=True, slots=True)
class ToolContext:
    """What a call is about: the room it was asked in, by whom, as which persona."""

    room_id: str
    persona: str  # persona name
    sender: str  # the user whose message is being answered
    event_id: str  # that message


ToolFn = Callable[[Mapping[str, Any], ToolContext], Awaitable[str]]


@dataclass(frozen=True, slots=True)
class Tool:
    name: str
    description: str
    parameters: Mapping[str, Any]  # JSON schema of the argument object
    run: ToolFn
    #: Seconds before the call is given up (None: the config's tools.timeout_s).
    timeout_s: float | None = None
    #: Changes something outside the bridge: runs only once a trusted user approves.
    side_effects: bool = False
    #: The room's notice while it runs ("checking the weather in London…").
    notice: Callable[[Mapping[str, Any]], str] | None = None

    def spec(self) -> ToolSpec:
        return ToolSpec(self.name, self.description, self.parameters)

    def describe(self, arguments: Mapping[str, Any]) -> str:
        """The notice for a call, falling back to the tool's name and arguments."""
        if self.notice is not None:
            try:
                return self.notice(arguments)
            except Exception:  # a notice is cosmetic: never fail a call over it
                pass
        shown = ", ".join(f"{k}={str(v)[:40]}" for k, v in arguments.items())
        return f"using {self.name}({shown})…"


class ToolRegistry:
    """The tools the bridge knows, by name; a persona's list picks from these."""

    def __init__(self, tools: Iterable[Tool] = ()) -> None:
        self._tools: dict[str, Tool] = {}
        for tool in tools:
            self.register(tool)

    def register(self, tool: Tool) -> None:
        if not _NAME.match(tool.name) or tool.name in RESERVED:
            raise ValueError(f"bad tool name {tool.name!r}: a-z 0-9 _, starting a-z")
        if tool.parameters.get("type") != "object":
            raise ValueError(f"tool {tool.name}: parameters must be a JSON schema of type object")
        if tool.name in self._tools:
            raise ValueError(f"tool {tool.name} is registered twice")
        self._tools[tool.name] = tool

    def unregister(self, name: str) -> None:
        self._tools.pop(name, None)

    def get(self, name: str) -> Tool | None:
        return self._tools.get(name)

    def names(self) -> list[str]:
        return sorted(self._tools)

    def all(self) -> list[Tool]:
        return [self._tools[n] for n in self.names()]

    def unknown(self, names: Iterable[str]) -> list[str]:
        return [n for n in names if n not in self._tools]

    def specs(self, names: Iterable[str]) -> tuple[ToolSpec, ...]:
        """The specs of ``names`` that exist, in the given order (a stable prompt)."""
        return tuple(t.spec() for n in names if (t := self._tools.get(n)) is not None)
