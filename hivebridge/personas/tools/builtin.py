"""The built-in tools: current_time, roll_dice, get_weather, room_history_search.

Each factory returns a :class:`Tool`; the app registers them. None has side
effects. What they read comes from their arguments and the asking room only.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import aiohttp

from ...db.messages import MessageStore
from ...matrix.content import is_edit
from .registry import Tool, ToolContext, ToolError

# --- current_time ------------------------------------------------------------------------


def current_time_tool(now: Callable[[], float] = time.time) -> Tool:
    async def run(args: Mapping[str, Any], ctx: ToolContext) -> str:
        name = str(args.get("timezone") or "UTC").strip()
        if not re.fullmatch(r"[A-Za-z0-9_+\-/]{1,64}", name) or ".." in name:
            raise ToolError(f"{name[:40]!r} is not a time zone; use an IANA name, e.g. Asia/Tokyo")
        try:
            zone = ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError):
            raise ToolError(
                f"unknown time zone {name!r}; use an IANA name like Europe/London"
            ) from None
        moment = datetime.fromtimestamp(now(), UTC).astimezone(zone)
        return f"{moment:%Y-%m-%d %H:%M (%A)} in {name} (UTC{moment:%z})"

    return Tool(
        "current_time",
        "The current date and time in a time zone.",
        {
            "type": "object",
            "properties": {
                "timezone": {
                    "type": "string",
                    "maxLength": 64,
                    "description": "an IANA time zone name",
                    "examples": ["Europe/London"],
                }
            },
            "required": ["timezone"],
            "additionalProperties": False,
        },
        run,
        timeout_s=2.0,
        notice=lambda a: f"looking at the clock in {a.get('timezone', 'UTC')}…",
    )


# --- roll_dice ---------------------------------------------------------------------------

MAX_DICE, MAX_SIDES = 100, 1000


def roll_dice_tool(rng: random.Random | None = None) -> Tool:
    dice = rng or random.SystemRandom()

    async def run(args: Mapping[str, Any], ctx: ToolContext) -> str:
        count, sides = int(args.get("count", 1)), int(args.get("sides", 6))
        if not 1 <= count <= MAX_DICE or not 2 <= sides <= MAX_SIDES:
            raise ToolError(f"roll 1-{MAX_DICE} dice of 2-{MAX_SIDES} sides")
        rolls = [dice.randint(1, sides) for _ in range(count)]
        shown = ", ".join(map(str, rolls)) if count <= 20 else f"{len(rolls)} rolls"
        return f"{count}d{sides}: {shown} (total {sum(rolls)})"

    return Tool(
        "roll_dice",
        "Roll dice, e.g. 2 dice of 6 sides.",
        {
            "type": "object",
            "properties": {
                "count": {"type": "integer", "minimum": 1, "maximum": MAX_DICE, "examples": [2]},
                "sides": {"type": "integer", "minimum": 2, "maximum": MAX_SIDES, "examples": [6]},
            },
            "required": ["count", "sides"],
            "additionalProperties": False,
        },
        run,
        timeout_s=1.0,
        notice=lambda a: f"rolling {a.get('count', 1)}d{a.get('sides', 6)}…",
    )


# --- get_weather -------------------------------------------------------------------------

#: Not places: the model must name one (the seed's rule: "only a specific place
#: name, never 'here' or 'today'").
VAGUE_LOCATIONS = frozenset(
    {
        "here", "there", "today", "tomorrow", "now", "tonight", "yesterday", "current",
        "current location", "my location", "my city", "my town", "local", "nearby",
        "near me", "outside", "home", "where i am", "where i live", "this city", "the city",
        "location", "place", "city", "somewhere", "anywhere", "everywhere", "unknown",
    }
)  # fmt: skip


def vague_location(location: str) -> str | None:
    """Why ``location`` is no place to look up, or None when it is one."""
    text = " ".join(location.split()).strip(" .,!?;:'\"").lower()
    if not text:
        return "no location was given"
    if text in VAGUE_LOCATIONS or text.removeprefix("the ") in VAGUE_LOCATIONS:
        return f"{location.strip()[:40]!r} is not a place"
    if not any(ch.isalpha() for ch in text):
        return f"{location.strip()[:40]!r} is not a place name"
    return None


def weather_tool(base_url: str, fmt: str, timeout_s: float) -> Tool:
    """The weather at a place from an HTTP service of wttr.in's ``format=`` kind:
    ``GET {base_url}/{place}?format={fmt}`` answers one line of text."""
    base = base_url.rstrip("/")

    async def run(args: Mapping[str, Any], ctx: ToolContext) -> str:
        location = str(args.get("location", ""))
        problem = vague_location(location)
        if problem:
            raise ToolError(f"{problem}: give a specific place name, like London or Paris")
        place = " ".join(location.split())
        # The whole place goes into one path segment: "/", "?" and "#" are escaped.
        url = f"{base}/{quote(place, safe='')}?format={quote(fmt, safe='')}"
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        headers = {"User-Agent": "hivebridge", "Accept": "text/plain"}
        try:
            async with (
                aiohttp.ClientSession(timeout=timeout) as session,
                session.get(url, headers=headers) as resp,
            ):
                body = (await resp.text(errors="replace")).strip()
                if resp.status == 404:
                    raise ToolError(f"the weather service does not know {place[:60]!r}")
                if resp.status != 200:
                    raise ToolError(f"the weather service answered HTTP {resp.status}")
        except aiohttp.ClientError as e:
            raise ToolError(f"the weather service cannot be reached ({type(e).__name__})") from None
        if not body or body.lower().startswith(("unknown location", "<")):
            raise ToolError(f"the weather service has nothing for {place[:60]!r}")
        return " ".join(body.split())[:500]

    return Tool(
        "get_weather",
        "The current weather at one specific place.",
        {
            "type": "object",
            "properties": {
                "location": {
                    "type": "string",
                    "maxLength": 80,
                    "description": "a city or place name, never 'here' or 'today'",
                    "examples": ["Paris"],
                }
            },
            "required": ["location"],
            "additionalProperties": False,
        },
        run,
        notice=lambda a: f"checking the weather in {str(a.get('location', '?'))[:60]}…",
    )


# --- room_history_search -----------------------------------------------------------------

MAX_HITS = 5


def history_search_tool(messages: MessageStore, prefix: str = "!") -> Tool:
    """Earlier messages of the asking room (only that room: the context says which)."""

    async def run(args: Mapping[str, Any], ctx: ToolContext) -> str:
        words = str(args.get("query", "")).split()[:8]
        sender = str(args.get("sender", "")).strip().lstrip("@")[:64]
        if not words and not sender:
            raise ToolError("give words to look for, or a sender")
        found = await messages.search(ctx.room_id, words, sender or None, limit=MAX_HITS + 5)
        hits = [
            m
            for m in found
            if m.event_id != ctx.event_id
            and not is_edit(m.content)
            and not (m.body.startswith(prefix) and not m.persona)
        ][:MAX_HITS]
        if not hits:
            return "no earlier message matches"
        lines = []
        for m in hits:
            when = datetime.fromtimestamp(m.ts / 1000, UTC).strftime("%Y-%m-%d %H:%M")
            who = m.persona or m.sender.split(":", 1)[0].lstrip("@")
            text = " ".join(m.body.split())
            lines.append(f"[{when} UTC] {who}: {text[:200]}")
        return f"{len(lines)} earlier message(s), newest first:\n" + "\n".join(lines)

    return Tool(
        "room_history_search",
        "Find earlier messages in this room by words or by sender.",
        {
            "type": "object",
            "properties": {
                "query": {
                    "type": "string",
                    "maxLength": 100,
                    "description": "words the message contains",
                    "examples": ["pizza"],
                },
                "sender": {"type": "string", "maxLength": 64, "description": "who wrote it"},
            },
            "required": ["query"],
            "additionalProperties": False,
        },
        run,
        timeout_s=5.0,
        notice=lambda a: f"searching this room for {str(a.get('query', ''))[:40]!r}…",
    )
