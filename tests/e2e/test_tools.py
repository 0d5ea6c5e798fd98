"""Personas with tools, through a real Synapse, the real bundled model and a fake weather service.

The 135M model does not pick a tool by itself (asked about the weather it
answers from thin air), so these tests make the choice deterministic the way
an operator would for a small model: ``!persona set … tool_choice get_weather``
makes the first step of every reply call that tool (then the persona answers
with its result). Decoding is greedy (temperature 0, the e2e config). Which
place the model passes, and that the answer carries the service's figures, is
the model's own doing.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from hivebridge.app import Bridge
from hivebridge.config import Config, EndpointConfig, ToolsConfig, WeatherToolConfig
from hivebridge.devserver.client import HumanClient, is_edit, shown_text
from hivebridge.inference.types import NONE, REQUIRED, Backend, ChatMessage, SamplingParams
from hivebridge.personas.replies import ReplyDone
from hivebridge.personas.tools import Tool, ToolContext
from tests.conftest import skip_or_fail
from tests.e2e.conftest import Homeserver
from tests.support.fake_weather import FIGURES, FakeWeather, fake_weather
from tests.support.llama_server import llama_server_missing, running_llama_server
from tests.support.waiting import until

Event = dict[str, Any]


def tool_config(
    homeserver: Homeserver, tmp_path: Path, weather: FakeWeather, **tools: Any
) -> Config:
    config = homeserver.config
    return replace(
        config,
        data_dir=str(tmp_path / "bridge"),
        inference=replace(config.inference, max_tokens=64, temperature=0.0),  # greedy: one answer
        tools=ToolsConfig(weather=WeatherToolConfig(base_url=weather.url), **tools),
    )


@asynccontextmanager
async def running(config: Config, homeserver: Homeserver) -> AsyncIterator[Bridge]:
    bridge = Bridge(config, homeserver.registration)
    await bridge.start()
    try:
        yield bridge
    finally:
        await bridge.stop()


def from_persona(mxid: str, msgtype: str) -> Any:
    def check(e: Event) -> bool:
        content = e.get("content", {})
        return (
            e.get("sender") == mxid
            and content.get("msgtype") == msgtype
            and content.get("m.relates_to", {}).get("rel_type") != "m.replace"
        )

    return check


async def command(client: HumanClient, room: str, persona: str, body: str) -> str:
    """A command in a DM: the persona answers for the bot with a notice."""
    notice = from_persona(persona, "m.notice")
    seen = sum(1 for e in client.timeline.get(room, []) if notice(e))
    await client.send_text(room, body)
    deadline = time.monotonic() + 60
    while True:
        found = [e for e in client.timeline.get(room, []) if notice(e)]
        if len(found) > seen:
            return str(found[seen]["content"]["body"])
        assert time.monotonic() < deadline, f"no answer to {body!r}"
        await client.sync_once(500)


async def ask(
    client: HumanClient, room: str, persona: str, text: str, bridge: Bridge
) -> tuple[ReplyDone, list[Event]]:
    """Send ``text`` and wait until the persona's reply is done; the room's events since."""
    done: list[ReplyDone] = []

    async def on_done(d: ReplyDone) -> None:
        done.append(d)

    undo = bridge.parts.replies.observe(on_done)
    try:
        before = len(client.timeline.get(room, []))
        await client.send_text(room, text)
        deadline = time.monotonic() + 240
        while not done:
            assert time.monotonic() < deadline, "no reply"
            await client.sync_once(500)
        await bridge.parts.handler.drain()
        await client.sync_once(500)
    finally:
        undo()
    return done[0], client.timeline[room][before:]


async def open_dm(homeserver: Homeserver, bridge: Bridge) -> tuple[HumanClient, str, str]:
    persona = bridge.config.persona_mxid(bridge.config.default_persona.name)
    owner = homeserver.owner()  # trusted: may set a persona's tools
    room = await owner.create_room([persona], direct=True)
    await owner.wait_for_members(room, {owner.user_id, persona})
    return owner, room, persona


async def test_weather_through_the_local_engine(homeserver: Homeserver, tmp_path: Path) -> None:
    """The persona calls get_weather (forced first step), the room sees the intermediate
    notice, and the final reply, one event, carries the service's figures."""
    async with (
        fake_weather() as weather,
        running(tool_config(homeserver, tmp_path, weather), homeserver) as bridge,
    ):
        owner, room, persona = await open_dm(homeserver, bridge)
        name = bridge.config.default_persona.name
        try:
            answer = await command(owner, room, persona, f"!persona set {name} tools get_weather")
            assert answer == f"Set tools of {name}."
            await command(owner, room, persona, f"!persona set {name} tool_choice get_weather")
            shown = await command(owner, room, persona, f"!persona show {name}")
            assert "tools: get_weather" in shown and "tool choice: get_weather" in shown
            listed = await command(owner, room, persona, "!tools")
            assert "get_weather" in listed and "room_history_search" in listed

            done, events = await ask(owner, room, persona, "What is the weather in London?", bridge)
            context = await command(owner, room, persona, "!context")
        finally:
            await owner.close()

        assert done.error is None, done.error
        assert "tools: get_weather" in context and "1 earlier tool calls" in context, context
        assert weather.places and all(p.lower().startswith("london") for p in weather.places)
        assert [r.call.name for r in done.tool_results] == ["get_weather"]
        assert done.tool_results[0].ok and FIGURES in done.tool_results[0].content

        # In the room: the notice while the tool ran, then one reply with edits.
        notices = [e for e in events if from_persona(persona, "m.notice")(e)]
        replies = [e for e in events if from_persona(persona, "m.text")(e)]
        assert notices and "weather" in notices[0]["content"]["body"].lower()
        assert [e["event_id"] for e in replies] == [done.reply_event_id]
        assert events.index(notices[0]) < events.index(replies[0])
        final = shown_text(owner.timeline[room], replies[0]["event_id"])
        # Figures only the service knew (a 135M model copies some of them, not always all).
        assert any(figure in final for figure in ("17", "64%")), final
        assert "{" not in final and '"type"' not in final  # never the envelope's JSON
        print("\n[tools e2e] the room, as a client shows it (edits applied):")
        for e in owner.timeline[room]:
            content = e.get("content", {})
            if e.get("type") != "m.room.message" or is_edit(e):
                continue
            text = shown_text(owner.timeline[room], e["event_id"])
            print(f"  {e['sender']} [{content.get('msgtype')}]: {text}")

        # Stored with the reply: the next prompt (and !context) show the call again.
        stored = await bridge.parts.tool_calls.for_replies(room, [done.reply_event_id or ""])
        assert [c.tool for c in stored[done.reply_event_id or ""]] == ["get_weather"]
        persona_row = bridge.parts.personas.get(persona)
        assert persona_row is not None
        prompt, _ = await bridge.parts.history.next_prompt(persona_row, room, None, group=False)
        assert any(m.role == "tool" and FIGURES in m.content for m in prompt.messages)


