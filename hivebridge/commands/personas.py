"""``!persona …``: spawn, despawn, list, show, set, invite.

The checks and answers of spawn, despawn and show are methods that need no
room (:meth:`PersonaCommands.spawn_persona` …), so the admin API gives the
same answers to the same mistakes as the room does.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass

from ..conversation import render_traits
from ..db.personas import Persona
from ..personas.directory import PersonaDirectory
from ..personas.display_names import display_name_problem
from ..personas.lifecycle import PersonaLifecycle, SpawnError
from ..personas.tools.toolbox import Toolbox
from .base import CommandContext, CommandTable, UserError
from .parser import ActionSpec, CommandSpec, OptionSpec, ParsedCommand, normalize_persona_name

_MXC = re.compile(r"^mxc://[^/\s]+/[^/\s]+$")
# Room ids of room version 12 have no server part (MSC4291).
_ROOM = re.compile(r"^(![^\s]+|#[^:\s]+:[^\s]+)$")
_USER = re.compile(r"^@[^:\s]+:[^\s]+$")
SETTABLE = ("prompt", "model", "profile", "display", "traits", "avatar", "tools", "tool_choice")
#: Traits are a small JSON object: a few dozen keys at most, each short.
MAX_TRAITS_CHARS = 2000


@dataclass(frozen=True, slots=True)
class Spawned:
    persona: Persona
    room_id: str | None
    took_s: float

    @property
    def text(self) -> str:
        """The answer to a spawn, in a room or from the admin API."""
        p = self.persona
        if self.room_id is None:
            return (
                f"Spawned {p.displayname} ({p.mxid}) in {self.took_s:.2f}s; "
                "it is in no room yet: invite it to one."
            )
        return f"Spawned {p.displayname} ({p.mxid}) in {self.room_id} in {self.took_s:.2f}s."


class PersonaCommands:
    def __init__(
        self,
        directory: PersonaDirectory,
        lifecycle: PersonaLifecycle,
        toolbox: Toolbox | None = None,
    ) -> None:
        self.directory = directory
        self.lifecycle = lifecycle
        self.toolbox = toolbox

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

    # Checks and operations that need no room (the admin API runs them too) ---------

    def persona_name(self, raw: str | None, prefix: str) -> str:
        """A valid persona name from what was typed, or a :class:`UserError` saying why not."""
        if not raw:
            raise UserError(f"Give a persona name, e.g. {prefix}persona show ada")
        check = normalize_persona_name(raw)
        if check.name is None:
            raise UserError(check.error or "Bad persona name.")
        return check.name

    def find(self, raw: str | None, prefix: str) -> Persona:
        name = self.persona_name(raw, prefix)
        persona = self.directory.get(self.directory.config.persona_mxid(name))
        if persona is None:
            raise UserError(
                f"No persona named {name!r}; {prefix}persona list shows them.", "not_found"
            )
        return persona

    async def room_id(self, raw: str) -> str:
        """A room id from a room id or an alias (resolved by the bot)."""
        if not _ROOM.match(raw):
            raise UserError(f"{raw!r} is not a room id (!…) or alias (#…:server).")
        if raw.startswith("#"):
            try:
                info = await self.directory.appservice.intent.resolve_room_alias(raw)  # type: ignore[arg-type]
            except Exception:
                raise UserError(f"Room alias {raw} not found.", "not_found") from None
            return str(info.room_id)
        return raw

    async def spawn_persona(
        self,
        raw_name: str | None,
        *,
        display: str | None,
        prompt: str | None,
        model: str | None,
        room: str | None,
        created_by: str,
        dm_with: str | None,
        prefix: str,
    ) -> Spawned:
        """Spawn into ``room`` (id or alias), else a direct chat with ``dm_with``, else no room."""
        name = self.persona_name(raw_name, prefix)
        if self.directory.get(self.directory.config.persona_mxid(name)) or name == "bot":
            raise UserError(f"The name {name!r} is taken.", "conflict")
        if display:
            self._check_display(display)
        if dm_with is not None and not _USER.match(dm_with):
            raise UserError(f"{dm_with[:60]!r} is not a user id (@user:server).")
        room_id = await self.room_id(room) if room else None
        started = time.monotonic()
        try:
            persona, where = await self.lifecycle.spawn(
                name,
                displayname=display or None,
                system_prompt=prompt or f"You are {display or name}.",
                model=model or None,
                room_id=room_id,
                created_by=created_by,
                dm_with=dm_with,
            )
        except SpawnError as e:
            raise UserError(f"Could not spawn {name}: {e}", "failed") from None
        return Spawned(persona, where, time.monotonic() - started)

    def _check_display(self, display: str) -> None:
        """Refuse invisible or direction-changing characters and the bot's lookalikes."""
        appservice = self.directory.config.appservice
        problem = display_name_problem(
            display, (appservice.bot_displayname, appservice.bot_localpart)
        )
        if problem is not None:
            raise UserError(problem)

    async def despawn_persona(self, raw_name: str | None, prefix: str) -> tuple[Persona, str]:
        """Despawn; returns the persona and the answer to show."""
        persona = self.find(raw_name, prefix)
        rooms = await self.lifecycle.despawn(persona)
        return persona, f"Despawned {persona.name}; it left {len(rooms)} room(s)."

    async def describe(self, p: Persona, *, full: bool = True) -> str:
        """What ``persona show`` answers; ``full=False`` (plain users) counts its rooms
        instead of naming them (a room id is a way into a room)."""
        rooms = await self.directory.store.rooms_of(p.name)
        where = ", ".join(rooms) if full else (str(len(rooms)) if rooms else "")
        traits = render_traits(p.traits) or "-"
        return (
            f"{p.displayname} ({p.mxid})\nmodel: {p.model or 'default'}\n"
            f"profile: {p.profile or 'default'}\n"
            f"prompt: {p.system_prompt}\ntraits:\n{traits}\n"
            f"{self._tools_line(p)}\n"
            f"avatar: {p.avatar_url or '-'}\nrooms: {where or '-'}\n"
            f"created by {p.created_by or '-'}"
        )

    # The room's side -------------------------------------------------------------------

    def _name(self, ctx: CommandContext, cmd: ParsedCommand) -> str:
        return self.persona_name(cmd.args.get("name"), ctx.prefix)

    def _persona(self, ctx: CommandContext, cmd: ParsedCommand) -> Persona:
        return self.find(cmd.args.get("name"), ctx.prefix)

    async def spawn(self, ctx: CommandContext, cmd: ParsedCommand) -> None:
        self._name(ctx, cmd)
        if cmd.rest:
            raise UserError(f"Unexpected text {cmd.rest[:40]!r}; quote values with spaces.")
        flags = {k: str(v) for k, v in cmd.flags.items() if v}
        spawned = await self.spawn_persona(
            cmd.args.get("name"),
            display=flags.get("display"),
            prompt=flags.get("prompt"),
            model=flags.get("model"),
            room=flags.get("room"),
            created_by=ctx.sender,
            dm_with=ctx.sender,
            prefix=ctx.prefix,
        )
        await ctx.reply(spawned.text)

    async def despawn(self, ctx: CommandContext, cmd: ParsedCommand) -> None:
        _, text = await self.despawn_persona(cmd.args.get("name"), ctx.prefix)
        await ctx.reply(text)

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
        await ctx.reply(await self.describe(self._persona(ctx, cmd), full=ctx.trusted))

    def _tools_line(self, p: Persona) -> str:
        if self.toolbox is None:
            return "tools: -"
        names = self.toolbox.names_for(p)
        shown = ", ".join(names) or "none"
        if p.tools is None:
            shown += " (the default)"
        return f"tools: {shown}\ntool choice: {p.tool_choice or 'auto'}"

    def _parse_tools(self, ctx: CommandContext, value: str) -> tuple[str, ...] | None:
        """``a,b`` / ``none`` / ``default`` (None: follow the config's default)."""
        assert self.toolbox is not None
        word = value.strip().lower()
        if word == "default":
            return None
        if word == "none":
            return ()
        names = tuple(dict.fromkeys(n.strip() for n in value.replace(" ", ",").split(",") if n))
        unknown = self.toolbox.registry.unknown(names)
        if unknown:
            known = ", ".join(self.toolbox.registry.names())
            raise UserError(
                f"No tool named {unknown[0][:40]!r}. Tools: {known} ({ctx.prefix}tools)."
            )
        return names

    def _parse_choice(self, p: Persona, value: str) -> str | None:
        word = value.strip()
        if word.lower() == "auto":
            return None
        if word.lower() == "required":
            return "required"
        assert self.toolbox is not None
        if word not in self.toolbox.names_for(p):
            raise UserError(
                f"tool_choice is auto, required, or one of {p.name}'s tools "
                f"({', '.join(self.toolbox.names_for(p)) or 'it has none'})."
            )
        return word

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
        elif field == "profile":
            p = _replace(p, profile=self._profile(ctx, value))
        elif field == "display":
            self._check_display(value)
            await intent.set_displayname(value)
            p = _replace(p, displayname=value)
        elif field in ("tools", "tool_choice") and self.toolbox is None:
            raise UserError("Tools are not available in this bridge.")
        elif field == "tools":
            p = _replace(p, tools=self._parse_tools(ctx, value))
        elif field == "tool_choice":
            p = _replace(p, tool_choice=self._parse_choice(p, value))
        elif field == "traits":
            try:
                traits = json.loads(value)
            except json.JSONDecodeError:
                raise UserError('traits must be a JSON object, e.g. {"openness": 0.8}') from None
            if not isinstance(traits, dict):
                raise UserError('traits must be a JSON object, e.g. {"openness": 0.8}')
            if len(render_traits(traits)) > MAX_TRAITS_CHARS:
                raise UserError(
                    f"traits are at most {MAX_TRAITS_CHARS} characters once written out."
                )
            p = _replace(p, traits=traits)
        else:
            if not _MXC.match(value):
                raise UserError("avatar must be an mxc:// URL (upload the image first).")
            await intent.set_avatar_url(value)  # type: ignore[arg-type]
            p = _replace(p, avatar_url=value)
        await self.directory.store.update(p)
        self.directory.remember(p)
        await ctx.reply(f"Set {field} of {p.name}.")

    def _profile(self, ctx: CommandContext, value: str) -> str | None:
        """A configured profile's name; ``default`` puts the persona back on none."""
        if value.lower() in ("default", "none", "-"):
            return None
        inference = self.directory.config.inference
        if inference.profile(value) is None:
            known = ", ".join(p.name for p in inference.profiles) or "none are configured"
            raise UserError(f"No worker profile {value[:40]!r} ({known}); {ctx.prefix}profiles.")
        return value

    async def invite(self, ctx: CommandContext, cmd: ParsedCommand) -> None:
        p = self._persona(ctx, cmd)
        raw = cmd.args.get("field") or (cmd.rest or "").strip()
        if not raw:
            raise UserError(f"Usage: {ctx.prefix}persona invite <name> <room id or alias>")
        room_id = await self.room_id(raw)
        try:
            await self.lifecycle.invite(p, room_id)
        except Exception as e:
            raise UserError(f"{p.name} could not join {raw}: {str(e)[:120]}") from None
        await ctx.reply(f"{p.displayname} joined {raw}.")


def _replace(p: Persona, **changes: object) -> Persona:
    from dataclasses import replace

    return replace(p, **changes)  # type: ignore[arg-type]
