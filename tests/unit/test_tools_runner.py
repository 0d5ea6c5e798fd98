"""Tools: the registry, argument checks, the runner (timeouts, errors), approvals, the hop limit."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import pytest

from hivebridge import metrics
from hivebridge.config import ToolsConfig
from hivebridge.db.personas import Persona
from hivebridge.inference.types import ToolCall
from hivebridge.personas.tools import (
    Approvals,
    Tool,
    ToolContext,
    ToolError,
    ToolRegistry,
    ToolRunner,
)
from hivebridge.personas.tools.builtin import (
    current_time_tool,
    roll_dice_tool,
    vague_location,
)
from hivebridge.personas.tools.schema import check_arguments
from hivebridge.personas.tools.toolbox import Toolbox

CTX = ToolContext("!room:hive.test", "ada", "@alice:hive.test", "$question")
TRUSTED = "@boss:hive.test"
EMPTY = {"type": "object", "properties": {}, "additionalProperties": False}


def tool(name: str, run: Any, **kw: Any) -> Tool:
    return Tool(name, f"{name} things.", kw.pop("parameters", EMPTY), run, **kw)


def runner(*tools: Tool, timeout_s: float = 5.0, approval_timeout_s: float = 5.0) -> ToolRunner:
    approvals = Approvals(lambda mxid: mxid == TRUSTED)
    return ToolRunner(
        ToolRegistry(tools), approvals, timeout_s=timeout_s, approval_timeout_s=approval_timeout_s
    )


def call(name: str, **args: Any) -> ToolCall:
    return ToolCall("c1", name, args)


async def ok(args: Mapping[str, Any], ctx: ToolContext) -> str:
    return f"done in {ctx.room_id}"


# --- registry and arguments --------------------------------------------------------------


def test_registry_rejects_bad_and_reserved_names() -> None:
    reg = ToolRegistry([tool("ping", ok)])
    for name in ("Ping", "auto", "none", "required", "bad-name", "x" * 49):
        with pytest.raises(ValueError):
            reg.register(tool(name, ok))
    with pytest.raises(ValueError):
        reg.register(tool("ping", ok))  # twice
    assert reg.specs(["nope", "ping"])[0].name == "ping"
    assert reg.unknown(["ping", "nope"]) == ["nope"]


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        ({"location": "Oslo"}, None),
        ({}, "location is required"),
        ({"location": 3}, "location must be a string"),
        ({"location": "x" * 81}, "location is longer than 80 characters"),
        ({"location": "Oslo", "when": "now"}, "unknown argument 'when'"),
    ],
)
def test_arguments_are_checked_against_the_schema(
    args: dict[str, Any], problem: str | None
) -> None:
    schema = {
        "type": "object",
        "properties": {"location": {"type": "string", "maxLength": 80}},
        "required": ["location"],
        "additionalProperties": False,
    }
    assert check_arguments(schema, args) == problem


def test_integer_bounds_and_bools() -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1}}}
    assert check_arguments(schema, {"n": 0}) == "n must be at least 1"
    assert check_arguments(schema, {"n": True}) == "n must be an integer"
    assert check_arguments(schema, {"n": 2.0}) is None


# --- the runner never raises ---------------------------------------------------------------


async def test_a_result_comes_back() -> None:
    result = await runner(tool("ping", ok)).run(call("ping"), CTX, ["ping"])
    assert result.ok and result.content == "done in !room:hive.test"


async def test_a_slow_tool_times_out() -> None:
    async def slow(args: Mapping[str, Any], ctx: ToolContext) -> str:
        await asyncio.sleep(10)
        return "never"

    before = metrics.TOOL_CALLS.labels("slow", "timeout")._value.get()
    result = await runner(tool("slow", slow, timeout_s=0.05)).run(call("slow"), CTX, ["slow"])
    assert result.outcome == "timeout" and result.content == "error: slow took longer than 0.05s"
    assert result.duration_s < 2
    assert metrics.TOOL_CALLS.labels("slow", "timeout")._value.get() == before + 1


async def test_failures_become_results_the_model_sees() -> None:
    async def refuses(args: Mapping[str, Any], ctx: ToolContext) -> str:
        raise ToolError("no such place")

    async def crashes(args: Mapping[str, Any], ctx: ToolContext) -> str:
        raise RuntimeError("secret token sk-123 leaked in a traceback")

    r = runner(tool("refuses", refuses), tool("crashes", crashes))
    refused = await r.run(call("refuses"), CTX, ["refuses", "crashes"])
    crashed = await r.run(call("crashes"), CTX, ["refuses", "crashes"])
    assert (refused.outcome, refused.content) == ("error", "error: no such place")
    assert crashed.outcome == "error" and crashed.content == "error: crashes failed (RuntimeError)"
    assert "sk-123" not in crashed.content


async def test_a_tool_the_persona_lacks_is_not_run() -> None:
    ran: list[str] = []

    async def record(args: Mapping[str, Any], ctx: ToolContext) -> str:
        ran.append("x")
        return "x"

    r = runner(tool("ping", record))
    result = await r.run(call("ping"), CTX, allowed=["other"])
    assert result.outcome == "unknown" and ran == []
    bad = await r.run(call("ping", extra=1), CTX, allowed=["ping"])
    assert bad.outcome == "invalid" and bad.content == "error: unknown argument 'extra'" and not ran


async def test_long_results_are_cut() -> None:
    async def chatty(args: Mapping[str, Any], ctx: ToolContext) -> str:
        return "x" * 5000

    r = runner(tool("chatty", chatty))
    r.max_result_chars = 100
    result = await r.run(call("chatty"), CTX, ["chatty"])
    assert len(result.content) == 100 and result.content.endswith("…")


# --- approvals -------------------------------------------------------------------------------


def side_effect_runner(ran: list[str], timeout: float = 5.0) -> tuple[ToolRunner, list[str]]:
    async def ring(args: Mapping[str, Any], ctx: ToolContext) -> str:
        ran.append(ctx.room_id)
        return "rang"

    posted: list[str] = []
    return runner(tool("ring", ring, side_effects=True), approval_timeout_s=timeout), posted


async def test_side_effects_run_after_a_trusted_reaction() -> None:
    ran: list[str] = []
    r, posted = side_effect_runner(ran)
    asked = asyncio.Event()

    async def post(text: str) -> str:
        posted.append(text)
        asked.set()
        return "$request"

    task = asyncio.create_task(r.run(call("ring"), CTX, ["ring"], post=post))
    await asyncio.wait_for(asked.wait(), 5)
    assert "needs approval" in posted[0] and ran == []
    assert not r.approvals.offer_reaction(CTX.room_id, "@mallory:hive.test", "$request", "✅")
    assert not r.approvals.offer_reaction(CTX.room_id, TRUSTED, "$other", "✅")
    assert r.approvals.offer_reaction(CTX.room_id, TRUSTED, "$request", "✅")
    result = await task
    assert result.ok and ran == [CTX.room_id]


async def test_deny_and_timeout_do_not_run_it() -> None:
    ran: list[str] = []
    r, _ = side_effect_runner(ran)
    asked = asyncio.Event()

    async def post(text: str) -> str:
        asked.set()
        return "$request"

    task = asyncio.create_task(r.run(call("ring"), CTX, ["ring"], post=post))
    await asyncio.wait_for(asked.wait(), 5)
    assert r.approvals.offer_command(CTX.room_id, "@mallory:hive.test", "$m1", "!approve")
    assert r.approvals.outcome_of("$m1") == "Only trusted users can approve or deny a tool."
    assert r.approvals.offer_command(CTX.room_id, TRUSTED, "$m2", "!deny")
    denied = await task
    assert denied.outcome == "denied" and denied.content == "error: the call was not run (denied)"
    assert r.approvals.outcome_of("$m2") == "Denied: using ring()…."

    r, _ = side_effect_runner(ran, timeout=0.05)
    late = await r.run(call("ring"), CTX, ["ring"], post=post)
    assert late.outcome == "denied" and "nobody approved it in time" in late.content
    assert ran == [] and r.approvals.pending(CTX.room_id) == 0
    assert r.approvals.offer_command(CTX.room_id, TRUSTED, "$m3", "!approve")
    assert r.approvals.outcome_of("$m3") == "Nothing here is waiting for approval."
    assert not r.approvals.offer_command(CTX.room_id, TRUSTED, "$m4", "!approved it")


# --- the hop limit -------------------------------------------------------------------------------


def persona(**kw: Any) -> Persona:
    return Persona("ada", "@hive_ada:hive.test", "Ada", "You are Ada.", **kw)


def toolbox(max_hops: int = 3, default: tuple[str, ...] = ("ping",)) -> Toolbox:
    return Toolbox(
        ToolsConfig(max_hops=max_hops, default=default),
        ToolRegistry([tool("ping", ok), tool("pong", ok)]),
        Approvals(lambda mxid: False),
    )


def choices(box: Toolbox, p: Persona, hops: int = 5) -> list[str]:
    names = box.names_for(p)
    return [box.choice(p, hop, names) for hop in range(hops)]


def test_the_hop_limit_forces_an_answer() -> None:
    assert choices(toolbox(max_hops=3), persona()) == ["auto", "auto", "auto", "none", "none"]
    assert choices(toolbox(max_hops=0), persona())[0] == "none"


def test_a_forced_choice_is_one_round_then_the_answer() -> None:
    box = toolbox()
    assert choices(box, persona(tool_choice="ping"), 3) == ["ping", "none", "none"]
    assert choices(box, persona(tool_choice="required"), 2) == ["required", "none"]
    assert choices(box, persona(tool_choice="gone"), 1) == ["auto"]  # no longer its tool


def test_persona_lists_win_over_the_default() -> None:
    box = toolbox(default=("ping", "missing"))
    assert box.names_for(persona()) == ["ping"]
    assert box.names_for(persona(tools=("pong",))) == ["pong"]
    assert box.names_for(persona(tools=())) == []
    assert choices(box, persona(tools=()), 1) == ["none"]


# --- built-in tools ---------------------------------------------------------------------------


@pytest.mark.parametrize("place", ["here", "Today", " the city ", "near me", "", "123", "?!"])
def test_vague_locations_are_refused(place: str) -> None:
    assert vague_location(place) is not None


@pytest.mark.parametrize("place", ["London", "São Paulo", "New York", "Here Lane, Leeds"])
def test_places_are_accepted(place: str) -> None:
    assert vague_location(place) is None


async def test_current_time_in_a_zone() -> None:
    clock = current_time_tool(now=lambda: 1_700_000_000.0)  # 2023-11-14 22:13 UTC
    out = await clock.run({"timezone": "Asia/Tokyo"}, CTX)
    assert out == "2023-11-15 07:13 (Wednesday) in Asia/Tokyo (UTC+0900)"
    for bad in ("Mars/Olympus", "../../etc/passwd", "x" * 70):
        with pytest.raises(ToolError):
            await clock.run({"timezone": bad}, CTX)


async def test_dice_within_bounds() -> None:
    dice = roll_dice_tool(random.Random(7))
    out = await dice.run({"count": 3, "sides": 6}, CTX)
    assert out.startswith("3d6: ") and "total" in out
    with pytest.raises(ToolError):
        await dice.run({"count": 0, "sides": 6}, CTX)


def test_the_config_default_must_name_known_tools() -> None:
    from hivebridge.app import build_toolbox
    from hivebridge.config import Config, ConfigError, HomeserverConfig
    from hivebridge.db.messages import MessageStore

    class Roles:
        def role_of(self, mxid: str) -> str:
            return "owner" if mxid == TRUSTED else "user"

    config = Config(HomeserverConfig("http://127.0.0.1:1", "hive.test"))
    box = build_toolbox(config, MessageStore(None), Roles())  # type: ignore[arg-type]
    assert box.registry.names() == [
        "current_time", "get_weather", "roll_dice", "room_history_search"
    ]  # fmt: skip
    assert box.approvals.is_trusted(TRUSTED) and not box.approvals.is_trusted("@x:hive.test")
    bad = replace(config, tools=ToolsConfig(default=("get_weather", "teleport")))
    with pytest.raises(ConfigError, match="teleport"):
        build_toolbox(bad, MessageStore(None), Roles())  # type: ignore[arg-type]
