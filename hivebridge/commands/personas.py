"""``!persona …``: spawn, despawn, list, show, set, invite."""

from __future__ import annotations

import json
import re
import time

from ..db.personas import Persona
from ..personas.directory import PersonaDirectory
from ..personas.lifecycle import PersonaLifecycle, SpawnError
from .base import CommandContext, CommandTable, UserError
from .parser import ActionSpec, CommandSpec, OptionSpec, ParsedCommand, normalize_persona_name

_MXC = re.compile(r"^mxc://[^/\s]+/[^/\s]+$")
# Room ids of room version 12 have no server part (MSC4291).
_ROOM = re.compile(r"^(![^\s]+|#[^:\s]+:[^\s]+)$")
SETTABLE = ("prompt", "model", "display", "traits", "avatar")


class PersonaCommands:
    def __init__(self, directory: PersonaDirectory, lifecycle: PersonaLifecycle) -> None:
        self.directory = directory
        self.lifecycle = lifecycle

    def register(self, table: CommandTable) -> None:
        spawn_usage = (
            'persona spawn <name> [--display "Name"] [--prompt "…"] [--model X] [--room <room>]'
        )
        table.add(
            CommandSpec(
                name="persona",
                usage="persona spawn|despawn|list|show|set|invite …",
                help="manage personas",
                optional_args=("action", "name", "field"),
                rest="value",
                flags=(
                    OptionSpec("display", help="display name"),
                    OptionSpec("prompt", help="system prompt"),
                    OptionSpec("model", help="model id, alias or name"),
                    OptionSpec("room", help="room id or alias to join"),
                ),
                actions=(
                    ActionSpec("spawn", spawn_usage, "a new persona, in a room", "trusted"),
                    ActionSpec("despawn", "persona despawn <name>", "remove a persona", "trusted"),
                    ActionSpec("list", "persona list", "the personas"),
                    ActionSpec("show", "persona show <name>", "one persona's settings"),
                    ActionSpec(
                        "set",
                        f"persona set <name> {'|'.join(SETTABLE)} <value>",
                        "change a persona",
                        "trusted",
                    ),
                    ActionSpec(
                        "invite", "persona invite <name> <room>", "bring it into a room", "trusted"
                    ),
                ),
            ),
            self.run,
        )

    async def run(self, ctx: CommandContext, cmd: ParsedCommand) -> None:
        assert cmd.action is not None  # the parser insists on one
        handler = {
            "spawn": self.spawn,
            "despawn": self.despawn,
            "list": self.list,
            "show": self.show,
            "set": self.set,
            "invite": self.invite,
        }[cmd.action.name]
        await handler(ctx, cmd)

    def _name(self, ctx: CommandContext, cmd: ParsedCommand) -> str:
        raw = cmd.args.get("name")
        if not raw:
            raise UserError(f"Give a persona name, e.g. {ctx.prefix}persona show ada")
        check = normalize_persona_name(raw)
        if check.name is None:
            raise UserError(check.error or "Bad persona name.")
        return check.name

    def _persona(self, ctx: CommandContext, cmd: ParsedCommand) -> Persona:
        name = self._name(ctx, cmd)
        persona = self.directory.get(self.directory.config.persona_mxid(name))
        if persona is None:
            raise UserError(f"No persona named {name!r}; {ctx.prefix}persona list shows them.")
        return persona

    async def _room(self, raw: str) -> str:
        if not _ROOM.match(raw):
            raise UserError(f"{raw!r} is not a room id (!…) or alias (#…:server).")
        if raw.startswith("#"):
            try:
                info = await self.directory.appservice.intent.resolve_room_alias(raw)  # type: ignore[arg-type]
            except Exception:
                raise UserError(f"Room alias {raw} not found.") from None
            return str(info.room_id)
        return raw

    async def spawn(self, ctx: CommandContext, cmd: ParsedCommand) -> None:
        name = self._name(ctx, cmd)
        if cmd.rest:
            raise UserError(f"Unexpected text {cmd.rest[:40]!r}; quote values with spaces.")
        if self.directory.get(self.directory.config.persona_mxid(name)) or name == "bot":
            raise UserError(f"The name {name!r} is taken.")
        room = cmd.flags.get("room")
        room_id = await self._room(str(room)) if room else None
        prompt = str(cmd.flags.get("prompt") or f"You are {cmd.flags.get('display') or name}.")
        started = time.monotonic()
        try:
            persona, where = await self.lifecycle.spawn(
                name,
                displayname=str(cmd.flags["display"]) if cmd.flags.get("display") else None,
                system_prompt=prompt,
                model=str(cmd.flags["model"]) if cmd.flags.get("model") else None,
                room_id=room_id,
                created_by=ctx.sender,
            )
        except SpawnError as e:
            raise UserError(f"Could not spawn {name}: {e}") from None
        took = time.monotonic() - started
        await ctx.reply(
            f"Spawned {persona.displayname} ({persona.mxid}) in {where} in {took:.2f}s."
        )

    async def despawn(self, ctx: CommandContext, cmd: ParsedCommand) -> None:
        persona = self._persona(ctx, cmd)
        rooms = await self.lifecycle.despawn(persona)
        await ctx.reply(f"Despawned {persona.name}; it left {len(rooms)} room(s).")

    async def list(self, ctx: CommandContext, cmd: ParsedCommand) -> None:
        personas = self.directory.all()
        if not personas:
            await ctx.reply(f"No personas yet; {ctx.prefix}persona spawn <name> makes one.")
            return
        lines = [
            f"{p.name} — {p.displayname} ({p.mxid}), model {p.model or 'default'}" for p in personas
        ]
        await ctx.reply("Personas:\n" + "\n".join(lines))

    async def show(self, ctx: CommandContext, cmd: ParsedCommand) -> None:
        p = self._persona(ctx, cmd)
        rooms = await self.directory.store.rooms_of(p.name)
        await ctx.reply(
            f"{p.displayname} ({p.mxid})\nmodel: {p.model or 'default'}\n"
            f"prompt: {p.system_prompt}\ntraits: {json.dumps(p.traits, ensure_ascii=False)}\n"
            f"avatar: {p.avatar_url or '-'}\nrooms: {', '.join(rooms) or '-'}\n"
            f"created by {p.created_by or '-'}"
        )

    async def set(self, ctx: CommandContext, cmd: ParsedCommand) -> None:
        p = self._persona(ctx, cmd)
        field = (cmd.args.get("field") or "").lower()
        value = (cmd.rest or "").strip()
        if field not in SETTABLE or not value:
            raise UserError(f"Usage: {ctx.prefix}{cmd.action.usage if cmd.action else ''}")
        intent = self.directory.intent(p)
        if field == "prompt":
            p = _replace(p, system_prompt=value)
        elif field == "model":
            p = _replace(p, model=value)
        elif field == "display":
            await intent.set_displayname(value)
            p = _replace(p, displayname=value)
        elif field == "traits":
            try:
                traits = json.loads(value)
            except json.JSONDecodeError:
                raise UserError('traits must be a JSON object, e.g. {"openness": 0.8}') from None
            if not isinstance(traits, dict):
                raise UserError('traits must be a JSON object, e.g. {"openness": 0.8}')
            p = _replace(p, traits=traits)
        else:
            if not _MXC.match(value):
                raise UserError("avatar must be an mxc:// URL (upload the image first).")
            await intent.set_avatar_url(value)  # type: ignore[arg-type]
            p = _replace(p, avatar_url=value)
        await self.directory.store.update(p)
        self.directory.remember(p)
        await ctx.reply(f"Set {field} of {p.name}.")

    async def invite(self, ctx: CommandContext, cmd: ParsedCommand) -> None:
        p = self._persona(ctx, cmd)
        raw = cmd.args.get("field") or (cmd.rest or "").strip()
        if not raw:
            raise UserError(f"Usage: {ctx.prefix}persona invite <name> <room id or alias>")
        room_id = await self._room(raw)
        try:
            await self.lifecycle.invite(p, room_id)
        except Exception as e:
            raise UserError(f"{p.name} could not join {raw}: {str(e)[:120]}") from None
        await ctx.reply(f"{p.displayname} joined {raw}.")


def _replace(p: Persona, **changes: object) -> Persona:
    from dataclasses import replace

    return replace(p, **changes)  # type: ignore[arg-type]
