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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from mautrix.appservice import IntentAPI
from mautrix.errors import MatrixRequestError

from . import metrics
from .config import Config
from .conversation import (
    EditThrottle,
    Prompt,
    Turn,
    apply_reset,
    build_prompt,
    markdown_to_html,
    select_turns,
    strip_think,
    summary_due,
)
from .db.messages import MessageStore, StoredMessage
from .db.personas import Persona
from .db.reply_jobs import JobState, ReplyJob, ReplyJobStore
from .db.rooms import RoomStore
from .db.summaries import ROOM, ChapterSummary
from .inference.types import (
    Backend,
    ChatMessage,
    GenerationStats,
    InferenceError,
    SamplingParams,
)
from .matrix.sender import ANSWERS_KEY, BOUNCE_LIMIT_KEY, Sender, retryable, stable_txn_id
from .personas import PersonaDirectory
from .summaries import Summarizer

log = logging.getLogger("hivebridge.replies")

#: ``on_usage(persona, message answered, stats)``: record what a reply cost.
UsageHook = Callable[[Persona, StoredMessage, GenerationStats], Awaitable[None]]

#: Stored messages considered for a prompt before the token budget trims them.
HISTORY_WINDOW = 200


def _is_edit(m: StoredMessage) -> bool:
    relates = m.content.get("m.relates_to")
    return isinstance(relates, dict) and relates.get("rel_type") == "m.replace"