async def test_a_persona_without_the_tool_never_calls_it(
    homeserver: Homeserver, tmp_path: Path
) -> None:
    """With only current_time (and a forced call), the weather service is never asked."""
    async with (
        fake_weather() as weather,
        running(tool_config(homeserver, tmp_path, weather), homeserver) as bridge,
    ):
        owner, room, persona = await open_dm(homeserver, bridge)
        name = bridge.config.default_persona.name
        try:
            question = "What is the weather in London?"
            done_plain, _ = await ask(owner, room, persona, question, bridge)
            await command(owner, room, persona, f"!persona set {name} tools current_time")
            await command(owner, room, persona, f"!persona set {name} tool_choice required")
            done_forced, _ = await ask(
                owner, room, persona, "What is the weather in Paris right now?", bridge
            )
        finally:
            await owner.close()
        assert done_plain.tool_results == ()  # no tools at all: none offered, none run
        assert [r.call.name for r in done_forced.tool_results] == ["current_time"]
        assert weather.places == []


class ForeverCalling:
    """The real engine, told to call a tool at every step it may (tool_choice
    "required" unless the bridge says "none"): a model that never stops calling."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.name = inner.name
        self.choices: list[str] = []

    def generate(
        self, messages: Sequence[ChatMessage], params: SamplingParams, *, session: str | None = None
    ) -> Any:
        self.choices.append(params.tool_choice)
        if params.tools and params.tool_choice != NONE:
            params = params.with_(tool_choice=REQUIRED)
        return self.inner.generate(messages, params, session=session)


async def test_the_hop_limit_stops_a_model_that_calls_tools_forever(
    homeserver: Homeserver, tmp_path: Path
) -> None:
    async with (
        fake_weather() as weather,
        running(
            tool_config(homeserver, tmp_path, weather, max_hops=2, default=("roll_dice",)),
            homeserver,
        ) as bridge,
    ):
        forever = ForeverCalling(bridge.parts.models.backend(bridge.parts.default_model))
        bridge.parts.replies.backend_for = lambda persona: forever
        owner, room, persona = await open_dm(homeserver, bridge)
        try:
            done, events = await ask(owner, room, persona, "Roll some dice for me!", bridge)
        finally:
            await owner.close()
        assert forever.choices == ["auto", "auto", "none"]
        assert [r.hop for r in done.tool_results] == [0, 1]
        assert all(r.call.name == "roll_dice" for r in done.tool_results)
        assert done.error is None and done.reply_event_id is not None
        assert [e["event_id"] for e in events if from_persona(persona, "m.text")(e)] == [
            done.reply_event_id
        ]


async def test_weather_through_a_remote_llama_cpp_server(
    homeserver: Homeserver, tmp_path: Path
) -> None:
    """The same through a real ``llama_cpp.server``: the forced choice goes out as
    OpenAI's ``tool_choice`` (the server constrains the arguments to the tool's
    schema and streams ``tool_calls``), the result comes back as a ``tool`` message."""
    missing = llama_server_missing()
    if missing:
        skip_or_fail(missing)
    with running_llama_server("smollm2") as server:
        async with fake_weather() as weather:
            config = tool_config(homeserver, tmp_path, weather)
            config = replace(config, endpoints=(EndpointConfig("srv", server.base_url),))
            async with running(config, homeserver) as bridge:
                # Models are discovered in the background after the start.
                plan = bridge.parts.inference.plan
                await until(lambda: bool(plan("srv/smollm2")), "srv's models discovered")
                owner, room, persona = await open_dm(homeserver, bridge)
                name = bridge.config.default_persona.name
                try:
                    settings = (
                        "model srv/smollm2",
                        "tools get_weather",
                        "tool_choice get_weather",
                    )
                    for setting in settings:
                        await command(owner, room, persona, f"!persona set {name} {setting}")
                    done, events = await ask(
                        owner, room, persona, "What is the weather in London?", bridge
                    )
                finally:
                    await owner.close()
    assert done.error is None, done.error
    assert done.stats.backend == "srv"  # the endpoint answered, not the local fallback
    assert [r.call.name for r in done.tool_results] == ["get_weather"]
    assert weather.places and weather.places[0].lower().startswith("london")
    assert FIGURES in done.tool_results[0].content
    notices = [e for e in events if from_persona(persona, "m.notice")(e)]
    replies = [e for e in events if from_persona(persona, "m.text")(e)]
    assert notices and [e["event_id"] for e in replies] == [done.reply_event_id]
    final = shown_text(owner.timeline[room], replies[0]["event_id"])
    print(f"\n[tools e2e, remote] reply: {final!r}")
    assert "17" in final, final


async def test_a_tool_with_side_effects_waits_for_a_trusted_approval(
    homeserver: Homeserver, tmp_path: Path
) -> None:
    """A test-only tool with side effects: it runs after the owner reacts ✅ to the
    request, and not at all after ``!deny``."""
    rung: list[str] = []

    async def ring(args: Any, ctx: ToolContext) -> str:
        rung.append(ctx.room_id)
        return "the bell rang"

    bell = Tool(
        "ring_bell",
        "Ring the office bell.",
        {"type": "object", "properties": {}, "additionalProperties": False},
        ring,
        side_effects=True,
        notice=lambda a: "ringing the bell",
    )
    async with (
        fake_weather() as weather,
        running(
            tool_config(homeserver, tmp_path, weather, approval_timeout_s=60.0), homeserver
        ) as bridge,
    ):
        bridge.parts.tools.registry.register(bell)
        owner, room, persona = await open_dm(homeserver, bridge)
        name = bridge.config.default_persona.name
        try:
            await command(owner, room, persona, f"!persona set {name} tools ring_bell")
            await command(owner, room, persona, f"!persona set {name} tool_choice ring_bell")

            async def approve_when_asked() -> None:
                request = await owner.wait_for(
                    room,
                    lambda e: (
                        from_persona(persona, "m.notice")(e)
                        and "needs approval" in e["content"]["body"]
                    ),
                    timeout=120,
                )
                relates = {"rel_type": "m.annotation", "event_id": request["event_id"], "key": "✅"}
                await owner.send(room, {"m.relates_to": relates}, event_type="m.reaction")

            waiter = asyncio.create_task(approve_when_asked())
            done, _ = await ask(owner, room, persona, "Ring the bell, please.", bridge)
            await waiter
            assert [r.outcome for r in done.tool_results] == ["ok"]
            assert rung == [room]

            async def deny_when_asked() -> None:
                await owner.wait_for(
                    room,
                    lambda e: (
                        from_persona(persona, "m.notice")(e)
                        and "needs approval" in e["content"]["body"]
                        and e["event_id"] not in seen
                    ),
                    timeout=120,
                )
                await owner.send_text(room, "!deny")

            seen = {e["event_id"] for e in owner.timeline[room]}
            waiter = asyncio.create_task(deny_when_asked())
            done, _ = await ask(owner, room, persona, "Ring it again!", bridge)
            await waiter
            answer = await owner.wait_for(
                room,
                lambda e: (
                    from_persona(persona, "m.notice")(e)
                    and e["content"]["body"].startswith("Denied")
                ),
                timeout=60,
            )
        finally:
            await owner.close()
        assert [r.outcome for r in done.tool_results] == ["denied"]
        assert rung == [room]  # not run again
        assert "ring_bell" in answer["content"]["body"] or "bell" in answer["content"]["body"]
