"""Per-room controls (``!start``, ``!stop``, ``!reset``) and ``!help``."""

from __future__ import annotations

import time
from collections.abc import Callable

from ..db.rooms import RoomStore
from .base import CommandContext, CommandTable
from .parser import CommandSpec, ParsedCommand


class RoomCommands:
    def __init__(
        self, rooms: RoomStore, table: CommandTable, on_change: Callable[[str], None]
    ) -> None:
        self.rooms = rooms
        self.table = table
        self._on_change = on_change  # drops cached loop state of the room

    def register(self, table: CommandTable) -> None:
        table.add(CommandSpec("start", "start", "personas answer in this room again"), self.start)
        table.add(
            CommandSpec("stop", "stop", "personas stay silent here (messages still stored)"),
            self.stop,
        )
        table.add(
            CommandSpec("reset", "reset", "the conversation context here starts fresh from now"),
            self.reset,
        )
        table.add(CommandSpec("help", "help", "list the commands you may use"), self.help)

    async def start(self, ctx: CommandContext, cmd: ParsedCommand) -> None:
        await self.rooms.set_active(ctx.room_id, True)
        self._on_change(ctx.room_id)
        await ctx.reply("Personas are active in this room.")

    async def stop(self, ctx: CommandContext, cmd: ParsedCommand) -> None:
        await self.rooms.set_active(ctx.room_id, False)
        self._on_change(ctx.room_id)
        await ctx.reply("Personas are silent in this room until !start.")

    async def reset(self, ctx: CommandContext, cmd: ParsedCommand) -> None:
        await self.rooms.reset_context(ctx.room_id, int(time.time() * 1000))
        self._on_change(ctx.room_id)
        await ctx.reply("Context reset: personas here start fresh from now (history is kept).")

    async def help(self, ctx: CommandContext, cmd: ParsedCommand) -> None:
        await ctx.reply(f"Commands for you ({ctx.role}):\n" + self.table.help_for(ctx.role))
