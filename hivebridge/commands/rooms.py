"""Per-room controls: ``!start``, ``!stop``, ``!reset``."""

from __future__ import annotations

import time
from collections.abc import Callable

from ..db.rooms import RoomStore
from .base import CommandContext, CommandTable
from .parser import CommandSpec, ParsedCommand


class RoomCommands:
    def __init__(self, rooms: RoomStore, on_change: Callable[[str], None]) -> None:
        self.rooms = rooms
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

    async def start(self, ctx: CommandContext, cmd: ParsedCommand) -> None:
        await self.rooms.set_active(ctx.room_id, True)
        self._on_change(ctx.room_id)
        await ctx.reply("Personas are active in this room.")

    async def stop(self, ctx: CommandContext, cmd: ParsedCommand) -> None:
        await self.rooms.set_active(ctx.room_id, False)
        self._on_change(ctx.room_id)
        await ctx.reply(f"Personas are silent in this room until {ctx.prefix}start.")

    async def reset(self, ctx: CommandContext, cmd: ParsedCommand) -> None:
        await self.rooms.reset_context(ctx.room_id, int(time.time() * 1000))
        self._on_change(ctx.room_id)
        await ctx.reply("Context reset: personas here start fresh from now (history is kept).")
