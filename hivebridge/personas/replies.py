"""Reply delivery: a persona's answer to one message, exactly once, streamed into the room.

The decision to answer is persisted as a reply job before any work; the prompt
comes from :mod:`.history`; the text streams from the persona's backend into
one message edited in place (throttled), ending with a final edit holding the
whole text. Failures end as one short notice in the room, never as a
traceback. When a reply is done, its cost is recorded and every observer
hears of it (:class:`ReplyDone`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from mautrix.appservice import IntentAPI
from mautrix.errors import MatrixRequestError

from .. import metrics
from ..config import Config
from ..conversation import (
    EditThrottle,
    Prompt,
    markdown_to_html,
    reply_pieces,
    strip_think,
    summary_due,
)
from ..conversation.formatting import MAX_REPLY_PIECES, REPLY_PIECE_BYTES
from ..db.messages import MessageStore, StoredMessage
from ..db.personas import Persona
from ..db.reply_jobs import JobState, ReplyJob, ReplyJobStore
from ..db.tool_calls import StoredToolCall, ToolCallStore
from ..db.usage import UsageKind
from ..inference.types import (
    NONE,
    Backend,
    ChatMessage,
    GenerationStats,
    InferenceError,
    SamplingParams,
    ToolCall,
    tool_calls_of,
)
from ..matrix.content import SCENE_KEY, answer_marks
from ..matrix.sender import Sender, retryable, stable_txn_id
from .directory import PersonaDirectory
from .history import Chapter, ConversationHistory, SceneCue
from .limits import Limits
from .summaries import Summarizer
from .tools import ToolContext, ToolResult
from .tools.toolbox import Toolbox

log = logging.getLogger("hivebridge.replies")


@dataclass(frozen=True, slots=True)
class ReplyDone:
    """One finished reply: what it answered, what it cost, how it looked in the room."""

    persona: Persona
    message: StoredMessage  # the message answered
    reply_event_id: str | None  # None when nothing was posted
    stats: GenerationStats
    model: str  # the catalogue's name of the model that answered
    first_visible_s: float | None  # from the start of the reply to its first text in the room
    edits: int  # m.replace edits sent, the final one included
    error: str | None = None  # what the room was told when it failed
    tool_results: tuple[ToolResult, ...] = ()  # the tool calls made on the way, in order


ReplyObserver = Callable[[ReplyDone], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class SceneTurn:
    """A reply that is a scene's turn: marked with the scene (no persona answers it
    through routing), told about the scene, and counted as a scene turn in usage."""

    scene_id: int
    cue: SceneCue


class ReplyService:
    """Answers messages as personas; one instance serves every persona in every room."""

    def __init__(
        self,
        config: Config,
        personas: PersonaDirectory,
        history: ConversationHistory,
        messages: MessageStore,
        sender: Sender,
        jobs: ReplyJobStore,
        limits: Limits,
        summarizer: Summarizer,
        *,
        backend_for: Callable[[Persona], Backend],
        model_name: Callable[[GenerationStats, str], str],
        observers: Sequence[ReplyObserver] = (),
        tools: Toolbox | None = None,
        tools_store: ToolCallStore | None = None,
    ) -> None:
        """``backend_for`` picks the persona's backend; ``model_name`` names the model that
        answered as the catalogue does (metric labels, usage rows); ``tools`` are what
        personas may call (None: no tools), their calls stored in ``tools_store``."""
        self.tools = tools
        self.tools_store = tools_store
        self.config = config
        self.personas = personas
        self.history = history
        self.messages = messages
        self.sender = sender
        self.jobs = jobs
        self.limits = limits
        self.summarizer = summarizer
        self.backend_for = backend_for
        self.model_name = model_name
        self._observers = list(observers)

    async def apply_config(self, config: Config) -> None:
        """Reloaded sampling and reply settings hold from the next reply."""
        self.config = config

    def observe(self, observer: ReplyObserver) -> Callable[[], None]:
        """Hear of every finished reply; returns the undo."""
        self._observers.append(observer)
        return lambda: self._observers.remove(observer)

    def sampling(self, persona: Persona) -> SamplingParams:
        """The config's sampling, with the persona's worker profile over it."""
        inf = self.config.inference
        params = SamplingParams(
            max_tokens=inf.max_tokens, temperature=inf.temperature, top_p=inf.top_p
        )
        profile = inf.profile(persona.profile)
        if profile is None:
            return params
        changes = {
            key: value
            for key in ("temperature", "top_p", "top_k", "min_p", "repeat_penalty", "max_tokens")
            if (value := getattr(profile, key)) is not None
        }
        return params.with_(**changes)

    async def reply(
        self,
        persona: Persona,
        msg: StoredMessage,
        bounce_limit: int,
        *,
        group: bool = False,
        job: ReplyJob | None = None,
        scene: SceneTurn | None = None,
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
            if not await self.jobs.create(msg.event_id, persona.name, msg.room_id, bounce_limit):
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
            return await self._reply(persona, msg, bounce_limit, group, existing, scene)
        except MatrixRequestError as e:
            if not retryable(e):  # forbidden, not in the room...: retrying cannot help
                await self._settle(persona, msg, "failed")
            raise

    async def _settle(
        self, persona: Persona, msg: StoredMessage, state: JobState, reply: str | None = None
    ) -> None:
        await self.jobs.finish(msg.event_id, persona.name, state, reply)

    async def _reply(
        self,
        persona: Persona,
        msg: StoredMessage,
        bounce_limit: int,
        group: bool,
        existing: str | None,
        scene: SceneTurn | None = None,
    ) -> str | None:
        intent = self.personas.intent(persona)
        extra = answer_marks(msg, bounce_limit, group=group)
        if scene is not None:
            extra[SCENE_KEY] = scene.scene_id
        prompt: Prompt | None = None
        chapter: Chapter | None = None
        stats = GenerationStats(model=persona.model or "", backend="")
        await self.sender.typing(intent, msg.room_id, True)
        error = ""
        steps: list[GenerationStats] = []
        results: list[ToolResult] = []
        stream = LiveReply(self, intent, persona, msg, extra, existing=existing)
        edits = 0  # of the messages of earlier tool steps; the last stream's are added below
        try:
            prompt, chapter = await self.history.prompt_for(
                persona, msg, group=group, scene=scene.cue if scene is not None else None
            )
            messages = list(prompt.messages)
            names = self._tool_names(persona)
            specs = self.tools.registry.specs(names) if self.tools else ()
            if specs and self.tools_store is not None:
                # A resumed reply runs its tools again: what a crash left goes.
                await self.tools_store.forget_unfinished(msg.event_id, persona.name)
            hop = 0
            while True:
                params = self.sampling(persona)
                choice = NONE
                if specs and self.tools is not None:
                    choice = self.tools.choice(persona, hop, names)
                    params = params.with_(tools=specs, tool_choice=choice)
                gen = self.backend_for(persona).generate(
                    messages, params, session=f"{msg.room_id}|{persona.mxid}"
                )
                async for piece in gen:
                    await stream.add(piece)
                    if stream.full:
                        break
                if stream.full:  # a runaway stream: what fits is shown, the rest not asked
                    await gen.aclose()
                steps.append(gen.stats)
                calls, note = tool_calls_of(gen)
                if calls and choice == NONE and not stream.text:
                    # Told to answer, it called again (a remote model may): stop here.
                    error = f"the model kept calling tools ({hop} steps of tools)"
                if not calls or choice == NONE:
                    break
                # A step of tools: what streamed stays as its own message; the next
                # step's text is a new one (the final reply: one event plus edits).
                said = await stream.finish() and stream.text
                edits += stream.edits_sent
                hop_results = await self._run_tools(persona, msg, intent, calls, note, hop, names)
                results.extend(hop_results)
                messages += [
                    ChatMessage("assistant", said or note, tool_calls=tuple(calls)),
                    *(
                        ChatMessage("tool", r.content, tool_call_id=r.call.id, name=r.call.name)
                        for r in hop_results
                    ),
                ]
                hop += 1
                existing = None if stream.wrote else stream.resumed_on
                stream = LiveReply(self, intent, persona, msg, extra, existing=existing, hop=hop)
                await self.sender.typing(intent, msg.room_id, True)
            stats = _combined(steps) if steps else stats
        except InferenceError as e:
            error = str(e)
        finally:
            await self.sender.typing(intent, msg.room_id, False)
        event_id = await stream.finish()
        edits += stream.edits_sent  # every edit this reply sent, in every step
        model = self.model_name(stats, persona.model or "default")
        if event_id is None or error:
            metrics.REPLIES_FAILED.labels("inference_error" if error else "empty").inc()
            error = error or "the model returned nothing"
            await self.sender.send_text(
                intent,
                msg.room_id,
                f"⚠️ I could not answer: {error}",
                txn_id=stable_txn_id(msg.event_id, persona.mxid, "error"),
                notice=True,
                persona=persona.name,
            )
            await self._settle(persona, msg, "failed", event_id)
            await self._done(
                ReplyDone(persona, msg, event_id, stats, model, None, edits, error, tuple(results))
            )
            return event_id
        if results and self.tools_store is not None:
            await self.tools_store.set_reply(msg.event_id, persona.name, event_id)
        await self._settle(persona, msg, "done", event_id)  # the final edit is out
        assert prompt is not None and chapter is not None
        for step in steps:
            metrics.observe_generation(step, model)
        log.info(
            "reply done: %d tokens, ttft %.2fs, %d edits, %d tool calls",
            stats.completion_tokens,
            stats.ttft_s or 0.0,
            edits,
            len(results),
            extra={"room_id": msg.room_id, "persona": persona.name, "event_id": msg.event_id},
        )
        await self._record_usage(
            persona, msg, stats, model, prompt.messages, "scene" if scene else "reply"
        )
        self._maybe_summarize(persona, msg.room_id, prompt, chapter)
        await self._done(
            ReplyDone(
                persona,
                msg,
                event_id,
                stats,
                model,
                stream.first_visible_s,
                edits,
                tool_results=tuple(results),
            )
        )
        return event_id

    def _tool_names(self, persona: Persona) -> list[str]:
        if self.tools is None or self.tools.config.max_hops <= 0:
            return []
        return self.tools.names_for(persona)

    async def _run_tools(
        self,
        persona: Persona,
        msg: StoredMessage,
        intent: IntentAPI,
        calls: Sequence[ToolCall],
        note: str,
        hop: int,
        allowed: list[str],
    ) -> list[ToolResult]:
        """Run one step's calls in order, each announced in the room while it runs."""
        assert self.tools is not None
        ctx = ToolContext(msg.room_id, persona.name, msg.sender, msg.event_id)
        out: list[ToolResult] = []
        for i, call in enumerate(calls):
            tool = self.tools.registry.get(call.name) if call.name in allowed else None
            shown = note if note and i == 0 else (tool.describe(call.arguments) if tool else "")
            if shown:
                await self.sender.send_text(
                    intent,
                    msg.room_id,
                    shown if note and i == 0 else f"🔧 {shown}",
                    txn_id=stable_txn_id(msg.event_id, persona.mxid, "tool", str(hop), str(i)),
                    notice=True,
                    persona=persona.name,
                )

            async def post(text: str, n: int = i) -> str:
                return await self.sender.send_text(
                    intent,
                    msg.room_id,
                    f"{persona.displayname}: {text}",
                    txn_id=stable_txn_id(msg.event_id, persona.mxid, "approval", str(hop), str(n)),
                    notice=True,
                    persona=persona.name,
                )

            result = await self.tools.runner.run(
                call, ctx, allowed, post=post, hop=hop, note=note if i == 0 else ""
            )
            out.append(result)
            if self.tools_store is not None:
                await self.tools_store.add(
                    StoredToolCall(
                        event_id=msg.event_id,
                        persona=persona.name,
                        room_id=msg.room_id,
                        hop=hop,
                        call_id=call.id,
                        tool=call.name,
                        arguments=dict(call.arguments),
                        note=result.note,
                        result=result.content,
                        outcome=result.outcome,
                        duration_ms=int(result.duration_s * 1000),
                        reply_event_id=None,
                        created_at=int(time.time() * 1000),
                    )
                )
        return out

    async def _record_usage(
        self,
        persona: Persona,
        msg: StoredMessage,
        stats: GenerationStats,
        model: str,
        prompt: list[ChatMessage],
        kind: UsageKind = "reply",
    ) -> None:
        """Count the reply against budgets and ``!stats``; a failure here never costs it."""
        if not stats.prompt_tokens:  # backends without a usage report: count it ourselves
            stats.prompt_tokens = sum(self.history.count_tokens(m.content) for m in prompt)
        try:
            await self.limits.record(
                user=msg.sender,
                room_id=msg.room_id,
                persona=persona.name,
                model=model,
                kind=kind,
                prompt_tokens=stats.prompt_tokens,
                completion_tokens=stats.completion_tokens,
            )
        except Exception:
            log.warning("could not record usage", exc_info=True, extra={"room_id": msg.room_id})

    async def _done(self, done: ReplyDone) -> None:
        for observer in list(self._observers):
            try:
                await observer(done)
            except Exception:
                room = {"room_id": done.message.room_id}
                log.warning("a reply observer failed", exc_info=True, extra=room)

    def _maybe_summarize(
        self, persona: Persona, room_id: str, prompt: Prompt, chapter: Chapter
    ) -> None:
        """Fold the turns this prompt had to drop into the chapter summary, later.

        Started after the reply is out, as a background job, so no reply waits.
        """
        cfg = self.config.summaries
        if cfg.enabled and summary_due(prompt, min_dropped_turns=cfg.min_dropped_turns):
            self.summarizer.schedule(
                self.backend_for(persona),
                persona,
                room_id,
                chapter.key,
                prompt.dropped,
                chapter.summary,
            )