@dataclass(frozen=True, slots=True)
class Chapter:
    """What a prompt's history is: the chapter summary (if any) and the turns after it."""

    key: str  # summary key: '' for the room, the thread root in thread mode
    summary: ChapterSummary | None
    turns: list[Turn]  # oldest first, since the last !reset and after the summary


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
        summarizer: Summarizer | None = None,
    ) -> None:
        self.config = config
        self.personas = personas
        self.messages = messages
        self.rooms = rooms
        self.sender = sender
        self.backend_for = backend_for
        self.count_tokens = functools.lru_cache(maxsize=4096)(count_tokens)
        #: Chapter summaries (read for prompts, written after replies); None: none.
        self.summarizer = summarizer
        #: The last streamed reply, for its timings (first visible text, edits).
        self.last_reply: LiveReply | None = None
        #: Called after each answered reply with its cost (usage table, budgets); None: off.
        self.on_usage: UsageHook | None = None
        #: Persisted reply decisions (exactly once across crashes); None: not persisted.
        self.jobs: ReplyJobStore | None = None
        #: ``(stats, configured model) -> model name`` for metric labels; the app sets the
        #: catalogue's, so a local model is counted under the name !models shows.
        self.model_name: Callable[[GenerationStats, str], str] = lambda s, d: s.model or d

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
        """System prompt (+ chapter summary) + the chapter's turns + the new message."""
        prompt, _ = await self.prompt_for(persona, msg, group=group)
        return prompt.messages

    async def prompt_for(
        self, persona: Persona, msg: StoredMessage, *, group: bool
    ) -> tuple[Prompt, Chapter]:
        """The prompt for a reply to ``msg``, with the chapter it was built from."""
        chapter = await self.chapter(msg.room_id, msg.thread_root, persona, before_ts=msg.ts)
        return self._build(persona, chapter, await self._turn(persona, msg), group), chapter

    async def next_prompt(
        self, persona: Persona, room_id: str, thread_root: str | None, *, group: bool
    ) -> tuple[Prompt, Chapter]:
        """The prompt the next message would get, with an empty new message (!context)."""
        chapter = await self.chapter(room_id, thread_root, persona)
        empty = Turn("", "", "", False, "", 0, thread_root)
        return self._build(persona, chapter, empty, group), chapter

    def _build(self, persona: Persona, chapter: Chapter, new: Turn, group: bool) -> Prompt:
        return build_prompt(
            persona.system_prompt,
            chapter.summary.summary if chapter.summary else None,
            chapter.turns,
            new,
            is_group=group,
            budget=self.config.inference.context_tokens,
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
        !reset and after the chapter summary; in thread mode a message in a
        thread sees that thread (and its root), one in the main timeline sees
        the main timeline; in room mode the room is one conversation. The whole
        chapter is returned, not a "last N" slice, so the prompt window stays
        stable (see :mod:`hivebridge.conversation.context`). With ``persona``
        None every persona's message is an assistant turn (for !rollback).
        """
        settings = await self.rooms.get(room_id)
        threaded = settings.mode == "thread" and thread_root is not None
        key = thread_root if threaded and thread_root else ROOM
        summary = None
        if self.summarizer is not None:
            summary = await self.summarizer.store.get(room_id, key)
            if summary is not None and not summary.valid_since(settings.context_since):
                summary = None  # written before a !reset: forgotten with the rest
        since = max(settings.context_since, summary.up_to_ts if summary else 0)
        turns: list[Turn] = []
        for m in await self.messages.in_context(room_id, since, HISTORY_WINDOW):
            if m.msgtype == "m.notice" or not m.body or _is_edit(m):
                continue
            if before_ts is not None and m.ts > before_ts:
                continue
            if m.body.startswith(self.config.routing.command_prefix) and not m.persona:
                continue  # commands are for the bot, not conversation
            turns.append(await self._turn(persona, m))
        if summary is not None:
            turns = apply_reset(turns, summary.up_to_event_id)
        if settings.mode == "thread":
            turns = select_turns(turns, thread_root, "thread" if threaded else "room")
        return Chapter(key, summary, turns)

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

    async def reply(
        self,
        persona: Persona,
        msg: StoredMessage,
        bounce_limit: int,
        *,
        group: bool = False,
        job: ReplyJob | None = None,
    ) -> str | None:
        """Answer ``msg`` as ``persona`` once, even across a crash.

        With ``job`` None this is a new decision: it is persisted as a pending
        reply job before any work, and refused (None) when the pair already has
        one, so routing the same message twice cannot answer it twice. With a
        pending ``job`` (resumed after a restart) the reply is regenerated and
        lands on the reply already posted, if there is one (the job's, or one
        found in the room), else it is sent with the same stable txn id.
        Returns the reply's event id; None when nothing was posted.
        """
        intent = self.personas.intent(persona)
        existing: str | None = None
        if job is None:
            if self.jobs is not None and not await self.jobs.create(
                msg.event_id, persona.name, msg.room_id, bounce_limit
            ):
                log.info(
                    "%s already answers %s; not deciding again",
                    persona.name,
                    msg.event_id,
                    extra={"room_id": msg.room_id},
                )
                return None
        else:
            bounce_limit = job.bounce_limit
            existing = job.reply_event_id or await self.sender.find_reply(
                intent, msg.room_id, msg.event_id, since_ts=msg.ts
            )
            log.info(
                "resuming %s's reply to %s (%s)",
                persona.name,
                msg.event_id,
                f"editing {existing}" if existing else "not posted yet",
                extra={"room_id": msg.room_id},
            )
        try:
            return await self._reply(persona, msg, bounce_limit, group, existing)
        except MatrixRequestError as e:
            if not retryable(e):  # forbidden, not in the room...: retrying cannot help
                await self._settle(persona, msg, "failed")
            raise

    async def _settle(
        self, persona: Persona, msg: StoredMessage, state: JobState, reply: str | None = None
    ) -> None:
        if self.jobs is not None:
            await self.jobs.finish(msg.event_id, persona.name, state, reply)

    async def _reply(
        self,
        persona: Persona,
        msg: StoredMessage,
        bounce_limit: int,
        group: bool,
        existing: str | None,
    ) -> str | None:
        intent = self.personas.intent(persona)
        extra = {
            BOUNCE_LIMIT_KEY: bounce_limit,
            ANSWERS_KEY: msg.event_id,
            **(reply_relation(msg) if group else {}),
        }
        stream = LiveReply(self, intent, persona, msg, extra, existing=existing)
        self.last_reply = stream
        prompt: Prompt | None = None
        chapter: Chapter | None = None
        await self.sender.typing(intent, msg.room_id, True)
        error = ""
        try:
            prompt, chapter = await self.prompt_for(persona, msg, group=group)
            gen = self.backend_for(persona).generate(
                prompt.messages, self.sampling(), session=f"{msg.room_id}|{persona.mxid}"
            )
            async for piece in gen:
                await stream.add(piece)
            metrics.observe_generation(
                gen.stats, self.model_name(gen.stats, persona.model or "default")
            )
            log.info(
                "reply done: %d tokens, ttft %.2fs, %d edits",
                gen.stats.completion_tokens,
                gen.stats.ttft_s or 0.0,
                stream.edits_sent,
                extra={"room_id": msg.room_id, "persona": persona.name, "event_id": msg.event_id},
            )
            if self.on_usage is not None:
                await self._report_usage(persona, msg, gen.stats, prompt.messages)
        except InferenceError as e:
            error = str(e)
        finally:
            await self.sender.typing(intent, msg.room_id, False)
        event_id = await stream.finish()
        if event_id is None or error:
            metrics.REPLIES_FAILED.labels("inference_error" if error else "empty").inc()
            await self.sender.send_text(
                intent,
                msg.room_id,
                f"⚠️ I could not answer: {error or 'the model returned nothing'}",
                txn_id=stable_txn_id(msg.event_id, persona.mxid, "error"),
                notice=True,
                persona=persona.name,
            )
            await self._settle(persona, msg, "failed", event_id)
            return event_id
        await self._settle(persona, msg, "done", event_id)  # the final edit is out
        if prompt is not None and chapter is not None:
            self._maybe_summarize(persona, msg.room_id, prompt, chapter)
        return event_id

    async def _report_usage(
        self,
        persona: Persona,
        msg: StoredMessage,
        stats: GenerationStats,
        prompt: list[ChatMessage],
    ) -> None:
        """Hand the reply's cost to ``on_usage``; a failure there never costs the reply."""
        if not stats.prompt_tokens:  # backends without a usage report: count it ourselves
            stats.prompt_tokens = sum(self.count_tokens(m.content) for m in prompt)
        try:
            assert self.on_usage is not None
            await self.on_usage(persona, msg, stats)
        except Exception:
            log.warning("usage hook failed", exc_info=True, extra={"room_id": msg.room_id})

    def _maybe_summarize(
        self, persona: Persona, room_id: str, prompt: Prompt, chapter: Chapter
    ) -> None:
        """Fold the turns this prompt had to drop into the chapter summary, later.

        Started after the reply is out, as a background job, so no reply waits.
        """
        cfg = self.config.summaries
        if self.summarizer is None or not cfg.enabled:
            return
        if summary_due(prompt, min_dropped_turns=cfg.min_dropped_turns):
            self.summarizer.schedule(
                self.backend_for(persona),
                persona,
                room_id,
                chapter.key,
                prompt.dropped,
                chapter.summary,
            )


class LiveReply:
    """One streamed reply: first text sent, throttled edits, a final full edit."""

    def __init__(
        self,
        service: ReplyService,
        intent: IntentAPI,
        persona: Persona,
        msg: StoredMessage,
        extra: dict[str, object],
        *,
        existing: str | None = None,
    ) -> None:
        """``existing``: a reply already posted (a resumed job); it is edited, never re-sent."""
        cfg = service.config.replies
        self.service = service
        self.intent = intent
        self.persona = persona
        self.msg = msg
        self.extra = extra
        # A resumed reply is already on screen: one final edit, no replayed stream.
        self.streaming = cfg.streaming and existing is None
        self.show_thinking = cfg.show_thinking
        self.throttle = EditThrottle(interval_s=cfg.edit_interval_s, max_edits=cfg.max_edits)
        self.raw = ""
        self.event_id: str | None = existing
        # Edits of a resumed reply get txn ids of their own: reusing the first
        # run's would make Synapse answer with that run's (partial) edit.
        self._edit_tag = "resume-edit" if existing else "edit"
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
        if self.event_id is None:
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
            if self.service.jobs is not None:  # a resume now edits this instead of posting
                await self.service.jobs.set_reply_event(msg.event_id, persona.name, self.event_id)
        else:
            self.edits_sent += 1
            await sender.edit_text(
                self.intent,
                msg.room_id,
                self.event_id,
                text,
                txn_id=stable_txn_id(
                    msg.event_id, persona.mxid, self._edit_tag, str(self.edits_sent)
                ),
                html=html,
                persona=persona.name,
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
