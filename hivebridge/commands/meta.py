"""``!help``: the commands the asker's role may run, with the configured prefix."""

from __future__ import annotations

from .base import CommandContext, CommandTable
from .parser import CommandSpec, ParsedCommand


class MetaCommands:
    def __init__(self, table: CommandTable) -> None:
        self.table = table

    def register(self, table: CommandTable) -> None:
        table.add(CommandSpec("help", "help", "list the commands you may use"), self.help)

    async def help(self, ctx: CommandContext, cmd: ParsedCommand) -> None:
        await ctx.reply(f"Commands for you ({ctx.role}):\n" + self.table.help_for(ctx.role))