class LiveReply:
    """One streamed reply: first text sent, throttled edits, a final full edit.

    No event may exceed Matrix's 64 KiB: a long reply is shown as several
    messages (:func:`reply_pieces`). While it streams, only the first message
    is edited; the final layout edits it and sends the others. Text beyond what
    the messages can show is not even kept (:attr:`full` stops the stream).
    """

    #: Raw text kept at most (hidden reasoning included); beyond it the stream stops.
    MAX_RAW_CHARS = 2 * MAX_REPLY_PIECES * REPLY_PIECE_BYTES

    def __init__(
        self,
        service: ReplyService,
        intent: IntentAPI,
        persona: Persona,
        msg: StoredMessage,
        extra: dict[str, object],
        *,
        existing: str | None = None,
        hop: int = 0,
    ) -> None:
        """``existing``: a reply already posted (a resumed job); it is edited, never re-sent.
        ``hop``: the step of a reply with tools this message is for (its own txn ids)."""
        self.resumed_on = existing
        self._hop = () if hop == 0 else (f"hop{hop}",)
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
        self.full = False
        self.event_id: str | None = existing
        self._parts: list[str] = []  # the messages after the first, when the reply is long
        self._shown: dict[str, str] = {}  # event id -> the text it shows now
        # Edits of a resumed reply get txn ids of their own: reusing the first
        # run's would make Synapse answer with that run's (partial) edit.
        self._edit_tag = "resume-edit" if existing else "edit"
        self.edits_sent = 0
        self.wrote = False  # sent or edited something
        self.first_visible_s: float | None = None
        self._started = time.monotonic()

    @property
    def text(self) -> str:
        """What the message shows (or would) once finished."""
        return self._visible(streaming=False)

    def _visible(self, *, streaming: bool) -> str:
        return strip_think(self.raw, self.show_thinking, streaming=streaming).strip()

    async def add(self, piece: str) -> None:
        room = self.MAX_RAW_CHARS - len(self.raw)
        if len(piece) >= room:
            self.full = True
            piece = piece[:room]
        self.raw += piece
        if self.streaming:
            action = self.throttle.update(self._visible(streaming=True), time.monotonic())
            if action.kind != "none" and action.text:
                await self._layout(action.text, final=False)

    async def finish(self) -> str | None:
        final = self._visible(streaming=False)
        self.throttle.finish(final, time.monotonic())
        await self._layout(final, final=True)
        for event_id, shown in self._shown.items():
            await self.service.messages.update_body(event_id, shown)
        return self.event_id

    async def _layout(self, text: str, *, final: bool) -> None:
        """Show ``text``: the first message only while streaming, every one at the end."""
        if not text.strip():
            return
        pieces = reply_pieces(text)
        for index, piece in enumerate(pieces if final else pieces[:1]):
            await self._show(index, piece)

    async def _show(self, index: int, text: str) -> None:
        sender, msg, persona = self.service.sender, self.msg, self.persona
        event_id: str | None
        if index == 0:
            event_id = self.event_id
        else:
            event_id = self._parts[index - 1] if index <= len(self._parts) else None
        if event_id is not None and self._shown.get(event_id) == text:
            return
        html = markdown_to_html(text)
        self.wrote = True
        part = () if index == 0 else (f"part{index}",)
        if event_id is None:
            if index == 0:
                self.first_visible_s = time.monotonic() - self._started
            event_id = await sender.send_text(
                self.intent,
                msg.room_id,
                text,
                txn_id=stable_txn_id(msg.event_id, persona.mxid, *self._hop, *part),
                html=html,
                persona=persona.name,
                extra=self.extra,
            )
            if index == 0:
                self.event_id = event_id
                # A resume now edits this instead of posting.
                await self.service.jobs.set_reply_event(msg.event_id, persona.name, event_id)
            else:
                self._parts.append(event_id)
        else:
            self.edits_sent += 1
            await sender.edit_text(
                self.intent,
                msg.room_id,
                event_id,
                text,
                txn_id=stable_txn_id(
                    msg.event_id,
                    persona.mxid,
                    self._edit_tag,
                    *self._hop,
                    *part,
                    str(self.edits_sent),
                ),
                html=html,
                persona=persona.name,
            )
        self._shown[event_id] = text


def _combined(steps: Sequence[GenerationStats]) -> GenerationStats:
    """One reply's cost over its steps: tokens summed, time from the first to the last."""
    if len(steps) == 1:
        return steps[0]
    first, last = steps[0], steps[-1]
    total = GenerationStats(model=last.model, backend=last.backend, started_at=first.started_at)
    for s in steps:
        total.prompt_tokens += s.prompt_tokens
        total.cached_tokens += s.cached_tokens
        total.evaluated_tokens += s.evaluated_tokens
        total.completion_tokens += s.completion_tokens
    total.ttft_s = first.ttft_s
    total.queue_wait_s = first.queue_wait_s
    total.finish(last.finish_reason or "stop")
    return total
