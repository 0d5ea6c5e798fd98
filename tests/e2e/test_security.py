"""Hostile input through a real Synapse: oversized transactions, secrets in endpoint
keys, endpoints that would hijack local models, private hosts (docs/operations.md,
"Security model")."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from hivebridge.app import Bridge
from hivebridge.config import Config, EndpointConfig
from hivebridge.inference.bundled import BUNDLED_MODEL_NAME
from tests.e2e.conftest import Homeserver
from tests.e2e.test_personas import bot_room, command
from tests.support.fake_endpoint import fake_endpoint
from tests.support.waiting import until

#: 60 kB: under Synapse's 64 KiB event limit with the event's other fields.
BODY_BYTES = 60_000


async def test_a_full_transaction_of_large_events_is_taken_in_one_batch(
    homeserver: Homeserver, bridge: Bridge, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the bridge is slow with one transaction, Synapse queues the next 100
    events and then sends them as one transaction of about 6 MB. Over aiohttp's
    default 1 MiB limit it was refused with 413, and Synapse retried it forever."""
    intake = bridge.parts.intake
    process = intake.process_transaction
    sizes: list[int] = []
    entered, release = asyncio.Event(), asyncio.Event()

    async def slow_once(txn_id: str, events: list[Any], **extra: Any) -> bool:
        sizes.append(len(events))
        if not entered.is_set():
            entered.set()
            await release.wait()
        return await process(txn_id, events, **extra)

    async with homeserver.owner() as owner:
        room = await bot_room(owner, bridge)
        monkeypatch.setattr(intake, "process_transaction", slow_once)
        first = await owner.send_text(room, "the bridge is slow with this one")
        await asyncio.wait_for(entered.wait(), 30)
        sent = [
            await owner.send_text(room, f"{i:03d} " + "x" * (BODY_BYTES - 4)) for i in range(100)
        ]
        release.set()
        released = time.monotonic()
        deadline = released + 120
        for event_id in [first, *sent]:
            while await bridge.parts.messages.get(event_id) is None:
                assert time.monotonic() < deadline, pushes_refused(homeserver)
                await asyncio.sleep(0.2)
        stored_s = time.monotonic() - released
    stored = await bridge.parts.messages.get(sent[-1])
    assert stored is not None and len(stored.body) == BODY_BYTES
    assert max(sizes) == 100, sizes  # one transaction carried all 100
    figures = {"transaction_events": max(sizes), "event_body_bytes": BODY_BYTES}
    figures |= {"released_to_stored_s": round(stored_s, 2), "load": os.getloadavg()}
    print("\n" + json.dumps(figures))


def pushes_refused(homeserver: Homeserver) -> str:
    """What Synapse said about the transactions it could not deliver (its log)."""
    lines = homeserver.synapse.log_path.read_text(errors="replace").splitlines()
    refused = [line for line in lines if "push_bulk" in line and "received code=" in line]
    return f"events never arrived; Synapse: {refused[-3:]}"


ENDPOINT_KEY = "sk-allowed-endpoint-key-4f3e2d1c"
#: Said in a DM with a persona on the local model: no endpoint may ever see it.
CANARY_DM = "canary-dm-7c1d0e55"
#: What the endpoint says in its errors: no room may ever see it.
CANARY_BODY = "CANARY-BODY-9a8b <a href='http://evil'>log in again</a>"


def is_reply(persona: str) -> Any:
    def check(e: dict[str, Any]) -> bool:
        content = e.get("content", {})
        return (
            e.get("sender") == persona
            and content.get("msgtype") == "m.text"
            and content.get("m.relates_to", {}).get("rel_type") != "m.replace"
        )

    return check


