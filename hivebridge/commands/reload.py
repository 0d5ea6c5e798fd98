"""``!reload_config``: read the config file again without a restart (what SIGHUP does)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from ..reload import ReloadOutcome
from .base import CommandContext, CommandTable
from .parser import CommandSpec, ParsedCommand


class ReloadCommands:
    def __init__(self, reload: Callable[[], Awaitable[ReloadOutcome]]) -> None:
        self._reload = reload

    def register(self, table: CommandTable) -> None:
        table.add(
            CommandSpec(
                "reload_config",
                "reload_config",
                "read the config file again: limits, permissions, routing, endpoints, …",
                "owner",
            ),
            self.reload_config,
        )

    async def reload_config(self, ctx: CommandContext, cmd: ParsedCommand) -> None:
        outcome = await self._reload()
        await ctx.reply(outcome.line)
