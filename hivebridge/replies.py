"""A persona's reply to one message: prompt, inference, delivery.

Glue between the room (Matrix), the conversation (what the model sees) and
inference (which backend answers). Failures end as one short notice in the
room, never as a traceback.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from .config import Config
from .db.messages import MessageStore, StoredMessage
from .db.personas import Persona
from .db.rooms import RoomStore
from .inference.types import Backend, ChatMessage, InferenceError, SamplingParams, collect
from .matrix.sender import BOUNCE_LIMIT_KEY, Sender, stable_txn_id
from .personas import PersonaDirectory

log = logging.getLogger("hivebridge.replies")

#: How many stored messages are considered for the prompt before the token budget.
HISTORY_WINDOW = 50


class ReplyService:
    def __init__(
        self,
        config: Config,
        personas: PersonaDirectory,
        messages: MessageStore,
        rooms: RoomStore,
        sender: Sender,
        backend_for: Callable[[Persona], Backend],
    ) -> None:
        self.config = config
        self.personas = personas
        self.messages = messages
        self.rooms = rooms
        self.sender = sender
        self.backend_for = backend_for

    def sampling(self) -> SamplingParams:
        inf = self.config.inference
        return SamplingParams(
            max_tokens=inf.max_tokens, temperature=inf.temperature, top_p=inf.top_p
        )

    async def build_prompt(self, persona: Persona, msg: StoredMessage) -> list[ChatMessage]:
        settings = await self.rooms.get(msg.room_id)
        history = await self.messages.recent(msg.room_id, settings.context_since, HISTORY_WINDOW)
        turns: list[ChatMessage] = []
        for m in history:
            if m.event_id == msg.event_id or m.msgtype == "m.notice" or not m.body:
                continue
            if m.ts > msg.ts:
                continue
            if m.sender == persona.mxid:
                turns.append(ChatMessage("assistant", m.body))
            else:
                turns.append(ChatMessage("user", m.body))
        turns.append(ChatMessage("user", msg.body))
        return [ChatMessage("system", persona.system_prompt), *turns]

    async def reply(
        self, persona: Persona, msg: StoredMessage, bounce_limit: int, *, group: bool = False
    ) -> str | None:
        intent = self.personas.intent(persona)
        await self.sender.typing(intent, msg.room_id, True)
        try:
            prompt = await self.build_prompt(persona, msg)
            backend = self.backend_for(persona)
            gen = backend.generate(prompt, self.sampling(), session=f"{msg.room_id}|{persona.mxid}")
            text = (await collect(gen)).strip()
            log.info(
                "reply ready",
                extra={
                    "room_id": msg.room_id,
                    "persona": persona.name,
                    "event_id": msg.event_id,
                    "completion_tokens": gen.stats.completion_tokens,
                    "ttft_s": gen.stats.ttft_s,
                },
            )
            error = ""
        except InferenceError as e:
            text, error = "", str(e)
        finally:
            await self.sender.typing(intent, msg.room_id, False)
        txn = stable_txn_id(msg.event_id, persona.mxid)
        if not text:
            await self.sender.send_text(
                intent,
                msg.room_id,
                f"⚠️ I could not answer: {error or 'the model returned nothing'}",
                txn_id=txn,
                notice=True,
                persona=persona.name,
            )
            return None
        return await self.sender.send_text(
            intent,
            msg.room_id,
            text,
            txn_id=txn,
            persona=persona.name,
            extra={BOUNCE_LIMIT_KEY: bounce_limit, **(reply_relation(msg) if group else {})},
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
