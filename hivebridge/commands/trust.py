"""``!trust`` / ``!untrust`` (owners only)."""

from __future__ import annotations

import re

from ..permissions import Roles
from .base import CommandContext, CommandTable, UserError
from .parser import CommandSpec, ParsedCommand

_MXID = re.compile(r"^@[^:\s]+:[^\s]+$")


class TrustCommands:
    def __init__(self, roles: Roles) -> None:
        self.roles = roles

    def register(self, table: CommandTable) -> None:
        table.add(
            CommandSpec(
                "trust", "trust <mxid>", "let a user manage personas", "owner", args=("mxid",)
            ),
            self.trust,
        )
        table.add(
            CommandSpec("untrust", "untrust <mxid>", "take trust back", "owner", args=("mxid",)),
            self.untrust,
        )

    def _mxid(self, cmd: ParsedCommand) -> str:
        mxid = cmd.args["mxid"]
        if not _MXID.match(mxid):
            raise UserError(f"{mxid[:60]!r} is not a user id like @alice:example.org")
        return mxid

    async def trust(self, ctx: CommandContext, cmd: ParsedCommand) -> None:
        mxid = self._mxid(cmd)
        added = await self.roles.trust(mxid, ctx.sender)
        await ctx.reply(f"{mxid} is trusted." if added else f"{mxid} was already trusted.")

    async def untrust(self, ctx: CommandContext, cmd: ParsedCommand) -> None:
        mxid = self._mxid(cmd)
        removed = await self.roles.untrust(mxid)
        role = self.roles.role_of(mxid)
        note = f" (still {role} by config)" if role != "user" else ""
        await ctx.reply(
            f"{mxid} is no longer trusted{note}."
            if removed
            else f"{mxid} was not trusted here{note}."
        )
