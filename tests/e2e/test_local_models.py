"""Several local models through a real Synapse: two personas on two models in one room,
a memory budget that holds one, !load / !unload / !reload_models, the admin API, worker
profiles and traits.

The second model is the bundled one re-quantised to Q8_0 (tests/support/models.py).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from hivebridge import metrics
from hivebridge.app import Bridge
from hivebridge.config import AdminApiConfig, Config, LocalModelConfig, ProfileConfig
from hivebridge.devserver.client import HumanClient
from hivebridge.devserver.process import free_port
from hivebridge.inference.bundled import BUNDLED_MODEL_NAME
from hivebridge.inference.local.gguf_meta import model_shape
from hivebridge.inference.types import SamplingParams
from hivebridge.personas.replies import ReplyDone
from tests.e2e.conftest import Homeserver
from tests.e2e.test_personas import bot_room, command

Event = dict[str, Any]
ADMIN_TOKEN = "admin-token-for-models-e2e-0123456789"


def models_config(base: Config, tmp_path: Path, q8: Path, **local: Any) -> Config:
    models_dir = tmp_path / "models"
    models_dir.mkdir(exist_ok=True)
    return replace(
        base,
        data_dir=str(tmp_path / "bridge"),
        inference=replace(
            base.inference,
            temperature=1.0,  # the profile below makes one persona deterministic
            profiles=(ProfileConfig("precise", temperature=0.0, max_tokens=24),),
            local=replace(
                base.inference.local,
                n_ctx=4096,
                n_seq_max=4,
                models_dir=str(models_dir),
                models=(LocalModelConfig("q8", str(q8)),),
                unload_grace_s=0.5,
                **local,
            ),
        ),
        admin_api=AdminApiConfig(token=ADMIN_TOKEN, port=free_port()),
    )


async def running(config: Config, registration: Path) -> AsyncIterator[Bridge]:
    bridge = Bridge(config, registration)
    await bridge.start()
    try:
        yield bridge
    finally:
        await bridge.stop()


@pytest.fixture
async def bridge(homeserver: Homeserver, tmp_path: Path, second_model: Path) -> Any:
    config = models_config(homeserver.config, tmp_path, second_model)
    async for b in running(config, homeserver.registration):
        yield b


def reply_to(persona: str, event_id: str) -> Callable[[Event], bool]:
    def check(e: Event) -> bool:
        content = e.get("content", {})
        return (
            e.get("type") == "m.room.message"
            and e.get("sender") == persona
            and content.get("m.relates_to", {}).get("m.in_reply_to", {}).get("event_id") == event_id
        )

    return check


async def ask(client: HumanClient, room: str, persona: str, text: str) -> Event:
    """Mention ``persona`` and wait for its (first, unedited) answer."""
    asked = await client.send_text(room, text, **{"m.mentions": {"user_ids": [persona]}})
    return await client.wait_for(room, reply_to(persona, asked), timeout=120)


async def group(owner: HumanClient, bridge: Bridge) -> tuple[str, str, str]:
    """A room with the bot, the default persona and "ada", a persona on the q8 model."""
    bot = bridge.config.bot_mxid
    assistant = bridge.config.persona_mxid("assistant")
    room = await owner.create_room([bot, assistant], name="models")
    await owner.wait_for_members(room, {owner.user_id, bot, assistant})
    spawned = await command(
        owner, room, f'!persona spawn ada --model q8 --room {room} --prompt "You are Ada."', bot
    )
    assert spawned.startswith("Spawned"), spawned
    return room, assistant, bridge.config.persona_mxid("ada")


def model_lines(models: str) -> dict[str, str]:
    found = {}
    for line in models.splitlines()[1:]:
        match = re.match(r"^\d+\. (\S+) — (.*)$", line)
        if match:
            found[match.group(1)] = match.group(2)
    return found


def budget_for_one(q8: Path, n_ctx: int) -> int:
    """Room for q8 (the larger) and part of the bundled model, never both: each model's
    estimate is its file plus an ``n_ctx``-token KV pool (~92 MiB at 4,096 here)."""
    kv = n_ctx * model_shape(q8).kv_bytes_per_token()
    return os.path.getsize(q8) + kv + 60 * 2**20


def sample(name: str, model: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, {"model": model}) or 0.0


async def test_two_personas_on_two_models_answer_in_one_room(
    homeserver: Homeserver, bridge: Bridge
) -> None:
    bot = bridge.config.bot_mxid
    async with homeserver.owner() as owner:
        room, assistant, ada = await group(owner, bridge)
        assert (await ask(owner, room, assistant, "Assistant, say hi."))["content"]["body"]
        assert (await ask(owner, room, ada, "Ada, say hi."))["content"]["body"]
        models = await command(owner, room, "!models", bot)
        lines = model_lines(models)
        print(f"\n{models}")
        assert lines[BUNDLED_MODEL_NAME].endswith("— loaded, 0 of 31 layers on a GPU"), models
        assert lines["q8"].startswith("local file smollm2-q8.gguf (") and "Q8_0" in lines["q8"]
        assert lines["q8"].endswith("— loaded, 0 of 31 layers on a GPU"), models

        # Clear lines for names that are no model and files that are no GGUF.
        nope = await command(owner, room, "!load nope", bot)
        assert nope.startswith("No local model 'nope'") and "\n" not in nope
        junk = Path(bridge.config.inference.local.models_dir or "") / "junk.gguf"
        junk.write_bytes(b"this is not a model")
        reload = await command(owner, room, "!reload_models", bot)
        assert "Not usable: junk: junk.gguf is not a usable GGUF file" in reload, reload
        bad = await command(owner, room, "!load junk", bot)
        assert bad.startswith("Cannot load junk: junk.gguf is not a usable GGUF file"), bad
        assert "\n" not in bad and "Traceback" not in bad
        assert await command(owner, room, "!unload q8", bot) == "Unloaded q8."

        # The admin API's load and unload do it, and !models shows it.
        api = f"http://127.0.0.1:{bridge.config.admin_api.port}/api/v1/models"
        auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        async with aiohttp.ClientSession(headers=auth) as http:
            async with http.post(f"{api}/q8/load") as resp:
                assert resp.status == 200 and (await resp.json())["local"]["state"] == "loaded"
            lines = model_lines(await command(owner, room, "!models", bot))
            assert "— loaded" in lines["q8"]
            async with http.post(f"{api}/q8/unload") as resp:
                assert resp.status == 200
                assert (await resp.json())["local"]["state"] == "not loaded"
            lines = model_lines(await command(owner, room, "!models", bot))
            assert lines["q8"].endswith("— not loaded")


async def test_a_budget_that_holds_one_model_swaps_them(
    homeserver: Homeserver, tmp_path: Path, second_model: Path
) -> None:
    probe = models_config(homeserver.config, tmp_path, second_model)
    budget = budget_for_one(second_model, probe.inference.local.n_ctx)
    config = models_config(homeserver.config, tmp_path, second_model, memory_budget=f"{budget}B")
    async for bridge in running(config, homeserver.registration):
        bot = bridge.config.bot_mxid
        unloads = sample("hivebridge_model_unloads_total", BUNDLED_MODEL_NAME)
        async with homeserver.owner() as owner:
            room, assistant, ada = await group(owner, bridge)
            assert (await ask(owner, room, assistant, "Assistant, hello?"))["content"]["body"]
            assert (await ask(owner, room, ada, "Ada, hello?"))["content"]["body"]
            lines = model_lines(await command(owner, room, "!models", bot))
            assert lines[BUNDLED_MODEL_NAME].endswith("— not loaded"), lines
            assert "— loaded" in lines["q8"]
            assert sample("hivebridge_model_unloads_total", BUNDLED_MODEL_NAME) == unloads + 1
            assert sample("hivebridge_model_loaded", BUNDLED_MODEL_NAME) == 0
            # Both still answer: the default model comes back and q8 makes room.
            assert (await ask(owner, room, assistant, "Assistant, still there?"))["content"]
            lines = model_lines(await command(owner, room, "!models", bot))
            assert "— loaded" in lines[BUNDLED_MODEL_NAME] and lines["q8"].endswith("not loaded")


async def test_unload_during_a_reply_ends_it_cleanly(
    homeserver: Homeserver, bridge: Bridge
) -> None:
    """A reply running on a model that is unloaded: its text so far stays, the room is
    told in one notice, its reply job is settled; the next reply loads the model again."""
    bot = bridge.config.bot_mxid
    # A long reply that surely still runs when the unload comes (no early end of text).
    replies = bridge.parts.replies
    replies.sampling = lambda persona: SamplingParams(max_tokens=400, ignore_eos=True)  # type: ignore[method-assign]
    async with homeserver.owner() as owner:
        room, _, ada = await group(owner, bridge)
        control = await bot_room(owner, bridge)  # the reply's room is busy with the reply
        asked = await owner.send_text(
            room, "Ada, tell a very long story.", **{"m.mentions": {"user_ids": [ada]}}
        )
        first = await owner.wait_for(room, reply_to(ada, asked), timeout=120)
        answer = await command(owner, control, "!unload q8", bot)
        assert answer == "Unloaded q8."
        notice = await owner.wait_for(
            room,
            lambda e: (
                e.get("sender") == ada
                and e.get("content", {}).get("msgtype") == "m.notice"
                and "could not answer" in e["content"].get("body", "")
            ),
            timeout=60,
        )
        assert "q8" in notice["content"]["body"] and "Traceback" not in notice["content"]["body"]
        await bridge.parts.handler.drain()
        job = await bridge.parts.jobs.get(asked, "ada")
        assert job is not None and job.state == "failed" and job.reply_event_id == first["event_id"]
        del replies.sampling  # the instance's patch: the class's method again
        assert (await ask(owner, room, ada, "Ada, are you back?"))["content"]["body"]


async def test_profiles_and_traits_shape_the_persona(
    homeserver: Homeserver, bridge: Bridge
) -> None:
    bot = bridge.config.bot_mxid
    async with homeserver.owner() as owner:
        room, assistant, ada = await group(owner, bridge)
        profiles = await command(owner, room, "!profiles", bot)
        assert "precise: temperature=0, max_tokens=24" in profiles, profiles
        bad = await command(owner, room, "!persona set ada profile nope", bot)
        assert bad.startswith("No worker profile 'nope' (precise)"), bad
        assert await command(owner, room, "!persona set ada profile precise", bot) == (
            "Set profile of ada."
        )
        # The same context twice on a temperature-0 profile: the same reply.
        texts = []
        for _ in range(2):
            assert "Context reset" in await command(owner, room, "!reset", bot)
            reply = await ask(owner, room, ada, "Ada, name three colours.")
            await bridge.parts.handler.drain()
            texts.append(await final_text(owner, room, reply["event_id"]))
        assert texts[0] and texts[0] == texts[1], texts

        # Traits go into the system prompt in a stable form, and !persona show has them.
        history, personas = bridge.parts.history, bridge.parts.personas
        me = personas.get(ada)
        assert me is not None
        before, _ = await history.next_prompt(me, room, None, group=True)
        assert "Your traits:" not in before.messages[0].content
        traits = '{"speaks": "like a pirate", "openness": 0.8}'
        assert await command(owner, room, f"!persona set ada traits {traits}", bot) == (
            "Set traits of ada."
        )
        me = personas.get(ada)
        assert me is not None
        after, _ = await history.next_prompt(me, room, None, group=True)
        system = after.messages[0].content
        assert system == "You are Ada.\n\nYour traits:\n- openness: 0.8\n- speaks: like a pirate"
        shown = await command(owner, room, "!persona show ada", bot)
        assert "profile: precise" in shown and "- speaks: like a pirate" in shown

        # Only ada's pinned prefix changes. Both personas on the default model now (a
        # model change takes effect on the next reply): the default persona's pinned
        # system block still serves a fresh room; ada evaluates its new traits.
        done: list[ReplyDone] = []

        async def record(d: ReplyDone) -> None:
            done.append(d)

        undo = bridge.parts.replies.observe(record)
        try:
            await command(owner, room, f"!persona set ada model {BUNDLED_MODEL_NAME}", bot)
            await ask(owner, room, ada, "Ada, one word please.")
            dm = await owner.create_room([assistant], direct=True)
            await owner.wait_for_members(dm, {owner.user_id, assistant})
            await ask_dm(owner, dm, assistant, "Hello there.")
            await command(owner, room, '!persona set ada traits {"speaks": "in rhymes"}', bot)
            await ask(owner, room, ada, "Ada, one more word please.")
            dm2 = await owner.create_room([assistant], direct=True)
            await owner.wait_for_members(dm2, {owner.user_id, assistant})
            await ask_dm(owner, dm2, assistant, "Hello again.")
            await bridge.parts.handler.drain()
        finally:
            undo()
        ada_after, assistant_after = done[-2], done[-1]
        assert done[0].model == BUNDLED_MODEL_NAME  # the model change took effect at once
        count = bridge.parts.models.count_tokens
        default = personas.get(assistant)
        assert default is not None
        assert assistant_after.stats.cached_tokens >= count(default.system_prompt), done
        assert ada_after.stats.evaluated_tokens >= count("- speaks: in rhymes"), done


async def ask_dm(client: HumanClient, room: str, persona: str, text: str) -> Event:
    asked = await client.send_text(room, text)
    return await client.wait_for(
        room,
        lambda e: (
            e.get("sender") == persona
            and e.get("type") == "m.room.message"
            and e.get("content", {}).get("msgtype") == "m.text"
            and e.get("content", {}).get("io.github.hivebridge.answers") == asked
        ),
        timeout=120,
    )


async def final_text(client: HumanClient, room: str, event_id: str) -> str:
    from hivebridge.devserver.client import shown_text

    deadline = time.monotonic() + 30
    await client.sync_once(timeout_ms=0)
    text = shown_text(client.timeline.get(room, []), event_id)
    while not text and time.monotonic() < deadline:
        await client.sync_once(timeout_ms=500)
        text = shown_text(client.timeline.get(room, []), event_id)
    return text
