"""The homeserver goes away for ~30 s in the middle of a reply; the bridge rides it out.

A Synapse of this module's own (the session's is shared by other tests and must
not go down), the bridge in process on SQLite. The persona has decided to
answer (its reply job is pending) when Synapse is stopped; the reply's sends
fail (connection refused) and are retried with backoff; Synapse is started
again on the same port and database, the reply lands once, and the next message
is answered as usual: nothing lost, nothing doubled, the bridge never stopped.
"""

from __future__ import annotations

import asyncio
import importlib.util
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp

from hivebridge.app import Bridge
from hivebridge.config import PermissionsConfig
from hivebridge.conversation import Prompt
from hivebridge.db.messages import StoredMessage
from hivebridge.db.personas import Persona
from hivebridge.devserver.client import HumanClient, register_user
from hivebridge.devserver.stack import SERVER_NAME, DevStack
from hivebridge.personas.history import Chapter
from tests.conftest import skip_or_fail
from tests.e2e.bridge_process import answers_to, dump, room_history

DOWN_S = 30.0


async def test_homeserver_down_30s_mid_reply(tmp_path: Path) -> None:
    if importlib.util.find_spec("synapse") is None:
        skip_or_fail("matrix-synapse is not installed")
    stack = DevStack(
        tmp_path,
        permissions=PermissionsConfig(invite_allowlist=(f"*:{SERVER_NAME}",)),
        configure=lambda c: replace(
            c, inference=replace(c.inference, max_tokens=16, temperature=0.0)
        ),
    )
    config, synapse, as_port = stack.config, stack.synapse, stack.config.appservice.port
    bridge = Bridge(config, stack.registration)
    try:
        await stack.start()
        await bridge.start()
        replies, conversation = bridge.parts.replies, bridge.parts.history
        persona = config.persona_mxid(config.default_persona.name)
        bot = config.bot_mxid
        user = await register_user(synapse.url, synapse.shared_secret, "carol", "pw-carol-1")
        token = user["access_token"]

        # Hold the reply at its start, so Synapse is surely down when it is sent.
        gate = asyncio.Event()
        prompt_for = conversation.prompt_for

        async def gated(
            p: Persona, msg: StoredMessage, *, group: bool, scene: Any = None
        ) -> tuple[Prompt, Chapter]:
            await gate.wait()
            return await prompt_for(p, msg, group=group, scene=scene)

        conversation.prompt_for = gated  # type: ignore[method-assign]

        async with HumanClient(synapse.url, user["user_id"], token) as carol:
            room = await carol.create_room([persona, bot], name="outage")
            await carol.wait_for_members(room, {carol.user_id, persona, bot})
            first = await carol.send_text(
                room, "Assistant, are you there?", **{"m.mentions": {"user_ids": [persona]}}
            )
        deadline = time.monotonic() + 60
        while await replies.jobs.get(first, config.default_persona.name) is None:
            assert time.monotonic() < deadline, "the persona never decided to answer"
            await asyncio.sleep(0.05)

        await asyncio.to_thread(synapse.stop)
        down_at = time.monotonic()
        gate.set()  # the reply is generated now and its sends fail
        await asyncio.sleep(DOWN_S / 2)
        # Still running and still holding the reply (pending, not failed).
        assert await _live(as_port)
        job = await replies.jobs.get(first, config.default_persona.name)
        assert job is not None and job.state == "pending", job
        await asyncio.sleep(max(0.0, DOWN_S - (time.monotonic() - down_at)))
        await synapse.start()
        print(f"\nhomeserver down for {time.monotonic() - down_at:.1f}s (restart included)")

        deadline = time.monotonic() + 60
        while (job := await replies.jobs.get(first, config.default_persona.name)) is None or (
            job.state == "pending"
        ):
            assert time.monotonic() < deadline, f"the reply never landed: {job}"
            await asyncio.sleep(0.25)
        landed = time.monotonic() - down_at
        assert job.state == "done", job
        print(f"the reply held through the outage landed {landed:.1f}s after the stop")
        async with HumanClient(synapse.url, user["user_id"], token) as carol:
            history = await room_history(carol, room)
        found = answers_to(history, persona, first)
        assert [e["event_id"] for e in found] == [job.reply_event_id], dump(history[-20:])

        async with HumanClient(synapse.url, user["user_id"], token) as carol:
            second = await carol.send_text(
                room, "Assistant, and now?", **{"m.mentions": {"user_ids": [persona]}}
            )
            deadline = time.monotonic() + 20
            while await bridge.parts.messages.get(second) is None:
                # Synapse on SQLite numbers appservice transactions anew after a restart;
                # intake keys its dedupe by id and content, so nothing is dropped.
                assert time.monotonic() < deadline, "message after the restart never stored"
                await asyncio.sleep(0.25)
            deadline = time.monotonic() + 60
            history = []
            while not answers_to(history, persona, second):
                assert time.monotonic() < deadline, "no answer after the outage"
                await asyncio.sleep(0.5)
                history = await room_history(carol, room)
            await asyncio.sleep(2)  # room for a would-be duplicate
            history = await room_history(carol, room)
        for event_id in (first, second):
            found = answers_to(history, persona, event_id)
            assert len(found) == 1, f"{event_id}: {len(found)} replies\n{dump(history[-20:])}"
            assert found[0]["content"]["msgtype"] == "m.text"
        print(f"reply held through the outage landed {landed:.1f}s after the stop; next answered")
    finally:
        await bridge.stop()
        stack.stop()


async def _live(port: int) -> bool:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{port}/_matrix/mau/live") as resp,
    ):
        return resp.status == 200
