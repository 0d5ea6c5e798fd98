"""What a persona sees: the chapter of a conversation and the prompt built from it.

A prompt is the persona's system prompt (plus the chapter summary), the turns
of the current chapter within the token budget, and the new message. The same
code serves replies and the commands that report on the next prompt
(``!context``, ``!summary``, ``!rollback``), so what they show is what the
model gets.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, replace

from ..config import Config
from ..conversation import (
    Prompt,
    ToolUse,
    Turn,
    apply_reset,
    build_prompt,
    persona_system_prompt,
    select_turns,
)
from ..db.messages import MessageStore, StoredMessage
from ..db.personas import Persona
from ..db.rooms import RoomStore
from ..db.summaries import ROOM, ChapterSummary, SummaryStore
from ..db.tool_calls import StoredToolCall, ToolCallStore
from ..inference.types import ToolCall
from ..matrix.content import is_edit
from ..matrix.members import RoomMembers
from .directory import PersonaDirectory

#: Stored messages considered for a prompt before the token budget trims them.
HISTORY_WINDOW = 200


@dataclass(frozen=True, slots=True)
class Chapter:
    """What a prompt's history is: the chapter summary (if any) and the turns after it."""

    key: str  # summary key: '' for the room, the thread root in thread mode
    summary: ChapterSummary | None
    turns: list[Turn]  # oldest first, since the last !reset and after the summary


@dataclass(frozen=True, slots=True)
class SceneCue:
    """What a scene turn adds to a prompt: a note after the system prompt, and the
    opening that stands in for the command which started the scene."""

    note: str
    opening: str = ""


class ConversationHistory:
    """Reads stored messages, room settings and summaries into chapters and prompts."""

    def __init__(
        self,
        config: Config,
        personas: PersonaDirectory,
        members: RoomMembers,
        messages: MessageStore,
        rooms: RoomStore,
        summaries: SummaryStore,
        count_tokens: Callable[[str], int],
        tool_calls: ToolCallStore | None = None,
    ) -> None:
        """``tool_calls``: where replies' tool calls are stored (None: prompts show none)."""
        self.tool_calls = tool_calls
        self.config = config
        self.personas = personas
        self.members = members
        self.messages = messages
        self.rooms = rooms
        self.summaries = summaries
        self.count_tokens = functools.lru_cache(maxsize=4096)(count_tokens)

    async def apply_config(self, config: Config) -> None:
        """A reloaded context budget and command prefix hold from the next prompt."""
        self.config = config

    async def prompt_for(
        self, persona: Persona, msg: StoredMessage, *, group: bool, scene: SceneCue | None = None
    ) -> tuple[Prompt, Chapter]:
        """The prompt for a reply to ``msg``, with the chapter it was built from.

        A scene turn (``scene``) adds the scene's note to the system block; when it
        answers the command that started the scene, the opening stands in for it.
        """
        chapter = await self.chapter(msg.room_id, msg.thread_root, persona, before_ts=msg.ts)
        new = await self._turn(persona, msg)
        if scene is not None and scene.opening and self._is_command(msg):
            new = replace(new, body=scene.opening)
        note = scene.note if scene is not None else None
        return self._build(persona, chapter, new, group, note), chapter

    async def next_prompt(
        self, persona: Persona, room_id: str, thread_root: str | None, *, group: bool
    ) -> tuple[Prompt, Chapter]:
        """The prompt the next message would get, with an empty new message (!context)."""
        chapter = await self.chapter(room_id, thread_root, persona)
        empty = Turn("", "", "", False, "", 0, thread_root)
        return self._build(persona, chapter, empty, group), chapter

    def _build(
        self, persona: Persona, chapter: Chapter, new: Turn, group: bool, note: str | None = None
    ) -> Prompt:
        inference = self.config.inference
        profile = inference.profile(persona.profile)
        budget = profile.context_tokens if profile and profile.context_tokens else None
        system = persona_system_prompt(persona.system_prompt, persona.traits)
        return build_prompt(
            f"{system}\n\n{note}" if note else system,
            chapter.summary.summary if chapter.summary else None,
            chapter.turns,
            new,
            is_group=group,
            budget=budget or inference.context_tokens,
            count_tokens=self.count_tokens,
        )

    async def chapter(
        self,
        room_id: str,
        thread_root: str | None,
        persona: Persona | None,
        *,
        before_ts: int | None = None,
    ) -> Chapter:
        """The history a prompt sees, oldest first.

        Stored messages still in the context (not rolled back), since the last
        reset and after the chapter summary; in thread mode a message in a
        thread sees that thread (and its root), one in the main timeline sees
        the main timeline; in room mode the room is one conversation. The whole
        chapter is returned, not a "last N" slice, so the prompt window stays
        stable (see :mod:`hivebridge.conversation.context`). With ``persona``
        None every persona's message is an assistant turn (for a rollback).
        """
        settings = await self.rooms.get(room_id)
        threaded = settings.mode == "thread" and thread_root is not None
        key = thread_root if threaded and thread_root else ROOM
        summary = await self.summaries.get(room_id, key)
        if summary is not None and not summary.valid_since(settings.context_since):
            summary = None  # written before a reset: forgotten with the rest
        since = max(settings.context_since, summary.up_to_ts if summary else 0)
        turns: list[Turn] = []
        for m in await self.messages.in_context(room_id, since, HISTORY_WINDOW):
            if m.msgtype == "m.notice" or not m.body or is_edit(m.content):
                continue
            if before_ts is not None and m.ts > before_ts:
                continue
            if self._is_command(m):
                continue  # commands are for the bot, not conversation
            turns.append(await self._turn(persona, m))
        if summary is not None:
            turns = apply_reset(turns, summary.up_to_event_id)
        turns = await self._with_tools(room_id, turns)
        if settings.mode == "thread":
            turns = select_turns(turns, thread_root, "thread" if threaded else "room")
        return Chapter(key, summary, turns)

    def _is_command(self, m: StoredMessage) -> bool:
        return m.body.startswith(self.config.routing.command_prefix) and not m.persona

    async def _with_tools(self, room_id: str, turns: list[Turn]) -> list[Turn]:
        """Own replies with the tool calls that led to them, as the model made them."""
        own = [t.event_id for t in turns if t.is_self]
        if self.tool_calls is None or not own:
            return turns
        found = await self.tool_calls.for_replies(room_id, own)
        if not found:
            return turns
        return [
            replace(t, tools=tuple(_use(c) for c in found[t.event_id]))
            if t.event_id in found
            else t
            for t in turns
        ]

    async def _turn(self, persona: Persona | None, m: StoredMessage) -> Turn:
        return Turn(
            event_id=m.event_id,
            sender_mxid=m.sender,
            sender_name=await self._name_of(m.room_id, m.sender),
            is_self=m.sender == persona.mxid if persona else m.persona is not None,
            body=m.body,
            ts=m.ts,
            thread_root=m.thread_root,
        )

    async def _name_of(self, room_id: str, mxid: str) -> str:
        persona = self.personas.get(mxid)
        if persona is not None:
            return persona.displayname
        name = await self.members.displayname(room_id, mxid)
        return name or mxid.split(":", 1)[0].lstrip("@")


def _use(c: StoredToolCall) -> ToolUse:
    return ToolUse(ToolCall(c.call_id, c.tool, c.arguments), c.result, c.hop, c.note)