async def test_endpoints_from_a_room_get_no_secret_no_local_traffic_no_private_host(
    homeserver: Homeserver, bridge: Bridge, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A trusted user's endpoint that lists the local model's name, asks for the
    bridge's tokens as its key, sits on a private host and answers errors with text
    of its own. Before: it got the appservice token as its Bearer key, every request
    for the local model (DMs included), and its error text reached the room."""
    intake = bridge.parts.intake
    secrets = [intake.as_token, intake.hs_token, bridge.config.database_url()]
    # As a deployment would have them: the bridge's token in its environment, and an
    # operator's slip (an allowed name holding a secret of the bridge).
    monkeypatch.setenv("HIVEBRIDGE_AS_TOKEN", intake.as_token)
    monkeypatch.setenv("HIVEBRIDGE_ENDPOINT_KEY_STOLEN", intake.hs_token)
    monkeypatch.setenv("HIVEBRIDGE_ENDPOINT_KEY_EVIL", ENDPOINT_KEY)
    bot = bridge.config.bot_mxid
    persona = bridge.config.persona_mxid(bridge.config.default_persona.name)
    local = BUNDLED_MODEL_NAME
    async with (
        fake_endpoint(
            [local, "evil-model", "broken"], broken_model="broken", error_body=CANARY_BODY
        ) as fake,
        homeserver.owner() as owner,
    ):
        room = await bot_room(owner, bridge)
        url = fake.url
        # Loopback too, but not the allowed 127.0.0.1 (nothing listens there).
        other_loopback = url.replace("127.0.0.1", "127.0.0.2")
        for variable, why in (
            ("HIVEBRIDGE_AS_TOKEN", "is not allowed"),
            ("HIVEBRIDGE_ENDPOINT_KEY_STOLEN", "holds a secret of the bridge"),
            ("HOME", "is not allowed"),
        ):
            reply = await command(owner, room, f"!add_endpoint evil {url} env:{variable}", bot)
            assert why in reply, reply
        for target in ("http://169.254.169.254/latest", other_loopback):
            reply = await command(owner, room, f"!add_endpoint meta {target}", bot)
            assert "is a private address" in reply and "--private" in reply, reply
        assert fake.received == []  # nothing refused reached it

        added = await command(
            owner, room, f"!add_endpoint evil {url} env:HIVEBRIDGE_ENDPOINT_KEY_EVIL", bot
        )
        assert f"models: evil/{local}, evil/evil-model, evil/broken" in added, added
        assert "key from HIVEBRIDGE_ENDPOINT_KEY_EVIL" in added and "2d1c" not in added
        again = await command(owner, room, f"!add_endpoint evil {url}", bot)
        assert "Endpoint evil exists; !remove_endpoint evil first" in again, again
        async with await homeserver.human("helper") as helper:
            await command(owner, room, f"!trust {helper.user_id}", bot)
            helpers_room = await bot_room(helper, bridge)
            reply = await command(
                helper, helpers_room, f"!add_endpoint lh {other_loopback} --private", bot
            )
            assert "--private needs the owner role" in reply, reply
        reply = await command(owner, room, f"!add_endpoint lh {other_loopback} --private", bot)
        assert "Endpoint lh added" in reply, reply
        models = await command(owner, room, "!models", bot)
        assert f"1. {local} — local file" in models and f"evil/{local} — endpoint evil" in models

        # The persona's model is the local one: its DM stays on this machine.
        dm = await owner.create_room([persona], direct=True)
        await owner.wait_for_members(dm, {owner.user_id, persona})
        await owner.send_text(dm, f"Please remember the word {CANARY_DM}.")
        await owner.wait_for(dm, is_reply(persona), timeout=120)
        await bridge.parts.handler.drain()
        answer = await command(owner, room, f"!ask {local} Say hi. max_tokens=4", bot)
        assert answer.startswith(f"[{local}] ") and "unavailable" not in answer, answer
        assert fake.chat_requests() == []

        answer = await command(owner, room, "!ask evil/evil-model Say hi.", bot)
        assert answer.startswith("[evil/evil-model] Hello from the endpoint."), answer
        answer = await command(owner, room, "!ask evil/broken Say hi.", bot)
        assert "CANARY" not in answer and "endpoint evil unavailable" in answer, answer
        listing = await command(owner, room, "!endpoints", bot)
        assert "HTTP 500" in listing and "CANARY" not in listing, listing

        await owner.sync_once(0)
        for room_id in (room, dm):
            timeline = json.dumps(owner.timeline.get(room_id, []))
            assert ENDPOINT_KEY not in timeline and "2d1c" not in timeline
            assert all(secret not in timeline for secret in secrets)
    sent = [json.loads(r.body)["model"] for r in fake.chat_requests()]
    assert sent and set(sent) == {"evil-model", "broken"}  # ids as the endpoint lists them
    for secret in secrets:
        assert not fake.anything_holds(secret)
    assert not fake.anything_holds(CANARY_DM)
    assert {r.headers.get("Authorization") for r in fake.received} == {f"Bearer {ENDPOINT_KEY}"}


@asynccontextmanager
async def running(config: Config, homeserver: Homeserver) -> AsyncIterator[Bridge]:
    bridge = Bridge(config, homeserver.registration)
    try:
        await asyncio.wait_for(bridge.start(), 120)  # only a hang guard
        yield bridge
    finally:
        await bridge.stop()


async def test_a_stalled_endpoint_holds_up_neither_the_start_nor_commands(
    homeserver: Homeserver, tmp_path: Path
) -> None:
    """An endpoint that trickles: its model list never ends, its answers come a chunk
    a second. Before: the start waited for its model list forever (the bridge never
    listened), a reply on it ran as long as the endpoint liked, and a command in
    that room waited for the reply. Now the start does not wait, the reply ends at
    the deadline with a short notice, and the command answers while the reply runs."""
    async with (
        fake_endpoint(["m"], stall_models=True) as stalled,
        fake_endpoint(["m"], pieces=[" slow"] * 60, interval_s=1.0) as slow,
    ):
        config = replace(
            homeserver.config,
            data_dir=str(tmp_path / "bridge"),
            endpoints=(EndpointConfig("stall", stalled.url), EndpointConfig("slow", slow.url)),
            inference=replace(homeserver.config.inference, remote_deadline_s=8.0),
        )
        async with running(config, homeserver) as bridge:
            # Listening and ready, and the model list it would have waited for still comes.
            assert bridge.parts.intake.ready
            await until(lambda: stalled.in_flight == 1, "the stalled model list is asked for")
            plan = bridge.parts.inference.plan
            await until(lambda: bool(plan("slow/m")), "slow's models discovered")
            persona = bridge.config.persona_mxid(bridge.config.default_persona.name)
            name = bridge.config.default_persona.name
            async with homeserver.owner() as owner:
                dm = await owner.create_room([persona], direct=True)
                await owner.wait_for_members(dm, {owner.user_id, persona})
                done = await command(owner, dm, f"!persona set {name} model slow/m", persona)
                assert done == f"Set model of {name}.", done
                await owner.send_text(dm, "Tell me a long story.")
                await until(lambda: slow.in_flight == 1, "the reply is streaming")
                listing = await command(owner, dm, "!endpoints", persona)
                assert "stall (config)" in listing and "slow (config)" in listing, listing
                assert slow.in_flight == 1  # answered while the reply was still running
                failed = await owner.wait_for(
                    dm, lambda e: "could not answer" in e.get("content", {}).get("body", "")
                )
                body = failed["content"]["body"]
                assert body == "⚠️ I could not answer: endpoint slow: no complete answer within 8s"
