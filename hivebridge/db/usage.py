"""What was answered, for whom, at what cost (``usage``), and request-limit state (``rate_limits``).

One ``usage`` row per persona reply or ``!ask``: the source of ``!stats`` and of the
daily token budgets, so both are right after a restart without counters of their own.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from mautrix.util.async_db import Database

UsageKind = Literal["reply", "ask", "summary", "scene"]
Scope = Literal["user_id", "room_id", "persona"]


@dataclass(frozen=True, slots=True)
class UsageRecord:
    ts: int  # ms since the epoch
    day: str  # UTC YYYY-MM-DD
    user_id: str
    room_id: str
    persona: str | None
    model: str
    kind: UsageKind
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True, slots=True)
class Tally:
    """Requests and tokens of one group (a user, a persona, a model), all time and today."""

    key: str
    requests: int
    tokens: int
    requests_today: int
    tokens_today: int


@dataclass(frozen=True, slots=True)
class UsageReport:
    messages: int
    messages_today: int
    replies: int
    replies_today: int
    asks: int
    asks_today: int
    tokens: int
    tokens_today: int
    #: People who asked most (personas answering personas are not among them) ...
    top_users: list[Tally]
    personas: list[Tally]
    models: list[Tally]
    #: ... and the personas that were answered by other personas, apart.
    persona_askers: list[Tally] = field(default_factory=list)
    scene_turns: int = 0
    scene_turns_today: int = 0
    #: Scene turns (and their tokens) per persona.
    scene_personas: list[Tally] = field(default_factory=list)


def users_like(prefix: str, domain: str) -> str:
    """A LIKE pattern (escape ``\\``) matching every user of our namespace:
    ``@<prefix>…:<domain>``, the bot and every persona."""
    return f"@{_like_escape(prefix)}%:{_like_escape(domain)}"


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


_TOKENS = "(prompt_tokens + completion_tokens)"


class UsageStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def record(self, row: UsageRecord) -> None:
        await self.db.execute(
            "INSERT INTO usage (ts, day, user_id, room_id, persona, model, kind, "
            "prompt_tokens, completion_tokens) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            row.ts,
            row.day,
            row.user_id,
            row.room_id,
            row.persona,
            row.model,
            row.kind,
            max(0, row.prompt_tokens),
            max(0, row.completion_tokens),
        )

    async def tokens_on(self, day: str, scope: Scope, value: str) -> int:
        """Tokens spent on ``day`` by one user, in one room or by one persona."""
        column = {"user_id": "user_id", "room_id": "room_id", "persona": "persona"}[scope]
        total = await self.db.fetchval(
            f"SELECT COALESCE(SUM{_TOKENS}, 0) FROM usage WHERE day=$1 AND {column}=$2",
            day,
            value,
        )
        return int(total or 0)

    async def report(
        self, day: str, *, bot_mxid: str, top: int = 5, ours: str | None = None
    ) -> UsageReport:
        """Totals and today's figures; messages are those people sent (not bot or personas).

        ``ours``: a :func:`users_like` pattern of our own users; the requests they made
        (a persona answering a persona) are tallied apart from the people's."""
        msg = await self.db.fetchrow(
            "SELECT COUNT(*) AS n, COALESCE(SUM(CASE WHEN ts >= $1 THEN 1 ELSE 0 END), 0) AS t "
            "FROM messages WHERE persona IS NULL AND sender <> $2",
            _day_start_ms(day),
            bot_mxid,
        )
        kinds = await self.db.fetch(
            f"SELECT kind, COUNT(*) AS n, COALESCE(SUM{_TOKENS}, 0) AS tok, "
            "COALESCE(SUM(CASE WHEN day=$1 THEN 1 ELSE 0 END), 0) AS n_today, "
            f"COALESCE(SUM(CASE WHEN day=$1 THEN {_TOKENS} ELSE 0 END), 0) AS tok_today "
            "FROM usage GROUP BY kind",
            day,
        )
        by_kind = {r["kind"]: r for r in kinds}

        def count(kind: str, col: str) -> int:
            row = by_kind.get(kind)
            return int(row[col]) if row is not None else 0

        return UsageReport(
            messages=int(msg["n"]) if msg else 0,
            messages_today=int(msg["t"]) if msg else 0,
            replies=count("reply", "n"),
            replies_today=count("reply", "n_today"),
            asks=count("ask", "n"),
            asks_today=count("ask", "n_today"),
            tokens=sum(int(r["tok"]) for r in kinds),
            tokens_today=sum(int(r["tok_today"]) for r in kinds),
            top_users=await self._tally("user_id", day, limit=top, ours=ours, mine=False),
            personas=await self._tally("persona", day),
            models=await self._tally("model", day),
            persona_askers=(
                await self._tally("user_id", day, limit=top, ours=ours, mine=True) if ours else []
            ),
            scene_turns=count("scene", "n"),
            scene_turns_today=count("scene", "n_today"),
            scene_personas=await self._tally("persona", day, kind="scene"),
        )

    async def _tally(
        self,
        column: str,
        day: str,
        limit: int | None = None,
        *,
        ours: str | None = None,
        mine: bool = False,
        kind: UsageKind | None = None,
    ) -> list[Tally]:
        """Groups by ``column``; with ``ours``, only our own users (``mine``) or only others;
        with ``kind``, only usage of that kind (scene turns)."""
        assert column in ("user_id", "persona", "model")
        where = f"{column} IS NOT NULL"
        args: list[Any] = [day]
        if ours is not None:
            args.append(ours)
            where += f" AND {'' if mine else 'NOT '}(user_id LIKE ${len(args)} ESCAPE '\\')"
        if kind is not None:
            args.append(kind)
            where += f" AND kind=${len(args)}"
        rows = await self.db.fetch(
            f"SELECT {column} AS k, COUNT(*) AS n, COALESCE(SUM{_TOKENS}, 0) AS tok, "
            "COALESCE(SUM(CASE WHEN day=$1 THEN 1 ELSE 0 END), 0) AS n_today, "
            f"COALESCE(SUM(CASE WHEN day=$1 THEN {_TOKENS} ELSE 0 END), 0) AS tok_today "
            f"FROM usage WHERE {where} GROUP BY {column} "
            f"ORDER BY COUNT(*) DESC, {column}" + (f" LIMIT {int(limit)}" if limit else ""),
            *args,
        )
        return [
            Tally(r["k"], int(r["n"]), int(r["tok"]), int(r["n_today"]), int(r["tok_today"]))
            for r in rows
        ]


class RateLimitStore:
    """Token-bucket state per key, as JSON, so request limits survive a restart."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def load(self) -> dict[str, Any]:
        state: dict[str, Any] = {}
        for r in await self.db.fetch("SELECT key, state FROM rate_limits"):
            try:
                state[r["key"]] = json.loads(r["state"])
            except ValueError:
                continue  # a damaged row only costs that user a fresh bucket
        return state

    async def save(self, key: str, state: Mapping[str, float]) -> None:
        await self.db.execute(
            "INSERT INTO rate_limits (key, state, updated_at) VALUES ($1, $2, $3) "
            "ON CONFLICT (key) DO UPDATE SET state=excluded.state, updated_at=excluded.updated_at",
            key,
            json.dumps(dict(state)),
            int(time.time() * 1000),
        )


def _day_start_ms(day: str) -> int:
    from datetime import UTC, datetime

    start = datetime.fromisoformat(day).replace(tzinfo=UTC)
    return int(start.timestamp() * 1000)
