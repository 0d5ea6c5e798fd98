"""A persona's reply to one message: prompt, inference, live delivery.

Glue between the room (Matrix), the conversation (what the model sees) and
inference (which backend answers). The reply appears as one message edited in
place as tokens arrive (throttled), ending with a final edit holding the whole
text. Failures end as one short notice in the room, never as a traceback.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable

from mautrix.appservice import IntentAPI

from .config import Config
from .conversation import EditThrottle, Turn, build_prompt, markdown_to_html, strip_think
from .db.messages import MessageStore, StoredMessage
from .db.personas import Persona
from .db.rooms import RoomStore
from .inference.types import Backend, ChatMessage, InferenceError, SamplingParams
from .matrix.sender import BOUNCE_LIMIT_KEY, Sender, stable_txn_id
from .personas import PersonaDirectory

log = logging.getLogger("hivebridge.replies")

#: Stored messages considered for a prompt before the token budget trims them.
HISTORY_WINDOW = 200


def _is_edit(m: StoredMessage) -> bool:
    relates = m.content.get("m.relates_to")
    return isinstance(relates, dict) and relates.get("rel_type") == "m.replace"


class ReplyService:
    def __init__(
        self,
        config: Config,
        personas: PersonaDirectory,
        messages: MessageStore,
        rooms: RoomStore,
        sender: Sender,
        backend_for: Callable[[Persona], Backend],
        count_tokens: Callable[[str], int],
    ) -> None:
        self.config = config
        self.personas = personas
        self.messages = messages
        self.rooms = rooms
        self.sender = sender
        self.backend_for = backend_for
        self.count_tokens = functools.lru_cache(maxsize=4096)(count_tokens)

    def sampling(self) -> SamplingParams:
        inf = self.config.inference
        return SamplingParams(
            max_tokens=inf.max_tokens, temperature=inf.temperature, top_p=inf.top_p
        )

    async def _name_of(self, room_id: str, mxid: str) -> str:
        persona = self.personas.get(mxid)
        if persona is not None:
            return persona.displayname
        member = await self.personas.appservice.state_store.get_member(room_id, mxid)  # type: ignore[arg-type]
        if member is not None and member.displayname:
            return str(member.displayname)
        return mxid.split(":", 1)[0].lstrip("@")

    async def build_prompt(
        self, persona: Persona, msg: StoredMessage, *, group: bool
    ) -> list[ChatMessage]:
        """System prompt + stored history since the last !reset + the new message."""
        settings = await self.rooms.get(msg.room_id)
        history = await self.messages.recent(msg.room_id, settings.context_since, HISTORY_WINDOW)
        turns: list[Turn] = []
        for m in history:
            if m.msgtype == "m.notice" or not m.body or _is_edit(m) or m.ts > msg.ts:
                continue
            if m.body.startswith(self.config.routing.command_prefix) and not m.persona:
                continue  # commands are for the bot, not conversation
            turns.append(await self._turn(persona, m))
        prompt = build_prompt(
            persona.system_prompt,
            None,
            [t for t in turns if t.event_id != msg.event_id],
            await self._turn(persona, msg),
            is_group=group,
            budget=self.config.inference.context_tokens,
            count_tokens=self.count_tokens,
        )
        return prompt.messages

    async def _turn(self, persona: Persona, m: StoredMessage) -> Turn:
        return Turn(
            event_id=m.event_id,
            sender_mxid=m.sender,
            sender_name=await self._name_of(m.room_id, m.sender),
            is_self=m.sender == persona.mxid,
            body=m.body,
            ts=m.ts,
            thread_root=m.thread_root,
        )

    async def reply(
        self, persona: Persona, msg: StoredMessage, bounce_limit: int, *, group: bool = False
    ) -> str | None:
        intent = self.personas.intent(persona)
        extra = {BOUNCE_LIMIT_KEY: bounce_limit, **(reply_relation(msg) if group else {})}
        stream = LiveReply(self, intent, persona, msg, extra)
        await self.sender.typing(intent, msg.room_id, True)
        error = ""
        try:
            prompt = await self.build_prompt(persona, msg, group=group)
            gen = self.backend_for(persona).generate(
                prompt, self.sampling(), session=f"{msg.room_id}|{persona.mxid}"
            )
            async for piece in gen:
                await stream.add(piece)
            log.info(
                "reply done: %d tokens, ttft %.2fs, %d edits",
                gen.stats.completion_tokens,
                gen.stats.ttft_s or 0.0,
                stream.edits_sent,
                extra={"room_id": msg.room_id, "persona": persona.name, "event_id": msg.event_id},
            )
        except InferenceError as e:
            error = str(e)
        finally:
            await self.sender.typing(intent, msg.room_id, False)
        event_id = await stream.finish()
        if event_id is None or error:
            await self.sender.send_text(
                intent,
                msg.room_id,
                f"⚠️ I could not answer: {error or 'the model returned nothing'}",
                txn_id=stable_txn_id(msg.event_id, persona.mxid, "error"),
                notice=True,
                persona=persona.name,
            )
        return event_id


class LiveReply:
    """One streamed reply: first text sent, throttled edits, a final full edit."""

    def __init__(
        self,
        service: ReplyService,
        intent: IntentAPI,
        persona: Persona,
        msg: StoredMessage,
        extra: dict[str, object],
    ) -> None:
        cfg = service.config.replies
        self.service = service
        self.intent = intent
        self.persona = persona
        self.msg = msg
        self.extra = extra
        self.streaming = cfg.streaming
        self.show_thinking = cfg.show_thinking
        self.throttle = EditThrottle(interval_s=cfg.edit_interval_s, max_edits=cfg.max_edits)
        self.raw = ""
        self.event_id: str | None = None
        self.edits_sent = 0
        self.first_visible_s: float | None = None
        self._started = time.monotonic()

    def _visible(self, *, streaming: bool) -> str:
        return strip_think(self.raw, self.show_thinking, streaming=streaming).strip()

    async def add(self, piece: str) -> None:
        self.raw += piece
        if self.streaming:
            await self._apply(self.throttle.update(self._visible(streaming=True), time.monotonic()))

    async def finish(self) -> str | None:
        await self._apply(self.throttle.finish(self._visible(streaming=False), time.monotonic()))
        if self.event_id is not None:
            await self.service.messages.update_body(self.event_id, self._visible(streaming=False))
        return self.event_id

    async def _apply(self, action: object) -> None:
        kind, text = getattr(action, "kind", "none"), getattr(action, "text", "")
        if kind == "none" or not text:
            return
        sender, msg, persona = self.service.sender, self.msg, self.persona
        html = markdown_to_html(text)
        if kind == "send" or self.event_id is None:
            self.first_visible_s = time.monotonic() - self._started
            self.event_id = await sender.send_text(
                self.intent,
                msg.room_id,
                text,
                txn_id=stable_txn_id(msg.event_id, persona.mxid),
                html=html,
                persona=persona.name,
                extra=self.extra,
            )
        else:
            self.edits_sent += 1
            await sender.edit_text(
                self.intent,
                msg.room_id,
                self.event_id,
                text,
                txn_id=stable_txn_id(msg.event_id, persona.mxid, "edit", str(self.edits_sent)),
                html=html,
            )


def reply_relation(msg: StoredMessage) -> dict[str, object]:
    """Content keys that make a message a reply to ``msg`` (in its thread, if any).

    In a group the answer says what it answers and mentions its sender, so the
    asker is notified and a persona that asked counts as addressed.
    """
    relates: dict[str, object] = {"m.in_reply_to": {"event_id": msg.event_id}}
    if msg.thread_root:
        relates.update(rel_type="m.thread", event_id=msg.thread_root, is_falling_back=False)
    return {"m.relates_to": relates, "m.mentions": {"user_ids": [msg.sender]}}
