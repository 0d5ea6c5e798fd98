"""``!stats``: messages, replies and tokens, in total and today, from the ``usage`` table."""

from __future__ import annotations

import time
from collections.abc import Callable

from ..db.usage import Tally, UsageStore
from ..utc import utc_day
from .base import CommandContext, CommandTable
from .parser import CommandSpec, ParsedCommand


class StatsCommands:
    def __init__(
        self,
        usage: UsageStore,
        bot_mxid: str,
        clock: Callable[[], float] = time.time,
        *,
        ours: str | None = None,
    ) -> None:
        """``ours``: a :func:`~hivebridge.db.usage.users_like` pattern of our own users,
        so personas answering personas are not listed among the people."""
        self.usage = usage
        self.bot_mxid = bot_mxid
        self.clock = clock
        self.ours = ours

    def register(self, table: CommandTable) -> None:
        table.add(
            CommandSpec("stats", "stats", "usage: messages, replies, tokens, top users"),
            self.stats,
        )

    async def stats(self, ctx: CommandContext, cmd: ParsedCommand) -> None:
        day = utc_day(self.clock())
        r = await self.usage.report(day, bot_mxid=self.bot_mxid, ours=self.ours)
        lines = [
            f"Usage (total / today, UTC {day}):",
            f"messages: {r.messages} / {r.messages_today}",
            f"persona replies: {r.replies} / {r.replies_today}",
            f"{ctx.prefix}ask answers: {r.asks} / {r.asks_today}",
            f"scene turns: {r.scene_turns} / {r.scene_turns_today}",
            f"tokens: {r.tokens} / {r.tokens_today}",
        ]
        sections = [
            ("per persona", r.personas),
            ("per model", r.models),
            ("scene turns per persona", r.scene_personas),
        ]
        if self.ours is not None:  # a persona answering a persona is no user's request
            sections.append(("asked by personas", r.persona_askers))
        if ctx.trusted:  # who talks how much is not every room member's business
            sections.insert(0, ("top users", r.top_users))
        for title, tallies in sections:
            lines.append(f"{title}: " + (_tallies(tallies) or "none"))
        await ctx.reply("\n".join(lines))


def _tallies(tallies: list[Tally]) -> str:
    return "; ".join(
        f"{t.key} {t.requests} req / {t.tokens} tok (today {t.requests_today} / {t.tokens_today})"
        for t in tallies
    )
