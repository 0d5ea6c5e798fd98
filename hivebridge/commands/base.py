"""Running a parsed command: roles, a reply line, and no traceback ever in a room."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal

from ..config import Config
from ..permissions import Role, role_allows
from .parser import CommandError, CommandSpec, ParsedCommand, format_help, parse

log = logging.getLogger("hivebridge.commands")

Reply = Callable[[str], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class CommandContext:
    """Who asked, where, and how to answer (as the bot, with an m.notice)."""

    room_id: str
    sender: str
    role: Role
    event_id: str
    reply: Reply
    #: The configured command prefix, for every command a reply shows.
    prefix: str = "!"

    @property
    def trusted(self) -> bool:
        """Trusted or owner: may see endpoint URLs and keys, who uses the bridge, and where
        personas are; plain users see names and health only."""
        return role_allows(self.role, "trusted")


Handler = Callable[[CommandContext, ParsedCommand], Awaitable[None]]


#: What went wrong, for a caller outside a room (the admin API answers a status for it).
ErrorKind = Literal["invalid", "not_found", "conflict", "failed"]


class UserError(Exception):
    """A problem with what the user asked; its text is the whole reply."""

    def __init__(self, message: str, kind: ErrorKind = "invalid") -> None:
        super().__init__(message)
        self.kind: ErrorKind = kind


@dataclass
class CommandTable:
    """Command specs and their handlers; a command group registers itself here."""

    prefix: str = "!"
    specs: dict[str, CommandSpec] = field(default_factory=dict)
    handlers: dict[str, Handler] = field(default_factory=dict)

    def add(self, spec: CommandSpec, handler: Handler) -> None:
        self.specs[spec.name] = spec
        self.handlers[spec.name] = handler

    async def apply_config(self, config: Config) -> None:
        """A reloaded command prefix holds from the next message."""
        self.prefix = config.routing.command_prefix

    def help_for(self, role: Role) -> str:
        return format_help(list(self.specs.values()), self.prefix, role)

    def is_command(self, body: str) -> bool:
        return body.startswith(self.prefix)

    async def run(self, ctx: CommandContext, body: str) -> bool:
        """Handle ``body`` if it is a command; False when it is not one."""
        parsed = parse(body, list(self.specs.values()), self.prefix)
        if parsed is None:
            return False
        if isinstance(parsed, CommandError):
            await ctx.reply(str(parsed))
            return True
        if not role_allows(ctx.role, parsed.min_role):
            await ctx.reply(
                f"{self.prefix}{parsed.label} needs the {parsed.min_role} role "
                f"(you are {ctx.role})."
            )
            return True
        try:
            await self.handlers[parsed.name](ctx, parsed)
        except UserError as e:
            await ctx.reply(str(e))
        except Exception:
            log.exception("command %s failed", parsed.label, extra={"room_id": ctx.room_id})
            await ctx.reply(
                f"{self.prefix}{parsed.label} failed; the details are in the bridge log."
            )
        return True
