"""Chapter summaries written in the background by the persona's own model.

When a reply's prompt had to drop enough old turns (``summary_due``), the
reply service hands the dropped turns to :meth:`Summarizer.schedule` *after*
the reply is sent. A task then asks the same backend the persona answers with
to merge the previous summary and those turns into a new one, and stores it
with the last event it covers. Later prompts carry the summary in the system
block and only the turns after that event.

Why it is shaped like this:

* **Never in the reply path**: the job is an ``asyncio`` task started after the
  reply finished; a reply never waits for it (a single serial local model may
  still queue the next generation behind a running summary).
* **One job per room**: a second trigger while one runs is dropped; the next
  reply after it ends triggers again if turns are still due.
* **Failure keeps raw history**: a failed or empty summary stores nothing, so
  prompts go on with the raw (trimmed) turns, exactly as before.
* **Deterministic**: temperature 0, so the same chapter gives the same text and
  the system block (the KV cache prefix) changes only when a chapter is written.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Sequence

from ..config import Config
from ..conversation import Turn, build_summary_request, strip_think
from ..db.personas import Persona
from ..db.summaries import ChapterSummary, SummaryStore
from ..inference.types import Backend, InferenceError, SamplingParams, collect

log = logging.getLogger("hivebridge.summaries")


class Summarizer:
    """Runs at most one summary job per room, in the background."""

    def __init__(
        self,
        config: Config,
        store: SummaryStore,
        count_tokens: Callable[[str], int],
    ) -> None:
        self.config = config
        self.store = store
        self.count_tokens = count_tokens
        self._jobs: dict[str, asyncio.Task[ChapterSummary | None]] = {}
        #: Chapters written since start and failures (for tests and the log).
        self.written = 0
        self.failed = 0

    async def apply_config(self, config: Config) -> None:
        """Reloaded summary settings hold from the next chapter (a running one finishes)."""
        self.config = config

    def running(self, room_id: str) -> bool:
        job = self._jobs.get(room_id)
        return job is not None and not job.done()

    def schedule(
        self,
        backend: Backend,
        persona: Persona,
        room_id: str,
        thread_key: str,
        turns: Sequence[Turn],
        previous: ChapterSummary | None,
    ) -> bool:
        """Start summarizing ``turns`` (oldest first) into the chapter; False if busy.

        ``backend`` is the one the persona's reply used, so the summary costs
        no second model and reads the conversation the way the persona does.
        """
        if not self.config.summaries.enabled or not turns or self.running(room_id):
            return False
        task = asyncio.create_task(
            self._run(backend, persona, room_id, thread_key, tuple(turns), previous),
            name=f"summary {room_id}",
        )
        self._jobs[room_id] = task
        task.add_done_callback(functools.partial(self._done, room_id))
        return True

    def _done(self, room_id: str, task: asyncio.Task[ChapterSummary | None]) -> None:
        if self._jobs.get(room_id) is task:
            del self._jobs[room_id]

    async def _run(
        self,
        backend: Backend,
        persona: Persona,
        room_id: str,
        thread_key: str,
        turns: tuple[Turn, ...],
        previous: ChapterSummary | None,
    ) -> ChapterSummary | None:
        cfg = self.config.summaries
        budget = cfg.input_tokens or self.config.inference.context_tokens
        request = build_summary_request(
            turns,
            previous.summary if previous else None,
            budget=budget,
            count_tokens=self.count_tokens,
            persona_name=persona.displayname,
        )
        extra = {"room_id": room_id, "persona": persona.name}
        try:
            gen = backend.generate(
                request.messages,
                SamplingParams(max_tokens=cfg.max_tokens, temperature=0.0, top_p=1.0),
                session=f"{room_id}|summary",
            )
            text = strip_think(await collect(gen), False, streaming=False).strip()
        except InferenceError as e:
            self.failed += 1
            log.warning("summary failed, raw history stays in use: %s", e, extra=extra)
            return None
        except Exception:
            self.failed += 1
            log.exception("summary failed, raw history stays in use", extra=extra)
            return None
        if not text:
            self.failed += 1
            log.warning("summary came back empty; raw history stays in use", extra=extra)
            return None
        stored = await self.store.put(
            room_id, thread_key, text, request.up_to_ts, request.up_to_event_id
        )
        self.written += 1
        log.info(
            "chapter summary written: %d turns folded, %d chars",
            len(request.covered),
            len(text),
            extra=extra,
        )
        return stored

    async def forget_since(self, room_id: str, ts: int) -> None:
        """A message sent at ``ts`` was redacted: a job that may have read it is cancelled
        and every summary covering it dropped; the next reply summarizes what is left."""
        job = self._jobs.get(room_id)
        if job is not None and not job.done():
            job.cancel()
            await asyncio.gather(job, return_exceptions=True)
        await self.store.delete_covering(room_id, ts)

    async def wait_idle(self, room_id: str | None = None) -> None:
        """Wait for the running job of ``room_id`` (or of every room) to end."""
        jobs = [self._jobs[room_id]] if room_id in self._jobs else []
        if room_id is None:
            jobs = list(self._jobs.values())
        if jobs:
            await asyncio.gather(*jobs, return_exceptions=True)

    async def close(self) -> None:
        """Cancel running jobs (at shutdown); the next reply after start retries."""
        jobs = list(self._jobs.values())
        for job in jobs:
            job.cancel()
        if jobs:
            await asyncio.gather(*jobs, return_exceptions=True)
