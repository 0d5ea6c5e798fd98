"""Conversation memory controls: ``!context``, ``!summary``, ``!rollback``, ``!mode``.

They show and steer what the next prompt holds, using the very code that
builds prompts (:meth:`ConversationHistory.chapter` and
:meth:`ConversationHistory.next_prompt`), so what they report is what the model
gets. ``!rollback`` only flags messages out of the context: the room keeps its
history, and the stored rows stay.
"""

from __future__ import annotations

import time

from ..conversation import rollback
from ..db.messages import MessageStore
from ..db.personas import Persona
from ..db.rooms import RoomStore
from ..inference.envelope import tool_instructions
from ..matrix.members import RoomMembers
from ..personas.directory import PersonaDirectory
from ..personas.history import ConversationHistory
from ..personas.tools.toolbox import Toolbox
from .base import CommandContext, CommandTable, UserError
from .parser import CommandSpec, ParsedCommand, normalize_persona_name

MODES = ("room", "thread")
#: More than this many exchanges at once is almost surely a typo.
MAX_ROLLBACK = 50


def _mode_usage(prefix: str) -> str:
    return f"Usage: {prefix}mode room|thread"


def _rollback_usage(prefix: str) -> str:
    return f"Usage: {prefix}rollback [n] (n = exchanges to forget, 1-{MAX_ROLLBACK}; default 1)"


def _context_usage(prefix: str) -> str:
    return f"Usage: {prefix}context [persona]"


class ContextCommands:
    def __init__(
        self,
        history: ConversationHistory,
        rooms: RoomStore,
        messages: MessageStore,
        personas: PersonaDirectory,
        members: RoomMembers,
        toolbox: Toolbox | None = None,
    ) -> None:
        self.toolbox = toolbox
        self.history = history
        self.rooms = rooms
        self.messages = messages
        self.personas = personas
        self.members = members

    def register(self, table: CommandTable) -> None:
        table.add(
            CommandSpec(
                "context",
                "context [persona]",
                "token use of the next prompt: system, summary, turns",
                optional_args=("persona",),
            ),
            self.context,
        )
        table.add(
            CommandSpec("summary", "summary", "show the chapter summary of this conversation"),
            self.summary,
        )
        table.add(
            CommandSpec(
                "rollback",
                "rollback [n]",
                "forget the last n exchanges (default 1); the messages stay in the room",
                optional_args=("n",),
            ),
            self.rollback,
        )
        table.add(
            CommandSpec(
                "mode",
                "mode room|thread",
                "threads share the room's context (room) or each keep their own (thread)",
                optional_args=("mode",),
            ),
            self.mode,
        )

    async def _thread_root(self, ctx: CommandContext) -> str | None:
        """The thread the command was sent in: in thread mode, its context is meant."""
        msg = await self.messages.get(ctx.event_id)
        return msg.thread_root if msg else None

    async def context(self, ctx: CommandContext, cmd: ParsedCommand) -> None:
        members = await self.members.joined(ctx.room_id)
        persona = self._persona(ctx, cmd.args.get("persona"), members)
        prompt, chapter = await self.history.next_prompt(
            persona, ctx.room_id, await self._thread_root(ctx), group=len(members) > 2
        )
        used = prompt.system_tokens + prompt.summary_tokens + prompt.turns_tokens
        lines = [
            f"Next prompt for {persona.displayname}: {used} of {prompt.budget} tokens "
            "(before the new message)",
            f"• system: {prompt.system_tokens}",
            f"• summary: {prompt.summary_tokens}"
            + ("" if chapter.summary else " (no summary yet)"),
            f"• turns: {prompt.turns_tokens} ({prompt.turns_included} messages)",
        ]
        if self.toolbox is not None and (specs := self.toolbox.specs_for(persona)):
            used = sum(len(t.tools) for t in prompt.included)
            lines.append(
                f"• tools: {', '.join(t.name for t in specs)} "
                f"(~{self.history.count_tokens(tool_instructions(specs))} tokens of "
                f"instructions for the local model); {used} earlier tool calls in the turns"
            )
        if prompt.turns_dropped:
            lines.append(
                f"• left out: {prompt.turns_dropped} older messages ({prompt.dropped_tokens} "
                "tokens), waiting to be summarized"
            )
        await ctx.reply("\n".join(lines))

    def _persona(self, ctx: CommandContext, raw: str | None, members: list[str]) -> Persona:
        if raw:
            check = normalize_persona_name(raw)
            mxid = self.personas.config.persona_mxid(check.name) if check.name else ""
            persona = self.personas.get(mxid)
            if persona is None:
                raise UserError(f"No persona named {raw[:40]!r}. {_context_usage(ctx.prefix)}")
            return persona
        here = [p for m in members if (p := self.personas.get(m)) is not None]
        if not here:
            raise UserError(f"No persona in this room. {_context_usage(ctx.prefix)}")
        return here[0]

    async def summary(self, ctx: CommandContext, cmd: ParsedCommand) -> None:
        chapter = await self.history.chapter(ctx.room_id, await self._thread_root(ctx), None)
        if chapter.summary is None:
            await ctx.reply(
                "No summary yet: the conversation here still fits the prompt "
                f"({len(chapter.turns)} messages since the last reset)."
            )
            return
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(chapter.summary.up_to_ts / 1000))
        await ctx.reply(
            f"Summary of the conversation up to {when} "
            f"({len(chapter.turns)} messages since):\n{chapter.summary.summary}"
        )

    async def rollback(self, ctx: CommandContext, cmd: ParsedCommand) -> None:
        raw = cmd.args.get("n", "1").strip()
        if not raw.isdigit() or not 1 <= int(raw) <= MAX_ROLLBACK:
            raise UserError(_rollback_usage(ctx.prefix))
        n = int(raw)
        chapter = await self.history.chapter(ctx.room_id, await self._thread_root(ctx), None)
        kept = rollback(chapter.turns, n)
        removed = chapter.turns[len(kept) :]
        if not removed:
            await ctx.reply("Nothing to roll back: no answered message since the last reset.")
            return
        await self.messages.remove_from_context([t.event_id for t in removed])
        exchanges = sum(
            1 for i, t in enumerate(removed) if t.is_self and (i == 0 or not removed[i - 1].is_self)
        )
        await ctx.reply(
            f"Rolled back {exchanges} exchange{'s' if exchanges != 1 else ''} "
            f"({len(removed)} messages): they stay in the room but leave the context."
        )

    async def mode(self, ctx: CommandContext, cmd: ParsedCommand) -> None:
        raw = cmd.args.get("mode")
        if raw is None:
            settings = await self.rooms.get(ctx.room_id)
            await ctx.reply(f"This room is in {settings.mode} mode. {_mode_usage(ctx.prefix)}")
            return
        mode = raw.strip().lower()
        if mode not in MODES:
            raise UserError(_mode_usage(ctx.prefix))
        await self.rooms.set_mode(ctx.room_id, mode)
        if mode == "thread":
            text = "Thread mode: a message in a thread sees only that thread's history."
        else:
            text = "Room mode: the whole room, threads included, is one conversation."
        await ctx.reply(text)
